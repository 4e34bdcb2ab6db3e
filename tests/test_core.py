"""Properties of the core op (``pumer_patch.core``): counts, identity, conservation, source maps,
per-sample batching, pruning order, gradients, padding, reference against default mode, the research
code's arithmetic, guidance and bias helpers, bad input, and the no-loop/no-sync performance contract.

Tensors come from ``torch.Generator(seed)`` (see ``strategies.py``); examples are narrowed with
strategies or ``assume``, never by returning early.
"""

from __future__ import annotations

import collections
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import cases, randn, ratio_triples, ratios
from torch.utils._python_dispatch import TorchDispatchMode

from pumer_patch import Ratios
from pumer_patch.core import (
    Tokens,
    apply_merge,
    attention_bias,
    gather_tokens,
    init_source,
    merge_count,
    merge_plan,
    merge_tokens,
    prune_count,
    prune_indices,
    prune_tokens,
    query_relevance,
    reduce_tokens,
    reduces_layer,
    reduced_counts,
    take_rows,
    text_merge_count,
    text_to_image_relevance,
    unmerge,
)

MODES = st.sampled_from(["default", "reference"])
PROTECTED = st.integers(0, 4)
F32 = st.just(torch.float32)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _tokens(x: torch.Tensor, *, sizes: bool = False, mask: torch.Tensor | None = None) -> Tokens:
    """``Tokens`` over ``x`` (B, N, C) with an identity source map, optional unit sizes and a mask."""
    b, n = x.shape[:2]
    size = torch.ones(b, n) if sizes else None
    return Tokens(x, size=size, source=init_source(b, n), mask=mask)


def _coverage(source: torch.Tensor, count: int) -> torch.Tensor:
    """How many original tokens each of the ``count`` survivors covers: (B, count).

    Asserts the partition: every entry is -1 (pruned) or a survivor index, every survivor covers one
    original token at least.
    """
    assert source.dtype == torch.long
    assert bool(((source >= -1) & (source < count)).all())
    per_slot = torch.zeros(source.shape[0], count + 1, dtype=torch.long)
    per_slot.scatter_add_(1, source + 1, torch.ones_like(source))  # slot 0 counts the pruned
    covered = per_slot[:, 1:]
    assert bool((covered >= 1).all()), "a survivor covers no original token"
    return covered


def _group_means(
    x0: torch.Tensor, source: torch.Tensor, count: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, count, C) float64: the (``weight``-ed) mean of the original tokens each survivor covers."""
    b, _, c = x0.shape
    w = (source >= 0).double() if weight is None else (source >= 0).double() * weight.double()
    idx = source.clamp_min(0)
    sums = torch.zeros(b, count, c, dtype=torch.float64)
    sums.scatter_add_(1, idx[..., None].expand(-1, -1, c), x0.double() * w[..., None])
    total = torch.zeros(b, count, dtype=torch.float64).scatter_add(1, idx, w)
    return sums / total[..., None]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (B, K) of ``x`` (B, N, C)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _trailing_mask(lengths: list[int], n: int) -> torch.Tensor:
    """Bool mask (B, n): the first ``lengths[i]`` tokens of sample i are real, the rest padding."""
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def _tome_groups(metric: torch.Tensor, r: int) -> tuple[list[list[int]], float]:
    """ToMe's bipartite soft matching with ``class_token=True`` on one sample (N, D), written out.

    The research code's merge: A = even positions (the class token first, never merged), B = odd
    positions; each A token picks its most similar B token (cosine) and the ``r`` best edges merge.
    Returns the output tokens in ToMe's order [unmerged A ascending ; B], each as the list of input
    positions averaged into it, and the smallest decision margin (how close a near-tie came).
    """
    n = metric.shape[0]
    r = min(r, (n - 1) // 2)
    if r <= 0:
        return [[i] for i in range(n)], math.inf
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    m = metric.double() / metric.double().norm(dim=-1, keepdim=True)
    scores = m[a[1:]] @ m[b].T  # (|A| - 1, |B|): the class token takes no partner
    best, partner = scores.max(dim=-1)
    order = sorted(range(len(a) - 1), key=lambda k: -float(best[k]))
    margin = math.inf
    if r < len(order):
        margin = float(best[order[r - 1]] - best[order[r]])
    if len(b) > 1:
        top2 = scores[order[:r]].topk(2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
    groups = {j: [j] for j in b}
    merged = {a[1 + k] for k in order[:r]}
    for k in order[:r]:
        groups[b[int(partner[k])]].append(a[1 + k])
    return [[i] for i in a if i not in merged] + [sorted(groups[j]) for j in b], margin


def _apply_groups(x: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Plain means (float64) of ``x`` (N, ...) over each group."""
    return torch.stack([x[g].double().mean(0) for g in groups])


def _research_step(
    x: torch.Tensor, metric: torch.Tensor, relevance: torch.Tensor, text: torch.Tensor, text_metric: torch.Tensor,
    text_mask: torch.Tensor, ratios: Ratios,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The research code's reduce step on one sample: (image, text, text mask, decision margin).

    Prune ``round(p * N)`` (keep one at least) by relevance, survivors sorted by relevance; merge
    ``round(m * N)`` image tokens and ``round(t * T)`` text tokens with ToMe (class token protected);
    a step that prunes nothing does nothing.
    """
    n = x.shape[0]
    n_prune = round(ratios.prune * n)
    if n_prune == 0:
        return x.double(), text.double(), text_mask.double(), math.inf
    keep = sorted(range(n), key=lambda i: (-float(relevance[i]), i))[: max(n - n_prune, 1)]
    img_groups, img_margin = _tome_groups(metric[keep], round(ratios.merge * n))
    txt_groups, txt_margin = _tome_groups(text_metric, round(ratios.text_merge * text.shape[0]))
    image = _apply_groups(x[keep], img_groups)
    return image, _apply_groups(text, txt_groups), _apply_groups(text_mask, txt_groups), min(img_margin, txt_margin)


# --------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------


@given(n=st.integers(1, 600), protected=PROTECTED, ratio=ratios(), more=ratios())
def test_prune_count_rounds_the_ratio_and_keeps_one(n, protected, ratio, more):
    assume(protected <= n)
    prunable = n - protected
    count = prune_count(n, ratio, protected)
    assert n - count >= min(n, protected + 1)  # the protected tokens and one more survive
    assert 0 <= count <= max(prunable - 1, 0)
    if 0 < count < prunable - 1:  # not capped: the nearest count to ratio * prunable
        assert abs(count - ratio * prunable) <= 0.5
    assert prune_count(n, 0.0, protected) == 0
    assert prune_count(n, max(ratio, more), protected) >= prune_count(n, min(ratio, more), protected)


@given(n=st.integers(1, 600), protected=PROTECTED, r=st.integers(0, 700), ratio=ratios())
def test_merge_counts_are_capped_at_half_of_the_mergeable(n, protected, r, ratio):
    assume(protected <= n)
    half = (n - protected) // 2
    done = merge_count(n, r, protected)
    assert done == (r if r <= half else half)
    assert n - done >= min(n, protected + 1)
    text = text_merge_count(n, ratio, protected)
    assert 0 <= text <= half
    if text < half:
        assert abs(text - ratio * n) <= 0.5  # text ratios count all text tokens, [CLS] included


@given(n_image=st.integers(1, 600), n_text=st.integers(1, 60), r=ratio_triples(), image_protected=PROTECTED)
def test_reduced_counts_keep_the_protected_and_follow_the_single_op_counts(n_image, n_text, r, image_protected):
    assume(image_protected <= n_image)
    image, text = reduced_counts(n_image, n_text, r, "default", image_protected)
    kept = n_image - prune_count(n_image, r.prune, image_protected)
    assert min(n_image, image_protected + 1) <= image <= kept  # pruning first, then merging within the survivors
    assert kept - image <= (kept - image_protected) // 2
    assert text == n_text - text_merge_count(n_text, r.text_merge, 1)
    ref_image, ref_text = reduced_counts(n_image, n_text, r, "reference")
    assert min(ref_image, ref_text) >= 1
    if round(r.prune * n_image) == 0:  # a reference layer that prunes nothing reduces nothing
        assert (ref_image, ref_text) == (n_image, n_text)
    else:
        assert ref_text == text
        assert ref_image <= max(n_image - round(r.prune * n_image), 1)


@given(n_image=st.integers(2, 600), n_text=st.integers(1, 60), r=ratio_triples())
def test_meters_research_rules_change_only_the_layers_they_name(n_image, n_text, r):
    vilt = reduced_counts(n_image, n_text, r, "reference")
    meter = reduced_counts(n_image, n_text, r, "reference", research="meter")
    assert reduced_counts(n_image, n_text, r, "default", research="meter") == reduced_counts(n_image, n_text, r)
    if r.prune == 0:  # not a reduce layer at all
        assert not reduces_layer(r, "reference", "meter") and meter == (n_image, n_text)
    elif round(r.merge * n_image) == 0:  # prunes only when it merges; the text merges anyway
        assert meter == (n_image, n_text - text_merge_count(n_text, r.text_merge, 1))
    else:
        assert meter == vilt
    assert reduces_layer(r, "reference") and reduces_layer(r, "default", "meter")


def test_reference_counts_reproduce_the_paper_numbers():
    """docs/design.md, "Reference mode": ViLT p0.1-r0.3-t0.2 at three layers, 145 image and 32 text tokens."""
    expected = [(145, 32), (87, 26), (52, 21), (31, 17)]
    counts = [expected[0]]
    for _ in range(3):
        counts.append(reduced_counts(*counts[-1], "p0.1-r0.3-t0.2", mode="reference"))
    assert counts == expected

    g = torch.Generator().manual_seed(0)
    image, text = Tokens(torch.randn(2, 145, 8, generator=g)), Tokens(torch.randn(2, 32, 8, generator=g))
    for n_image, n_text in expected[1:]:
        relevance = torch.rand(2, image.count, generator=g)
        out = reduce_tokens(relevance, image, "p0.1-r0.3-t0.2", text_tokens=text, mode="reference")
        image, text = out.image, out.text
        assert (image.count, text.count) == (n_image, n_text)


# --------------------------------------------------------------------------------------------
# Identity at ratio 0
# --------------------------------------------------------------------------------------------


@given(case=cases(), protected=PROTECTED, mode=MODES)
def test_ratio_zero_is_the_identity(case, protected, mode):
    assume(protected <= case.tokens)
    g = case.generator()
    x, t, relevance = case.image(g), case.text_x(g), case.relevance(g)
    assert torch.equal(prune_tokens(x, relevance, 0.0, protected=protected).x, x)
    assert torch.equal(merge_tokens(x, case.metric(g), 0, protected=protected).x, x)

    image = _tokens(x, sizes=True, mask=torch.rand(case.batch, case.tokens, generator=g) > 0.3)
    out = reduce_tokens(relevance, image, Ratios(), text_tokens=_tokens(t), mode=mode, image_protected=protected)
    assert out.keep_idx is None
    assert torch.equal(out.image.x, x) and torch.equal(out.text.x, t)
    assert torch.equal(out.image.source, image.source) and torch.equal(out.image.size, image.size)
    assert torch.equal(out.image.mask, image.mask) and torch.equal(out.text.source, init_source(case.batch, case.text))


# --------------------------------------------------------------------------------------------
# Output counts, protected tokens, conservation
# --------------------------------------------------------------------------------------------


@given(case=cases(), ratio=ratios(), r=st.integers(0, 400), triple=ratio_triples(), protected=PROTECTED)
def test_ops_return_the_documented_count_with_protected_tokens_first(case, ratio, r, triple, protected):
    assume(protected <= case.tokens)
    g = case.generator()
    x, t, relevance, metric = case.image(g), case.text_x(g), case.relevance(g), case.metric(g)

    pruned = prune_tokens(_tokens(x), relevance, ratio, protected=protected)
    assert pruned.count == case.tokens - prune_count(case.tokens, ratio, protected)
    _coverage(pruned.source, pruned.count)
    merged = merge_tokens(_tokens(x), metric, r, protected=protected)
    assert merged.count == case.tokens - merge_count(case.tokens, r, protected)
    _coverage(merged.source, merged.count)
    for out in (pruned, merged):
        assert torch.equal(out.x[:, :protected], x[:, :protected])
        assert torch.equal(out.source[:, :protected], init_source(case.batch, protected))
    reduced = reduce_tokens(relevance, _tokens(x), triple, text_tokens=_tokens(t), image_protected=protected)
    counts = reduced_counts(case.tokens, case.text, triple, "default", protected)
    assert (reduced.image.count, reduced.text.count) == counts
    assert torch.equal(reduced.image.x[:, :protected], x[:, :protected])
    assert torch.equal(reduced.text.x[:, :1], t[:, :1])


@given(case=cases(), r=st.integers(0, 400), protected=PROTECTED)
def test_merging_conserves_size_weighted_mass(case, r, protected):
    assume(protected <= case.tokens)
    g = case.generator()
    x, metric = case.image(g), case.metric(g)
    size = torch.randint(1, 5, (case.batch, case.tokens), generator=g).float()
    out = merge_tokens(x, metric, r, size, protected=protected)
    assert torch.equal(out.size.sum(1), size.sum(1))  # small integers: exact in float32
    before = (x.double() * size.double()[..., None]).sum(1)
    after = (out.x.double() * out.size.double()[..., None]).sum(1)
    scale = (x.double().abs() * size.double()[..., None]).sum(1)
    tol = (_eps(case.dtype) + 2 * case.tokens * _eps(torch.float32)) * scale + 1e-12
    assert bool(((before - after).abs() <= tol).all())


@given(case=cases(), r=st.integers(0, 400), protected=PROTECTED, weighted=st.booleans())
def test_tokens_that_take_no_merge_keep_their_exact_values(case, r, protected, weighted):
    assume(protected <= case.tokens)
    g = case.generator()
    x, metric = case.image(g), case.metric(g)
    size = torch.randint(1, 5, (case.batch, case.tokens), generator=g).float()
    tokens = Tokens(x, size=size, source=init_source(case.batch, case.tokens))
    out = merge_tokens(tokens, metric, r, protected=protected, weighted=weighted)
    members = torch.zeros(case.batch, out.count, dtype=torch.long).scatter_add(1, out.source, torch.ones_like(out.source))
    alone = members == 1  # (B, N') output tokens standing for one input token
    origin = torch.zeros(case.batch, out.count, dtype=torch.long).scatter_(
        1, out.source, torch.arange(case.tokens).expand(case.batch, -1)
    )
    assert torch.equal(out.x[alone], take_rows(x, origin)[alone])


@given(case=cases(), steps=st.lists(ratio_triples(), min_size=1, max_size=3), protected=PROTECTED, mode=MODES)
def test_source_map_stays_a_partition_and_unmerges_to_group_means(case, steps, protected, mode):
    assume(protected <= case.tokens)
    g = case.generator()
    x0, t0 = case.image(g), case.text_x(g)
    default = mode == "default"
    protected = protected if default else 0  # reference mode ignores it, and its image may shrink to one token
    image, text = _tokens(x0, sizes=default), _tokens(t0, sizes=default)
    counts = (case.tokens, case.text)
    for i, r in enumerate(steps):
        relevance = torch.rand(case.batch, image.count, generator=g)
        out = reduce_tokens(relevance, image, r, text_tokens=text, mode=mode, image_protected=protected)
        counts = reduced_counts(*counts, r, mode, image_protected=protected)
        if i == 0 and out.keep_idx is not None:  # one step: exactly the tokens not kept are pruned
            kept = torch.zeros(case.batch, case.tokens, dtype=torch.bool).scatter_(1, out.keep_idx, True)
            assert torch.equal(out.image.source < 0, ~kept)
        image, text = out.image, out.text
    assert (image.count, text.count) == counts
    for tokens, x_orig in ((image, x0), (text, t0)):
        covered = _coverage(tokens.source, tokens.count)
        if default:  # sizes carried from ones count the originals; values are their plain means
            assert torch.equal(tokens.size, covered.float())
            spread = unmerge(tokens.x, tokens.source, fill=-7.0)
            expected = unmerge(_group_means(x_orig, tokens.source, tokens.count), tokens.source, fill=-7.0)
            tol = 2 * len(steps) * _eps(case.dtype) * float(x_orig.double().abs().max()) + 1e-6
            assert torch.allclose(spread.double(), expected, rtol=0, atol=tol)
            assert bool((spread[tokens.source < 0] == -7.0).all())


@given(
    case=cases(dtype=F32), r=ratio_triples(), protected=PROTECTED, mode=MODES,
    guide=st.sampled_from(["relevance", "query"]),
)
def test_batching_is_per_sample_and_deterministic(case, r, protected, mode, guide):
    assume(protected <= case.tokens)
    g = case.generator()
    x, t = case.image(g), case.text_x(g)
    metric, text_metric = case.metric(g), case.metric(g, case.text)
    real = torch.rand(case.batch, case.tokens, generator=g) > 0.2
    real[:, :protected] = True
    text_len = torch.randint(1, case.text + 1, (case.batch,), generator=g).tolist()
    text_mask = _trailing_mask(text_len, case.text)
    query = randn(g, (case.batch, 1, metric.shape[-1]), torch.float32)
    relevance = case.relevance(g) if guide == "relevance" else query_relevance(query, metric)

    def run(s: slice):
        image = Tokens(x[s], size=torch.ones(x[s].shape[:2]), source=init_source(*x[s].shape[:2]), mask=real[s])
        text = Tokens(t[s], source=init_source(*t[s].shape[:2]), mask=text_mask[s])
        return reduce_tokens(
            relevance[s], image, r, image_metric=metric[s], text_tokens=text, text_metric=text_metric[s], mode=mode,
            image_protected=protected,
        )

    full, again = run(slice(None)), run(slice(None))
    for i in range(case.batch):
        alone = run(slice(i, i + 1))
        for name in ("x", "size", "source", "mask"):
            for side in ("image", "text"):
                a, b, c = (getattr(getattr(out, side), name) for out in (full, again, alone))
                assert (a is None) == (c is None), f"{side}.{name}"
                if a is not None:
                    assert torch.equal(a, b) and torch.equal(a[i : i + 1], c), f"{side}.{name}"
        if full.keep_idx is not None:
            assert torch.equal(full.keep_idx[i : i + 1], alone.keep_idx)


# --------------------------------------------------------------------------------------------
# Pruning order
# --------------------------------------------------------------------------------------------


@given(
    case=cases(dtype=F32),
    levels=st.one_of(st.none(), st.integers(1, 4)),
    protected=PROTECTED,
    keep_order=st.booleans(),
    padded=st.booleans(),
    data=st.data(),
)
def test_pruning_keeps_the_top_relevance_tokens_earlier_index_first(case, levels, protected, keep_order, padded, data):
    assume(protected <= case.tokens)
    n_keep = data.draw(st.integers(protected, case.tokens), label="n_keep")
    g = case.generator()
    relevance = case.relevance(g, levels)
    mask = torch.rand(case.batch, case.tokens, generator=g) > 0.3 if padded else None
    got = prune_indices(relevance, n_keep, protected, keep_order, mask)
    assert torch.equal(got, prune_indices(relevance, n_keep, protected, keep_order, mask))
    for i in range(case.batch):
        rel = relevance[i].tolist()
        real = [True] * case.tokens if mask is None else mask[i].tolist()
        # real before padding (all padding ranks alike), then by relevance; among equals the earlier wins
        key = lambda j: (0, -rel[j], j) if real[j] else (1, 0.0, j)  # noqa: E731
        best = sorted(range(protected, case.tokens), key=key)[: n_keep - protected]
        if keep_order:
            best.sort()
        assert got[i].tolist() == list(range(protected)) + best


@given(case=cases(), ratio=ratios(), protected=PROTECTED, levels=st.one_of(st.none(), st.integers(1, 4)))
def test_prune_tokens_orders_survivors_spatially_or_by_relevance(case, ratio, protected, levels):
    assume(protected <= case.tokens)
    g = case.generator()
    x, relevance = case.image(g), case.relevance(g, levels)
    spatial = prune_tokens(_tokens(x), relevance, ratio, protected=protected)
    ranked = prune_tokens(_tokens(x), relevance, ratio, protected=protected, keep_order=False)
    kept_spatial = _survivor_positions(spatial)
    kept_ranked = _survivor_positions(ranked)
    assert bool((kept_spatial.diff(dim=1) > 0).all())
    assert torch.equal(kept_ranked.sort(dim=1).values, kept_spatial)
    if ranked.count < case.tokens:  # survivors of a pruning come by relevance, protected ones first
        assert torch.equal(kept_ranked[:, :protected], init_source(case.batch, protected))
        assert bool((relevance.gather(1, kept_ranked[:, protected:]).diff(dim=1) <= 0).all())
    else:  # nothing pruned: nothing moves
        assert torch.equal(ranked.x, x)
    assert torch.equal(ranked.x, _gather(x, kept_ranked))


def _survivor_positions(pruned: Tokens) -> torch.Tensor:
    """(B, K) original position of each survivor of a pruning (sources of a prune are one-to-one)."""
    b, n0 = pruned.source.shape
    positions = torch.zeros(b, pruned.count, dtype=torch.long)
    hit = pruned.source >= 0
    rows, cols = hit.nonzero(as_tuple=True)
    positions[rows, pruned.source[rows, cols]] = cols
    return positions


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@given(case=cases(max_tokens=300), r=ratio_triples(), protected=PROTECTED, mode=MODES)
def test_gradients_reach_kept_and_merged_tokens_only(case, r, protected, mode):
    assume(protected <= case.tokens)
    g = case.generator()
    x, t = case.image(g).requires_grad_(), case.text_x(g).requires_grad_()
    out = reduce_tokens(
        case.relevance(g), _tokens(x), r, text_tokens=_tokens(t), mode=mode, image_protected=protected
    )
    (out.image.x.float().sum() + out.text.x.float().sum()).backward()
    for grad, tokens in ((x.grad, out.image), (t.grad, out.text)):
        covered = tokens.source >= 0
        assert torch.equal((grad != 0).all(-1), covered)
        assert torch.equal((grad == 0).all(-1), ~covered)
        # each output is a mean whose weights sum to one: the gradient mass is one per output value
        total = grad.double().sum((1, 2))
        expected = float(tokens.count * case.channels)
        assert torch.allclose(total, torch.full_like(total, expected), rtol=2 * _eps(case.dtype))


@given(case=cases(max_tokens=300), r=st.integers(0, 200), protected=PROTECTED, weighted=st.booleans())
def test_merge_tokens_passes_gradients_to_every_token(case, r, protected, weighted):
    assume(protected <= case.tokens)
    g = case.generator()
    x = case.image(g).requires_grad_()
    out = merge_tokens(x, case.metric(g), r, protected=protected, weighted=weighted)
    out.x.float().sum().backward()
    assert bool((x.grad != 0).all())
    total = x.grad.double().sum((1, 2))
    assert torch.allclose(total, torch.full_like(total, out.count * case.channels), rtol=2 * _eps(case.dtype))


# --------------------------------------------------------------------------------------------
# Padding (default mode, bool masks)
# --------------------------------------------------------------------------------------------


@given(case=cases(min_tokens=2), ratio=ratios(), protected=PROTECTED)
def test_padding_is_pruned_first(case, ratio, protected):
    assume(protected < case.tokens)
    g = case.generator()
    x, relevance = case.image(g), case.relevance(g)
    real = torch.rand(case.batch, case.tokens, generator=g) > 0.4
    real[:, :protected] = True
    out = prune_tokens(_tokens(x, mask=real), relevance, ratio, protected=protected)
    kept = out.source >= 0
    pruned_real = (real & ~kept).any(1)
    kept_padding = (~real & kept).any(1)
    assert not bool((pruned_real & kept_padding).any())
    assert torch.equal(out.mask, real.gather(1, _survivor_positions(out)))


@given(case=cases(min_tokens=2), r=ratio_triples(), protected=PROTECTED, data=st.data())
def test_padding_never_merges_with_real_tokens(case, r, protected, data):
    """Padding in one trailing run, real tokens in one leading run: each run of two tokens or more
    holds both sets of the bipartite split, so merging never needs to mix real and padding."""
    assume(protected < case.tokens)
    n_prune = prune_count(case.tokens, r.prune, protected)
    image_pads = [_pad_count(data, case.tokens - protected, n_prune) for _ in range(case.batch)]
    text_pads = [_pad_count(data, case.text - 1, 0) for _ in range(case.batch)]
    g = case.generator()
    x, t = case.image(g), case.text_x(g)
    image = _tokens(x, sizes=True, mask=_trailing_mask([case.tokens - p for p in image_pads], case.tokens))
    text = _tokens(t, sizes=True, mask=_trailing_mask([case.text - p for p in text_pads], case.text))
    out = reduce_tokens(case.relevance(g), image, r, text_tokens=text, image_protected=protected)
    for before, after in ((image, out.image), (text, out.text)):
        real, source = before.mask, after.source
        covered = source >= 0
        # padding goes before any real token is pruned
        assert not bool(((real & ~covered).any(1) & (~real & covered).any(1)).any())
        idx = source.clamp_min(0)
        has_real = torch.zeros(case.batch, after.count, dtype=torch.bool).scatter_reduce(1, idx, real & covered, "amax")
        has_pad = torch.zeros(case.batch, after.count, dtype=torch.bool).scatter_reduce(1, idx, ~real & covered, "amax")
        assert not bool((has_real & has_pad).any()), "a real token merged with padding"
        assert torch.equal(after.mask, has_real)


def _pad_count(data: st.DataObject, unprotected: int, n_prune: int) -> int:
    """Padding tokens of one sample such that none, or a run of two at least, survives pruning,
    and the real run is empty or two long at least when padding survives."""
    options = [st.integers(0, min(n_prune, unprotected))]
    if unprotected - n_prune >= 4:
        options.append(st.integers(n_prune + 2, unprotected - 2))
    return data.draw(st.one_of(options), label="padding")


@given(case=cases(min_tokens=2), r=st.integers(0, 300), protected=PROTECTED)
def test_padding_never_shifts_real_values(case, r, protected):
    """Any mask: a merged token with real members is the size-weighted mean of its real members and
    real; a token of padding only stays padding."""
    assume(protected <= case.tokens)
    g = case.generator()
    x, metric = case.image(g), case.metric(g)
    real = torch.rand(case.batch, case.tokens, generator=g) > 0.5
    size = torch.randint(1, 4, (case.batch, case.tokens), generator=g).float()
    tokens = Tokens(x, size=size, source=init_source(case.batch, case.tokens), mask=real)
    out = merge_tokens(tokens, metric, r, protected=protected)
    members_real = torch.zeros(case.batch, out.count, dtype=torch.bool).scatter_reduce(1, out.source, real, "amax")
    assert torch.equal(out.mask, members_real)
    means = _group_means(x, out.source, out.count, weight=size * real)
    got = out.x.double()[members_real]
    tol = 2 * _eps(case.dtype) * float(x.double().abs().max()) + 1e-6
    assert torch.allclose(got, means[members_real], rtol=0, atol=tol)


# --------------------------------------------------------------------------------------------
# Reference mode against default mode and against the research code's arithmetic
# --------------------------------------------------------------------------------------------


@given(case=cases(), r=st.integers(0, 300), protected=PROTECTED)
def test_both_merge_layouts_make_the_same_groups_and_values(case, r, protected):
    """With equal protection and unit sizes, the spatial layout (default) and ToMe's layout with plain
    means (reference) are permutations of each other."""
    assume(protected <= case.tokens)
    g = case.generator()
    x, metric = case.image(g), case.metric(g)
    spatial = merge_tokens(_tokens(x), metric, r, protected=protected)
    tome = merge_tokens(_tokens(x), metric, r, protected=protected, keep_order=False, weighted=False)
    assert tome.size is None
    assert torch.equal(unmerge(spatial.x, spatial.source), unmerge(tome.x, tome.source))
    assert torch.equal(tome.x[:, :protected], x[:, :protected])
    plan = merge_plan(metric, r, protected)
    if plan is not None:
        assert bool((plan.kept.diff(dim=1) > 0).all())
        assert torch.equal(plan.dest.gather(1, plan.kept), torch.arange(plan.kept.shape[1]).expand_as(plan.kept))


@given(case=cases(), r=st.integers(0, 300), protected=PROTECTED, keep_order=st.booleans())
def test_summed_merges_are_the_means_times_the_group_sizes(case, r, protected, keep_order):
    """``reduce="sum"`` (the research code's ViLT ``merge_style="tip"``) makes the same groups as the
    mean; each output is its group's sum: the mean times the members, the total conserved."""
    assume(protected <= case.tokens)
    g = case.generator()
    x, metric = case.image(g).float(), case.metric(g)
    plan = merge_plan(metric, r, protected, keep_order)
    summed = apply_merge(_tokens(x, sizes=True), plan, reduce="sum")
    mean = apply_merge(_tokens(x, sizes=True), plan)
    assert torch.equal(summed.source, mean.source) and torch.equal(summed.size, mean.size)
    # float32 rounding grows with the members of a group: a tolerance per member and unit of scale
    tol = 8 * case.tokens * _eps(torch.float32) * (1 + x.abs().amax())
    assert bool(((summed.x - mean.x * mean.size[..., None]).abs() <= tol * mean.size[..., None]).all())
    assert bool(((summed.x.double().sum(1) - x.double().sum(1)).abs() <= tol * case.tokens).all())
    alone = mean.size == 1  # tokens that take no merge keep their exact values
    assert torch.equal(summed.x[alone], mean.x[alone])


@given(case=cases(), text_merge=ratios(), data=st.data())
def test_reference_and_default_agree_on_pruning_and_text_merging(case, text_merge, data):
    """No protected image token, no image merging, no padding, unit sizes: both modes keep the same
    tokens (reference sorted by relevance, default in place) and merge the text alike."""
    prune = data.draw(st.floats(min(0.95, 0.6 / case.tokens), 0.95), label="prune")
    r = Ratios(prune, 0.0, text_merge)
    g = case.generator()
    x, t, relevance = case.image(g), case.text_x(g), case.relevance(g)
    metric = case.metric(g, case.text)
    out = {
        mode: reduce_tokens(
            relevance, _tokens(x), r, text_tokens=_tokens(t), text_metric=metric, mode=mode, image_protected=0
        )
        for mode in ("default", "reference")
    }
    ref, dflt = out["reference"], out["default"]
    assert (ref.image.count, ref.text.count) == (dflt.image.count, dflt.text.count)
    assert (ref.keep_idx is None) == (dflt.keep_idx is None)
    if ref.keep_idx is not None:
        assert torch.equal(ref.keep_idx.sort(dim=1).values, dflt.keep_idx)
        assert bool((relevance.gather(1, ref.keep_idx).diff(dim=1) <= 0).all())
    for a, b in ((ref.image, dflt.image), (ref.text, dflt.text)):
        assert torch.equal(unmerge(a.x, a.source), unmerge(b.x, b.source))


@given(case=cases(max_tokens=97, max_text=40, max_batch=3, dtype=F32), r=ratio_triples())
def test_reference_mode_reproduces_the_research_code(case, r):
    """Survivors sorted by relevance, ToMe (class token = most relevant survivor) on the image and on
    the text (text [CLS] protected), plain means, fractional text masks: checked against a written-out
    per-sample version of the research code's step."""
    g = case.generator()
    x, t, relevance = case.image(g), case.text_x(g), case.relevance(g)
    metric, text_metric = case.metric(g, dim=16), case.metric(g, case.text, dim=16)
    text_mask = _trailing_mask(torch.randint(1, case.text + 1, (case.batch,), generator=g).tolist(), case.text).float()
    expected = [
        _research_step(x[i], metric[i], relevance[i], t[i], text_metric[i], text_mask[i], r) for i in range(case.batch)
    ]
    assume(min(e[3] for e in expected) > 1e-5)  # no near-tie that float32 and float64 may break apart
    out = reduce_tokens(
        relevance, Tokens(x), r, image_metric=metric, text_tokens=Tokens(t, mask=text_mask), text_metric=text_metric,
        mode="reference",
    )
    for i, (image, text, mask, _) in enumerate(expected):
        assert torch.allclose(out.image.x[i].double(), image, rtol=0, atol=1e-5)
        assert torch.allclose(out.text.x[i].double(), text, rtol=0, atol=1e-5)
        assert torch.allclose(out.text.mask[i].double(), mask, rtol=0, atol=1e-6)


@given(case=cases(), r=ratio_triples())
def test_reference_layer_that_prunes_nothing_reduces_nothing(case, r):
    assume(round(r.prune * case.tokens) == 0)
    g = case.generator()
    x, t = case.image(g), case.text_x(g)
    out = reduce_tokens(case.relevance(g), _tokens(x), r, text_tokens=_tokens(t), mode="reference")
    assert out.keep_idx is None
    assert torch.equal(out.image.x, x) and torch.equal(out.text.x, t)
    assert reduced_counts(case.tokens, case.text, r, "reference") == (case.tokens, case.text)


@given(case=cases(), r=ratio_triples(), protected=PROTECTED, mode=MODES)
def test_reduce_is_pruning_then_merging(case, r, protected, mode):
    """``reduce_tokens`` composes the public ops with the documented counts and protection."""
    assume(protected <= case.tokens)
    g = case.generator()
    x, relevance, metric = case.image(g), case.relevance(g), case.metric(g)
    out = reduce_tokens(relevance, _tokens(x), r, image_metric=metric, mode=mode, image_protected=protected)
    n = case.tokens
    if mode == "default":
        kept = prune_tokens(_tokens(x), relevance, r.prune, protected=protected)
        keep_idx = _survivor_positions(kept)
        manual = merge_tokens(kept, _gather(metric, keep_idx), round(r.merge * (n - protected)), protected=protected)
    else:
        assume(round(r.prune * n) > 0)
        kept = prune_tokens(_tokens(x), relevance, r.prune, keep_order=False)
        keep_idx = _survivor_positions(kept)
        manual = merge_tokens(
            kept, _gather(metric, keep_idx), round(r.merge * n), protected=1, keep_order=False, weighted=False
        )
    assert torch.equal(out.image.x, manual.x)
    assert torch.equal(out.image.source, manual.source)


@given(case=cases(dtype=F32), r=ratio_triples(), protected=PROTECTED, mode=MODES)
def test_the_plans_handed_back_are_the_ones_applied(case, r, protected, mode):
    assume(protected <= case.tokens)
    g = case.generator()
    x, t, relevance, metric = case.image(g), case.text_x(g), case.relevance(g), case.metric(g)
    image = _tokens(x, sizes=mode == "default")
    out = reduce_tokens(relevance, image, r, image_metric=metric, text_tokens=_tokens(t), mode=mode,
                        image_protected=protected)
    pruned = image if out.keep_idx is None else gather_tokens(image, out.keep_idx)
    again = apply_merge(pruned, out.image_plan, weighted=mode == "default")
    assert torch.equal(again.x, out.image.x) and torch.equal(again.source, out.image.source)
    text = apply_merge(_tokens(t), out.text_plan, weighted=mode == "default")
    assert torch.equal(text.x, out.text.x)
    assert (out.image_plan is None) == (out.image.count == pruned.count)


@given(case=cases(dtype=F32), r=ratio_triples(), protected=PROTECTED, mode=MODES, extra=st.integers(0, 40))
def test_a_carry_moves_with_the_tokens(case, r, protected, mode, extra):
    """A floating carry is averaged over each merged group as the features are; an integer one keeps the
    surviving destination's value, and both drop what pruning drops."""
    assume(protected <= case.tokens)
    extra = extra if mode == "default" else 0
    g = case.generator()
    x, relevance, metric = case.image(g), case.relevance(g), case.metric(g)
    coord = randn(g, (case.batch, case.tokens, 2), torch.float32)
    cell = torch.arange(case.tokens).expand(case.batch, -1)
    image = _tokens(x, sizes=mode == "default")
    out = reduce_tokens(relevance, image, r, image_metric=metric, mode=mode, image_protected=protected,
                        extra_merges=extra, carry=(coord, cell))
    moved_coord, moved_cell = out.carry
    follows = reduce_tokens(relevance, replace(image, x=coord), r, image_metric=metric, mode=mode,
                            image_protected=protected, extra_merges=extra)
    torch.testing.assert_close(moved_coord, follows.image.x)  # the same step on the carry as on the features
    # each survivor's cell is one of the original cells it covers: its own where nothing merged into it
    covered = out.image.source  # (B, N0) output index of each original token
    for b in range(case.batch):
        for j, c in enumerate(moved_cell[b].tolist()):
            assert covered[b, c] == j
    assert moved_cell.shape == out.image.x.shape[:2] and moved_coord.shape == (*out.image.x.shape[:2], 2)


@given(case=cases(dtype=F32), r=ratio_triples(), protected=PROTECTED, extra=st.integers(1, 40))
def test_extra_merges_add_to_the_ratios_in_one_matching(case, r, protected, extra):
    assume(protected <= case.tokens)
    g = case.generator()
    x, relevance, metric = case.image(g), case.relevance(g), case.metric(g)
    out = reduce_tokens(relevance, _tokens(x), r, image_metric=metric, image_protected=protected, extra_merges=extra)
    plain = reduce_tokens(relevance, _tokens(x), r, image_metric=metric, image_protected=protected)
    kept = case.tokens - prune_count(case.tokens, r.prune, protected)
    asked = round(r.merge * (case.tokens - protected)) + extra
    assert out.image.count == kept - merge_count(kept, asked, protected)
    assert out.image.count <= plain.image.count
    with pytest.raises(ValueError, match="extra_merges"):
        reduce_tokens(relevance, _tokens(x), r, image_metric=metric, mode="reference", extra_merges=extra)


@given(case=cases(dtype=F32), r=ratio_triples())
def test_meters_research_rules_in_the_reduce_step(case, r):
    g = case.generator()
    x, t, relevance = case.image(g), case.text_x(g), case.relevance(g)
    metric, text_metric = case.metric(g), case.metric(g, case.text)
    text_mask = _trailing_mask(torch.randint(1, case.text + 1, (case.batch,), generator=g).tolist(), case.text).float()

    def run(research: str):
        return reduce_tokens(relevance, Tokens(x), r, image_metric=metric, text_tokens=Tokens(t, mask=text_mask),
                             text_metric=text_metric, mode="reference", research=research)

    meter, vilt = run("meter"), run("vilt")
    assert (meter.image.count, meter.text.count) == reduced_counts(case.tokens, case.text, r, "reference",
                                                                  research="meter")
    if r.prune > 0 and round(r.merge * case.tokens) == 0:  # the image stays whole, the text merges
        assert meter.keep_idx is None and torch.equal(meter.image.x, x)
        # the research text merge: [CLS] kept, ToMe's layout, plain means, the mask not read by the matching
        plan = merge_plan(text_metric, text_merge_count(case.text, r.text_merge, 1), 1, keep_order=False)
        assert torch.equal(meter.text.x, apply_merge(Tokens(t, mask=text_mask), plan, weighted=False).x)
    elif r.prune > 0:
        assert torch.equal(meter.image.x, vilt.image.x) and torch.equal(meter.text.x, vilt.text.x)
    else:
        assert torch.equal(meter.image.x, x) and torch.equal(meter.text.x, t)


# --------------------------------------------------------------------------------------------
# Guidance and attention bias
# --------------------------------------------------------------------------------------------


@given(case=cases(max_tokens=100, dtype=F32), heads=st.integers(1, 4))
def test_text_to_image_relevance_sums_real_rows_over_the_real_length(case, heads):
    g = case.generator()
    attn = torch.rand(case.batch, heads, case.text, case.tokens, generator=g).softmax(-1)
    lengths = torch.randint(1, case.text + 1, (case.batch,), generator=g)
    mask = _trailing_mask(lengths.tolist(), case.text)
    per_row = attn.double().mean(1)  # (B, T, N)
    real_rows = (per_row * mask[..., None]).sum(1) / lengths[:, None]
    all_rows = per_row.sum(1) / lengths[:, None]
    assert torch.allclose(text_to_image_relevance(attn, mask).double(), real_rows, atol=1e-6)
    assert torch.allclose(text_to_image_relevance(attn, mask, "reference").double(), all_rows, atol=1e-6)
    assert torch.allclose(text_to_image_relevance(attn).double(), per_row.mean(1), atol=1e-6)
    # padded rows do not count in default mode, whatever they hold
    noisy = torch.where(mask[:, None, :, None], attn, torch.rand(attn.shape, generator=g))
    assert torch.equal(text_to_image_relevance(noisy, mask), text_to_image_relevance(attn, mask))


@given(case=cases(), with_size=st.booleans(), with_mask=st.booleans())
def test_attention_bias_is_log_size_and_dtype_min_on_padding(case, with_size, with_mask):
    g = case.generator()
    size = torch.randint(1, 9, (case.batch, case.tokens), generator=g).float() if with_size else None
    mask = torch.rand(case.batch, case.tokens, generator=g) > 0.3 if with_mask else None
    bias = attention_bias(size, mask, case.dtype)
    if size is None and mask is None:
        assert bias is None
    else:
        assert bias.shape == (case.batch, 1, 1, case.tokens) and bias.dtype == case.dtype
        flat = bias[:, 0, 0]
        real = torch.ones(case.batch, case.tokens, dtype=torch.bool) if mask is None else mask
        want = size.log().to(case.dtype) if size is not None else torch.zeros_like(flat)
        assert torch.equal(flat[real], want[real])
        assert bool((flat[~real] == torch.finfo(case.dtype).min).all())


@given(case=cases(min_tokens=3, max_tokens=100, dtype=F32), as_3d=st.booleans())
def test_a_text_query_guides_like_its_softmax_relevance(case, as_3d):
    g = case.generator()
    x, metric = case.image(g), case.metric(g)
    query = randn(g, (case.batch, 8), torch.float32)
    relevance = (torch.einsum("bc,bnc->bn", query, metric) / math.sqrt(8)).softmax(-1)
    from_query = query_relevance(query[:, None] if as_3d else query, metric)
    torch.testing.assert_close(from_query, relevance)
    r = Ratios(0.5, 0.2, 0.0)
    by_query = reduce_tokens(from_query, x, r, image_metric=metric)
    by_relevance = reduce_tokens(relevance, x, r, image_metric=metric)
    assert torch.equal(by_query.keep_idx, by_relevance.keep_idx)
    assert torch.equal(by_query.image.x, by_relevance.image.x)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

_X = torch.randn(2, 6, 4)
_REL = torch.rand(2, 6)
_METRIC = torch.randn(2, 6, 3)
_TEXT = torch.randn(2, 5, 4)
_R = "p0.3-r0.2-t0.4"

BAD_CALLS = {
    "tokens rank": (lambda: prune_tokens(torch.randn(6, 4), _REL, 0.1), ValueError, "tokens"),
    "tokens integer": (lambda: prune_tokens(_X.long(), _REL, 0.1), TypeError, "tokens"),
    "tokens type": (lambda: prune_tokens(_X.tolist(), _REL, 0.1), TypeError, "tokens"),
    "tokens.size shape": (
        lambda: prune_tokens(Tokens(_X, size=torch.ones(2, 5)), _REL, 0.1), ValueError, "tokens.size",
    ),
    "tokens.mask shape": (
        lambda: merge_tokens(Tokens(_X, mask=torch.ones(1, 6)), _METRIC, 1), ValueError, "tokens.mask",
    ),
    "tokens.source batch": (
        lambda: merge_tokens(Tokens(_X, source=init_source(3, 6)), _METRIC, 1), ValueError, "tokens.source",
    ),
    "relevance batch": (lambda: prune_tokens(_X, torch.rand(3, 6), 0.5), ValueError, "relevance"),
    "relevance tokens": (lambda: prune_tokens(_X, torch.rand(2, 5), 0.5), ValueError, "relevance"),
    "relevance rank": (lambda: prune_tokens(_X, torch.rand(2, 6, 1), 0.5), ValueError, "relevance"),
    "relevance integer": (lambda: prune_tokens(_X, torch.ones(2, 6, dtype=torch.long), 0.5), TypeError, "relevance"),
    "metric batch": (lambda: merge_tokens(_X, torch.randn(3, 6, 3), 1), ValueError, "metric"),
    "metric tokens": (lambda: merge_tokens(_X, torch.randn(2, 5, 3), 1), ValueError, "metric"),
    "metric rank": (lambda: merge_tokens(_X, torch.randn(2, 6), 1), ValueError, "metric"),
    "metric integer": (lambda: merge_tokens(_X, torch.ones(2, 6, 3, dtype=torch.int32), 1), TypeError, "metric"),
    "r negative": (lambda: merge_tokens(_X, _METRIC, -1), ValueError, "r must"),
    "r bool": (lambda: merge_tokens(_X, _METRIC, True), ValueError, "r must"),
    "r float": (lambda: merge_tokens(_X, _METRIC, 1.5), ValueError, "r must"),
    "protected negative": (lambda: prune_tokens(_X, _REL, 0.1, protected=-1), ValueError, "protected"),
    "protected too many": (lambda: merge_tokens(_X, _METRIC, 1, protected=7), ValueError, "protected"),
    "mode": (lambda: reduce_tokens(_REL, _X, _R, mode="fast"), ValueError, "mode"),
    "counts mode": (lambda: reduced_counts(6, 5, _R, mode="fast"), ValueError, "mode"),
    "ratios string": (lambda: reduce_tokens(_REL, _X, "p0.3-r0.2"), ValueError, "ratios"),
    "ratios type": (lambda: reduce_tokens(_REL, _X, 0.3), TypeError, "ratios"),
    "relevance missing": (lambda: reduce_tokens(None, _X, _R), ValueError, "relevance"),
    "relevance batch (reduce)": (lambda: reduce_tokens(torch.rand(3, 6), _X, _R), ValueError, "relevance"),
    "relevance shape (reduce)": (lambda: reduce_tokens(torch.rand(2, 5), _X, _R), ValueError, "relevance"),
    "relevance query (reduce)": (lambda: reduce_tokens(torch.rand(2, 1, 4), _X, _R), ValueError, "query_relevance"),
    "relevance integer (reduce)": (
        lambda: reduce_tokens(torch.ones(2, 6, dtype=torch.long), _X, _R), TypeError, "relevance",
    ),
    "query shape": (lambda: query_relevance(torch.rand(2, 5), _X), ValueError, "query"),
    "image_tokens rank": (lambda: reduce_tokens(_REL, torch.randn(6, 4), _R), ValueError, "image_tokens"),
    "image_tokens integer": (lambda: reduce_tokens(_REL, _X.int(), _R), TypeError, "image_tokens"),
    "image_metric tokens": (
        lambda: reduce_tokens(_REL, _X, _R, image_metric=torch.randn(2, 5, 3)), ValueError, "image_metric",
    ),
    "image_protected too many": (lambda: reduce_tokens(_REL, _X, _R, image_protected=7), ValueError, "image_protected"),
    "text_tokens batch": (
        lambda: reduce_tokens(_REL, _X, _R, text_tokens=torch.randn(3, 5, 4)), ValueError, "text_tokens",
    ),
    "text_tokens rank": (lambda: reduce_tokens(_REL, _X, _R, text_tokens=torch.randn(5, 4)), ValueError, "text_tokens"),
    "text_tokens integer": (lambda: reduce_tokens(_REL, _X, _R, text_tokens=_TEXT.long()), TypeError, "text_tokens"),
    "text_metric tokens": (
        lambda: reduce_tokens(_REL, _X, _R, text_tokens=_TEXT, text_metric=torch.randn(2, 4, 3)),
        ValueError,
        "text_metric",
    ),
    "text_protected negative": (
        lambda: reduce_tokens(_REL, _X, _R, text_tokens=_TEXT, text_protected=-1), ValueError, "text_protected",
    ),
    "text_protected too many": (
        lambda: reduce_tokens(_REL, _X, _R, text_tokens=_TEXT, text_protected=6), ValueError, "text_protected",
    ),
    "attn rank": (lambda: text_to_image_relevance(torch.rand(2, 5, 6)), ValueError, "attn"),
    "text_mask tokens": (
        lambda: text_to_image_relevance(torch.rand(2, 3, 5, 6), torch.ones(2, 4)), ValueError, "text_mask",
    ),
    "text_mask batch": (
        lambda: text_to_image_relevance(torch.rand(2, 3, 5, 6), torch.ones(1, 5), "reference"), ValueError, "text_mask",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_a_clear_error_naming_the_argument(name):
    call, error, fragment = BAD_CALLS[name]
    with pytest.raises(error, match=fragment):
        call()


_BAD_RATIOS = st.one_of(
    st.floats(max_value=0.0, exclude_max=True).filter(lambda v: v < 0),
    st.floats(min_value=1.0),
    st.just(math.nan),
    st.booleans(),
)


@given(bad=_BAD_RATIOS, slot=st.sampled_from(["prune", "merge", "text_merge"]))
def test_bad_ratios_are_refused_naming_the_ratio(bad, slot):
    error = TypeError if isinstance(bad, bool) else ValueError
    spec = {slot: bad}
    with pytest.raises(error, match=f"Ratios.{slot}"):
        reduce_tokens(_REL, _X, spec, text_tokens=_TEXT)
    with pytest.raises(error, match="prune ratio"):
        prune_tokens(_X, _REL, bad)
    with pytest.raises(error, match="text_merge ratio"):
        text_merge_count(10, bad)


# --------------------------------------------------------------------------------------------
# Performance contract: no Python loop over batch or tokens, no host sync, large shapes run
# --------------------------------------------------------------------------------------------


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2"}


def _dispatched_ops(batch: int, n: int, n_text: int, mode: str) -> collections.Counter[str]:
    g = torch.Generator().manual_seed(0)
    image = Tokens(
        torch.randn(batch, n, 16, generator=g), size=torch.ones(batch, n), source=init_source(batch, n),
        mask=torch.rand(batch, n, generator=g) > 0.1,
    )
    text = Tokens(torch.randn(batch, n_text, 16, generator=g), mask=torch.ones(batch, n_text, dtype=torch.bool))
    with _OpCounter() as counter:
        reduce_tokens(torch.rand(batch, n, generator=g), image, "p0.1-r0.3-t0.2", text_tokens=text, mode=mode)
    return counter.ops


@pytest.mark.parametrize("mode", ["default", "reference"])
def test_reduce_dispatches_the_same_ops_for_any_batch_or_length_and_never_syncs(mode):
    small, large = _dispatched_ops(1, 40, 12, mode), _dispatched_ops(8, 577, 40, mode)
    assert small == large
    assert not _SYNC_OPS & set(large)


@pytest.mark.parametrize("batch", [64, 256])
def test_large_batches_reduce(batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 577, 64, generator=g)
    image = Tokens(x, size=torch.ones(batch, 577), source=init_source(batch, 577))
    out = reduce_tokens(torch.rand(batch, 577, generator=g), image, "p0.1-r0.3-t0.2")
    assert out.image.x.shape == (batch, reduced_counts(577, 1, "p0.1-r0.3-t0.2")[0], 64)
    assert torch.equal(out.image.size.sum(1), (out.image.source >= 0).sum(1).float())
