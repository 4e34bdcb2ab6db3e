"""timm ``VisionTransformer``: ViT, DeiT (distilled too), DINO, CLIP and SigLIP trunks, register tokens.

Found by ``isinstance`` anywhere in the model, a timm trunk inside an open_clip ``TimmModel`` too.
The root's class is switched to a module-level subclass that overrides two methods:

* ``forward_features`` runs timm's embedding steps and final norm around the reducing block loop
  (``_vit.run_blocks``), so that grad checkpointing and direct ``forward_features`` calls reduce
  too. It repeats the six steps of ``VisionTransformer.forward_features`` (timm 1.0); the library's
  own ``Block`` instances run unchanged at plain blocks (``blk(x, attn_mask=bias)``, which both the
  fused and the eager attention honour) and as their own sub-modules at reduce blocks.
* ``pool`` makes pooling count merged tokens by their sizes (default mode): ``avg`` is the
  size-weighted mean, which equals the mean over the tokens they stand for; ``map`` passes
  ``log(size)`` to the latent attention pool as proportional attention. ``token`` reads [CLS], which
  is never merged; ``max`` and ``prr`` pool as timm does.

The ``num_prefix_tokens`` leading tokens are protected. Relevance: the [CLS] row for towers pooled
from [CLS] (``token`` or none), else the size-weighted attention received (see ``_vit``), so pruning
works without a class token too. ``forward_intermediates`` runs unreduced: feature maps need the grid.
``forward_intermediates`` (and so ``features_only`` models, which call it) is refused while the
patch reduces: feature maps need the full grid. Token sizes travel with the features
(``_vit.sizes_of``): ``forward_head`` on features that did not come straight from this model's
``forward_features`` (sliced, copied) is refused where the pooling needs sizes.
When the plan reduces nothing, the methods fall through to timm's unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
from packaging.version import Version
from timm.layers import Attention, AttentionPoolLatent
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from pumer_patch.core import Mode, attention_bias
from pumer_patch.ratios import Ratios

from ._loop import output_of
from ._vit import (
    Attended,
    BlockOps,
    VitOptions,
    reduces,
    remember_sizes,
    resolve_vit_options,
    run_blocks,
    sizes_of,
    weighted_mean,
)
from .base import STATE_ATTR, Adapter, PatchState, Trace, ensure_class

__all__ = ["TimmAdapter", "PumerVisionTransformer", "PumerVisionTransformerDistilled"]

_TESTED = (Version("1.0"), Version("2"))
_SUPPORTED = "timm VisionTransformer / VisionTransformerDistilled built from timm.models.vision_transformer.Block"


def _plain(block: Block, x: Tensor, bias: Tensor | None) -> Tensor:
    return block(x, attn_mask=bias)


def _attend(block: Block, x: Tensor, bias: Tensor | None, rows: slice | None) -> Attended:
    """``Block.forward``'s attention line; the q/k it used come from a hook on ``attn.qkv``.

    The hook reads the projection the attention computes anyway (recomputing k alone would cost
    2 N C^2 per reduce block); the q/k norms are applied again to the keys and the rows asked for.
    """
    attn: Attention = block.attn
    h = block.norm1(x)
    with output_of(attn.qkv, h) as captured:
        x = x + block.drop_path1(block.ls1(attn(h, attn_mask=bias)))
    b, n, _ = x.shape
    qkv = captured["out"].reshape(b, n, 3, attn.num_heads, attn.head_dim)  # (B, N, 3, H, d)
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, H, N, d)
    q = None if rows is None else attn.q_norm(qkv[:, rows, 0].transpose(1, 2))  # (B, H, Q, d)
    return Attended(x, q, k, attn.scale)


def _finish(block: Block, x: Tensor) -> Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


_OPS = BlockOps(_plain, _attend, _finish)


def _forward_features(
    vit: VisionTransformer, library: Callable[..., Tensor], x: Tensor, attn_mask: Tensor | None, is_causal: bool
) -> Tensor:
    """``forward_features`` (B, 3, H, W) -> (B, N', C); the features remember their token sizes for ``pool``."""
    state: PatchState = getattr(vit, STATE_ATTR)
    if not reduces(state.plan):
        state.last = Trace()
        return library(x, attn_mask=attn_mask, is_causal=is_causal)
    if attn_mask is not None or is_causal:
        raise ValueError(
            "attn_mask / is_causal cover the original tokens, which a pumer_patch-reduced ViT does not keep; "
            "call without them, or pumer_patch.remove(model) first"
        )
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    checkpointing = vit.grad_checkpointing and torch.is_grad_enabled()
    tokens, state.last = run_blocks(
        vit.blocks, x, state.plan, _OPS, protected=vit.num_prefix_tokens, checkpointing=checkpointing
    )
    return remember_sizes(vit.norm(tokens.x), tokens.size)


def _merges(vit: VisionTransformer) -> bool:
    plan = getattr(vit, STATE_ATTR).plan
    return plan.options.merge_schedule is not None or any(r.merge > 0 for r in plan.schedule.values())


def _pool(vit: VisionTransformer, library: Callable[..., Tensor], x: Tensor, pool_type: str | None) -> Tensor:
    """``pool`` (B, N', C) -> (B, C), counting each token by its size where the pooling averages."""
    pool_type = vit.global_pool if pool_type is None else pool_type
    averages = isinstance(vit.attn_pool, AttentionPoolLatent) or (vit.attn_pool is None and pool_type in ("avg", "avgmax"))
    size = sizes_of(x)
    if size is None:
        if averages and _merges(vit):
            raise ValueError(
                "these features are not the tensor this pumer_patch-reduced model's forward_features returned "
                "(detached, sliced, copied or from elsewhere), so their merged tokens' sizes are unknown and the "
                f"{pool_type or 'attention'} pooling would weigh them wrongly; pass forward_features' output as it is"
            )
        return library(x, pool_type)
    start = 0 if vit.pool_include_prefix else vit.num_prefix_tokens
    if isinstance(vit.attn_pool, AttentionPoolLatent):
        return vit.attn_pool(x[:, start:], attn_mask=attention_bias(size[:, start:], None, x.dtype))
    if vit.attn_pool is None and pool_type in ("avg", "avgmax"):
        mean = weighted_mean(x[:, start:], size[:, start:])
        return mean if pool_type == "avg" else 0.5 * (x[:, start:].amax(dim=1) + mean)
    return library(x, pool_type)


def _forward_intermediates(vit: VisionTransformer, library: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if reduces(getattr(vit, STATE_ATTR).plan):
        raise ValueError(
            "forward_intermediates (and features_only models) return feature maps on the full patch grid, which a "
            "pumer_patch-reduced ViT does not keep; pumer_patch.remove(model) first, or use forward_features"
        )
    return library(*args, **kwargs)


def _no_script(vit: VisionTransformer) -> None:
    raise TypeError(
        "torch.jit.script cannot compile a pumer_patch-patched timm model (its loop uses data-dependent Python); "
        "use torch.compile, or pumer_patch.remove(model) before scripting"
    )


class PumerVisionTransformer(VisionTransformer):
    """``VisionTransformer`` whose features come from the reducing loop; see the module docstring."""

    _pumer_patched = True

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return _forward_features(self, super().forward_features, x, attn_mask, is_causal)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        return _pool(self, super().pool, x, pool_type)

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        return _forward_intermediates(self, super().forward_intermediates, *args, **kwargs)

    def __prepare_scriptable__(self) -> nn.Module:
        _no_script(self)
        return self


class PumerVisionTransformerDistilled(VisionTransformerDistilled):
    """``VisionTransformerDistilled`` (DeiT, [CLS] and distillation token protected), as above."""

    _pumer_patched = True

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return _forward_features(self, super().forward_features, x, attn_mask, is_causal)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        return _pool(self, super().pool, x, pool_type)

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        return _forward_intermediates(self, super().forward_intermediates, *args, **kwargs)

    def __prepare_scriptable__(self) -> nn.Module:
        _no_script(self)
        return self


_PATCHED: dict[type[nn.Module], type[nn.Module]] = {
    VisionTransformer: PumerVisionTransformer,
    VisionTransformerDistilled: PumerVisionTransformerDistilled,
}


def _library_class(module: nn.Module) -> type[nn.Module]:
    """timm's class of ``module``, under our patch and under any class another tool put on top of it."""
    for cls in type(module).__mro__:
        if "_pumer_patched" in vars(cls):
            return cls.__bases__[0]
    return type(module)


def _is_other_timm_vit(module: nn.Module) -> bool:
    """A timm ViT-like model with its own block classes (``VisionTransformerRelPos``, ...): claimed only to be
    refused. Eva and Beit are claimed before this adapter by ``timm_eva`` (registry order)."""
    return (
        type(module).__module__.startswith("timm.models.")
        and not isinstance(module, VisionTransformer)
        and hasattr(module, "blocks")
        and hasattr(module, "patch_embed")
    )


_OVERRIDES = ("forward", "forward_features", "forward_head", "pool", "forward_intermediates")


def _check_library_part(
    module: nn.Module, expected: type[nn.Module], where: str, overrides: Sequence[str] = ("forward",)
) -> None:
    """Refuse timm's other classes as unsupported and anything else as patched by someone."""
    cls = _library_class(module)
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
        return [m for m in model.modules() if isinstance(m, VisionTransformer) or _is_other_timm_vit(m)]

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        return root.blocks

    def check(self, root: nn.Module) -> None:
        if not isinstance(root, VisionTransformer):
            raise ValueError(
                f"timm's {type(root).__qualname__} has its own block classes; the timm adapter supports {_SUPPORTED}"
            )
        cls = _library_class(root)
        expected = cls if cls in _PATCHED else VisionTransformer
        _check_library_part(root, expected, f"timm {type(root).__qualname__}", _OVERRIDES)
        for i, block in enumerate(root.blocks):
            _check_library_part(block, Block, f"{cls.__qualname__}.blocks[{i}]")
            _check_library_part(block.attn, Attention, f"{cls.__qualname__}.blocks[{i}].attn")
        version = Version(timm.__version__)
        if not _TESTED[0] <= version < _TESTED[1]:
            warnings.warn(
                f"pumer_patch's timm adapter repeats VisionTransformer.forward_features and Block.forward as of "
                f"timm {_TESTED[0]}..<{_TESTED[1]}; found {version}. Check zero-reduction parity.",
                stacklevel=3,
            )

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: dict[str, Any], mode: Mode, schedule: dict[int, Ratios]
    ) -> VitOptions:
        # [CLS] relevance where the output is read from [CLS]; pooled towers use the attention received
        auto = "cls" if root.has_class_token and root.global_pool in ("token", "") else "received"
        return resolve_vit_options(options, len(root.blocks), root.has_class_token, auto, mode)

    def swaps(self, root: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
        return [(root, _PATCHED[_library_class(root)])]
