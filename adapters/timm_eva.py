"""timm's ViTs with positions inside attention: ``Eva`` (EVA, EVA02, DINOv3, Perception Encoder, ViT-RoPE) and ``Beit``.

``timm.models.eva.Eva`` gives patch tokens rotary position embeddings (RoPE) in every attention;
``timm.models.beit.Beit`` adds a learned relative position bias. Both read each token's grid cell
inside every block, so a reducing loop must carry, for every patch token, where it stands:

* pruning keeps each survivor's position: its rotary row, its bias rows and columns;
* merging gives the merged token a position, ``merge_position``:
  ``"mean"`` (default): the size-weighted mean of the grid coordinates of the tokens it stands for.
  RoPE at a fractional coordinate is exact on every grid: the rotary angles are affine in the
  (row, col) cell (all of timm's rope kinds: ``cat``, ``dinov3``, ``mixed``, ``mrope``, per call
  coordinate augmentation included), so the merged token's row is the nearest cell's row turned by
  ``slope @ (mean - cell)``. The per-step slope is the model's own table's step, on the branch that
  the closed form of its frequencies names (``rope_steps``): on small grids a step exceeds pi (EVA02
  and DINOv3 up to 4 x 4 patches, Perception Encoder up to 6 x 6), and the table alone would give
  its alias. A rope module without a known closed form is refused for ``"mean"``, and so is a
  training-time augmentation too strong to tell a step from its aliases. For BEiT the mean is
  rounded to the nearest cell: its bias table is learned at integer offsets only, and interpolating
  it would cost four gathers of a (B, H, N, N) bias per block for a position BEiT never saw.
  ``"destination"``: the position of the token the others merge into (ToMe's B token).

Which rule keeps a reduced model closer to its unreduced answers was measured on tiny position-regression
ViTs (``python -m benchmarks.merge_position``): on the RoPE models ``"mean"`` came closer at every
setting tried, while for BEiT the measurement does not decide. So ``"mean"`` is the default, and
(rounded) it keeps one rule for both families.

Register tokens and [CLS] (``num_prefix_tokens``) are protected: never pruned or merged, and no
rotary (as timm). The blocks run through ``_loop.run_blocks`` with the positions as its carry (each
token's cell and coordinate, moved by ``reduce_tokens`` with the tokens; the position maths lives in
``_positions``). Relevance, merge metric, ``merge_schedule`` and pooling by sizes follow ``_loop``,
``_vit`` and ``timm``: the metric is the keys the attention used (after q/k norm and rotary),
captured from ``attn.q_norm`` / ``attn.k_norm`` (EVA) or recomputed from ``attn.qkv`` (BEiT's
attention calls its projection through ``F.linear``; 2 N C^2 extra FLOPs at each reduce block).

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent, AttentionRope
from timm.layers.pos_embed_sincos import (
    RotaryEmbeddingCat,
    RotaryEmbeddingDinoV3,
    RotaryEmbeddingMixed,
    RotaryEmbeddingMRope,
    _build_grid,
    _rope_layout,
    apply_rot_embed_cat,
    get_mixed_grid,
)
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import Tensor, nn

from pumer_patch.core import Mode, Tokens, attention_bias
from pumer_patch.ratios import Ratios

from ._loop import Attended, BlockStep, CallScope, captured, reduce_blocks, refuse_backward_hooks_on, run_blocks
from ._positions import gather_bias, grid_carry, positions, rope_rows, rope_slope
from ._timm_common import TIMM_TESTED, PumerTimmRoot, pooling_sizes, refuse_masks
from ._vit import VitOptions, resolve_vit_options, weighted_mean
from .base import SHARED_ATTR, Adapter, Plan, Trace, ensure_class, library_class, warn_if_untested

__all__ = [
    "TimmEvaAdapter", "EvaOptions", "PumerEva", "PumerBeit", "PumerBeitAttention", "EvaStep", "BeitStep", "rope_steps",
]

_SUPPORTED = "timm Eva (EVA, EVA02, DINOv3, Perception Encoder, ViT-RoPE) and Beit"

MergePosition = Literal["mean", "destination"]


@dataclass(frozen=True)
class EvaOptions(VitOptions):
    """``VitOptions`` (``merge_schedule``, ``relevance``) and where a merged token stands (module docstring)."""

    merge_position: MergePosition = "mean"


# ---------------------------------------------------------------------------------------------
# EVA: rotary rows for the surviving tokens
# ---------------------------------------------------------------------------------------------


class _EvaBlock(NamedTuple):
    """An ``EvaBlock`` / ``EvaBlockPostNorm`` for ``run_blocks``, with the rotary rows of its tokens (or None)."""

    rope: Tensor | None

    def plain(self, block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        return block(x, rope=self.rope, attn_mask=bias)

    def arguments(self, block: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (x,), {"rope": self.rope, "attn_mask": bias}

    def attend(self, block: nn.Module, x: Tensor, bias: Tensor | None, rows: slice | None) -> Attended:
        """The attention half, with the q/k the attention used.

        q and k are the ``q_norm`` / ``k_norm`` outputs (B, H, N, d), turned by ``rope`` past the prefix
        as ``attn`` turns them; grouped-query keys are repeated to the query heads.
        """
        attn, rope = block.attn, self.rope
        with captured(attn.q_norm, attn.k_norm) as out:
            if isinstance(block, EvaBlockPostNorm):
                x = x + block.drop_path1(block.norm1(attn(x, rope=rope, attn_mask=bias)))
            else:
                h = attn(block.norm1(x), rope=rope, attn_mask=bias)
                x = x + block.drop_path1(h if block.gamma_1 is None else block.gamma_1 * h)
        q, k = out[0], out[1]
        if rope is not None:
            npt, half = attn.num_prefix_tokens, attn.rotate_half
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention: (B, H, N, d)
        return Attended(x, None if rows is None else q[:, :, rows], k, attn.scale)

    def finish(self, block: nn.Module, x: Tensor) -> Tensor:
        if isinstance(block, EvaBlockPostNorm):
            return x + block.drop_path2(block.norm2(block.mlp(x)))
        h = block.mlp(block.norm2(x))
        return x + block.drop_path2(h if block.gamma_2 is None else block.gamma_2 * h)


#: the rope modules whose closed form ``rope_steps`` knows (``merge_position="mean"`` needs it)
_KNOWN_ROPES = (RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed, RotaryEmbeddingMRope)


def rope_steps(rope: nn.Module, grid: tuple[int, int]) -> tuple[Tensor, float]:
    """timm's closed-form rotary angle per grid step, (D, 2) or (depth, heads, D, 2) for (row, col), and its spread.

    Every rope kind of timm turns channel d by ``sum_c f[d, c] * coord_c``: frequencies times the
    coordinates of timm's own grid (``_build_grid``: cell indices, scaled to ``ref_feat_shape`` for
    EVA02 / Perception Encoder; ``[-1, 1]``-centred for DINOv3; ``grid_indexing="xy"`` swaps the
    channels). One grid step moves each coordinate by its grid's difference between neighbouring
    cells, so the step of channel d along an axis is ``sum_c f[d, c] * dcoord_c``, laid out as the
    table (``_rope_layout``). ``rope_slope`` takes it to name the branch of the table's own step.

    The spread (>= 1) bounds the training-time coordinate augmentation (jitter times rescale, each a
    factor; a shift moves no step); 1 in eval or without augmentation.
    """
    if isinstance(rope, RotaryEmbeddingMixed):
        t_x, t_y = get_mixed_grid(list(grid), grid_indexing=rope.grid_indexing)
        coords = torch.stack([t_x, t_y], dim=-1).unflatten(0, grid)  # (H, W, 2)
    elif isinstance(rope, RotaryEmbeddingMRope):
        coords = _build_grid(list(grid), grid_indexing=rope.grid_indexing, ndim=2)
    elif isinstance(rope, RotaryEmbeddingDinoV3):
        coords = _build_grid(list(grid), grid_type="centered", grid_offset=rope.grid_offset,
                             grid_indexing=rope.grid_indexing, normalize_coords=rope.normalize_coords, ndim=2)
    else:
        coords = _build_grid(list(grid), grid_type=rope.grid_type, ref_feat_shape=rope.ref_feat_shape,
                             grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
                             normalize_coords=rope.normalize_coords)
    coords = coords.double()
    zero = torch.zeros(2, dtype=torch.float64)
    moves = torch.stack([  # (2 coordinate channels, 2 axes): each coordinate's change per row / column step
        coords[1, 0] - coords[0, 0] if grid[0] > 1 else zero,
        coords[0, 1] - coords[0, 0] if grid[1] > 1 else zero,
    ], dim=-1)
    per_axis = []
    for axis in range(2):
        move = moves[:, axis]
        if isinstance(rope, RotaryEmbeddingMixed):
            freqs = rope.freqs.detach().double().cpu()  # (2, depth, heads, head_dim // 2)
            per_axis.append(_rope_layout(freqs[0] * move[0] + freqs[1] * move[1]))
        elif isinstance(rope, RotaryEmbeddingMRope):
            channel = torch.cat([torch.zeros(1, dtype=torch.float64), move])  # temporal channels stay at 0
            per_axis.append(_rope_layout(rope.inv_freq.double().cpu() * channel[rope.axis.cpu()], rotate_half=True))
        else:
            if isinstance(rope, RotaryEmbeddingDinoV3):
                freqs, half = 2 * math.pi / rope.periods.double().cpu(), rope.rotate_half
            else:
                freqs, half = rope.bands.double().cpu(), rope.rotate_half
            per_axis.append(_rope_layout((move[:, None] * freqs).flatten(), half))  # (2 * bands) -> D
    augmented = rope.training and rope.aug_active
    spread = (rope.jitter_coords or 1.0) * (rope.rescale_coords or 1.0) if augmented else 1.0
    return torch.stack(per_axis, dim=-1), spread


class EvaStep:
    """EVA's blocks for one forward (a ``PlacedStep``): each block reads its tokens' rotary rows.

    rope: ``_pos_embed``'s table, (N0, 2D), or one per block (depth, heads, N0, 2D) for mixed RoPE,
    or None. With ``merge_position="mean"`` the per-step slopes (``rope_slope``, branch named by
    ``rope_steps``) are read once per table and forward.
    """

    def __init__(self, root: Eva, rope: Tensor | None, grid: tuple[int, int], merge_position: MergePosition) -> None:
        self.rope, self.grid, self.protected = rope, grid, root.num_prefix_tokens
        self.mixed = getattr(root, "rope_mixed", False) and rope is not None
        self.steps = rope_steps(root.rope, grid) if merge_position == "mean" and rope is not None else None
        self._slopes: dict[int, Tensor] = {}

    def at(self, i: int, carry: tuple[Tensor, ...] | None) -> BlockStep:
        table = self.rope[i] if self.mixed else self.rope
        if table is None or carry is None:
            return _EvaBlock(table)
        slope = None
        if self.steps is not None:
            key = i if self.mixed else 0
            if key not in self._slopes:
                nominal, spread = self.steps
                self._slopes[key] = rope_slope(table, self.grid, nominal[i] if self.mixed else nominal, spread)
            slope = self._slopes[key]
        return _EvaBlock(rope_rows(table, positions(carry, self.protected, self.grid[1]), self.grid[1], slope))


# ---------------------------------------------------------------------------------------------
# BEiT: relative bias for the surviving cells
# ---------------------------------------------------------------------------------------------

# the cells (B, N) of this block's tokens, [CLS] as 0 and patch cell c as c + 1, in the layout of
# BEiT's relative_position_index; set around each block call, so a checkpoint recompute sets it again
_BEIT_CELLS: CallScope[Tensor] = CallScope("pumer_beit_cells")


class PumerBeitAttention(BeitAttention):
    """BEiT's ``Attention`` whose own relative bias covers the cells of this call's tokens.

    Inside a reducing loop's block call the cells come from ``_BEIT_CELLS``; anywhere else (the
    library's forward, an unreduced call) it is timm's bias, unchanged.
    """

    _pumer_patched = True

    def _get_rel_pos_bias(self) -> Tensor:
        full = super()._get_rel_pos_bias()  # (1, heads, N0 + 1, N0 + 1)
        cells = _BEIT_CELLS.get(getattr(self, SHARED_ATTR, None))
        return full if cells is None else gather_bias(full[0], cells)


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
    state = getattr(block.attn, SHARED_ATTR, None)
    if where is None or state is None:
        yield
        return
    with _BEIT_CELLS.open(state, where.cells):
        yield


class _BeitBlock(NamedTuple):
    """A BEiT ``Block`` for ``run_blocks``, with its tokens' cells and the shared bias for them (or None)."""

    where: _BeitWhere | None
    shared_full: Tensor | None

    def plain(self, block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        with _beit_cells(block, self.where):
            return block(x, shared_rel_pos_bias=_beit_bias(self.where, self.shared_full, bias))

    def arguments(self, block: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (x,), {"shared_rel_pos_bias": _beit_bias(self.where, self.shared_full, bias)}

    def attend(self, block: nn.Module, x: Tensor, bias: Tensor | None, rows: slice | None) -> Attended:
        """The attention half; the relevance's logit bias is the position biases of the query rows and the key bias."""
        attn: BeitAttention = block.attn
        h = block.norm1(x)
        shared = _beit_bias(self.where, self.shared_full, bias)
        with _beit_cells(block, self.where):
            out = attn(h, shared_rel_pos_bias=shared)
            has_own = attn.relative_position_bias_table is not None
            own = attn._get_rel_pos_bias() if rows is not None and has_own else None
        x = x + block.drop_path1(out if block.gamma_1 is None else block.gamma_1 * out)
        # BEiT's attention projects through F.linear (no module call to read): recompute k, and q for the rows
        inner = attn.qkv.weight.shape[0] // 3
        k = F.linear(h, attn.qkv.weight[inner: 2 * inner], attn.k_bias)
        k = k.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (B, N, A) -> (B, H, N, d)
        if rows is None:
            return Attended(x, None, k, attn.scale)
        q = F.linear(h[:, rows], attn.qkv.weight[:inner], attn.q_bias)
        q = q.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (B, Q, A) -> (B, H, Q, d)
        logits = None  # (B, H, Q, N)
        for part in (own, shared):
            if part is not None:
                part = part[..., rows, :] if part.shape[-2] > 1 else part
                logits = part if logits is None else logits + part
        return Attended(x, q, k, attn.scale, logit_bias=logits)

    def finish(self, block: nn.Module, x: Tensor) -> Tensor:
        out = block.mlp(block.norm2(x))
        return x + block.drop_path2(out if block.gamma_2 is None else block.gamma_2 * out)


class BeitStep:
    """BEiT's blocks for one forward (a ``PlacedStep``): each reads the relative bias of its tokens' cells.

    shared_full: ``rel_pos_bias()`` (heads, N0 + 1, N0 + 1) or None.
    """

    def __init__(self, root: Beit, shared_full: Tensor | None) -> None:
        self.shared_full, self.width = shared_full, root.patch_embed.grid_size[1]
        self.positional = shared_full is not None or any(
            b.attn.relative_position_bias_table is not None for b in root.blocks
        )

    def at(self, i: int, carry: tuple[Tensor, ...] | None) -> BlockStep:
        if carry is None or not self.positional:
            return _BeitBlock(None, self.shared_full)
        pos = positions(carry, 1, self.width)
        # a merged token's mean coordinate, rounded to the nearest cell (the bias is learned per cell offset)
        rounded = pos.coord.round().long()
        cells = torch.cat([pos.cell.new_zeros(pos.cell.shape[0], 1), 1 + rounded[..., 0] * self.width + rounded[..., 1]], 1)
        shared = None if self.shared_full is None else gather_bias(self.shared_full, cells)
        return _BeitBlock(_BeitWhere(cells, shared), self.shared_full)


def _grid_of(root: nn.Module, embedded: Tensor) -> tuple[int, int]:
    """The patch grid (H, W): from the NHWC patch embedding (dynamic image size) or the patch embed."""
    if embedded.dim() == 4:
        return tuple(embedded.shape[1:3])
    return tuple(root.patch_embed.grid_size)


# ---------------------------------------------------------------------------------------------
# the patched roots
# ---------------------------------------------------------------------------------------------


class PumerEva(PumerTimmRoot, Eva):
    """``Eva`` whose features come from the reducing loop; see the module docstring."""

    _pumer_patched = True

    def _reduce_features(
        self, x: Tensor, plan: Plan, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> tuple[Tokens, Trace]:
        refuse_masks(attn_mask, is_causal)
        if self.patch_drop is not None and self.training:
            raise ValueError(
                "patch dropout (patch_drop_rate) in training drops cells that timm's _pos_embed does not name, so a "
                "pumer_patch-reduced Eva cannot place its tokens; train with patch_drop_rate=0, or remove the patch"
            )
        embedded = self.patch_embed(x)
        grid = _grid_of(self, embedded)
        x, rope = self._pos_embed(embedded)
        x = self.norm_pre(x)
        position = plan.options.merge_position
        step = EvaStep(self, rope, grid, position)
        carry = grid_carry(x.shape[0], self.num_prefix_tokens, grid, x.device, position == "mean")
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        tokens, trace = run_blocks(
            self.blocks, x, plan, step, protected=self.num_prefix_tokens, checkpointing=checkpointing, carry=carry,
            name=f"{library_class(self).__name__}.blocks",
        )
        trace.grid = grid
        return tokens, trace

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """(B, N', C) -> (B, C), counting each token by its size where the pooling averages."""
        pool_type = self.global_pool if pool_type is None else pool_type
        latent = isinstance(self.attn_pool, AttentionPoolLatent)
        if not latent and pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)
        size = pooling_sizes(self, x, "attention" if latent else pool_type)
        if size is None:
            return super().pool(x, pool_type)
        if latent:  # timm's Eva pools prefix tokens too
            return self.attn_pool(x, attn_mask=attention_bias(size, None, x.dtype))
        start = self.num_prefix_tokens
        mean = weighted_mean(x[:, start:], size[:, start:])
        return mean if pool_type == "avg" else 0.5 * (x[:, start:].amax(dim=1) + mean)


class PumerBeit(PumerTimmRoot, Beit):
    """``Beit`` whose features come from the reducing loop and whose head pools by token sizes.

    Its reducing features and ``forward_head`` repeat timm 1.0's embedding and head lines around the
    loop and the size-weighted mean (BEiT pools inline, with no ``pool`` to wrap).
    """

    _pumer_patched = True

    def _reduce_features(self, x: Tensor, plan: Plan) -> tuple[Tokens, Trace]:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        shared = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        grid = tuple(self.patch_embed.grid_size)
        mean = plan.options.merge_position == "mean"
        carry = grid_carry(x.shape[0], self.num_prefix_tokens, grid, x.device, mean)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        tokens, trace = run_blocks(
            self.blocks, x, plan, BeitStep(self, shared), protected=self.num_prefix_tokens,
            checkpointing=checkpointing, carry=carry, name=f"{library_class(self).__name__}.blocks",
        )
        trace.grid = grid
        return tokens, trace

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool != "avg":
            return super().forward_head(x, pre_logits)
        size = pooling_sizes(self, x, "avg")
        if size is None:
            return super().forward_head(x, pre_logits)
        x = weighted_mean(x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:])
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------

_ROOTS: dict[type[nn.Module], type[nn.Module]] = {Eva: PumerEva, Beit: PumerBeit}
_OVERRIDES = ("forward", "forward_features", "forward_head", "pool", "forward_intermediates")


class TimmEvaAdapter(Adapter):
    name = "timm_eva"
    supports = _SUPPORTED
    Options = EvaOptions

    def roots(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, (Eva, Beit))]

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        return root.blocks

    def check(self, root: nn.Module) -> None:
        library = library_class(root)
        expected = Eva if isinstance(root, Eva) else Beit
        ensure_class(root, expected, f"timm {library.__qualname__}", _OVERRIDES)
        name = expected.__qualname__
        for i, block in enumerate(root.blocks):
            if expected is Eva:
                block_class = EvaBlockPostNorm if library_class(block) is EvaBlockPostNorm else EvaBlock
                ensure_class(block, block_class, f"{name}.blocks[{i}]")
                attn_class = AttentionRope if library_class(block.attn) is AttentionRope else EvaAttention
                ensure_class(block.attn, attn_class, f"{name}.blocks[{i}].attn")
            else:
                ensure_class(block, BeitBlock, f"{name}.blocks[{i}]")
                ensure_class(block.attn, BeitAttention, f"{name}.blocks[{i}].attn")
        if expected is Eva and isinstance(root.attn_pool, AttentionPoolLatent) and root.attn_pool.pos_embed is not None:
            raise ValueError("this Eva's attention pool adds a position embedding per token, which a reduced ViT lacks")
        warn_if_untested("timm", timm.__version__, TIMM_TESTED, "Eva / Beit forward_features")

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: dict[str, Any], mode: Mode, schedule: dict[int, Ratios]
    ) -> EvaOptions:
        position = options.pop("merge_position", "mean")
        if position not in ("mean", "destination"):
            raise ValueError(f"merge_position must be 'mean' or 'destination', got {position!r}")
        rope = getattr(root, "rope", None)
        if position == "mean" and rope is not None and not isinstance(rope, _KNOWN_ROPES):
            known = ", ".join(k.__name__ for k in _KNOWN_ROPES)
            raise ValueError(
                f"merge_position='mean' places a merged token's rotary at its mean coordinate from the closed form of "
                f"timm's {known}; this Eva's rope is {type(rope).__qualname__}: use merge_position='destination'"
            )
        has_cls = getattr(root, "cls_token", None) is not None
        auto = "cls" if has_cls and root.global_pool in ("token", "") else "received"
        vit = resolve_vit_options(options, len(root.blocks), has_cls, auto, mode)
        refuse_backward_hooks_on(root.blocks, reduce_blocks(schedule, vit.merge_schedule),
                                 f"{library_class(root).__name__}.blocks")
        return EvaOptions(vit.merge_schedule, vit.relevance, position)

    def swaps(self, root: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
        found: list[tuple[nn.Module, type[nn.Module]]] = [(root, _ROOTS[library_class(root)])]
        if library_class(root) is Beit:
            own = [b.attn for b in root.blocks if b.attn.relative_position_bias_table is not None]
            found += [(attn, PumerBeitAttention) for attn in own]
        return found
