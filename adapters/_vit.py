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

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from pumer_patch.core import Mode

from .base import Plan

__all__ = ["Relevance", "VitOptions", "reduces", "resolve_vit_options", "weighted_mean"]

Relevance = Literal["cls", "received"]


@dataclass(frozen=True)
class VitOptions:
    """The options the timm and open_clip adapters accept (see the module docstring).

    merge_schedule: as given, an int r or one int per block; resolved to a tuple per block or None.
    relevance: ``"auto"``, ``"cls"`` or ``"received"``; resolved to ``"cls"`` or ``"received"``.
    """

    merge_schedule: int | Sequence[int] | None = None
    relevance: Literal["auto", "cls", "received"] = "auto"


def _is_count(r: object) -> bool:
    """A token count: any int, numpy's too (a schedule built with numpy), never a bool."""
    return isinstance(r, numbers.Integral) and not isinstance(r, bool)


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
        if _is_count(schedule):
            schedule = [schedule] * n_blocks
        if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
            raise TypeError(
                f"merge_schedule must be an int r or a list of {n_blocks} ints (one per block), got {schedule!r}"
            )
        if len(schedule) != n_blocks:
            raise ValueError(
                f"merge_schedule has {len(schedule)} entries but the model has {n_blocks} blocks; give one r per block"
            )
        if any(not _is_count(r) or r < 0 for r in schedule):
            raise ValueError(
                f"merge_schedule entries must be non-negative ints (tokens merged at that block), got {list(schedule)}"
            )
        schedule = tuple(int(r) for r in schedule) if any(schedule) else None
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
