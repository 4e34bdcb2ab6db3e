"""ViLT reference mode against the research forward (csarron/PuMer), re-implemented here on its own.

``research_encoder`` below is written from what the research code does (``vit_vilt.Attention`` and
``Block.forward``, the layer loop of ``modeling_vilt.ViltModel``, ``reducer.bipartite_soft_matching``,
``bipartite_weighted_matching`` and ``merge_wavg``, ``common.differentiable_masked_softmax``), in plain
torch on the weights of the Hugging Face ``ViltLayer``s; it calls nothing from ``pumer_patch``. Both
run in float64 on the same encoder input (captured with a hook); both take the masked softmax's exp in
float32, as the research code does, and they agree to about 1e-14 here (the target: 1e-4).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from transformers import ViltConfig, ViltForQuestionAnswering
from transformers.models.vilt.modeling_vilt import ViltLayer

import pumer_patch
from pumer_patch.core import reduce_tokens

TOL = 1e-4  # reference mode within 1e-4 of the research forward, padded or not
N_TEXT, REAL = 40, 26  # text positions; the padded sample's real tokens

# (prune, merge, text merge) per layer, the research config's three ratios
Schedule = dict[int, tuple[float, float, float]]
PAPER: Schedule = {1: (0.1, 0.3, 0.2), 3: (0.1, 0.3, 0.2), 4: (0.1, 0.3, 0.2)}
# layer 3 prunes round(0.005 * 39) = 0 image tokens, so the research code reduces nothing there
# (the text does not merge either), while layers 1 and 5 merge the text harder
SKIPPING: Schedule = {1: (0.2, 0.2, 0.4), 3: (0.005, 0.3, 0.4), 5: (0.1, 0.5, 0.3)}
SCHEDULES = {"paper": PAPER, "skipping": SKIPPING}


# ---------------------------------------------------------------------------------------------
# the research forward
# ---------------------------------------------------------------------------------------------


def research_softmax(scores: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """``differentiable_masked_softmax``: scores (B, H, Q, K), mask (B, K) -> probabilities (B, H, Q, K).

    Key j weighs ``mask_j * exp(s)``, except that query i always sees key i; every key gets
    ``eps / K`` more and the row sum ``eps`` more. The research code exponentiates in float32.
    """
    b, _, q, k = scores.shape
    diagonal = torch.zeros(q, k, dtype=torch.bool)
    diagonal[torch.arange(min(q, k)), torch.arange(min(q, k))] = True
    weight = torch.where(diagonal, torch.ones(()), mask.float()[:, None, None, :])  # (B, 1, Q, K)
    e = (scores - scores.max(dim=-1, keepdim=True).values).float().exp() * weight
    return ((e + eps / k) / (e.sum(dim=-1, keepdim=True) + eps)).to(scores.dtype)


def tome_groups(metric: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """``bipartite_soft_matching`` with its class token: metric (B, N, D) -> (unmerged A, merged A, their B).

    A = even rows, B = odd rows, row 0 (A's first) never merges, ``r`` capped at (N - 1) // 2. Returns
    (B, Na - r) unmerged A indices sorted, (B, r) merged A indices, (B, r) their B partners, all
    counted within A or B.
    """
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)  # (B, Na, Nb)
    scores[:, 0] = -math.inf
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    return order[:, r:].sort(dim=-1).values, order[:, :r], partner.gather(1, order[:, :r])


def merge_sum(x: Tensor, groups: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """The research merge with ``mode="sum"``: x (B, N, C) -> [unmerged A ; B + the A merged into it]."""
    unmerged, merged, partner = groups
    a, b_rows = x[:, ::2], x[:, 1::2]
    c = x.shape[-1]
    take = lambda rows, idx: rows.gather(1, idx[..., None].expand(-1, -1, c))  # noqa: E731
    return torch.cat([take(a, unmerged), b_rows.scatter_add(1, partner[..., None].expand(-1, -1, c), take(a, merged))], dim=1)


def merge_mean(x: Tensor, groups: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``merge_wavg`` without sizes: each merged group becomes the plain mean of its members."""
    return merge_sum(x, groups) / merge_sum(torch.ones_like(x[..., :1]), groups)


def research_layer(
    layer: ViltLayer,
    x: Tensor,
    mask: Tensor,
    text_len: int,
    text_mask: Tensor,
    ratios: tuple[float, float, float] | None,
    sim_method: str,
    merge_style: str,
    pad_rows: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """One research ``Block``: x (B, L, C), mask (B, L) key weights, text_mask (B, T) -> x', mask', text_mask'.

    ``pad_rows=False`` leaves the padded text rows out of the relevance (not the research code: the
    foil that shows the comparison can fail).
    """
    self_attn = layer.attention.attention
    b, length, c = x.shape
    heads = self_attn.num_attention_heads
    h = layer.layernorm_before(x)
    # (B, L, C) -> (B, H, L, d) for each of q, k, v
    q, k, v = (proj(h).reshape(b, length, heads, c // heads).transpose(1, 2) for proj in (self_attn.query, self_attn.key, self_attn.value))
    attn = research_softmax((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5, mask)
    x = x + layer.attention.output.dense((attn @ v).transpose(1, 2).reshape(b, length, c))
    metric = k.mean(dim=1)  # (B, L, d)

    n_image = length - text_len
    n_prune = 0 if ratios is None else round(ratios[0] * n_image)
    if n_prune > 0:  # the research block reduces only when it prunes
        to_image = attn[:, :, :text_len, text_len:]  # every text row, padding included
        if not pad_rows:
            to_image = to_image * text_mask[:, None, :, None]
        per_head = to_image[:, 0] if sim_method == "first_head" else to_image.mean(dim=1)
        scores = per_head.sum(dim=1) / text_mask.sum(dim=1, keepdim=True)
        keep = max(n_image - n_prune, 1)
        top_val, top_idx = scores.topk(keep, dim=-1)  # survivors in relevance order
        pick = lambda rows: rows.gather(1, top_idx[..., None].expand(-1, -1, rows.shape[-1]))  # noqa: E731
        image, image_metric = pick(x[:, text_len:]), pick(metric[:, text_len:])
        r = min(round(ratios[1] * n_image), (keep - 1) // 2)
        if r > 0 and merge_style == "tome":
            image = merge_mean(image, tome_groups(image_metric, r))
        elif r > 0:  # tip: matching on keys scaled by relevance, merged tokens summed
            image = merge_sum(image, tome_groups(image_metric * top_val[..., None], r))
        text = x[:, :text_len]
        r_text = min(round(text_len * ratios[2]), (text_len - 1) // 2)
        if r_text > 0:
            groups = tome_groups(metric[:, :text_len], r_text)
            text, text_mask = merge_mean(text, groups), merge_mean(text_mask[..., None], groups)[..., 0]
        x = torch.cat([text, image], dim=1)
        mask = torch.cat([text_mask, torch.ones_like(image[..., 0])], dim=1)  # image masks reset to ones
    x = x + layer.output.dense(layer.intermediate(layer.layernorm_after(x)))
    return x, mask, text_mask


def research_encoder(
    layers: list[ViltLayer],
    x: Tensor,
    text_mask: Tensor,
    schedule: Schedule,
    sim_method: str = "mean_head",
    merge_style: str = "tome",
    pad_rows: bool = True,
) -> tuple[Tensor, Tensor]:
    """The research layer loop: x (B, T + N, C) embeddings, text_mask (B, T) -> (B, T' + N', C) and the text mask (B, T')."""
    mask = torch.cat([text_mask, torch.ones_like(x[:, text_mask.shape[1] :, 0])], dim=1)
    for i, layer in enumerate(layers):
        x, mask, text_mask = research_layer(
            layer, x, mask, text_mask.shape[1], text_mask, schedule.get(i), sim_method, merge_style, pad_rows
        )
    return x, text_mask


# ---------------------------------------------------------------------------------------------
# the patched model
# ---------------------------------------------------------------------------------------------


def tiny_vilt(seed: int = 0) -> ViltForQuestionAnswering:
    """A float64 ViLT with 65 image tokens (64 patches + [CLS]) and 40 text positions.

    ``initializer_range`` 0.2 makes attention far from uniform, so relevance and matching have
    clear winners and the padded text rows weigh in the relevance.
    """
    torch.manual_seed(seed)
    config = ViltConfig(
        hidden_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=64,
        patch_size=8,
        max_position_embeddings=N_TEXT,
        vocab_size=50,
        num_labels=5,
        initializer_range=0.2,
    )
    return ViltForQuestionAnswering(config).double().eval()


def batch(padded: bool, seed: int = 0) -> dict[str, Tensor]:
    """Two samples of 40 text positions; with ``padded`` the first has 26 real tokens, the rest pad (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (2, N_TEXT), generator=g)
    mask = torch.ones(2, N_TEXT, dtype=torch.long)
    if padded:
        mask[0, REAL:] = 0
        ids[0, REAL:] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64),
    }


def forward(model: ViltForQuestionAnswering, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(encoder input (B, L, C), encoder output (B, L', C), logits) of one forward of ``model``."""
    seen: dict[str, Tensor] = {}

    def capture(_module, args, kwargs, output) -> None:
        seen["input"] = args[0] if args else kwargs["hidden_states"]
        seen["output"] = output[0]

    handle = model.vilt.encoder.register_forward_hook(capture, with_kwargs=True)
    try:
        torch.manual_seed(0)  # ViLT samples its patch order
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        handle.remove()
    return seen["input"], seen["output"], logits


def head(model: ViltForQuestionAnswering, encoded: Tensor) -> Tensor:
    """Logits from the encoder output (B, L, C): the final layernorm, the pooler on the text [CLS], the classifier."""
    return model.classifier(model.vilt.pooler(model.vilt.layernorm(encoded)))


def research(
    model: ViltForQuestionAnswering, embedded: Tensor, text_mask: Tensor, schedule: Schedule, **kwargs: str | bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(encoder output (B, L', C), logits, final text mask (B, T')) of the research forward on ``embedded``."""
    with torch.no_grad():
        encoded, final_mask = research_encoder(list(model.vilt.encoder.layer), embedded, text_mask.double(), schedule, **kwargs)
        return encoded, head(model, encoded), final_mask


def patched(schedule: Schedule, **options: str) -> ViltForQuestionAnswering:
    model = tiny_vilt()
    ratios = {i: pumer_patch.Ratios(*r) for i, r in schedule.items()}
    return pumer_patch.apply(model, ratios=ratios, mode="reference", **options)


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("merge_style", ["tome", "tip"])
@pytest.mark.parametrize("relevance", ["mean_head", "first_head"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_reduction_matches_the_research_forward(padded: bool, schedule: str, relevance: str, merge_style: str):
    steps = SCHEDULES[schedule]
    model = patched(steps, relevance=relevance, merge_style=merge_style)
    inputs = batch(padded)
    embedded, encoded, logits = forward(model, inputs)
    want, want_logits, final_mask = research(model, embedded, inputs["attention_mask"], steps, sim_method=relevance, merge_style=merge_style)
    assert max_diff(encoded, want) < TOL  # every row, padded text rows included: the layouts agree
    assert max_diff(logits, want_logits) < TOL
    if padded and schedule == "skipping":  # the case is what it claims: a real token merged with a pad
        assert ((final_mask > 0) & (final_mask < 1)).any()


def test_a_layer_that_prunes_nothing_reduces_nothing():
    # round(0.005 * 65) = 0 at every layer: the reference loop runs its masked softmax and reduces nothing
    steps = {1: (0.005, 0.3, 0.2), 4: (0.005, 0.3, 0.2)}
    model = patched(steps)
    inputs = batch(padded=True)
    embedded, encoded, logits = forward(model, inputs)
    want, want_logits, _ = research(model, embedded, inputs["attention_mask"], steps)
    assert encoded.shape[1] == N_TEXT + 65
    assert max_diff(encoded, want) < TOL
    assert max_diff(logits, want_logits) < TOL


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_no_reduction_stays_within_the_target(padded: bool):
    """An empty schedule falls back to the library: HF's additive mask, not the research masked softmax.

    What that leaves: real query rows differ only by the softmax's epsilon (every key gets 1e-6 / L
    of weight, pads included): about 6e-6 in the encoder output and 5e-7 in the logits here. Padded
    query rows differ for real (HF: the real keys only; research: the real keys and itself), but
    without reduction nothing reads them, so they are left out of the comparison.
    """
    model = pumer_patch.apply(tiny_vilt(), layers=[1], prune_ratio=0.0, mode="reference")
    inputs = batch(padded)
    embedded, encoded, logits = forward(model, inputs)
    want, want_logits, _ = research(model, embedded, inputs["attention_mask"], {})
    real = torch.cat([inputs["attention_mask"], torch.ones(2, 65, dtype=torch.long)], dim=1).bool()
    assert max_diff(encoded[real], want[real]) < TOL
    assert max_diff(logits, want_logits) < TOL


def test_the_padded_case_can_fail():
    """The comparison is sharp: leaving the padded text rows out of the relevance (what HF's additive
    mask amounted to) moves the research forward far beyond the tolerance."""
    model = tiny_vilt()
    inputs = batch(padded=True)
    embedded, _, _ = forward(model, inputs)
    _, with_pads, _ = research(model, embedded, inputs["attention_mask"], PAPER)
    _, without_pads, _ = research(model, embedded, inputs["attention_mask"], PAPER, pad_rows=False)
    assert max_diff(with_pads, without_pads) > 100 * TOL


def test_tip_is_for_reference_mode_only():
    with pytest.raises(ValueError, match="mode='reference'"):
        pumer_patch.apply(tiny_vilt(), "p0.1-r0.3-t0.2-135", merge_style="tip")
    with pytest.raises(ValueError, match="merge_style must be"):
        pumer_patch.apply(tiny_vilt(), "p0.1-r0.3-t0.2-135", mode="reference", merge_style="sum")
    with pytest.raises(ValueError, match="mode='reference'"):
        reduce_tokens(torch.rand(1, 9), torch.randn(1, 9, 4), "p0.2-r0.2-t0", merge_style="tip")
