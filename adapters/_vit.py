"""The block loop shared by the single-tower ViT adapters (timm, open_clip).

Both towers stack pre-norm blocks ``x + attn(norm1(x)); x + mlp(norm2(x))`` over image tokens whose
first ``protected`` are prefix tokens ([CLS], distillation, registers). A reduce block runs its
attention half, reduces the tokens with ``pumer_patch.core.reduce_tokens`` and runs its MLP half on
the survivors (ToMe's and PuMer's place). Each adapter hands the loop a ``BlockOps``: the whole
block, the attention half (also returning the keys and the query rows asked for) and the MLP half.

Relevance without text (pruning):

* ``"cls"``: the [CLS] row of the attention, mean over heads (EViT), for towers pooled from [CLS].
* ``"received"``: the attention each token receives from the non-prefix queries, mean over heads,
  each query weighted by its size. For towers that pool over their tokens (``avg``, ``map``) it
  plays the [CLS] row's part: the mean of the attention outputs over the pooled queries is
  ``sum_j received_j v_j``, so ``received_j`` is token j's share of what the pooled feature reads
  at this layer (Learned Token Pruning, Kim et al. 2022, scores tokens this way; for ``map`` it is
  a proxy, the latent query being learned). It costs one extra ``q k^T`` (2 B H N^2 d FLOPs) at
  each pruning block; the [CLS] row costs 2 B H N d.

Merge metric: the attention keys averaged over heads (ToMe). Both are computed without gradient:
they only choose indices.

Options (``pumer_patch.apply(..., **options)``):

* ``merge_schedule``: ToMe's r, the tokens merged away at each block: an int for the same r at
  every block, or a list with one r per block. It is independent of ``layers``, which places the
  ratios: ``apply(model, layers=[], merge_schedule=8)`` is plain ToMe. At a block that also has a
  merge ratio the two counts add up in one matching; pruning still follows the ratios. Counts are
  capped at half of the mergeable tokens like the ratios'. Not in reference mode: the research code
  has no such schedule.
* ``relevance``: ``"auto"`` (decided at apply time from how the tower pools), ``"cls"`` or
  ``"received"``.

``text_merge`` ratios have no effect: these towers carry no text. ``mode="reference"`` is refused:
it is the research code's arithmetic for its ViLT and METER checkpoints, and it would prune and move
the prefix tokens that these towers' heads read at fixed positions.

Token sizes travel with the features a reducing forward returns (``sizes_of``), so a head applied
later, or twice, or to another batch's features first, pools each batch by its own sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from pumer_patch.core import Mode, Tokens, reduce_tokens
from pumer_patch.ratios import Ratios
from pumer_patch.sizes import token_sizes, with_token_sizes

from ._loop import Loop, Policy, key_bias, start
from .base import Plan, Trace

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


class Attended(NamedTuple):
    """What the attention half of a block hands back.

    x: (B, N, C) after the attention residual. q: (B, H, Q, d) the query rows asked for (after any
    q norm), or None. k: (B, H, N, d) the keys (after any k norm). scale: the logit scale.
    probs: (B, H, N, N) the attention probabilities the block computed anyway (eager attention), or
    None; when given, relevance reads its rows instead of recomputing them from ``q``.
    """

    x: Tensor
    q: Tensor | None
    k: Tensor
    scale: float
    probs: Tensor | None = None


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


def attention_relevance(q: Tensor, k: Tensor, scale: float, bias: Tensor | None, query_size: Tensor | None) -> Tensor:
    """Relevance (B, N): attention paid to each key, mean over heads and over the query rows.

    q: (B, H, Q, d) query rows; k: (B, H, N, d); bias: (B, 1, 1, N) key bias as in the forward;
    query_size: (B, Q) weights of the query rows (their sizes), None for a plain mean. float32.
    """
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Q, N)
    if bias is not None:
        logits = logits + bias.float()
    return probability_relevance(logits.softmax(dim=-1), query_size)


def probability_relevance(probs: Tensor, query_size: Tensor | None) -> Tensor:
    """Relevance (B, N) from attention probabilities (B, H, Q, N): mean over heads, then over the query rows.

    query_size: (B, Q) weights of the query rows (their sizes), None for a plain mean. float32.
    """
    probs = probs.float().mean(dim=1)  # (B, Q, N)
    if query_size is None:
        return probs.mean(dim=1)
    weight = query_size.float()
    return (probs * weight.unsqueeze(-1)).sum(dim=1) / weight.sum(dim=1, keepdim=True)


def weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """Size-weighted mean over tokens: x (B, N, C), size (B, N) -> (B, C), accumulated in float32.

    A merged token is the size-weighted mean of its members, so this equals the plain mean of the
    tokens it stands for.
    """
    weight = size.float().unsqueeze(-1)
    return ((x.float() * weight).sum(dim=1) / weight.sum(dim=1)).to(x.dtype)


def _block_ratios(plan: Plan, i: int, n: int, protected: int) -> Ratios | None:
    """The ratios of block ``i`` on ``n`` tokens, ``merge_schedule`` folded in; None to run it plainly.

    ToMe's r is added to the tokens the merge ratio asks for, in one matching. It is expressed as a
    merge ratio of the very count ``reduce_tokens`` takes it of, so its rounding gives back r.
    """
    ratios = plan.schedule.get(i)
    schedule = plan.options.merge_schedule
    mergeable = n - protected
    if schedule is None or schedule[i] == 0 or mergeable < 2:
        return ratios
    ratios = ratios or Ratios()
    total = min(round(ratios.merge * mergeable) + schedule[i], mergeable - 1)
    return replace(ratios, merge=total / mergeable)


def _reduce_block(
    block: nn.Module,
    tokens: Tokens,
    bias: Tensor | None,
    ratios: Ratios,
    ops: BlockOps,
    protected: int,
    cls_row: bool,
    guide: Callable[[Tensor], Tensor] | None,
) -> tuple[Tokens, bool]:
    """One reduce block: attention half, relevance and metric, ``reduce_tokens``, MLP half.

    Returns the reduced ``Tokens`` and whether a merge happened (from then on sizes differ from one).
    """
    prune = ratios.prune > 0
    rows = None if not prune or guide is not None else (slice(0, 1) if cls_row else slice(protected, None))
    att = ops.attend(block, tokens.x, bias, rows)
    relevance = None
    with torch.no_grad():  # indices only
        if prune and guide is not None:
            relevance = guide(att.x)
        elif prune:
            weights = None if cls_row or tokens.size is None else tokens.size[:, protected:]
            if att.probs is not None:
                relevance = probability_relevance(att.probs[:, :, rows], weights)
            else:
                relevance = attention_relevance(att.q, att.k, att.scale, bias, weights)
        metric = att.k.mean(dim=1)  # (B, H, N, d) -> (B, N, d): keys averaged over heads
    reduced = reduce_tokens(relevance, replace(tokens, x=att.x), ratios, img_metric=metric, image_protected=protected)
    image = reduced.image
    kept = tokens.count if reduced.keep_idx is None else reduced.keep_idx.shape[1]
    return replace(image, x=ops.finish(block, image.x)), image.count < kept


def run_blocks(
    blocks: Sequence[nn.Module],
    x: Tensor,
    plan: Plan,
    ops: BlockOps,
    *,
    protected: int,
    guide: Callable[[Tensor], Tensor] | None = None,
    checkpointing: bool = False,
) -> tuple[Tokens, Trace]:
    """Run ``blocks`` on x (B, N, C), reducing at the planned blocks (default mode).

    protected: leading prefix tokens never pruned or merged. guide: relevance (B, N) from the
    post-attention tokens (text guidance); None uses ``plan.options.relevance``.
    checkpointing: recompute every block, reduce blocks included, in backward.
    Returns the final ``Tokens`` (with sizes, and sources with ``plan.trace``) and the ``Trace``.
    """
    policy = Policy.of(plan.mode)
    loop = Loop(plan, checkpointing)
    tokens = start(policy, x, source=plan.trace)
    cls_row = plan.options.relevance == "cls"
    bias: Tensor | None = None  # no key bias until a merge makes sizes differ from one
    for i, block in enumerate(blocks):
        ratios = _block_ratios(plan, i, tokens.count, protected)
        if ratios is None:
            tokens = replace(tokens, x=loop.run(ops.plain, block, tokens.x, bias))
            continue
        tokens, merged = loop.run(_reduce_block, block, tokens, bias, ratios, ops, protected, cls_row, guide)
        if merged or bias is not None:
            bias = key_bias(policy, [tokens], x.dtype)
        loop.count(i, tokens)
    return tokens, loop.trace(tokens)
