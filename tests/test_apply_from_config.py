"""``pumer_patch.apply_from_config``: a PuMer checkpoint's config names its reduction; one call applies it."""

from __future__ import annotations

import pytest
import torch
from transformers import ViltConfig, ViltForQuestionAnswering

import pumer_patch


def vilt(**extra) -> ViltForQuestionAnswering:
    torch.manual_seed(0)
    config = ViltConfig(
        hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64, image_size=64,
        patch_size=8, max_position_embeddings=40, vocab_size=100, num_labels=5, layer_norm_eps=1e-6,
    )
    for key, value in extra.items():  # as the converters carry a PuMer config.json's fields
        setattr(config, key, value)
    return ViltForQuestionAnswering(config).eval()


def test_vilt_config_names_layers_ratios_relevance_and_merge_style(tmp_path):
    model = vilt(prune_r=0.1, merge_r=0.3, merge_text=0.2, reduce_layers=[2, 5], sim_method="first_head", merge_style="tip")
    model.save_pretrained(tmp_path)
    loaded = ViltForQuestionAnswering.from_pretrained(tmp_path).eval()
    pumer_patch.apply_from_config(loaded)
    plan = loaded.vilt._pumer.plan
    assert plan.mode == "reference" and sorted(plan.schedule) == [2, 5]
    assert str(plan.schedule[2]) == "p0.1-r0.3-t0.2"
    assert (plan.options.relevance, plan.options.merge_style) == ("first_head", "tip")
    expected = vilt()  # the same weights patched by hand give the same logits
    pumer_patch.apply(expected, layers=[2, 5], ratios="p0.1-r0.3-t0.2", mode="reference", relevance="first_head", merge_style="tip")
    batch = {"input_ids": torch.randint(1, 100, (2, 12)), "pixel_values": torch.randn(2, 3, 64, 64)}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected(**batch).logits)


def test_a_config_without_a_reduction_or_an_unknown_sim_method_is_refused():
    with pytest.raises(ValueError, match="names no reduction"):
        pumer_patch.apply_from_config(vilt())
    model = vilt(prune_r=0.1, merge_r=0.3, reduce_layers=[2], sim_method="qk")
    with pytest.raises(ValueError, match="sim_method='qk' is not supported"):
        pumer_patch.apply_from_config(model)
    assert not pumer_patch.is_patched(model)


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("reduce_layers", [0.9, 2.7], TypeError, r"config.reduce_layers=\[0.9, 2.7\] holds float 0.9"),
        ("reduce_layers", [True, 2], TypeError, r"holds bool True, not a layer index"),
        ("reduce_layers", {2: "a", 5: "b"}, TypeError, r"reduce_layers=\{2: 'a', 5: 'b'\} is a dict"),
        ("reduce_layers", "25", TypeError, r"reduce_layers='25' is a str; write the layer indices as a list of ints"),
        ("reduce_layers", ["2", "5"], TypeError, r"holds str '2'"),
        ("prune_r", "0.1", TypeError, r"config.prune_r='0.1' is a str; write the ratio as a number"),
        ("merge_r", True, TypeError, r"config.merge_r=True is a bool"),
    ],
)
def test_a_malformed_reduction_field_is_refused_not_coerced(field, value, error, message):
    fields = {"prune_r": 0.1, "merge_r": 0.3, "merge_text": 0.2, "reduce_layers": [2, 5], field: value}
    model = vilt(**fields)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        pumer_patch.apply_from_config(model)
    assert not pumer_patch.is_patched(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_numpy_layer_indices_in_a_config_are_read_as_ints():
    np = pytest.importorskip("numpy")
    model = vilt(prune_r=0.1, merge_r=0.3, reduce_layers=[np.int64(2), np.int32(5)])
    pumer_patch.apply_from_config(model)
    assert sorted(model.vilt._pumer.plan.schedule) == [2, 5]
