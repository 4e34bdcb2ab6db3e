"""Where the patch tokens of a reduced ViT stand on their grid: cells, coordinates, rotary rows, BEiT bias.

Pure torch, no model: the position maths of ``timm_eva``, kept apart so that it can be tested like the
core. A token's place is its grid cell (the row of the position tables it reads) and its (row, col)
coordinate, which a merged token may hold at a fractional, size-weighted mean. ``grid_carry`` and
``positions`` convert to and from the per-token carry that ``_loop.run_blocks`` moves through every
reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Positions", "gather_bias", "grid_carry", "positions", "rope_rows", "rope_slope"]


@dataclass
class Positions:
    """Where each patch token (the M non-prefix tokens) stands on the (H, W) patch grid.

    cell: (B, M) long, the row-major grid cell whose embedding row the token reads (its own, or the
    destination's after a merge). coord: (B, M, 2) float32 (row, col): the cell's, or with
    ``merge_position="mean"`` the size-weighted mean coordinate of the original tokens it stands for.
    """

    cell: Tensor
    coord: Tensor

    @staticmethod
    def grid(batch: int, grid: tuple[int, int], device: torch.device) -> Positions:
        cell = torch.arange(grid[0] * grid[1], device=device).expand(batch, -1)
        return Positions(cell, _cell_coord(cell, grid[1]))


def _cell_coord(cell: Tensor, width: int) -> Tensor:
    """(B, M) row-major cells -> (B, M, 2) float32 (row, col)."""
    return torch.stack([cell.div(width, rounding_mode="floor"), cell % width], dim=-1).float()


def grid_carry(batch: int, protected: int, grid: tuple[int, int], device: torch.device, mean: bool) -> tuple[Tensor, ...]:
    """The loop's carry for tokens at their own cells: cell (B, N) long and, for ``"mean"``, coord (B, N, 2).

    The ``protected`` prefix rows are zeros (prefix tokens never move and have no cell).
    """
    pos = Positions.grid(batch, grid, device)
    cell = torch.cat([pos.cell.new_zeros(batch, protected), pos.cell], dim=1)
    if not mean:
        return (cell,)
    return cell, torch.cat([pos.coord.new_zeros(batch, protected, 2), pos.coord], dim=1)


def positions(carry: tuple[Tensor, ...], protected: int, width: int) -> Positions:
    """The patch tokens' ``Positions`` from the loop's carry (``"destination"`` carries cells alone)."""
    cell = carry[0][:, protected:]
    return Positions(cell, carry[1][:, protected:] if len(carry) > 1 else _cell_coord(cell, width))


# ---------------------------------------------------------------------------------------------
# rotary rows (EVA)
# ---------------------------------------------------------------------------------------------


def rope_slope(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """The rotary angle added per grid step, (..., D, 2) for (row, col), from a table (..., H*W, 2D).

    ``table`` is what timm's attention reads (``apply_rot_embed_cat``: ``[sin ; cos]`` of D angles
    per cell). The angles are affine in the cell's (row, col); each step is read as the angle in
    (-pi, pi] that turns cell (0, 0) into (1, 0) and (0, 1); an axis of length 1 has slope 0.
    """
    sin, cos = table.float().chunk(2, dim=-1)
    theta = torch.atan2(sin, cos).unflatten(-2, grid)  # (..., H, W, D)
    zero = torch.zeros_like(theta[..., 0, 0, :])

    def step(delta: Tensor) -> Tensor:
        return torch.remainder(delta + math.pi, 2 * math.pi) - math.pi

    rows = step(theta[..., 1, 0, :] - theta[..., 0, 0, :]) if grid[0] > 1 else zero
    cols = step(theta[..., 0, 1, :] - theta[..., 0, 0, :]) if grid[1] > 1 else zero
    return torch.stack([rows, cols], dim=-1)


def rope_rows(table: Tensor, pos: Positions, width: int, slope: Tensor | None) -> Tensor:
    """The rotary rows (B, 1 or heads, M, 2D) of the tokens at ``pos``, from a table (N0, 2D) or (heads, N0, 2D).

    Each token reads its cell's row; with ``slope`` (``rope_slope``), the row is turned on by the
    angle ``slope @ (coord - cell)`` (a merged token at its mean coordinate). A token at its own
    cell turns by exactly 0, so its row is the table's, bit for bit.
    """
    b, m = pos.cell.shape
    rows = table.index_select(-2, pos.cell.reshape(-1)).unflatten(-2, (b, m))  # (..., B, M, 2D)
    rows = rows.movedim(-3, 0)  # (B, ..., M, 2D)
    if table.dim() == 2:
        rows = rows.unsqueeze(1)  # (B, 1, M, 2D): broadcast over heads
    if slope is None:
        return rows
    offset = pos.coord - _cell_coord(pos.cell, width)  # (B, M, 2)
    if slope.dim() == 2:
        slope = slope.unsqueeze(0)  # (1, D, 2)
    angle = torch.einsum("bmk,hdk->bhmd", offset, slope)  # (B, 1 or heads, M, D)
    sin, cos = rows.float().chunk(2, dim=-1)
    turn_sin, turn_cos = angle.sin(), angle.cos()
    turned = torch.cat([sin * turn_cos + cos * turn_sin, cos * turn_cos - sin * turn_sin], dim=-1)
    return turned.to(rows.dtype)

def gather_bias(bias: Tensor, cells: Tensor) -> Tensor:
    """Rows and columns ``cells`` (B, N) of a bias (heads, N0 + 1, N0 + 1): (B, heads, N, N)."""
    h = bias.shape[0]
    b, n = cells.shape
    rows = bias.index_select(1, cells.reshape(-1)).unflatten(1, (b, n))  # (heads, B, N, N0 + 1)
    rows = rows.transpose(0, 1)  # (B, heads, N, N0 + 1)
    return rows.gather(3, cells[:, None, None, :].expand(b, h, n, n))
