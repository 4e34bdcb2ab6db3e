"""What the two timm adapters share (``timm``: ``VisionTransformer``; ``timm_eva``: ``Eva``, ``Beit``).

Both switch a timm root to a subclass whose ``forward_features`` runs the reducing loop: the root
mixin refuses what a reduced token sequence cannot give (feature maps on the full grid, masks over
the original tokens, TorchScript), and ``pooling_sizes`` is how their heads get the token sizes
``forward_features`` attached to its output.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pumer_patch.core import Tokens
from pumer_patch.sizes import require_token_sizes, with_token_sizes

from ._vit import reduces
from .base import STATE_ATTR, PatchState, Plan, Trace, library_class, record_trace

__all__ = ["TIMM_TESTED", "PumerTimmRoot", "merges", "pooling_sizes", "refuse_masks"]

#: the timm versions whose lines both timm adapters repeat (``base.warn_if_untested``)
TIMM_TESTED = ("1.0", "2")


def merges(plan: Plan) -> bool:
    """Whether the plan merges tokens (so sizes differ from one and pooling must weigh by them)."""
    return plan.options.merge_schedule is not None or any(r.merge > 0 for r in plan.schedule.values())


def pooling_sizes(root: nn.Module, x: Tensor, what: str) -> Tensor | None:
    """The token sizes (B, N') of features ``x`` for the ``what`` pooling of ``root``; None where nothing merged.

    Raises ``TokenSizesLost`` when the patch merges and ``x`` is not the tensor ``forward_features`` returned.
    """
    plan = getattr(root, STATE_ATTR).plan
    return require_token_sizes(x, consumer=f"timm {library_class(root).__qualname__}'s {what} pooling", merged=merges(plan))


def refuse_masks(attn_mask: Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError(
            "attn_mask / is_causal cover the original tokens, which a pumer_patch-reduced ViT does not keep; "
            "call without them, or pumer_patch.remove(model) first"
        )


class PumerTimmRoot(nn.Module):
    """Mixed into every patched timm root before timm's class (the last base).

    ``forward_features`` runs timm's own when the plan reduces nothing, else the root's reducing
    loop (``_reduce_features``), and attaches the token sizes to the normed features for the heads;
    the refusals are what a reduced token sequence cannot give.
    """

    def forward_features(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """(B, 3, H, W) -> (B, N', C), carrying its token sizes; the arguments are timm's."""
        state: PatchState = getattr(self, STATE_ATTR)
        if not reduces(state.plan):
            record_trace(state, Trace())
            return super().forward_features(x, *args, **kwargs)
        tokens, trace = self._reduce_features(x, state.plan, *args, **kwargs)
        record_trace(state, trace)
        return with_token_sizes(self.norm(tokens.x), tokens.size)

    def _reduce_features(self, x: Tensor, plan: Plan, *args: Any, **kwargs: Any) -> tuple[Tokens, Trace]:
        """(B, 3, H, W) -> the tokens leaving the last block (before the final norm) and the trace."""
        raise NotImplementedError

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        if reduces(getattr(self, STATE_ATTR).plan):
            raise ValueError(
                "forward_intermediates (and features_only models) return feature maps on the full patch grid, which "
                "a pumer_patch-reduced ViT does not keep; pumer_patch.remove(model) first, or use forward_features"
            )
        return super().forward_intermediates(*args, **kwargs)

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(
            "torch.jit.script cannot compile a pumer_patch-patched timm model (its loop uses data-dependent Python); "
            "use torch.compile, or pumer_patch.remove(model) before scripting"
        )
