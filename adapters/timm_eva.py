"""timm's ViTs with positions inside attention: ``Eva`` (EVA, EVA02, DINOv3, Perception Encoder, ViT-RoPE) and ``Beit``.

``timm.models.eva.Eva`` gives patch tokens rotary position embeddings (RoPE) in every attention;
``timm.models.beit.Beit`` adds a learned relative position bias. Both read each token's grid cell
inside every block, so a reducing loop must carry, for every patch token, where it stands:

* pruning keeps each survivor's position: its rotary row, its bias rows and columns;
* merging gives the merged token a position, ``merge_position``:
  ``"mean"`` (default): the size-weighted mean of the grid coordinates of the tokens it stands for.
  RoPE at a fractional coordinate is exact: the rotary angles are affine in the (row, col) cell (all
  of timm's rope kinds: ``cat``, ``dinov3``, ``mixed``, per call coordinate augmentation included),
  so the merged token's row is the destination's row rotated by ``slope @ (mean - cell)``, with the
  per-step slope read off the model's own table (needs every frequency under pi per patch step, true
  of every timm config at its native grid). For BEiT the mean is rounded to the nearest cell: its
  bias table is learned at integer offsets only, and interpolating it would cost four gathers of a
  (B, H, N, N) bias per block for a position BEiT never saw.
  ``"destination"``: the position of the token the others merge into (ToMe's B token).

Measured (``python -m benchmarks.merge_position``: tiny ViTs, 64 tokens, no absolute position
embedding, trained 300 steps to regress the displacement between two blobs, one seed, 256 test
images): mean distance in patches between the reduced and the unreduced model's answers, mean /
destination. EVA02-like (RoPE ``cat``, unreduced error 0.37): merge 0.3 at blocks 1, 2: 0.82 / 1.06;
ToMe r=8 every block: 0.82 / 0.93; prune 0.2 + merge 0.3: 1.18 / 1.36 (feature cosine 0.974 / 0.955,
0.976 / 0.970, 0.952 / 0.931). DINOv3-like (RoPE ``dinov3``, 4 registers, error 0.51): 0.24 / 0.27,
0.42 / 0.58, 0.68 / 0.69. The PE-like and BEiT models did not learn the task in 300 steps (error
2.3 and 3.4 against 3.6 for a constant answer) and show no difference (BEiT: 0.32 / 0.32, 0.63 /
0.62); on random weights the two agree to 0.003 in cosine. So ``"mean"`` is the default; for BEiT
the measurement does not decide, and ``"mean"`` (rounded) keeps one rule for both families.

Register tokens and [CLS] (``num_prefix_tokens``) are protected: never pruned or merged, and no
rotary (as timm). Relevance, merge metric, ``merge_schedule`` and pooling by sizes follow
``_vit`` and ``timm``: the metric is the keys the attention used (after q/k norm and rotary),
captured from ``attn.q_norm`` / ``attn.k_norm`` (EVA) or recomputed from ``attn.qkv`` (BEiT's attention
calls its projection through ``F.linear``; 2 N C^2 extra FLOPs at each reduce block).

What runs: the library's own blocks (``blk(x, rope=..., attn_mask=bias)`` for EVA;
``blk(x, shared_rel_pos_bias=...)`` for BEiT, whose ``attn`` instances switch to a subclass that
gathers its relative bias for the surviving cells) at plain blocks, and their sub-modules at reduce
blocks. The root's class switches to a subclass overriding ``forward_features`` (the embedding steps
of timm 1.0, then the loop), ``pool`` (EVA) or ``forward_head`` (BEiT, which pools inline), and
``forward_intermediates`` (refused while reducing). Patch dropout in training is refused while
reducing: timm's ``_pos_embed`` does not hand back which cells it kept.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import timm
import torch
import torch.nn.functional as F
from packaging.version import Version
from timm.layers import AttentionPoolLatent, AttentionRope
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import Tensor, nn

from pumer_patch.core import (
    Mode,
    Tokens,
    apply_merge,
    attention_bias,
    gather_tokens,
    merge_plan,
    prune_count,
    prune_indices,
    take_rows,
)
from pumer_patch.ratios import Ratios

from ._loop import CallScope, Loop, Policy, key_bias, start
from ._vit import (
    Attended,
    VitOptions,
    _block_ratios,
    attention_relevance,
    reduces,
    remember_sizes,
    resolve_vit_options,
    sizes_of,
    weighted_mean,
)
from .base import STATE_ATTR, Adapter, PatchState, Trace, ensure_class

__all__ = [
    "TimmEvaAdapter", "EvaOptions", "Positions", "PumerEva", "PumerBeit", "PumerBeitAttention",
    "rope_slope", "rope_rows",
]

_TESTED = (Version("1.0"), Version("2"))
_SUPPORTED = "timm Eva (EVA, EVA02, DINOv3, Perception Encoder, ViT-RoPE) and Beit"

MergePosition = Literal["mean", "destination"]


@dataclass(frozen=True)
class EvaOptions:
    """``VitOptions`` (``merge_schedule``, ``relevance``) and where a merged token stands (module docstring)."""

    merge_schedule: int | Sequence[int] | None = None
    relevance: Literal["auto", "cls", "received"] = "auto"
    merge_position: MergePosition = "mean"


# ---------------------------------------------------------------------------------------------
# positions on the patch grid
# ---------------------------------------------------------------------------------------------


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


def _reduce(
    tokens: Tokens,
    pos: Positions | None,
    relevance: Tensor | None,
    metric: Tensor,
    ratios: Ratios,
    protected: int,
    merge_position: MergePosition,
    grid: tuple[int, int],
) -> tuple[Tokens, Positions | None, bool]:
    """``core.reduce_tokens``'s default-mode step (prune, then merge), carrying the positions along.

    The core's step hands back no merge plan, which the positions need; this one calls the same
    primitives with the same counts. ``pos`` None: every token at its own cell, kept so while
    nothing is removed (the library's own position arguments then run). Returns the tokens, their
    positions and whether a merge happened.
    """
    n = tokens.count
    n_keep = n - prune_count(n, ratios.prune, protected)
    r = round(ratios.merge * (n - protected))  # of the tokens before pruning, as the core counts
    if n_keep < n:
        pos = pos if pos is not None else Positions.grid(tokens.x.shape[0], grid, tokens.x.device)
        keep = prune_indices(relevance, n_keep, protected, keep_order=True, mask=tokens.mask)
        tokens, metric = gather_tokens(tokens, keep), take_rows(metric, keep)
        patches = keep[:, protected:] - protected  # (B, K - protected) into the patch tokens
        pos = Positions(pos.cell.gather(1, patches), take_rows(pos.coord, patches))
    plan = merge_plan(metric, r, protected, keep_order=True, mask=tokens.mask)
    if plan is None:
        return tokens, pos, False
    pos = pos if pos is not None else Positions.grid(tokens.x.shape[0], grid, tokens.x.device)
    kept = plan.kept[:, protected:] - protected
    cell = pos.cell.gather(1, kept)
    if merge_position == "mean":
        padded = torch.cat([pos.coord.new_zeros(pos.coord.shape[0], protected, 2), pos.coord], dim=1)  # (B, N, 2)
        size = tokens.size if tokens.size is not None else torch.ones_like(padded[..., 0])
        coord = apply_merge(Tokens(padded, size=size), plan).x[:, protected:]
    else:
        coord = take_rows(pos.coord, kept)
    return apply_merge(tokens, plan), Positions(cell, coord), True


# ---------------------------------------------------------------------------------------------
# EVA: rotary rows for the surviving tokens
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


_CAPTURE: ContextVar[dict[int, Tensor] | None] = ContextVar("pumer_eva_capture", default=None)


@contextmanager
def _captured(*modules: nn.Module) -> Iterator[dict[int, Tensor]]:
    """Inside the ``with`` block, ``captured[i]`` is what ``modules[i]`` returned in this call.

    The hooks see every caller of the modules; they write only where this context set the dict, so
    another thread's forward of the same model (which has no dict, or its own) is never read.
    """
    captured: dict[int, Tensor] = {}

    def hook(i: int) -> Callable[..., None]:
        def write(_module: nn.Module, _inputs: tuple[Any, ...], out: Tensor) -> None:
            target = _CAPTURE.get()
            if target is captured:
                target[i] = out

        return write

    handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(modules)]
    token = _CAPTURE.set(captured)
    try:
        yield captured
    finally:
        _CAPTURE.reset(token)
        for handle in handles:
            handle.remove()


def _eva_plain(block: nn.Module, x: Tensor, rope: Tensor | None, bias: Tensor | None) -> Tensor:
    return block(x, rope=rope, attn_mask=bias)


def _eva_attend(block: nn.Module, x: Tensor, rope: Tensor | None, bias: Tensor | None, rows: slice | None) -> Attended:
    """The attention half of ``EvaBlock`` / ``EvaBlockPostNorm``, with the q/k the attention used.

    q and k are the ``q_norm`` / ``k_norm`` outputs (B, H, N, d), turned by ``rope`` past the prefix
    as ``attn`` turns them; grouped-query keys are repeated to the query heads.
    """
    attn = block.attn
    with _captured(attn.q_norm, attn.k_norm) as captured:
        if isinstance(block, EvaBlockPostNorm):
            x = x + block.drop_path1(block.norm1(attn(x, rope=rope, attn_mask=bias)))
        else:
            out = attn(block.norm1(x), rope=rope, attn_mask=bias)
            x = x + block.drop_path1(out if block.gamma_1 is None else block.gamma_1 * out)
    q, k = captured[0], captured[1]
    if rope is not None:
        npt, half = attn.num_prefix_tokens, attn.rotate_half
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention: (B, H, N, d)
    return Attended(x, None if rows is None else q[:, :, rows], k, attn.scale)


def _eva_finish(block: nn.Module, x: Tensor) -> Tensor:
    if isinstance(block, EvaBlockPostNorm):
        return x + block.drop_path2(block.norm2(block.mlp(x)))
    out = block.mlp(block.norm2(x))
    return x + block.drop_path2(out if block.gamma_2 is None else block.gamma_2 * out)


# ---------------------------------------------------------------------------------------------
# BEiT: relative bias for the surviving cells
# ---------------------------------------------------------------------------------------------

# the cells (B, N) of this block's tokens, [CLS] as 0 and patch cell c as c + 1, in the layout of
# BEiT's relative_position_index; set around each block call, so a checkpoint recompute sets it again
_BEIT_CELLS: CallScope[Tensor] = CallScope("pumer_beit_cells")


def _gather_bias(bias: Tensor, cells: Tensor) -> Tensor:
    """Rows and columns ``cells`` (B, N) of a bias (heads, N0 + 1, N0 + 1): (B, heads, N, N)."""
    h = bias.shape[0]
    b, n = cells.shape
    rows = bias.index_select(1, cells.reshape(-1)).unflatten(1, (b, n))  # (heads, B, N, N0 + 1)
    rows = rows.transpose(0, 1)  # (B, heads, N, N0 + 1)
    return rows.gather(3, cells[:, None, None, :].expand(b, h, n, n))


class PumerBeitAttention(BeitAttention):
    """BEiT's ``Attention`` whose own relative bias covers the cells of this call's tokens.

    Inside a reducing loop's block call the cells come from ``_BEIT_CELLS``; anywhere else (the
    library's forward, an unreduced call) it is timm's bias, unchanged.
    """

    _pumer_patched = True

    def _get_rel_pos_bias(self) -> Tensor:
        full = super()._get_rel_pos_bias()  # (1, heads, N0 + 1, N0 + 1)
        cells = _BEIT_CELLS.get(getattr(self, "_pumer_state", None))
        return full if cells is None else _gather_bias(full[0], cells)


class _BeitWhere(NamedTuple):
    """A BEiT block's positional arguments: cells (B, N) and the shared bias gathered for them (or None)."""

    cells: Tensor
    shared: Tensor | None


def _beit_bias(where: _BeitWhere | None, shared_full: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """``shared_rel_pos_bias`` for a block: the shared bias (for the cells) plus the size bias."""
    shared = shared_full if where is None else where.shared
    if shared is None or bias is None:
        return bias if shared is None else shared
    return shared + bias  # (heads or B, heads, N, N) + (B, 1, 1, N)


@contextmanager
def _beit_cells(block: nn.Module, where: _BeitWhere | None) -> Iterator[None]:
    state = getattr(block.attn, "_pumer_state", None)
    if where is None or state is None:
        yield
        return
    with _BEIT_CELLS.open(state, where.cells):
        yield


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


class _Family(NamedTuple):
    """What differs between EVA and BEiT in the loop.

    where(i, pos): block i's positional argument for tokens at ``pos`` (None: all at their own
    cells, the library's own). plain(block, x, where, bias) -> x. attend(block, x, where, bias, rows)
    -> (Attended, logit bias (B, heads, Q or 1, N) for the relevance or None). finish(block, x) -> x.
    """

    where: Callable[[int, Positions | None], Any]
    plain: Callable[[nn.Module, Tensor, Any, Tensor | None], Tensor]
    attend: Callable[[nn.Module, Tensor, Any, Tensor | None, slice | None], tuple[Attended, Tensor | None]]
    finish: Callable[[nn.Module, Tensor], Tensor]


def _reduce_block(
    block: nn.Module,
    tokens: Tokens,
    pos: Positions | None,
    where: Any,
    bias: Tensor | None,
    ratios: Ratios,
    family: _Family,
    protected: int,
    cls_row: bool,
    merge_position: MergePosition,
    grid: tuple[int, int],
) -> tuple[Tokens, Positions | None, bool]:
    """Attention half, relevance and metric, ``_reduce``, MLP half (``_vit._reduce_block`` with positions)."""
    prune = ratios.prune > 0
    rows = None if not prune else (slice(0, 1) if cls_row else slice(protected, None))
    att, logit_bias = family.attend(block, tokens.x, where, bias, rows)
    relevance = None
    with torch.no_grad():  # indices only
        if prune:
            weights = None if cls_row or tokens.size is None else tokens.size[:, protected:]
            relevance = attention_relevance(att.q, att.k, att.scale, logit_bias, weights)
        metric = att.k.mean(dim=1)  # (B, H, N, d) -> (B, N, d): keys averaged over heads
    reduced, pos, merged = _reduce(
        replace(tokens, x=att.x), pos, relevance, metric, ratios, protected, merge_position, grid
    )
    return replace(reduced, x=family.finish(block, reduced.x)), pos, merged


def _run_blocks(
    blocks: Sequence[nn.Module],
    x: Tensor,
    state: PatchState,
    family: _Family,
    protected: int,
    grid: tuple[int, int],
    checkpointing: bool,
) -> tuple[Tokens, Trace]:
    """Run ``blocks`` on x (B, N, C), reducing at the planned blocks; positions travel with the tokens."""
    plan = state.plan
    policy = Policy.of(plan.mode)
    loop = Loop(plan, checkpointing)
    tokens = start(policy, x, source=plan.trace)
    pos: Positions | None = None  # None until the first reduction: every token at its own cell
    cls_row = plan.options.relevance == "cls"
    bias: Tensor | None = None
    for i, block in enumerate(blocks):
        ratios = _block_ratios(plan, i, tokens.count, protected)
        where = family.where(i, pos)
        if ratios is None:
            tokens = replace(tokens, x=loop.run(family.plain, block, tokens.x, where, bias))
            continue
        tokens, pos, merged = loop.run(
            _reduce_block, block, tokens, pos, where, bias, ratios, family, protected, cls_row,
            plan.options.merge_position, grid,
        )
        if merged or bias is not None:
            bias = key_bias(policy, [tokens], x.dtype)
        loop.count(i, tokens)
    return tokens, loop.trace(tokens, grid=grid)


def _grid_of(root: nn.Module, embedded: Tensor) -> tuple[int, int]:
    """The patch grid (H, W): from the NHWC patch embedding (dynamic image size) or the patch embed."""
    if embedded.dim() == 4:
        return tuple(embedded.shape[1:3])
    return tuple(root.patch_embed.grid_size)


def _refuse_masks(attn_mask: Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError(
            "attn_mask / is_causal cover the original tokens, which a pumer_patch-reduced ViT does not keep; "
            "call without them, or pumer_patch.remove(model) first"
        )


def _eva_family(root: Eva, rope: Tensor | None, grid: tuple[int, int], merge_position: MergePosition) -> _Family:
    """EVA's loop pieces for one forward.

    rope: ``_pos_embed``'s table, (N0, 2D), or one per block (depth, heads, N0, 2D) for mixed RoPE.
    """
    mixed = getattr(root, "rope_mixed", False) and rope is not None
    slopes: dict[int, Tensor] = {}

    def table(i: int) -> Tensor | None:
        return rope[i] if mixed else rope

    def where(i: int, pos: Positions | None) -> Tensor | None:
        t = table(i)
        if t is None or pos is None:
            return t
        slope = None
        if merge_position == "mean":
            key = i if mixed else 0
            if key not in slopes:
                slopes[key] = rope_slope(t, grid)
            slope = slopes[key]
        return rope_rows(t, pos, grid[1], slope)

    def attend(block: nn.Module, x: Tensor, where: Tensor | None, bias: Tensor | None,
               rows: slice | None) -> tuple[Attended, Tensor | None]:
        return _eva_attend(block, x, where, bias, rows), bias

    return _Family(where, _eva_plain, attend, _eva_finish)


def _beit_family(root: Beit, shared_full: Tensor | None) -> _Family:
    """BEiT's loop pieces for one forward; ``shared_full`` is ``rel_pos_bias()`` (heads, N0 + 1, N0 + 1) or None."""
    width = root.patch_embed.grid_size[1]
    positional = shared_full is not None or any(b.attn.relative_position_bias_table is not None for b in root.blocks)

    def where(i: int, pos: Positions | None) -> _BeitWhere | None:
        if pos is None or not positional:
            return None
        # a merged token's mean coordinate, rounded to the nearest cell (the bias is learned per cell offset)
        rounded = pos.coord.round().long()
        cells = torch.cat([pos.cell.new_zeros(pos.cell.shape[0], 1), 1 + rounded[..., 0] * width + rounded[..., 1]], 1)
        return _BeitWhere(cells, None if shared_full is None else _gather_bias(shared_full, cells))

    def plain(block: nn.Module, x: Tensor, where: _BeitWhere | None, bias: Tensor | None) -> Tensor:
        with _beit_cells(block, where):
            return block(x, shared_rel_pos_bias=_beit_bias(where, shared_full, bias))

    def attend(block: nn.Module, x: Tensor, where: _BeitWhere | None, bias: Tensor | None,
               rows: slice | None) -> tuple[Attended, Tensor | None]:
        attn: BeitAttention = block.attn
        h = block.norm1(x)
        shared = _beit_bias(where, shared_full, bias)
        with _beit_cells(block, where):
            out = attn(h, shared_rel_pos_bias=shared)
            has_own = attn.relative_position_bias_table is not None
            own = attn._get_rel_pos_bias() if rows is not None and has_own else None
        x = x + block.drop_path1(out if block.gamma_1 is None else block.gamma_1 * out)
        # BEiT's attention projects through F.linear (no module call to read): recompute k, and q for the rows
        inner = attn.qkv.weight.shape[0] // 3
        k = F.linear(h, attn.qkv.weight[inner: 2 * inner], attn.k_bias)
        k = k.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (B, N, A) -> (B, H, N, d)
        if rows is None:
            return Attended(x, None, k, attn.scale), None
        q = F.linear(h[:, rows], attn.qkv.weight[:inner], attn.q_bias)
        q = q.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (B, Q, A) -> (B, H, Q, d)
        logits = None  # the position biases of the query rows, and the key bias: (B, H, Q, N)
        for part in (own, shared):
            if part is not None:
                part = part[..., rows, :] if part.shape[-2] > 1 else part
                logits = part if logits is None else logits + part
        return Attended(x, q, k, attn.scale), logits

    def finish(block: nn.Module, x: Tensor) -> Tensor:
        out = block.mlp(block.norm2(x))
        return x + block.drop_path2(out if block.gamma_2 is None else block.gamma_2 * out)

    return _Family(where, plain, attend, finish)


# ---------------------------------------------------------------------------------------------
# the patched roots
# ---------------------------------------------------------------------------------------------


def _eva_forward_features(
    eva: Eva, library: Callable[..., Tensor], x: Tensor, attn_mask: Tensor | None, is_causal: bool
) -> Tensor:
    """``Eva.forward_features`` (B, 3, H, W) -> (B, N', C); the features remember their token sizes."""
    state: PatchState = getattr(eva, STATE_ATTR)
    if not reduces(state.plan):
        state.last = Trace()
        return library(x, attn_mask=attn_mask, is_causal=is_causal)
    _refuse_masks(attn_mask, is_causal)
    if eva.patch_drop is not None and eva.training:
        raise ValueError(
            "patch dropout (patch_drop_rate) in training drops cells that timm's _pos_embed does not name, so a "
            "pumer_patch-reduced Eva cannot place its tokens; train with patch_drop_rate=0, or remove the patch"
        )
    embedded = eva.patch_embed(x)
    grid = _grid_of(eva, embedded)
    x, rope = eva._pos_embed(embedded)
    x = eva.norm_pre(x)
    family = _eva_family(eva, rope, grid, state.plan.options.merge_position)
    checkpointing = eva.grad_checkpointing and torch.is_grad_enabled()
    tokens, state.last = _run_blocks(eva.blocks, x, state, family, eva.num_prefix_tokens, grid, checkpointing)
    return remember_sizes(eva.norm(tokens.x), tokens.size)


def _merges(root: nn.Module) -> bool:
    plan = getattr(root, STATE_ATTR).plan
    return plan.options.merge_schedule is not None or any(r.merge > 0 for r in plan.schedule.values())


def _unknown_sizes(root: nn.Module, what: str) -> ValueError:
    return ValueError(
        "these features are not the tensor this pumer_patch-reduced model's forward_features returned "
        "(detached, sliced, copied or from elsewhere), so their merged tokens' sizes are unknown and the "
        f"{what} pooling would weigh them wrongly; pass forward_features' output as it is"
    )


def _eva_pool(eva: Eva, library: Callable[..., Tensor], x: Tensor, pool_type: str | None) -> Tensor:
    """``Eva.pool`` (B, N', C) -> (B, C), counting each token by its size where the pooling averages."""
    pool_type = eva.global_pool if pool_type is None else pool_type
    latent = isinstance(eva.attn_pool, AttentionPoolLatent)
    averages = latent or pool_type in ("avg", "avgmax")
    size = sizes_of(x)
    if size is None:
        if averages and _merges(eva):
            raise _unknown_sizes(eva, pool_type or "attention")
        return library(x, pool_type)
    if latent:  # timm's Eva pools prefix tokens too
        return eva.attn_pool(x, attn_mask=attention_bias(size, None, x.dtype))
    if pool_type in ("avg", "avgmax"):
        start = eva.num_prefix_tokens
        mean = weighted_mean(x[:, start:], size[:, start:])
        return mean if pool_type == "avg" else 0.5 * (x[:, start:].amax(dim=1) + mean)
    return library(x, pool_type)


def _forward_intermediates(root: nn.Module, library: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if reduces(getattr(root, STATE_ATTR).plan):
        raise ValueError(
            "forward_intermediates (and features_only models) return feature maps on the full patch grid, which a "
            "pumer_patch-reduced ViT does not keep; pumer_patch.remove(model) first, or use forward_features"
        )
    return library(*args, **kwargs)


def _no_script(root: nn.Module) -> None:
    raise TypeError(
        "torch.jit.script cannot compile a pumer_patch-patched timm model (its loop uses data-dependent Python); "
        "use torch.compile, or pumer_patch.remove(model) before scripting"
    )


class PumerEva(Eva):
    """``Eva`` whose features come from the reducing loop; see the module docstring."""

    _pumer_patched = True

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return _eva_forward_features(self, super().forward_features, x, attn_mask, is_causal)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        return _eva_pool(self, super().pool, x, pool_type)

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        return _forward_intermediates(self, super().forward_intermediates, *args, **kwargs)

    def __prepare_scriptable__(self) -> nn.Module:
        _no_script(self)
        return self


class PumerBeit(Beit):
    """``Beit`` whose features come from the reducing loop and whose head pools by token sizes.

    ``forward_features`` and ``forward_head`` repeat timm 1.0's embedding and head lines around the
    loop and the size-weighted mean (BEiT pools inline, with no ``pool`` to wrap).
    """

    _pumer_patched = True

    def forward_features(self, x: Tensor) -> Tensor:
        state: PatchState = getattr(self, STATE_ATTR)
        if not reduces(state.plan):
            state.last = Trace()
            return super().forward_features(x)
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        shared = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        family = _beit_family(self, shared)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        grid = tuple(self.patch_embed.grid_size)
        tokens, state.last = _run_blocks(self.blocks, x, state, family, self.num_prefix_tokens, grid, checkpointing)
        return remember_sizes(self.norm(tokens.x), tokens.size)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool != "avg":
            return super().forward_head(x, pre_logits)
        size = sizes_of(x)
        if size is None:
            if _merges(self):
                raise _unknown_sizes(self, "avg")
            return super().forward_head(x, pre_logits)
        x = weighted_mean(x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:])
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        return _forward_intermediates(self, super().forward_intermediates, *args, **kwargs)

    def __prepare_scriptable__(self) -> nn.Module:
        _no_script(self)
        return self


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------

_ROOTS: dict[type[nn.Module], type[nn.Module]] = {Eva: PumerEva, Beit: PumerBeit}
_OVERRIDES = ("forward", "forward_features", "forward_head", "pool", "forward_intermediates")


def _library_class(module: nn.Module) -> type[nn.Module]:
    """timm's class of ``module``, under our patch and under any class another tool put on top of it."""
    for cls in type(module).__mro__:
        if "_pumer_patched" in vars(cls):
            return cls.__bases__[0]
    return type(module)


class TimmEvaAdapter(Adapter):
    name = "timm_eva"
    supports = _SUPPORTED
    Options = EvaOptions

    def roots(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, (Eva, Beit))]

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        return root.blocks

    def check(self, root: nn.Module) -> None:
        library = _library_class(root)
        expected = Eva if isinstance(root, Eva) else Beit
        ensure_class(root, expected, f"timm {library.__qualname__}", _OVERRIDES)
        name = expected.__qualname__
        for i, block in enumerate(root.blocks):
            if expected is Eva:
                block_class = EvaBlockPostNorm if _library_class(block) is EvaBlockPostNorm else EvaBlock
                ensure_class(block, block_class, f"{name}.blocks[{i}]")
                attn_class = AttentionRope if _library_class(block.attn) is AttentionRope else EvaAttention
                ensure_class(block.attn, attn_class, f"{name}.blocks[{i}].attn")
            else:
                ensure_class(block, BeitBlock, f"{name}.blocks[{i}]")
                ensure_class(block.attn, BeitAttention, f"{name}.blocks[{i}].attn")
        if expected is Eva and isinstance(root.attn_pool, AttentionPoolLatent) and root.attn_pool.pos_embed is not None:
            raise ValueError("this Eva's attention pool adds a position embedding per token, which a reduced ViT lacks")
        version = Version(timm.__version__)
        if not _TESTED[0] <= version < _TESTED[1]:
            warnings.warn(
                f"pumer_patch's timm_eva adapter repeats Eva / Beit forward_features lines as of timm "
                f"{_TESTED[0]}..<{_TESTED[1]}; found {version}. Check zero-reduction parity.",
                stacklevel=3,
            )

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: dict[str, Any], mode: Mode, schedule: dict[int, Ratios]
    ) -> EvaOptions:
        position = options.pop("merge_position", "mean")
        if position not in ("mean", "destination"):
            raise ValueError(f"merge_position must be 'mean' or 'destination', got {position!r}")
        has_cls = getattr(root, "cls_token", None) is not None
        auto = "cls" if has_cls and root.global_pool in ("token", "") else "received"
        vit: VitOptions = resolve_vit_options(options, len(root.blocks), has_cls, auto, mode)
        return EvaOptions(vit.merge_schedule, vit.relevance, position)

    def swaps(self, root: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
        found: list[tuple[nn.Module, type[nn.Module]]] = [(root, _ROOTS[_library_class(root)])]
        if _library_class(root) is Beit:
            own = [b.attn for b in root.blocks if b.attn.relative_position_bias_table is not None]
            found += [(attn, PumerBeitAttention) for attn in own]
        return found
