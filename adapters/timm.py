"""timm ``VisionTransformer``: ViT, DeiT (distilled too), DINO, CLIP and SigLIP trunks, register tokens.

Found by ``isinstance`` anywhere in the model, a timm trunk inside an open_clip ``TimmModel`` too.
The root's class is switched to a module-level subclass that overrides two methods:

* ``forward_features`` runs timm's embedding steps and final norm around the reducing block loop
  (``_loop.run_blocks``), so that grad checkpointing and direct ``forward_features`` calls reduce
  too. It repeats the six steps of ``VisionTransformer.forward_features`` (timm 1.0); the library's
  own ``Block`` instances run unchanged at plain blocks (``blk(x, attn_mask=bias)``, which both the
  fused and the eager attention honour) and as their own sub-modules at reduce blocks, around which
  the block's own forward hooks still run (``_loop.call_as_block``; backward hooks there are refused).
* ``pool`` makes pooling count merged tokens by their sizes (default mode): ``avg`` is the
  size-weighted mean, which equals the mean over the tokens they stand for; ``map`` passes
  ``log(size)`` to the latent attention pool as proportional attention. ``token`` reads [CLS], which
  is never merged; ``max`` and ``prr`` pool as timm does.

The ``num_prefix_tokens`` leading tokens are protected. Relevance: the [CLS] row for towers pooled
from [CLS] (``token`` or none), else the size-weighted attention received (see ``_loop``), so pruning
works without a class token too. ``forward_intermediates`` (and so ``features_only`` models, which
call it) is refused while the patch reduces: feature maps need the full grid. Token sizes travel
with the features (``pumer_patch.token_sizes``): ``forward_head`` on features that did not come
straight from this model's ``forward_features`` (sliced, copied) raises ``TokenSizesLost`` where
the pooling needs sizes. When the plan reduces nothing, the methods fall through to timm's unchanged.
Other timm ViT-like models (their own block classes) belong to no adapter and are refused by ``apply``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.layers import Attention, AttentionPoolLatent
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from pumer_patch.core import Mode, Tokens, attention_bias
from pumer_patch.ratios import Ratios

from ._loop import Attended, captured, reduce_blocks, refuse_backward_hooks_on, run_blocks
from ._timm_common import TIMM_TESTED, PumerTimmRoot, pooling_sizes, refuse_masks
from ._vit import VitOptions, resolve_vit_options, weighted_mean
from .base import Adapter, Plan, Trace, ensure_class, library_class, warn_if_untested

__all__ = ["TimmAdapter", "TimmBlockStep", "PumerTimmVisionTransformer", "PumerTimmVisionTransformerDistilled"]

_SUPPORTED = "timm VisionTransformer / VisionTransformerDistilled built from timm.models.vision_transformer.Block"


class TimmBlockStep:
    """timm's ``Block`` for ``run_blocks``: its own forward, or its attention and MLP lines apart."""

    def plain(self, block: Block, x: Tensor, bias: Tensor | None) -> Tensor:
        return block(x, attn_mask=bias)

    def arguments(self, block: Block, x: Tensor, bias: Tensor | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (x,), {"attn_mask": bias}

    def attend(self, block: Block, x: Tensor, bias: Tensor | None, rows: slice | None) -> Attended:
        """``Block.forward``'s attention line; the q/k it used come from a hook on ``attn.qkv``.

        The hook reads the projection the attention computes anyway (recomputing k alone would cost
        2 N C^2 per reduce block); the q/k norms are applied again to the keys and the rows asked for.
        """
        attn: Attention = block.attn
        h = block.norm1(x)
        with captured(attn.qkv) as out:
            x = x + block.drop_path1(block.ls1(attn(h, attn_mask=bias)))
        b, n, _ = x.shape
        qkv = out[0].reshape(b, n, 3, attn.num_heads, attn.head_dim)  # (B, N, 3, H, d)
        k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, H, N, d)
        q = None if rows is None else attn.q_norm(qkv[:, rows, 0].transpose(1, 2))  # (B, H, Q, d)
        return Attended(x, q, k, attn.scale)

    def finish(self, block: Block, x: Tensor) -> Tensor:
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


_STEP = TimmBlockStep()


class _ReducingVit(PumerTimmRoot):
    """``forward_features`` through the reducing loop, ``pool`` by token sizes; see the module docstring."""

    def _reduce_features(
        self, x: Tensor, plan: Plan, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> tuple[Tokens, Trace]:
        refuse_masks(attn_mask, is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        return run_blocks(self.blocks, x, plan, _STEP, protected=self.num_prefix_tokens, checkpointing=checkpointing,
                          name=f"{library_class(self).__name__}.blocks")

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """(B, N', C) -> (B, C), counting each token by its size where the pooling averages."""
        pool_type = self.global_pool if pool_type is None else pool_type
        latent = isinstance(self.attn_pool, AttentionPoolLatent)
        if not latent and not (self.attn_pool is None and pool_type in ("avg", "avgmax")):
            return super().pool(x, pool_type)
        size = pooling_sizes(self, x, "attention" if latent else pool_type)
        if size is None:
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        if latent:
            return self.attn_pool(x[:, start:], attn_mask=attention_bias(size[:, start:], None, x.dtype))
        mean = weighted_mean(x[:, start:], size[:, start:])
        return mean if pool_type == "avg" else 0.5 * (x[:, start:].amax(dim=1) + mean)


class PumerTimmVisionTransformer(_ReducingVit, VisionTransformer):
    """``VisionTransformer`` whose features come from the reducing loop; see the module docstring."""

    _pumer_patched = True


class PumerTimmVisionTransformerDistilled(_ReducingVit, VisionTransformerDistilled):
    """``VisionTransformerDistilled`` (DeiT, [CLS] and distillation token protected), as above."""

    _pumer_patched = True


_PATCHED: dict[type[nn.Module], type[nn.Module]] = {
    VisionTransformer: PumerTimmVisionTransformer,
    VisionTransformerDistilled: PumerTimmVisionTransformerDistilled,
}

_OVERRIDES = ("forward", "forward_features", "forward_head", "pool", "forward_intermediates")


def _check_library_part(
    module: nn.Module, expected: type[nn.Module], where: str, overrides: Sequence[str] = ("forward",)
) -> None:
    """Refuse timm's other classes as unsupported and anything else as patched by someone."""
    cls = library_class(module)
    if cls is not expected and cls.__module__.startswith("timm."):
        raise ValueError(
            f"{where} is timm's {cls.__qualname__}, not supported: the timm adapter supports {_SUPPORTED} "
            f"(with {expected.__module__}.{expected.__qualname__} there)"
        )
    ensure_class(module, expected, where, overrides)


class TimmAdapter(Adapter):
    name = "timm"
    supports = _SUPPORTED + " (ViT, DeiT, DINO, CLIP, SigLIP, register tokens)"
    Options = VitOptions

    def roots(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, VisionTransformer)]

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        return root.blocks

    def check(self, root: nn.Module) -> None:
        cls = library_class(root)
        expected = cls if cls in _PATCHED else VisionTransformer
        _check_library_part(root, expected, f"timm {type(root).__qualname__}", _OVERRIDES)
        for i, block in enumerate(root.blocks):
            _check_library_part(block, Block, f"{cls.__qualname__}.blocks[{i}]")
            _check_library_part(block.attn, Attention, f"{cls.__qualname__}.blocks[{i}].attn")
        warn_if_untested("timm", timm.__version__, TIMM_TESTED, "VisionTransformer.forward_features and Block.forward")

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: dict[str, Any], mode: Mode, schedule: dict[int, Ratios]
    ) -> VitOptions:
        # [CLS] relevance where the output is read from [CLS]; pooled towers use the attention received
        auto = "cls" if root.has_class_token and root.global_pool in ("token", "") else "received"
        resolved = resolve_vit_options(options, len(root.blocks), root.has_class_token, auto, mode)
        refuse_backward_hooks_on(root.blocks, reduce_blocks(schedule, resolved.merge_schedule),
                                 f"{library_class(root).__name__}.blocks")
        return resolved

    def swaps(self, root: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
        return [(root, _PATCHED[library_class(root)])]
