"""ViLT adapter: parity, token arithmetic, FLOPs, padding, heads, state, training, bad input."""

from __future__ import annotations

import copy
import io

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
from transformers.models.vilt.modeling_vilt import ViltEmbeddings, ViltEncoder

import pumer_patch
from model_state import same, snapshot
from pumer_patch.adapters.vilt import PumerViltEncoder, unmerge_hidden

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
# parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("how", ["zero_ratios", "no_layers"])
def test_zero_reduction_is_bit_identical(cls, how):
    model = make(cls)
    batch = inputs(cls)
    expected = first_tensor(run(model, batch))
    if how == "zero_ratios":
        pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.0, merge_ratio=0.0, text_merge_ratio=0.0)
    else:
        pumer_patch.apply(model, layers=[], prune_ratio=0.3)
    assert pumer_patch.is_patched(model)
    assert torch.equal(first_tensor(run(model, batch)), expected)


def test_remove_restores_everything():
    model = make()
    batch = inputs(ViltForQuestionAnswering)
    expected = run(model, batch).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {name: type(m) for name, m in model.named_modules()}

    pumer_patch.apply(model, "p0.2-r0.3-t0.2-13", trace=True)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(run(model, batch).logits, expected)

    assert pumer_patch.remove(model) is model
    assert {name: type(m) for name, m in model.named_modules()} == classes
    leftovers = [(name, attr) for name, m in model.named_modules() for attr in vars(m) if "pumer" in attr]
    assert leftovers == []
    assert torch.equal(run(model, batch).logits, expected)


def test_apply_twice_replaces_never_stacks():
    model = make()
    batch = inputs(ViltForQuestionAnswering)
    pumer_patch.apply(model, layers=[1], prune_ratio=0.5)
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.2)
    assert type(model.vilt.encoder) is PumerViltEncoder
    assert type(model.vilt.encoder).__bases__ == (ViltEncoder,)
    run(model, batch)
    counts = pumer_patch.last_trace(model).counts
    assert [c.layer for c in counts] == [1, 3]
    once = make()
    pumer_patch.apply(once, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.2)
    assert torch.equal(run(model, batch).logits, run(once, batch).logits)
    pumer_patch.remove(model)
    assert type(model.vilt.encoder) is ViltEncoder


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
# state: state_dict, save/load, deepcopy, pickling
# ---------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    model = make()
    batch = inputs(ViltForQuestionAnswering)
    pumer_patch.apply(model, "p0.2-r0.3-t0.2-13")
    expected = run(model, batch).logits
    model.save_pretrained(tmp_path)
    loaded = ViltForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert not pumer_patch.is_patched(loaded)
    pumer_patch.apply(loaded, "p0.2-r0.3-t0.2-13")
    assert torch.equal(run(loaded, batch).logits, expected)


def test_deepcopy_and_torch_save_of_a_patched_model():
    model = make()
    batch = inputs(ViltForQuestionAnswering)
    pumer_patch.apply(model, "p0.2-r0.3-t0.2-13", trace=True)
    expected = run(model, batch).logits
    clone = copy.deepcopy(model)
    assert torch.equal(run(clone, batch).logits, expected)
    assert clone.vilt._pumer is not model.vilt._pumer
    assert clone.vilt.encoder._pumer_state is clone.vilt._pumer  # shared state stays shared in the copy
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(run(loaded, batch).logits, expected)
    pumer_patch.remove(loaded)
    assert type(loaded.vilt.encoder) is ViltEncoder


# ---------------------------------------------------------------------------------------------
# bad input leaves the model untouched
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": [6], "prune_ratio": 0.1}, ValueError, r"out of range .* valid indices are 0\.\.5"),
        ({"layers": [2, 2], "prune_ratio": 0.1}, ValueError, "repeats layer 2"),
        ({"layers": [-1], "prune_ratio": 0.1}, ValueError, "negative"),
        ({"layers": [1], "prune_ratio": 1.0}, ValueError, r"prune must lie in \[0, 1\)"),
        ({"layers": [1], "merge_ratio": -0.1}, ValueError, r"merge must lie in \[0, 1\)"),
        ({"layers": [1], "prune_ratio": float("nan")}, ValueError, "prune must lie"),
        ({"layers": [1], "ratios": "p0.1-q0.2"}, ValueError, "paper's form"),
        ({"layers": 3, "prune_ratio": 0.1}, TypeError, "list of block indices"),
        ({"prune_ratio": 0.1}, ValueError, "layers is required"),
        ({"layers": [1], "prune_ratio": 0.1, "merge_schedule": 4}, ValueError, "unknown option"),
        ({"layers": [1], "prune_ratio": 0.1, "mode": "fast"}, ValueError, "mode must be one of"),
        ({"layers": [1], "prune_ratio": 0.1, "fixed_patch_order": "yes"}, TypeError, "fixed_patch_order"),
        ({"layers": [1], "prune_ratio": 0.1, "attention": "flash"}, ValueError, "attention must be 'eager'"),
        ({}, ValueError, "nothing to reduce"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(kwargs, error, match):
    model = make()
    pumer_patch.apply(model, layers=[2], merge_ratio=0.2)  # a patch in place must survive a bad re-apply
    before = snapshot(model)
    with pytest.raises(error, match=match):
        pumer_patch.apply(model, **kwargs)
    assert same(snapshot(model), before)
    assert model.vilt._pumer.plan.schedule.keys() == {2}


def test_not_a_vilt_model_lists_what_is_supported():
    with pytest.raises(TypeError, match="Supported: .*ViltModel"):
        pumer_patch.apply(torch.nn.Linear(3, 3), layers=[0], prune_ratio=0.1)


def test_model_patched_by_something_else_is_refused():
    model = make()
    layer = model.vilt.encoder.layer[3]
    layer.forward = layer.forward  # what monkey-patching libraries do: an instance-bound forward
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"encoder.layer\[3\] .* patched by something else"):
        pumer_patch.apply(model, layers=[1], prune_ratio=0.2)
    assert same(snapshot(model), before)

    other = make()
    other.vilt.embeddings.__class__ = type("ToMeEmbeddings", (ViltEmbeddings,), {})
    with pytest.raises(ValueError, match="ViltModel.embeddings is .*ToMeEmbeddings"):
        pumer_patch.apply(other, layers=[1], prune_ratio=0.2)


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


def test_sdpa_training_gradients_checkpointing_and_bf16():
    def grads(checkpointing: bool) -> torch.Tensor:
        model = make().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        pumer_patch.apply(model, layers=[1, 3], ratios="p0.2-r0.3-t0.2", attention="sdpa")
        torch.manual_seed(5)
        model(**inputs(ViltForQuestionAnswering), labels=torch.rand(2, 3)).loss.backward()
        assert all(layer.attention.attention.value.weight.grad.abs().sum() > 0 for layer in model.vilt.encoder.layer)
        return model.vilt.encoder.layer[0].output.dense.weight.grad

    torch.testing.assert_close(grads(True), grads(False))
    model = pumer_patch.apply(make(), layers=[1, 3], ratios="p0.2-r0.3-t0.2", attention="sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(run(model, inputs(ViltForQuestionAnswering)).logits).all()


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def test_training_gradients_reach_every_layer():
    model = make(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.2)
    batch = inputs(ViltForQuestionAnswering)
    labels = torch.rand(2, 3)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    for i in range(6):
        grad = model.vilt.encoder.layer[i].attention.attention.query.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient in layer {i}"
    assert model.vilt.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_matches_plain_backward():
    def grads(checkpointing: bool) -> torch.Tensor:
        model = make().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.2)
        torch.manual_seed(5)
        model(**inputs(ViltForQuestionAnswering), labels=torch.rand(2, 3)).loss.backward()
        return model.vilt.encoder.layer[0].output.dense.weight.grad

    torch.testing.assert_close(grads(True), grads(False))


@pytest.mark.slow
def test_torch_compile_runs_the_patched_model():
    model = make()
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.2)
    batch = inputs(ViltForQuestionAnswering)
    eager = run(model, batch).logits
    compiled = torch.compile(model)
    torch.testing.assert_close(run(compiled, batch).logits, eager, rtol=1e-4, atol=1e-4)


def test_bfloat16_autocast_on_cpu():
    model = make()
    pumer_patch.apply(model, "p0.2-r0.3-t0.2-13")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, inputs(ViltForQuestionAnswering)).logits
    assert torch.isfinite(out).all()
