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

__all__ = ["Positions", "RopeUnresolved", "gather_bias", "grid_carry", "positions", "rope_rows", "rope_slope"]


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


class RopeUnresolved(ValueError):
    """The per-step rotary angle cannot be told apart from its aliases (nothing is changed)."""


def rope_slope(table: Tensor, grid: tuple[int, int], nominal: Tensor, scale: float = 1.0) -> Tensor:
    """The rotary angle added per grid step, (..., D, 2) for (row, col), from a table (..., H*W, 2D).

    ``table`` is what timm's attention reads (``apply_rot_embed_cat``: ``[sin ; cos]`` of D angles
    per cell), its angles affine in the cell's (row, col). A table holds each angle modulo 2 pi only,
    so its per-step difference is known modulo 2 pi too, and on a small grid the true step exceeds pi
    (EVA02 and Perception Encoder scale cells to a fixed reference grid, DINOv3 to [-1, 1]): reading
    the step as the angle in (-pi, pi] then turns a merged token by the wrong angle. ``nominal``
    (..., D, 2), the closed-form step of the rope's frequencies at the unaugmented grid, names the
    branch: the slope is the table's own difference plus the multiple of 2 pi that brings it nearest
    ``nominal`` times the axis' coordinate scale ``s``. Coordinate augmentation in training scales
    each axis by an unknown ``s`` in [1 / scale, scale]; ``s`` is read off the channels whose branch
    is already certain, lowest frequency first. The result keeps the table's gradient (the branch is
    a constant).

    Raises ``RopeUnresolved`` when a branch stays uncertain (augmentation too strong for the lowest
    frequency) or when the table's steps disagree with ``nominal`` (a rope whose closed form differs).
    An axis of length 1 has slope 0 (no token moves along it).
    """
    sin, cos = table.float().chunk(2, dim=-1)
    theta = torch.atan2(sin, cos).unflatten(-2, grid)  # (..., H, W, D)
    noise = max(1e-3, 8 * torch.finfo(table.dtype).eps)  # the error of an angle read from the table
    axes = []
    for axis, length in enumerate(grid):
        if length == 1:  # a one-row (or one-column) grid has no neighbour along this axis to read a step from
            axes.append(torch.zeros_like(theta[..., 0, 0, :]))
            continue
        step = theta[..., 1, 0, :] if axis == 0 else theta[..., 0, 1, :]
        wrapped = torch.remainder(step - theta[..., 0, 0, :] + math.pi, 2 * math.pi) - math.pi
        with torch.no_grad():
            name = "row" if axis == 0 else "column"
            turns = _turns(wrapped.detach(), nominal[..., axis].to(wrapped), scale, noise, name)
        axes.append(wrapped + 2 * math.pi * turns)
    return torch.stack(axes, dim=-1)


def _turns(wrapped: Tensor, nominal: Tensor, scale: float, noise: float, axis: str) -> Tensor:
    """How many whole turns (..., D) to add to each wrapped step so that it is the true one.

    The true step is ``nominal * s`` for one unknown ``s`` with ``|s - estimate| <= spread`` (s = 1
    without augmentation: one vectorised rounding). Under augmentation, the channels whose
    prediction is certain within pi / 2 take the nearest branch, and the most precise channel
    resolved so far narrows ``s`` for the next round.
    """
    flat_w, flat_n = wrapped.reshape(-1), nominal.reshape(-1)
    estimate = 1.0
    turns = torch.round((flat_n - flat_w) / (2 * math.pi))
    if scale > 1:
        magnitude = flat_n.abs()
        resolved = torch.zeros_like(flat_w, dtype=torch.bool)
        spread = scale - 1.0
        while not bool(resolved.all()):
            ready = ~resolved & (magnitude * spread + noise < math.pi / 2)
            if not bool(ready.any()):
                raise RopeUnresolved(
                    f"the rotary's per-step {axis} angle cannot be told apart from its aliases under coordinate "
                    f"augmentation up to x{scale:g}; use merge_position='destination', or train without the "
                    f"rope's jitter / rescale augmentation"
                )
            turns[ready] = torch.round((flat_n[ready] * estimate - flat_w[ready]) / (2 * math.pi))
            resolved |= ready
            best = torch.where(resolved, magnitude, torch.zeros_like(magnitude)).argmax()
            if magnitude[best] > 0:
                estimate = float((flat_w[best] + 2 * math.pi * turns[best]) / flat_n[best])
                spread = noise / float(magnitude[best])
    residual = (flat_n * estimate - flat_w - 2 * math.pi * turns).abs().max()
    if residual > math.pi / 4:
        raise RopeUnresolved(
            f"the rotary table's per-step {axis} angles differ from the closed form of its frequencies by up to "
            f"{float(residual):.3g} rad, so a merged token's rotary at its mean coordinate is unknown; use "
            f"merge_position='destination'"
        )
    return turns.reshape(wrapped.shape)


def rope_rows(table: Tensor, pos: Positions, width: int, slope: Tensor | None) -> Tensor:
    """The rotary rows (B, 1 or heads, M, 2D) of the tokens at ``pos``, from a table (N0, 2D) or (heads, N0, 2D).

    Without ``slope`` each token reads its cell's row. With ``slope`` (``rope_slope``), a token at
    coordinate ``coord`` reads the row of the cell nearest it and turns it by ``slope @ (coord -
    nearest)`` (at most half a step per axis inside the grid): the rotary at its coordinate. A token
    whose coordinate is a cell, its own or not, turns by exactly 0 and gets that cell's row, bit for bit.
    """
    cell = pos.cell
    if slope is not None:
        height = table.shape[-2] // width
        rounded = pos.coord.round()
        nearest = torch.stack([rounded[..., 0].clamp(0, height - 1), rounded[..., 1].clamp(0, width - 1)], dim=-1)
        cell = (nearest[..., 0] * width + nearest[..., 1]).long()  # (B, M)
    b, m = cell.shape
    rows = table.index_select(-2, cell.reshape(-1)).unflatten(-2, (b, m))  # (..., B, M, 2D)
    rows = rows.movedim(-3, 0)  # (B, ..., M, 2D)
    if table.dim() == 2:
        rows = rows.unsqueeze(1)  # (B, 1, M, 2D): broadcast over heads
    if slope is None:
        return rows
    offset = pos.coord - nearest  # (B, M, 2)
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
