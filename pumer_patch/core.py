"""The token-reduction maths: pruning, bipartite merging, size and source tracking.

Pure torch: tensors in, tensors out; nothing here knows a model. Every function works on a batch
at once (no Python loop over samples or tokens) and every output count depends only on the input
shapes and the ratios, so shapes stay static for ``torch.compile`` and CUDA graphs.

Two modes (see docs/design.md, "Reference mode"):

* ``"default"``: protected leading tokens (image [CLS], text [CLS]) are never pruned or merged,
  survivors keep their original order, token sizes are carried so merged tokens are averaged by the
  number of original tokens they stand for, and ratios count the unprotected tokens.
* ``"reference"``: the arithmetic of the PuMer research code, which its released checkpoints were
  trained with (ratios of all image tokens, prunable image [CLS], survivors sorted by relevance,
  ToMe's [unmerged A ; B] layout, plain means, no sizes, a layer that prunes nothing reduces nothing).
  The research code's ViLT and METER differ in one rule, so reference mode has two rule sets
  (``Research``): ``"meter"`` also prunes only where the layer merges image tokens (the text still
  merges), and reduces nothing at all, nor counts as a reduce layer, where the prune ratio is 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .ratios import Ratios, RatiosLike

__all__ = [
    "Mode",
    "Tokens",
    "MergePlan",
    "Reduced",
    "prune_count",
    "merge_count",
    "text_merge_count",
    "reduced_counts",
    "prune_indices",
    "prune_tokens",
    "merge_plan",
    "apply_merge",
    "merge_tokens",
    "gather_tokens",
    "take_rows",
    "reduce_tokens",
    "reduces_layer",
    "check_mode",
    "query_relevance",
    "Research",
    "text_to_image_relevance",
    "attention_bias",
    "masked_softmax",
    "unmerge",
    "init_source",
]

Mode = Literal["default", "reference"]
_MODES = ("default", "reference")
#: whose research code ``mode="reference"`` reproduces (the module docstring says where they differ)
Research = Literal["vilt", "meter"]
_RESEARCH = ("vilt", "meter")


@dataclass
class Tokens:
    """A token sequence with the state that travels with it.

    x: (B, N, C) features.
    size: (B, N) float, how many original tokens each token stands for; ``None`` means all ones.
    source: (B, N0) long, for each *original* token the index in ``x`` of the token that now covers
        it, or -1 if it was pruned; ``None`` if not tracked. A partition: each original token is
        covered by at most one survivor. ``unmerge`` uses it to go back to the full grid.
    mask: (B, N) real (1) against padding (0); ``None`` means no padding. Bool in default mode; the
        reference mode averages it when text tokens merge, so it may become fractional there.
    """

    x: Tensor
    size: Tensor | None = None
    source: Tensor | None = None
    mask: Tensor | None = None

    @property
    def count(self) -> int:
        return self.x.shape[1]


class MergePlan(NamedTuple):
    """Where every input token goes in a merge, computed once and applied to tokens, sizes, sources.

    kept: (B, N - r) indices of the input tokens that survive, in output order.
    dest: (B, N) output index of every input token (a merged token points at its destination).
    merged: (B, r) indices of the input tokens merged away.
    """

    kept: Tensor
    dest: Tensor
    merged: Tensor


@dataclass
class Reduced:
    """What ``reduce_tokens`` returns: the tokens, and the plans it applied to them.

    image / text: the reduced tokens (text None when none were given). keep_idx: (B, K) image
    indices kept by pruning, None if nothing was pruned. image_plan / text_plan: the merges applied
    after pruning (indices into the K survivors), None where nothing merged. carry: the image
    attachments given to ``reduce_tokens``, moved by the same indices and plans.
    """

    image: Tokens
    text: Tokens | None
    keep_idx: Tensor | None
    image_plan: MergePlan | None = None
    text_plan: MergePlan | None = None
    carry: tuple[Tensor, ...] = ()


# --------------------------------------------------------------------------------------------
# Counts: the documented formulas, shared by the ops, the adapters, the tests and the benchmarks.
# --------------------------------------------------------------------------------------------


def check_mode(mode: object) -> None:
    """Raise ``ValueError`` unless ``mode`` is ``"default"`` or ``"reference"``."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def _check_research(research: object) -> None:
    if research not in _RESEARCH:
        raise ValueError(f"research must be one of {_RESEARCH}, got {research!r}")



def _check_ratio(name: str, ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(ratio).__name__}")
    if math.isnan(ratio) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {ratio!r}")


def prune_count(n: int, ratio: float, protected: int = 0) -> int:
    """Tokens removed when pruning ``ratio`` of ``n`` tokens whose first ``protected`` stay.

    ``round(ratio * (n - protected))`` (Python's round), leaving at least one unprotected token.
    """
    _check_ratio("prune ratio", ratio)
    prunable = n - protected
    if prunable <= 1:
        return 0
    return min(round(ratio * prunable), prunable - 1)


def merge_count(n: int, r: int, protected: int = 0) -> int:
    """Merges actually done for a requested ``r`` on ``n`` tokens: at most half of the mergeable."""
    return max(0, min(r, (n - protected) // 2))


def text_merge_count(n_text: int, ratio: float, protected: int = 1) -> int:
    """Text tokens merged away: ``round(ratio * n_text)``, capped at half of the unprotected ones."""
    _check_ratio("text_merge ratio", ratio)
    return merge_count(n_text, round(ratio * n_text), protected)


class _Counts(NamedTuple):
    """What one reduce layer asks of the image: keep ``keep`` tokens, then ``merge`` merges.

    ``merge`` is requested: ``merge_plan`` caps it at half of the mergeable survivors.
    """

    keep: int
    merge: int


def reduces_layer(ratios: RatiosLike, mode: Mode = "default", research: Research = "vilt") -> bool:
    """Whether a planned layer is a reduce layer at all (else it runs, and is traced, as a plain one).

    Only METER's research code says no: a layer whose prune ratio is 0 reduces nothing there.
    """
    return not (mode == "reference" and research == "meter" and Ratios.parse(ratios).prune == 0)


def _layer_counts(
    n: int, ratios: Ratios, mode: Mode, protected: int, research: Research, extra_merges: int = 0
) -> tuple[_Counts | None, bool]:
    """The image counts of one reduce layer on ``n`` tokens (None: the image stays as it is), and whether
    the text merges (where its ratio asks).

    default: prune ``round(p * M)`` of the ``M = n - protected`` unprotected tokens (at least one
    left), merge ``round(m * M)`` (M before pruning) plus ToMe's ``extra_merges``.
    reference: ``round(p * n)`` pruned (at least one kept), ``round(m * n)`` merged; a layer that
    prunes nothing reduces nothing; METER's prunes only where it merges, and merges its text anyway.
    """
    if not reduces_layer(ratios, mode, research):
        return None, False
    if mode == "default":
        merges = round(ratios.merge * (n - protected)) + extra_merges
        return _Counts(n - prune_count(n, ratios.prune, protected), merges), True
    n_prune, r = round(ratios.prune * n), round(ratios.merge * n)
    if research == "meter" and r == 0:
        return None, True
    if n_prune == 0:
        return None, False
    return _Counts(max(n - n_prune, 1), r), True


def reduced_counts(
    n_image: int,
    n_text: int,
    ratios: RatiosLike,
    mode: Mode = "default",
    image_protected: int = 1,
    text_protected: int = 1,
    research: Research = "vilt",
) -> tuple[int, int]:
    """(image, text) token counts after one reduce layer, exactly as ``reduce_tokens`` produces them.

    default: prune ``round(p * M)`` of the ``M = n_image - image_protected`` unprotected image tokens,
    merge ``round(m * M)`` (M before pruning) capped at half of what is left; text merges
    ``round(t * n_text)`` capped at half of the unprotected text tokens.
    reference: ``round(p * n_image)`` pruned (nothing protected, at least one kept); if that is zero
    the layer does nothing; else ``round(m * n_image)`` merged, capped at ``(kept - 1) // 2`` (the most
    relevant survivor is never merged), and the text as in default mode. ``research="meter"``: the
    image stays whole where ``round(m * n_image)`` is zero, and nothing changes where ``p`` is 0.
    """
    check_mode(mode)
    _check_research(research)
    ratios = Ratios.parse(ratios)
    reference = mode == "reference"
    counts, text_merges = _layer_counts(n_image, ratios, mode, image_protected, research)
    image, text = n_image, n_text
    if counts is not None:
        image = counts.keep - merge_count(counts.keep, counts.merge, 1 if reference else image_protected)
    if text_merges:
        text = n_text - text_merge_count(n_text, ratios.text_merge, 1 if reference else text_protected)
    return image, text


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _as_tokens(name: str, tokens: Tensor | Tokens, size: Tensor | None = None) -> Tokens:
    if isinstance(tokens, Tensor):
        tokens = Tokens(tokens, size=size)
    elif not isinstance(tokens, Tokens):
        raise TypeError(f"{name} must be a Tensor (B, N, C) or Tokens, got {type(tokens).__name__}")
    x = tokens.x
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, N, C), got rank {x.dim()} shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}; convert it with .float()")
    b, n = x.shape[:2]
    for field in ("size", "mask"):
        value = getattr(tokens, field)
        if value is not None and tuple(value.shape) != (b, n):
            raise ValueError(f"{name}.{field} must have shape (B, N) = {(b, n)}, got {tuple(value.shape)}")
    if tokens.source is not None and (tokens.source.dim() != 2 or tokens.source.shape[0] != b):
        raise ValueError(f"{name}.source must have shape (B, N0) with B = {b}, got {tuple(tokens.source.shape)}")
    return tokens


def _check_scores(name: str, scores: Tensor, b: int, n: int, rank: int = 2) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(scores).__name__}")
    if scores.dim() != rank or tuple(scores.shape[:2]) != (b, n):
        want = "(B, N)" if rank == 2 else "(B, N, C)"
        raise ValueError(f"{name} must have shape {want} with B, N = {b}, {n}; got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {scores.dtype}")


def _check_protected(protected: int, n: int, name: str = "protected") -> None:
    if isinstance(protected, bool) or not isinstance(protected, int) or protected < 0:
        raise ValueError(f"{name} must be a non-negative int, got {protected!r}")
    if protected > n:
        raise ValueError(f"{name}={protected} exceeds the {n} tokens given")


# --------------------------------------------------------------------------------------------
# Gathering with state
# --------------------------------------------------------------------------------------------


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """The rows of x (B, N, C) at idx (B, K): (B, K, C).

    ``x.gather(1, idx[..., None].expand(...))`` reads one index per element; indexing whole rows
    copies C contiguous values per index, which is faster (``benchmarks.reduce_op`` times the step).
    """
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), idx]


def _remap_source(source: Tensor | None, new_index: Tensor) -> Tensor | None:
    """Compose a source map with ``new_index`` (B, N_old): old position -> new position or -1."""
    if source is None:
        return None
    mapped = new_index.gather(1, source.clamp_min(0))
    return torch.where(source >= 0, mapped, torch.full_like(mapped, -1))


def gather_tokens(tokens: Tokens, idx: Tensor) -> Tokens:
    """Keep the tokens at ``idx`` (B, K) in that order; sizes, mask and source follow."""
    b, n, _ = tokens.x.shape
    x = take_rows(tokens.x, idx)
    size = None if tokens.size is None else tokens.size.gather(1, idx)
    mask = None if tokens.mask is None else tokens.mask.gather(1, idx)
    source = None
    if tokens.source is not None:
        # (B, N): new position of each old token, -1 where dropped
        new_index = torch.full((b, n), -1, dtype=torch.long, device=idx.device)
        new_index.scatter_(1, idx, torch.arange(idx.shape[1], device=idx.device).expand(b, -1))
        source = _remap_source(tokens.source, new_index)
    return Tokens(x, size=size, source=source, mask=mask)


def init_source(batch: int, n: int, device: torch.device | str | None = None) -> Tensor:
    """The identity source map (B, N): every token covers itself."""
    return torch.arange(n, device=device).expand(batch, -1).clone()


# --------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------


def prune_indices(
    relevance: Tensor,
    n_keep: int,
    protected: int = 0,
    keep_order: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    """Indices (B, n_keep) of the tokens to keep: the protected ones, then the most relevant.

    relevance: (B, N). Padding (``mask`` 0) counts as least relevant, so it goes first. Ties are
    broken by position (earlier wins), so the choice is deterministic. With ``keep_order`` the
    survivors keep their original order, else they come sorted by relevance (the research code).
    """
    b, n = relevance.shape
    with torch.no_grad():
        scores = relevance[:, protected:].float()
        if mask is not None:
            scores = scores.masked_fill(mask[:, protected:] <= 0, -math.inf)
        order = scores.argsort(dim=-1, descending=True, stable=True)[:, : n_keep - protected]
        if keep_order:
            order = order.sort(dim=-1).values
        order = order + protected
        if protected:
            head = torch.arange(protected, device=relevance.device).expand(b, -1)
            order = torch.cat([head, order], dim=1)
    return order


def prune_tokens(
    tokens: Tensor | Tokens,
    relevance: Tensor,
    ratio: float,
    *,
    protected: int = 0,
    keep_order: bool = True,
) -> Tokens:
    """Drop ``prune_count(N, ratio, protected)`` of the least relevant tokens.

    tokens: (B, N, C) or ``Tokens``; relevance: (B, N), higher is kept. Protected leading tokens are
    always kept, at the front. Returns ``Tokens`` with sizes, mask and source gathered alike.
    """
    tokens = _as_tokens("tokens", tokens)
    b, n, _ = tokens.x.shape
    _check_scores("relevance", relevance, b, n)
    _check_protected(protected, n)
    n_prune = prune_count(n, ratio, protected)
    if n_prune == 0:
        return tokens
    idx = prune_indices(relevance, n - n_prune, protected, keep_order, tokens.mask)
    return gather_tokens(tokens, idx)


# --------------------------------------------------------------------------------------------
# Bipartite soft matching (ToMe), within one modality
# --------------------------------------------------------------------------------------------


def merge_plan(
    metric: Tensor,
    r: int,
    protected: int = 0,
    keep_order: bool = True,
    mask: Tensor | None = None,
) -> MergePlan | None:
    """Match tokens for merging; ``None`` when nothing merges (r capped to 0).

    metric: (B, N, D), compared by cosine similarity (in float32, so fp16 cannot overflow).
    The first ``protected`` tokens are left out; the rest fall into set A (even positions) or B (odd
    positions), as ToMe splits them (with one protected [CLS] this is ToMe's ``class_token=True``,
    which the research code used), each A token picks its most similar B token, and the ``r`` best
    such edges merge (``r`` capped at half of the mergeable tokens). Padding (``mask`` 0) matches
    padding, and those edges rank first, whatever the padding holds (merging padding costs nothing,
    as pruning drops padding first), so the content of padding never decides which real tokens
    merge. Padding meets a real token only where the split leaves an A token no partner of its kind
    and ``r`` needs that edge (counts are static), and then carries no weight in the mean.
    ``keep_order`` puts survivors in their original order; else ToMe's layout [protected ; unmerged A ; B].
    """
    b, n, _ = metric.shape
    r = merge_count(n, r, protected)
    if r == 0:
        return None
    device = metric.device
    with torch.no_grad():
        a0, b0 = protected + protected % 2, protected + 1 - protected % 2  # first A, first B position
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, bb = m[:, a0::2], m[:, b0::2]
        scores = a @ bb.transpose(-1, -2)  # (B, Na, Nb)
        if mask is not None:
            real_a, real_b = (mask > 0)[:, a0::2, None], (mask > 0)[:, None, b0::2]
            scores = scores.masked_fill(real_a != real_b, -math.inf)
            scores = scores.masked_fill(~real_a & ~real_b, 2.0)  # above any cosine: padding pairs go first
        node_max, node_idx = scores.max(dim=-1)  # best B for every A: (B, Na)
        edge_order = node_max.argsort(dim=-1, descending=True, stable=True)
        src = edge_order[:, :r]  # A indices merged away
        dst = node_idx.gather(1, src)  # their B partners
        n_b = bb.shape[1]
        if keep_order:
            keep = torch.ones(b, n, dtype=torch.bool, device=device)
            keep.scatter_(1, a0 + 2 * src, False)
            # stable sort of "dropped" flags lists the kept positions in their original order
            kept = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, : n - r]
        else:
            unm = edge_order[:, r:].sort(dim=-1).values
            head = torch.arange(protected, device=device).expand(b, -1)
            b_all = (b0 + 2 * torch.arange(n_b, device=device)).expand(b, -1)
            kept = torch.cat([head, a0 + 2 * unm, b_all], dim=1)
        dest = torch.empty(b, n, dtype=torch.long, device=device)
        dest.scatter_(1, kept, torch.arange(n - r, device=device).expand(b, -1))
        merged = a0 + 2 * src
        dest.scatter_(1, merged, dest.gather(1, b0 + 2 * dst))
    return MergePlan(kept=kept, dest=dest, merged=merged)


def apply_merge(
    tokens: Tokens, plan: MergePlan | None, weighted: bool = True, reduce: Literal["mean", "sum"] = "mean"
) -> Tokens:
    """Apply a ``MergePlan``: each merged group becomes the (size-weighted) mean of its members.

    tokens.x: (B, N, C) -> (B, N - r, C). Tokens that take no merge keep their exact values. With
    ``weighted=False`` every member counts once (plain mean) and no sizes are produced (the research
    code). Padding carries no weight, so it never shifts a real token. ``reduce="sum"`` adds the
    members up instead, whatever their weights (the research code's ViLT ``merge_style="tip"``);
    sizes and masks follow the groups alike. Accumulated in float32 (float64 inputs in float64).
    Differentiable in ``tokens.x``.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if plan is None:
        return tokens
    x = tokens.x
    b, n, c = x.shape
    n_out = plan.kept.shape[1]
    dest = plan.dest
    size = tokens.size if (weighted and tokens.size is not None) else x.new_ones(b, n, dtype=torch.float32)
    # float32 at least (half precision would round the sums), float64 stays float64
    acc = torch.promote_types(x.dtype, torch.float32)
    # Only the r merged rows are touched: a destination d with weight w_d receiving tokens m moves
    # by sum_m w_m (x_m - x_d) / (w_d + sum_m w_m), which lands on the weighted mean (or by sum_m x_m
    # for a sum), while every other kept token is a plain gather (exact, and no full-size scatter or select).
    to = dest.gather(1, plan.merged)  # (B, r) output row of each merged token
    kept_x = take_rows(x, plan.kept).to(acc)
    if reduce == "sum":
        step = take_rows(x, plan.merged).to(acc)
    else:
        weight = size.to(acc)
        if weighted and tokens.mask is not None:
            weight = weight * (tokens.mask > 0).to(acc)
        w_merged = weight.gather(1, plan.merged)
        den = weight.gather(1, plan.kept).scatter_add(1, to, w_merged)  # (B, N - r) total weight per output
        # padding-only groups have no weight: their step is 0 / eps = 0 and they keep their value
        step = (take_rows(x, plan.merged).to(acc) - take_rows(kept_x, to)) * (
            w_merged / den.gather(1, to).clamp_min(1e-12)
        ).unsqueeze(-1)
    flat = (to + n_out * torch.arange(b, device=x.device).unsqueeze(1)).reshape(-1)  # rows of (B * (N - r), C)
    out = kept_x.reshape(b * n_out, c).index_add_(0, flat, step.reshape(-1, c)).view(b, n_out, c).to(x.dtype)

    new_size = None
    if weighted:
        new_size = torch.zeros(b, n_out, dtype=size.dtype, device=x.device).scatter_add(1, dest, size)
    mask = tokens.mask
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(b, n_out, dtype=torch.bool, device=x.device).scatter_reduce(
                1, dest, mask, reduce="amax", include_self=False
            )
        else:  # the research code averages (possibly fractional) masks like features
            mask = torch.zeros(b, n_out, dtype=mask.dtype, device=x.device).scatter_reduce(
                1, dest, mask, reduce="mean", include_self=False
            )
    return Tokens(out, size=new_size, source=_remap_source(tokens.source, dest), mask=mask)


def merge_tokens(
    tokens: Tensor | Tokens,
    metric: Tensor,
    r: int,
    size: Tensor | None = None,
    *,
    protected: int = 0,
    keep_order: bool = True,
    weighted: bool = True,
) -> Tokens:
    """Merge ``r`` tokens away by bipartite soft matching (ToMe) on ``metric``.

    tokens: (B, N, C) or ``Tokens``; metric: (B, N, D) (e.g. attention keys averaged over heads);
    size: (B, N) token sizes when ``tokens`` is a bare tensor. ``r`` is capped at half of the
    ``N - protected`` mergeable tokens; the protected leading tokens come back unchanged at the front.
    Output count: ``N - merge_count(N, r, protected)``.
    """
    tokens = _as_tokens("tokens", tokens, size)
    b, n, _ = tokens.x.shape
    _check_scores("metric", metric, b, n, rank=3)
    _check_protected(protected, n)
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a non-negative int (tokens to merge away), got {r!r}")
    plan = merge_plan(metric, r, protected, keep_order, tokens.mask)
    return apply_merge(tokens, plan, weighted)


# --------------------------------------------------------------------------------------------
# Guidance, bias, un-merging
# --------------------------------------------------------------------------------------------


def text_to_image_relevance(attn: Tensor, text_mask: Tensor | None = None, mode: Mode = "default") -> Tensor:
    """Relevance (B, N) of each image token: the attention text pays to it (the paper's ``mean_head``).

    attn: (B, H, T, N) attention probabilities from the T text queries to the N image keys.
    Mean over heads, summed over the real text rows and divided by the real text length. The
    reference mode sums every row, padding included (the research code), and still divides by the
    real length. Without ``text_mask`` every row is real.
    """
    if attn.dim() != 4:
        raise ValueError(f"attn must have shape (B, H, T, N), got {tuple(attn.shape)}")
    check_mode(mode)
    if text_mask is not None and tuple(text_mask.shape) != tuple(attn.shape[::2]):
        raise ValueError(f"text_mask must have shape (B, T) = {tuple(attn.shape[::2])}, got {tuple(text_mask.shape)}")
    probs = attn.float().mean(dim=1)  # (B, T, N)
    if text_mask is None:
        return probs.mean(dim=1)
    text_mask = text_mask.float()
    length = text_mask.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1)
    if mode == "default":
        probs = probs * text_mask.unsqueeze(-1)
    return probs.sum(dim=1) / length


def attention_bias(size: Tensor | None, mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive key bias (B, 1, 1, N): ``log(size)`` for proportional attention, dtype-min on padding.

    Adding ``log(size)`` to the attention logits makes a token that stands for ``s`` originals count
    ``s`` times in the softmax (ToMe). ``None`` when there is neither size nor padding.
    """
    if size is None and mask is None:
        return None
    ref = size if size is not None else mask
    bias = torch.zeros(ref.shape, dtype=torch.float32, device=ref.device)
    if size is not None:
        bias = bias + size.float().log()
    if mask is not None:
        # (1 - mask) * min, as transformers builds it, so fractional reference masks behave alike
        bias = bias + (1.0 - mask.float()) * torch.finfo(torch.float32).min
    # the bias is built in float32: clamp it to what ``dtype`` holds (float16 / bfloat16), never below float32's range
    floor = max(torch.finfo(dtype).min, torch.finfo(torch.float32).min)
    return bias.clamp_min(floor).to(dtype)[:, None, None, :]


def masked_softmax(scores: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """The research code's masked softmax, which its ViLT and METER attention use instead of an additive mask.

    scores: (B, H, Q, K) attention logits; weight: (B, K) key weights in [0, 1] (fractional where
    text merging averaged a real token with a pad). Key j gets ``weight_j * exp(score)``, except that
    query i always sees key i (the diagonal, for the first ``min(Q, K)`` queries, so a padded query
    row is never empty), and every key gets ``eps / K`` on top: ``(w e + eps / K) / (sum(w e) + eps)``.
    Computed in float32, returned in the dtype of ``scores``.
    """
    b, _, q, k = scores.shape
    w = weight.reshape(b, 1, 1, k).float()
    eye = torch.eye(q, k, dtype=torch.float32, device=scores.device).view(1, 1, q, k)
    w = w + (1.0 - w) * eye
    e = (scores - scores.amax(dim=-1, keepdim=True)).float().exp() * w
    return ((e + eps / k) / (e.sum(dim=-1, keepdim=True) + eps)).to(scores.dtype)


def unmerge(x: Tensor, source: Tensor, fill: float = 0.0) -> Tensor:
    """Spread reduced tokens (B, N', C) back to the original grid (B, N0, C) through ``source``.

    Each original token gets the value of the token that covers it; pruned ones get ``fill``.
    """
    out = take_rows(x, source.clamp_min(0))
    return out.masked_fill((source < 0).unsqueeze(-1), fill)


# --------------------------------------------------------------------------------------------
# The PuMer reducer
# --------------------------------------------------------------------------------------------


def query_relevance(query: Tensor, keys: Tensor) -> Tensor:
    """Relevance (B, N) from one query vector per sample: its softmax attention over the keys.

    query: (B, C) or (B, 1, C), e.g. a text [CLS]; keys: (B, N, C), e.g. the image merge metric.
    Scaled by ``1 / sqrt(C)``, computed in float32.
    """
    if query.dim() == 3 and query.shape[1] == 1:
        query = query[:, 0]
    if query.dim() != 2 or keys.dim() != 3 or query.shape[0] != keys.shape[0] or query.shape[1] != keys.shape[2]:
        raise ValueError(
            f"query must be (B, C) or (B, 1, C) for keys (B, N, C) = {tuple(keys.shape)}, got {tuple(query.shape)}"
        )
    logits = torch.einsum("bc,bnc->bn", query.float(), keys.float()) / math.sqrt(keys.shape[-1])
    return logits.softmax(dim=-1)


class _ImageStep(NamedTuple):
    """The image half of a reduce step: the pruned tokens, and what merges them."""

    pruned: Tokens
    keep_idx: Tensor | None
    plan: MergePlan | None


def _check_inputs(
    relevance: Tensor | None,
    image_tokens: Tensor | Tokens,
    ratios: RatiosLike,
    image_metric: Tensor | None,
    text_tokens: Tensor | Tokens | None,
    text_metric: Tensor | None,
    mode: Mode,
    image_protected: int,
    text_protected: int,
    merge_style: str,
    research: str,
    extra_merges: int,
    carry: tuple[Tensor, ...],
) -> tuple[Ratios, Tokens, Tokens | None]:
    """Every argument of ``reduce_tokens`` checked; the parsed ratios and the image and text ``Tokens``."""
    check_mode(mode)
    if merge_style not in ("tome", "tip"):
        raise ValueError(f"merge_style must be 'tome' or 'tip', got {merge_style!r}")
    if merge_style == "tip" and mode != "reference":
        raise ValueError("merge_style='tip' is the research code's arithmetic: use it with mode='reference'")
    _check_research(research)
    if isinstance(extra_merges, bool) or not isinstance(extra_merges, int) or extra_merges < 0:
        raise ValueError(f"extra_merges must be a non-negative int (ToMe's r), got {extra_merges!r}")
    if extra_merges and mode != "default":
        raise ValueError("extra_merges is ToMe's schedule, which the research code (mode='reference') has not")
    ratios = Ratios.parse(ratios)
    image = _as_tokens("image_tokens", image_tokens)
    b, n, _ = image.x.shape
    if image_metric is not None:
        _check_scores("image_metric", image_metric, b, n, rank=3)
    text = None if text_tokens is None else _as_tokens("text_tokens", text_tokens)
    if text is not None:
        if text.x.shape[0] != b:
            raise ValueError(f"text_tokens has batch {text.x.shape[0]} but image_tokens has batch {b}")
        if text_metric is not None:
            _check_scores("text_metric", text_metric, b, text.x.shape[1], rank=3)
        _check_protected(text_protected, text.x.shape[1], "text_protected")
    if relevance is None and ratios.prune > 0:
        raise ValueError("pruning needs guidance: pass relevance (B, N) (e.g. query_relevance(text_cls, keys)), or prune=0")
    if relevance is not None:
        if not isinstance(relevance, Tensor) or not relevance.is_floating_point():
            raise TypeError("relevance must be a floating Tensor (B, N); for a text query use query_relevance(query, keys)")
        if tuple(relevance.shape) != (b, n):
            raise ValueError(
                f"relevance must be (B, N) = ({b}, {n}), one score per image token; got {tuple(relevance.shape)} "
                f"(for a text query (B, C) pass query_relevance(query, keys))"
            )
    _check_protected(image_protected, n, "image_protected")
    for value in carry:
        if not isinstance(value, Tensor) or value.dim() not in (2, 3) or tuple(value.shape[:2]) != (b, n):
            raise ValueError(f"each carry must be (B, N) or (B, N, K) with B, N = {b}, {n}, one row per image token")
    return ratios, image, text


def _image_step_default(image: Tokens, relevance: Tensor | None, metric: Tensor, counts: _Counts, protected: int) -> _ImageStep:
    """Prune to the ``counts.keep`` most relevant, then match ``counts.merge`` pairs.

    Protected tokens stay first and whole; survivors keep their spatial order.
    """
    keep_idx = None
    if counts.keep < image.count:
        keep_idx = prune_indices(relevance, counts.keep, protected, keep_order=True, mask=image.mask)
        image, metric = gather_tokens(image, keep_idx), take_rows(metric, keep_idx)
    plan = merge_plan(metric, counts.merge, protected, keep_order=True, mask=image.mask)
    return _ImageStep(image, keep_idx, plan)


def _image_step_reference(
    image: Tokens, relevance: Tensor | None, metric: Tensor, counts: _Counts, merge_style: str
) -> _ImageStep:
    """The research code's: nothing protected from pruning, survivors sorted by relevance, ToMe's layout.

    Its ToMe (``class_token=True``) on relevance-sorted survivors protects the most relevant one.
    ``"tip"`` matches keys scaled by each survivor's relevance. The image mask is reset to ones.
    """
    image = replace(image, mask=None)
    keep_idx = None
    if counts.keep < image.count:
        keep_idx = prune_indices(relevance, counts.keep, 0, keep_order=False)
        image, metric = gather_tokens(image, keep_idx), take_rows(metric, keep_idx)
    if merge_style == "tip":  # (B, K, D) keys scaled by the survivors' relevance, in relevance order
        kept_relevance = relevance if keep_idx is None else relevance.gather(1, keep_idx)
        metric = metric * kept_relevance.unsqueeze(-1)
    plan = merge_plan(metric, counts.merge, 1, keep_order=False)
    return _ImageStep(image, keep_idx, plan)


def _text_step(text: Tokens, metric: Tensor, ratio: float, mode: Mode, protected: int) -> tuple[Tokens, MergePlan | None]:
    """Merge ``text_merge_count`` text tokens within the text (the reference mode: [CLS] only kept, plain means,
    ToMe's layout, the mask averaged like the features but ignored by the matching)."""
    reference = mode == "reference"
    protected = 1 if reference else protected
    r = text_merge_count(text.count, ratio, protected)
    plan = merge_plan(metric, r, protected, keep_order=not reference, mask=None if reference else text.mask)
    return apply_merge(text, plan, weighted=not reference), plan


def _carried(value: Tensor, step: _ImageStep, weighted: bool) -> Tensor:
    """An attachment (B, N) or (B, N, K) moved as the image tokens: pruned rows dropped; a merged group takes the
    (size-weighted) mean of its members' values when they are floating, the surviving destination's otherwise."""
    flat = value.dim() == 2
    value = value.unsqueeze(-1) if flat else value  # (B, N, K)
    if step.keep_idx is not None:
        value = take_rows(value, step.keep_idx)
    if step.plan is not None:
        if value.is_floating_point():
            value = apply_merge(replace(step.pruned, x=value, source=None), step.plan, weighted).x
        else:
            value = take_rows(value, step.plan.kept)
    return value.squeeze(-1) if flat else value


def reduce_tokens(
    relevance: Tensor | None,
    image_tokens: Tensor | Tokens,
    ratios: RatiosLike,
    *,
    image_metric: Tensor | None = None,
    text_tokens: Tensor | Tokens | None = None,
    text_metric: Tensor | None = None,
    mode: Mode = "default",
    image_protected: int = 1,
    text_protected: int = 1,
    merge_style: Literal["tome", "tip"] = "tome",
    research: Research = "vilt",
    extra_merges: int = 0,
    carry: Sequence[Tensor] = (),
) -> Reduced:
    """One PuMer reduce step: text-informed pruning, then merging within each modality.

    relevance: (B, N) how much each image token matters, higher kept, e.g.
        ``text_to_image_relevance(attn, text_mask)`` or, from a text query, ``query_relevance(query,
        keys)``; None: no guidance, only allowed with ``ratios.prune == 0``.
    image_tokens: (B, N, C) or ``Tokens``, the image [CLS] (if any) first.
    ratios: ``Ratios``, ``"p0.1-r0.3-t0.2"``, a mapping or a 3-tuple.
    image_metric: (B, N, D) merge similarity features (attention keys averaged over heads); defaults
        to the image features. text_tokens / text_metric: (B, T, C) / (B, T, D), text [CLS] first;
        merged within the text only when ``ratios.text_merge > 0``.
    image_protected / text_protected: leading tokens never pruned or merged (default mode only; the
        reference mode protects the most relevant image survivor and the text [CLS], as the paper).
    merge_style: how image tokens merge; ``"tome"`` (ToMe: cosine of ``image_metric``, means) or, in
        reference mode only, ``"tip"`` (the research code's ViLT option): the match compares
        ``image_metric`` scaled by each survivor's relevance, and a merged group becomes the *sum* of its
        members. Text always merges ToMe's way.
    research: the reference rule set, ``"vilt"`` or ``"meter"`` (module docstring).
    extra_merges: ToMe's r, image merges on top of the merge ratio's in the same matching (default mode).
    carry: attachments of the image tokens, (B, N) or (B, N, K) each (grid positions, cells), moved
        like the tokens: ``Reduced.carry`` (floating ones are averaged over a merged group as the
        features are, others keep the surviving destination's value).

    Counts follow ``reduced_counts``. Returns ``Reduced`` with the tokens and the plans used.
    """
    carry = tuple(carry)
    ratios, image, text = _check_inputs(
        relevance, image_tokens, ratios, image_metric, text_tokens, text_metric, mode, image_protected,
        text_protected, merge_style, research, extra_merges, carry,
    )
    reference = mode == "reference"
    counts, text_merges = _layer_counts(image.count, ratios, mode, image_protected, research, extra_merges)
    reduced = Reduced(image, text, None, carry=carry)
    if counts is not None:
        metric = image_metric if image_metric is not None else image.x
        if reference:
            step = _image_step_reference(image, relevance, metric, counts, merge_style)
        else:
            step = _image_step_default(image, relevance, metric, counts, image_protected)
        merged = apply_merge(step.pruned, step.plan, weighted=not reference, reduce="sum" if merge_style == "tip" else "mean")
        carried = tuple(_carried(value, step, not reference) for value in carry)
        reduced = Reduced(merged, text, step.keep_idx, step.plan, carry=carried)
    if text is not None and text_merges and ratios.text_merge > 0:
        t_metric = text_metric if text_metric is not None else text.x
        reduced.text, reduced.text_plan = _text_step(text, t_metric, ratios.text_merge, mode, text_protected)
    return reduced
