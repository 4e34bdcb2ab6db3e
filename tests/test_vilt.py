"""ViLT adapter: token arithmetic, FLOPs, padding, patch order, heads, SDPA (the contract is in test_contract.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForImagesAndTextClassification,
    ViltForMaskedLM,
    ViltForQuestionAnswering,
    ViltForTokenClassification,
    ViltModel,
)
from transformers.models.vilt.modeling_vilt import ViltEmbeddings

import pumer_patch
from model_state import same, snapshot
from pumer_patch.adapters.vilt import unmerge_hidden

HEADS = [
    ViltModel,
    ViltForQuestionAnswering,
    ViltForImagesAndTextClassification,
    ViltForImageAndTextRetrieval,
    ViltForMaskedLM,
    ViltForTokenClassification,
]


def tiny_config(**overrides) -> ViltConfig:
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=64,
        patch_size=8,
        max_position_embeddings=24,
        vocab_size=50,
        num_labels=3,
        num_images=2,
        modality_type_vocab_size=3,  # NLVR2 marks its second image with token type 2
    )
    kwargs.update(overrides)
    return ViltConfig(**kwargs)


def make(cls=ViltForQuestionAnswering, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides)).eval()


def inputs(cls, batch: int = 2, text: int = 12, size: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (batch, text), generator=g)
    if cls is ViltForImagesAndTextClassification:
        return {"input_ids": ids, "pixel_values": torch.randn(batch, 2, 3, size, size, generator=g)}
    return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def run(model, batch: dict, seed: int = 123):
    """Forward under a fixed seed: ViLT samples its patch order with torch.multinomial."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(**batch)


def first_tensor(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


# ---------------------------------------------------------------------------------------------
# token arithmetic and FLOPs at the paper's configuration
# ---------------------------------------------------------------------------------------------


def vilt_b32(**overrides) -> ViltConfig:
    """ViLT-B/32's shapes (random weights: the compute is the same as the trained model's)."""
    return ViltConfig(image_size=384, patch_size=32, max_position_embeddings=40, **overrides)


@pytest.mark.parametrize("mode", ["default", "reference"])
def test_paper_config_counts_and_flops(mode):
    torch.manual_seed(0)
    model = ViltModel(vilt_b32()).eval()
    batch = {"input_ids": torch.randint(1, 1000, (1, 40)), "pixel_values": torch.randn(1, 3, 384, 384)}

    def flops() -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            run(model, batch)
        return counter.get_total_flops()

    base = flops()
    pumer_patch.apply(model, "p0.1-r0.3-t0.2-258", mode=mode)
    reduced = flops()
    n_image, n_text, expected = 145, 40, []
    for layer in (2, 5, 8):
        n_image, n_text = pumer_patch.reduced_counts(n_image, n_text, "p0.1-r0.3-t0.2", mode=mode)
        expected.append((layer, n_image, n_text))
    counts = pumer_patch.last_trace(model).counts
    assert [(c.layer, c.image, c.text) for c in counts] == expected
    # the paper's "about 16 GFLOPs" counts multiply-accumulates; FlopCounterMode counts 2 per MAC
    assert 14e9 < base / 2 < 18e9
    assert reduced / base <= 0.60


def test_reference_counts_match_the_paper_numbers():
    torch.manual_seed(0)
    model = ViltModel(vilt_b32(hidden_size=48, num_attention_heads=4, intermediate_size=96)).eval()
    pumer_patch.apply(model, "p0.1-r0.3-t0.2-258", mode="reference")
    run(model, {"input_ids": torch.randint(1, 1000, (2, 32)), "pixel_values": torch.randn(2, 3, 384, 384)})
    counts = pumer_patch.last_trace(model).counts
    assert [(c.image, c.text) for c in counts] == [(87, 26), (52, 21), (31, 17)]


def test_per_layer_schedule_and_ratio_forms():
    model = make()
    batch = inputs(ViltForQuestionAnswering)
    pumer_patch.apply(model, ratios={1: "p0.5-r0-t0", 4: pumer_patch.Ratios(0.0, 0.4, 0.2)})
    run(model, batch)
    counts = pumer_patch.last_trace(model).counts
    # 65 image tokens: prune round(0.5 * 64) = 32 at layer 1; merge round(0.4 * 32) = 13 at layer 4
    assert [(c.layer, c.image, c.text) for c in counts] == [(1, 33, 12), (4, 20, 10)]
    as_tuple = make()
    pumer_patch.apply(as_tuple, layers=[1, 4], ratios=(0.1, 0.2, 0.1))
    as_kwargs = make()
    pumer_patch.apply(as_kwargs, layers=[1, 4], prune_ratio=0.1, merge_ratio=0.2, text_merge_ratio=0.1)
    assert torch.equal(run(as_tuple, batch).logits, run(as_kwargs, batch).logits)


# ---------------------------------------------------------------------------------------------
# padding, patch order, sources
# ---------------------------------------------------------------------------------------------


def test_padded_text_gives_each_sample_its_result_alone():
    model = make()
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.3)
    batch = inputs(ViltForQuestionAnswering, batch=3)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    together = run(model, {**batch, "attention_mask": mask}).logits
    for i in range(3):
        alone = run(model, {k: v[i : i + 1] for k, v in {**batch, "attention_mask": mask}.items()}).logits
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_padded_pixels_are_pruned_first_and_never_merged_into_real_patches():
    model = make()
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.2, trace=True)
    batch = inputs(ViltForQuestionAnswering, batch=2)
    pixel_mask = torch.ones(2, 64, 64, dtype=torch.long)
    pixel_mask[1, :, 40:] = 0  # sample 1: a 64 x 40 image padded to 64 x 64 -> 8 x 5 real patches of 8 x 8
    out = run(model, {**batch, "pixel_mask": pixel_mask}).logits
    trace = pumer_patch.last_trace(model)
    source = trace.image.source  # (B, 65) over [CLS ; patches], -1 where pruned
    real = torch.ones(2, 65, dtype=torch.bool)
    real[1, 1:] = trace.patch_index[1, :, 1] < 5
    assert real[1].sum() == 41
    # sample 1 has 24 padded patches; 13 are pruned at layer 1 (round(0.2 * 64)): all of them padding
    assert (source[1][~real[1]] == -1).sum() >= 13
    assert (source[1][real[1]] >= 0).all()
    for b in range(2):  # no surviving token covers both a real and a padded patch
        covered = source[b]
        for token in covered[covered >= 0].unique():
            members = real[b][covered == token]
            assert members.all() or not members.any()
    # the companion sample does not change the padded sample's answer
    other = {**batch, "pixel_values": torch.cat([torch.randn(1, 3, 64, 64), batch["pixel_values"][1:]])}
    torch.testing.assert_close(run(model, {**other, "pixel_mask": pixel_mask}).logits[1], out[1], rtol=1e-5, atol=1e-5)


def test_fixed_patch_order_is_raster_and_seed_independent():
    model = make()
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, trace=True)
    batch = inputs(ViltForQuestionAnswering)
    a = run(model, batch, seed=1).logits
    patch_index = pumer_patch.last_trace(model).patch_index
    raster = patch_index[..., 0] * 8 + patch_index[..., 1]
    assert torch.equal(raster, torch.arange(64).expand(2, -1))
    torch.testing.assert_close(run(model, batch, seed=2).logits, a)


def test_sources_sizes_and_unmerge_hidden():
    model = make(ViltModel)
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.3, trace=True)
    batch = inputs(ViltModel)
    hidden = run(model, batch).last_hidden_state
    trace = pumer_patch.last_trace(model)
    assert hidden.shape[1] == trace.text.count + trace.image.count
    for tokens in (trace.text, trace.image):
        covered = torch.zeros_like(tokens.size)
        covered.scatter_add_(1, tokens.source.clamp_min(0), (tokens.source >= 0).float())
        assert torch.equal(covered, tokens.size)  # sizes count exactly the originals each token covers
    assert (trace.image.source[:, 0] == 0).all() and (trace.text.source[:, 0] == 0).all()  # [CLS] kept first
    full = unmerge_hidden(hidden, trace)
    assert full.shape == (2, 12 + 65, 32)
    kept = trace.image.source[0] >= 0
    assert torch.equal(full[0, 12:][kept], hidden[0, trace.text.count :][trace.image.source[0][kept]])


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_every_head_runs_patched(cls):
    model = make(cls)
    batch = inputs(cls, text=10)
    expected = first_tensor(run(model, batch)).shape
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.3)
    out = first_tensor(run(model, batch))
    if cls is ViltModel:
        assert out.shape[1] < expected[1]
    else:  # dense text heads (masked LM, token classification) get every text position back
        assert out.shape == expected
    assert torch.isfinite(out).all()


def test_masked_lm_loss_over_text_positions():
    model = make(ViltForMaskedLM)
    batch = inputs(ViltForMaskedLM, text=10)
    labels = torch.full((2, 10), -100)
    labels[:, 3] = 7
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.3)
    out = run(model, {**batch, "labels": labels})
    assert out.logits.shape == (2, 10, 50) and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------
# a model patched by something else
# ---------------------------------------------------------------------------------------------


def test_embeddings_of_another_class_are_refused():
    # an instance-bound method is refused for every family in test_contract.py; this is a subclass
    model = make()
    model.vilt.embeddings.__class__ = type("ToMeEmbeddings", (ViltEmbeddings,), {})
    before = snapshot(model)
    with pytest.raises(ValueError, match="ViltModel.embeddings is .*ToMeEmbeddings"):
        pumer_patch.apply(model, layers=[1], prune_ratio=0.2)
    assert same(snapshot(model), before)


# ---------------------------------------------------------------------------------------------
# attention="sdpa"
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", HEADS)
def test_sdpa_matches_eager(cls):
    # the same tokens kept and merged, outputs to float32 rounding, with padded text in the batch
    batch = {**inputs(cls, batch=3), "attention_mask": torch.tensor([[1] * 12, [1] * 7 + [0] * 5, [1] * 4 + [0] * 8])}
    outputs, sources = [], []
    for attention in ("eager", "sdpa"):
        model = make(cls)
        pumer_patch.apply(model, layers=[1, 3], ratios="p0.2-r0.3-t0.2", attention=attention, trace=True)
        outputs.append(first_tensor(run(model, batch)))
        trace = pumer_patch.last_trace(model)
        sources.append([(t.text.source, t.image.source) for t in (trace if isinstance(trace, list) else [trace])])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for (text_e, image_e), (text_s, image_s) in zip(*sources):
        assert torch.equal(text_e, text_s) and torch.equal(image_e, image_s)


def test_sdpa_alone_without_reduction_matches_the_library():
    model = make()
    batch = inputs(ViltForQuestionAnswering)
    expected = run(model, batch).logits
    pumer_patch.apply(model, layers=[], attention="sdpa")
    assert pumer_patch.is_patched(model)
    torch.testing.assert_close(run(model, batch).logits, expected, rtol=1e-5, atol=1e-5)
    # SDPA returns no probabilities: output_attentions runs the library's eager forward, bit for bit
    pumer_patch.remove(model)
    eager = run(model, {**batch, "output_attentions": True})
    pumer_patch.apply(model, layers=[], attention="sdpa")
    patched = run(model, {**batch, "output_attentions": True})
    assert len(patched.attentions) == 6 and torch.equal(patched.logits, eager.logits)


@pytest.mark.parametrize("output_attentions", [False, True])
def test_reference_mode_runs_every_layers_hooks_with_its_attentions(output_attentions):
    # reference mode runs every layer in parts (its masked softmax): the hooks of each layer see the
    # tuple ViltLayer returns, its attentions included when asked for, as the encoder records them
    model = make(ViltForQuestionAnswering)
    pumer_patch.apply(model, layers=[1, 3], ratios="p0.2-r0.3-t0.2", mode="reference")
    seen: list[tuple[int, int, int]] = []
    for i, layer in enumerate(model.vilt.encoder.layer):
        layer.register_forward_hook(lambda _m, args, out, i=i: seen.append((i, args[0].shape[1], len(out))))
    out = run(model, {**inputs(ViltForQuestionAnswering), "output_attentions": output_attentions})
    assert [s[0] for s in seen] == list(range(6)) and all(s[2] == 1 + output_attentions for s in seen)
    assert seen[1][1] == seen[0][1] > seen[2][1]  # layer 1 reduces: layer 2 receives fewer tokens
    if output_attentions:
        assert [a.shape[-1] for a in out.attentions] == [s[1] for s in seen]
    with pytest.raises(ValueError, match=r"layer\[0\] \(ViltLayer\) has a backward hook"):
        model.vilt.encoder.layer[0].register_full_backward_hook(lambda *_: None)
        pumer_patch.apply(model, layers=[1, 3], ratios="p0.2-r0.3-t0.2", mode="reference")
