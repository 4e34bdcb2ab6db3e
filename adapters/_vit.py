"""What the single-tower ViT adapters (timm, timm_eva, open_clip, METER's CLIP tower, transformers) share.

Their blocks run through ``_loop.run_blocks``; this module holds their options and pooling:

* ``merge_schedule``: ToMe's r, the tokens merged away at each block: an int for the same r at
  every block, or a list with one r per block. It is independent of ``layers``, which places the
  ratios: ``apply(model, layers=[], merge_schedule=8)`` is plain ToMe. At a block that also has a
  merge ratio the two counts add up in one matching; pruning still follows the ratios. Counts are
  capped at half of the mergeable tokens like the ratios'. Not in reference mode: the research code
  has no such schedule.
* ``relevance``: ``"auto"`` (decided at apply time from how the tower pools), ``"cls"`` or
  ``"received"`` (see ``_loop``).

``text_merge`` ratios have no effect: these towers carry no text. ``mode="reference"`` is refused:
it is the research code's arithmetic for its ViLT and METER checkpoints, and it would prune and move
the prefix tokens that these towers' heads read at fixed positions.

Token sizes travel with the features a reducing forward returns (``pumer_patch.token_sizes``), so a
head applied later, or twice, or to another batch's features first, pools each batch by its own sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor, nn

from pumer_patch.core import Mode, Tokens
from pumer_patch.sizes import token_sizes, with_token_sizes

from . import _loop
from ._loop import Attended, attention_relevance, probability_relevance, run_blocks
from .base import Plan

__all__ = [
    "Attended",
    "BlockOps",
    "Relevance",
    "VitOptions",
    "attention_relevance",
    "probability_relevance",
    "reduces",
    "resolve_vit_options",
    "run_blocks",
    "sizes_of",
    "weighted_mean",
]

Relevance = Literal["cls", "received"]


@dataclass(frozen=True)
class VitOptions:
    """The options the timm and open_clip adapters accept (see the module docstring).

    merge_schedule: as given, an int r or one int per block; resolved to a tuple per block or None.
    relevance: ``"auto"``, ``"cls"`` or ``"received"``; resolved to ``"cls"`` or ``"received"``.
    """

    merge_schedule: int | Sequence[int] | None = None
    relevance: Literal["auto", "cls", "received"] = "auto"


def remember_sizes(features: Tensor, size: Tensor | None) -> Tensor:
    """Record that ``features`` stand for ``size`` original tokens each; returns ``features``."""
    return with_token_sizes(features, size)


def sizes_of(features: Tensor) -> Tensor | None:
    """The token sizes (B, N') of features a reducing forward returned, None for any other tensor."""
    return token_sizes(features)


class BlockOps(NamedTuple):
    """The three block-specific pieces of the loop, as module-level functions of one library.

    plain(block, x, bias) -> x: the library's own forward. attend(block, x, bias, rows) -> Attended:
    the attention half, with ``q`` for the query ``rows`` (a slice) or None. finish(block, x) -> x:
    the MLP half. ``bias`` is the proportional-attention key bias (B, 1, 1, N) or None.
    """

    plain: Callable[[nn.Module, Tensor, Tensor | None], Tensor]
    attend: Callable[[nn.Module, Tensor, Tensor | None, slice | None], Attended]
    finish: Callable[[nn.Module, Tensor], Tensor]


def resolve_vit_options(
    options: dict[str, object], n_blocks: int, has_cls: bool, auto: Relevance, mode: Mode
) -> VitOptions:
    """Check ``merge_schedule`` and ``relevance`` and bring them to their resolved forms.

    merge_schedule: None, an int r (ToMe's r at every block) or one int per block -> tuple or None.
    relevance: ``"auto"`` (``auto``), ``"cls"`` (needs a class token) or ``"received"``.
    """
    if mode == "reference":
        raise ValueError(
            "mode='reference' reproduces the research code's ViLT / METER arithmetic (it prunes and moves the "
            "[CLS], which this ViT's head reads at a fixed position); use mode='default' on timm and open_clip"
        )
    given = VitOptions(**options)
    schedule = given.merge_schedule
    if schedule is not None:
        if isinstance(schedule, int) and not isinstance(schedule, bool):
            schedule = [schedule] * n_blocks
        if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
            raise TypeError(
                f"merge_schedule must be an int r or a list of {n_blocks} ints (one per block), got {schedule!r}"
            )
        if len(schedule) != n_blocks:
            raise ValueError(
                f"merge_schedule has {len(schedule)} entries but the model has {n_blocks} blocks; give one r per block"
            )
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in schedule):
            raise ValueError(
                f"merge_schedule entries must be non-negative ints (tokens merged at that block), got {list(schedule)}"
            )
        schedule = tuple(schedule) if any(schedule) else None
    relevance = given.relevance
    if relevance not in ("auto", "cls", "received"):
        raise ValueError(f"relevance must be 'auto', 'cls' or 'received', got {relevance!r}")
    if relevance == "cls" and not has_cls:
        raise ValueError("relevance='cls' needs a class token, which this model has not; use 'received' or 'auto'")
    return VitOptions(merge_schedule=schedule, relevance=auto if relevance == "auto" else relevance)


def reduces(plan: Plan) -> bool:
    """Whether the plan reduces anything (otherwise the library's forward runs untouched)."""
    return bool(plan.schedule) or plan.options.merge_schedule is not None


def weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """Size-weighted mean over tokens: x (B, N, C), size (B, N) -> (B, C), accumulated in float32.

    A merged token is the size-weighted mean of its members, so this equals the plain mean of the
    tokens it stands for.
    """
    weight = size.float().unsqueeze(-1)
    return ((x.float() * weight).sum(dim=1) / weight.sum(dim=1)).to(x.dtype)


# hf_vit's names from before the loop moved to ``_loop``; they go when it runs ``_loop.run_blocks``
_block_ratios = _loop._block_ratios


def _reduce_block(
    block: nn.Module,
    tokens: Tokens,
    bias: Tensor | None,
    ratios: tuple,
    ops: BlockOps,
    protected: int,
    cls_row: bool,
    guide: Callable[[Tensor], Tensor] | None,
) -> tuple[Tokens, bool]:
    """``_loop._reduce_block`` without a carry, for ``_block_ratios``' answer."""
    tokens, _, merged = _loop._reduce_block(block, tokens, bias, *ratios, ops, protected, cls_row, guide, ())
    return tokens, merged
