"""open_clip's own ``VisionTransformer`` image tower (CLIP, CLIPA, CoCa); the text tower is left alone.

The text tower uses the same ``Transformer`` and ``ResidualAttentionBlock`` classes, so only the
image tower's instances are switched (towers with a timm trunk belong to the timm adapter):

* ``visual.transformer`` -> ``PumerTransformer``: the reducing block loop (``_loop.run_blocks``),
  calling the library's own blocks at plain blocks and their sub-modules at reduce blocks (with the
  block's forward hooks around them, ``_loop.call_as_block``; backward hooks there are refused).
  Proportional attention goes through the block's ``attn_mask``: ``nn.MultiheadAttention`` takes a
  float (B * H, N, N) mask, built as a stride-0 expansion of (B * H, 1, N), so no N^2 memory.
* ``visual`` -> ``PumerOpenClipVisionTransformer``: ``avg`` pooling (CLIPA) becomes the size-weighted mean,
  equal to the mean over the tokens the merged ones stand for. ``tok`` reads [CLS], never merged;
  the attentional pooler (CoCa) takes no mask, so it sees merged tokens unweighted.

The MHA in-projection is fused (``in_proj_weight``) and returns neither q nor k, so a reduce block
recomputes the keys (merge metric) with ``F.linear`` on the key slice: 2 B N C^2 FLOPs, about 8 % of
a block; the [CLS] query row costs 2 B C^2, the queries for "received" relevance (``avg``, CoCa)
another 2 B N C^2.

Text guidance (``pumer_patch.adapters.guidance.text_guidance``, also importable from here): pruning
can follow a text query instead of the [CLS] row, for text-conditioned retrieval; each token reaches
the joint space through the tower's ``ln_post`` and ``proj``. An image embedding then depends on the
query: do not cache it.

Per call, the tower's forward opens a scope (``_loop.CallScope``) in which the transformer hands the
token sizes to the pooling. ``forward_intermediates`` is refused while the patch reduces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock, Transformer
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from torch import Tensor, nn

from pumer_patch.core import Mode
from pumer_patch.ratios import Ratios

from ._loop import Attended, CallScope, reduce_blocks, refuse_backward_hooks_on, run_blocks
from ._vit import VitOptions, reduces, resolve_vit_options, weighted_mean
from .base import SHARED_ATTR, STATE_ATTR, Adapter, PatchState, Trace, ensure_class, record_trace, warn_if_untested
from .guidance import GuidedTower, guide_of, text_guidance

__all__ = [
    "OpenClipAdapter", "OpenClipBlockStep", "PumerTransformer", "PumerOpenClipVisionTransformer", "text_guidance",
]

_TESTED = ("2.24", "4")


@dataclass
class _TowerCall:
    """What the tower's transformer hands its pooling during one forward of the tower."""

    size: Tensor | None = None  # (B, N') token sizes of the reduced tokens


_CALL: CallScope[_TowerCall] = CallScope("pumer_patch_open_clip_call")


def _mha_mask(bias: Tensor | None, heads: int) -> Tensor | None:
    """Key bias (B, 1, 1, N) as the (B * H, N, N) float mask ``nn.MultiheadAttention`` takes, stride 0 over queries."""
    if bias is None:
        return None
    b, n = bias.shape[0], bias.shape[-1]
    return bias.reshape(b, 1, n).repeat_interleave(heads, dim=0).expand(-1, n, -1)


def _heads(x: Tensor, heads: int) -> Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, N, C) -> (B, H, N, d)


class OpenClipBlockStep:
    """open_clip's ``ResidualAttentionBlock`` for ``run_blocks`` (the image tower's, METER's CLIP tower's)."""

    def plain(self, block: ResidualAttentionBlock, x: Tensor, bias: Tensor | None) -> Tensor:
        return block(x, attn_mask=_mha_mask(bias, block.attn.num_heads))

    def arguments(
        self, block: ResidualAttentionBlock, x: Tensor, bias: Tensor | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (x,), {"attn_mask": _mha_mask(bias, block.attn.num_heads)}

    def attend(self, block: ResidualAttentionBlock, x: Tensor, bias: Tensor | None, rows: slice | None) -> Attended:
        """``ResidualAttentionBlock.forward``'s attention line, then k (and q rows) from the fused in-projection."""
        attn: nn.MultiheadAttention = block.attn
        h = block.ln_1(x)
        x = x + block.ls_1(block.attention(q_x=h, attn_mask=_mha_mask(bias, attn.num_heads)))
        c, heads = attn.embed_dim, attn.num_heads
        weight, in_bias = attn.in_proj_weight, attn.in_proj_bias
        k_bias = None if in_bias is None else in_bias[c : 2 * c]
        k = _heads(F.linear(h, weight[c : 2 * c], k_bias), heads)
        q = None
        if rows is not None:
            q = _heads(F.linear(h[:, rows], weight[:c], None if in_bias is None else in_bias[:c]), heads)
        return Attended(x, q, k, (c // heads) ** -0.5)

    def finish(self, block: ResidualAttentionBlock, x: Tensor) -> Tensor:
        return x + block.ls_2(block.mlp(block.ln_2(x)))


_STEP = OpenClipBlockStep()


class PumerTransformer(Transformer):
    """The image tower's ``Transformer`` with the reducing loop; see the module docstring."""

    _pumer_patched = True

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        state: PatchState = getattr(self, SHARED_ATTR)
        if not reduces(state.plan):
            record_trace(state, Trace())
            return super().forward(x, attn_mask)
        if attn_mask is not None:
            raise ValueError("the image tower of a pumer_patch-reduced open_clip model takes no attn_mask")
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        tokens, trace = run_blocks(
            self.resblocks, x, state.plan, _STEP, protected=1, guide=guide_of(state), checkpointing=checkpointing,
            name="visual.transformer.resblocks",
        )
        record_trace(state, trace)
        call = _CALL.get(state)
        if call is not None:
            call.size = tokens.size
        return tokens.x


class PumerOpenClipVisionTransformer(OpenClipVisionTransformer):
    """open_clip ``VisionTransformer`` whose ``avg`` pooling weighs merged tokens by their sizes."""

    _pumer_patched = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _CALL.open(getattr(self, STATE_ATTR), _TowerCall()):
            return super().forward(*args, **kwargs)

    def _global_pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        call = _CALL.get(getattr(self, STATE_ATTR))
        # no sizes: unreduced; with an attentional pooler x holds its queries
        weighted = self.pool_type == "avg" and self.attn_pool is None
        if not weighted or call is None or call.size is None:
            return super()._global_pool(x)
        return weighted_mean(x[:, 1:], call.size[:, 1:]), x[:, 1:]

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        if reduces(getattr(self, STATE_ATTR).plan):
            raise ValueError(
                "forward_intermediates returns feature maps on the full patch grid, which a pumer_patch-reduced "
                "tower does not keep; pumer_patch.remove(model) first, or call the tower"
            )
        return super().forward_intermediates(*args, **kwargs)


def _joint(tower: OpenClipVisionTransformer, x: Tensor) -> Tensor:
    """Tokens x (B, N, C) through the tower's own head (``ln_post``, ``proj``) into the joint space: (B, N, D)."""
    return tower.ln_post(x) @ tower.proj


class OpenClipAdapter(Adapter):
    name = "open_clip"
    supports = "open_clip VisionTransformer image towers with ResidualAttentionBlock (CLIP, CLIPA, CoCa)"
    Options = VitOptions

    def roots(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, OpenClipVisionTransformer)]

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        return root.transformer.resblocks

    def check(self, root: nn.Module) -> None:
        ensure_class(root, OpenClipVisionTransformer, "open_clip VisionTransformer", ("forward", "_global_pool", "forward_intermediates"))
        ensure_class(root.transformer, Transformer, "VisionTransformer.transformer")
        if not root.transformer.batch_first:
            raise ValueError(
                "the open_clip adapter needs a batch-first image Transformer (open_clip >= 2.24 builds one)"
            )
        for i, block in enumerate(root.transformer.resblocks):
            where = f"VisionTransformer.transformer.resblocks[{i}]"
            if isinstance(block, CustomResidualAttentionBlock):
                raise ValueError(
                    f"{where} is open_clip's CustomResidualAttentionBlock (qk norm / scaled cosine attention), "
                    f"not supported: the open_clip adapter supports ResidualAttentionBlock over nn.MultiheadAttention"
                )
            ensure_class(block, ResidualAttentionBlock, where)
            attn = block.attn
            if type(attn) is not nn.MultiheadAttention or not attn._qkv_same_embed_dim or not attn.batch_first:
                raise ValueError(f"{where}.attn must be a batch-first nn.MultiheadAttention with a fused in-projection")
            if hasattr(block, "ln_1_kv"):
                raise ValueError(f"{where} is a cross-attention block; only self-attention towers are supported")
        warn_if_untested("open_clip", open_clip.__version__, _TESTED, "ResidualAttentionBlock.forward")

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: dict[str, Any], mode: Mode, schedule: dict[int, Ratios]
    ) -> VitOptions:
        # [CLS] relevance where the embedding is read from [CLS]; avg / attentional pooling: attention received
        auto = "cls" if root.attn_pool is None and root.pool_type == "tok" else "received"
        resolved = resolve_vit_options(options, len(root.transformer.resblocks), True, auto, mode)
        refuse_backward_hooks_on(root.transformer.resblocks, reduce_blocks(schedule, resolved.merge_schedule),
                                 "visual.transformer.resblocks")
        return resolved

    def swaps(self, root: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
        return [(root, PumerOpenClipVisionTransformer), (root.transformer, PumerTransformer)]

    def guided_towers(self, model: nn.Module) -> list[GuidedTower]:
        """The patched image towers in ``model``, for ``text_guidance``; refuses one that maps no token to the text."""
        towers = []
        for root in model.modules():
            if not isinstance(root, OpenClipVisionTransformer) or not hasattr(root, STATE_ATTR):
                continue
            if root.attn_pool is not None or root.proj is None:
                raise ValueError(
                    "text_guidance needs a tower whose tokens map to the joint space (a proj, no attentional pooler)"
                )
            towers.append(GuidedTower(getattr(root, STATE_ATTR), root.proj.shape[1], partial(_joint, root)))
        return towers
