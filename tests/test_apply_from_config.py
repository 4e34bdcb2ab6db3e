"""``pumer_patch.apply_from_config``: a config names its reduction (PuMer's fields, or the one ``apply``
recorded for ``save_pretrained``); one call applies it, a malformed field is refused."""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import timm
import torch
from open_clip.model import CLIP
from transformers import (
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    ViltConfig,
    ViltForQuestionAnswering,
)

import pumer_patch
from pumer_patch.models.meter import MeterConfig, MeterForQuestionAnswering


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
        ("sim_method", ["mean_head"], TypeError, r"config.sim_method=\['mean_head'\] is a list; write it as a string"),
        ("merge_style", True, TypeError, r"config.merge_style=True is a bool; write it as a string"),
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


# ---------------------------------------------------------------------------------------------
# the reduction apply records in the config: save_pretrained -> from_pretrained -> apply_from_config
# ---------------------------------------------------------------------------------------------

HF_VISION = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)


def _clip() -> CLIPModel:
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                bos_token_id=0, eos_token_id=2)
    return CLIPModel(CLIPConfig(vision_config=HF_VISION, text_config=text, projection_dim=16)).eval()


def _dinov2() -> Dinov2ForImageClassification:
    torch.manual_seed(0)
    return Dinov2ForImageClassification(Dinov2Config(**HF_VISION, mlp_ratio=2, num_labels=3)).eval()


def _meter() -> MeterForQuestionAnswering:
    torch.manual_seed(0)
    return MeterForQuestionAnswering(MeterConfig(
        image_size=32, vit_patch_size=8, hidden_size=32, num_heads=2, num_layers=2, num_top_layer=4, vocab_size=100,
        vision_width=24, vision_layers=3, vision_heads=2, text_hidden_size=16, text_intermediate_size=32,
        max_position_embeddings=42, vqa_label_size=7,
    )).eval()


def _text_and_image(size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(3, 100, (2, 10), generator=g), "attention_mask": torch.ones(2, 10, dtype=torch.long),
            "pixel_values": torch.randn(2, 3, size, size, generator=g)}


def _image(size: int = 32) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))}


# name -> (build, apply arguments, inputs, output of the model)
RECORDED = {
    "vilt": (vilt, dict(layers=[1, 3], ratios={1: "p0.1-r0.3-t0.2", 3: "p0-r0.25-t0.1"}, fixed_patch_order=False,
                        relevance="first_head"), lambda: _text_and_image(64), lambda m, x: m(**x).logits),
    "vilt_paper": (vilt, dict(layers="p0.1-r0.3-t0.2-25", mode="reference", merge_style="tip"),
                   lambda: _text_and_image(64), lambda m, x: m(**x).logits),
    "clip_tower": (_clip, dict(layers=[1], merge_ratio=0.3, merge_schedule=[1, 0, 2], relevance="received"),
                   _image, lambda m, x: m.get_image_features(**x).pooler_output),
    "dinov2_classifier": (_dinov2, dict(layers=[0, 2], merge_ratio=0.4), _image, lambda m, x: m(**x).logits),
    "meter": (_meter, dict(layers="p0.3-r0.5-t0.2-02", encoder_merge_schedule=2),
              lambda: _text_and_image(32), lambda m, x: m(**x).logits),
}


def _record_of(model: torch.nn.Module) -> dict:
    (root,) = pumer_patch.patched_roots(model)
    return vars(root.config)["pumer_reduction"]


@pytest.mark.parametrize("name", list(RECORDED))
def test_save_pretrained_records_the_reduction_and_apply_from_config_restores_it_bit_for_bit(name, tmp_path):
    build, arguments, inputs, output = RECORDED[name]
    model = pumer_patch.apply(build(), **arguments)
    x = inputs()
    torch.manual_seed(0)  # ViLT's own patch sampling (fixed_patch_order=False) draws from the global generator
    with torch.no_grad():
        expected = output(model, x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert _record_of(model) in (saved.get("pumer_reduction"), saved.get("vision_config", {}).get("pumer_reduction"))
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert not pumer_patch.is_patched(loaded)  # from_pretrained loads the weights; the record waits for the call
    pumer_patch.apply_from_config(loaded)
    (root,) = pumer_patch.patched_roots(model)
    (loaded_root,) = pumer_patch.patched_roots(loaded)
    assert loaded_root._pumer.plan == root._pumer.plan
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(output(loaded, x), expected)


def test_the_record_names_block_indices_ratios_mode_and_options_in_json_types():
    np = pytest.importorskip("numpy")
    model = pumer_patch.apply(_clip(), layers=[np.int64(1)], merge_ratio=0.3, merge_schedule=(np.int32(1), 0, 2))
    assert _record_of(model) == {"ratios": {"1": "p0-r0.3-t0"}, "mode": "default",
                                 "options": {"merge_schedule": [1, 0, 2]}}
    meter = pumer_patch.apply(_meter(), "p0.3-r0.5-t0.2-02")  # the paper's layers 0 and 2: fusion blocks 0 and 1
    assert _record_of(meter)["ratios"] == {"0": "p0.3-r0.5-t0.2", "1": "p0.3-r0.5-t0.2"}


def test_remove_puts_the_config_back_and_a_loaded_record_survives_a_repatch(tmp_path):
    model = vilt()
    before = model.config.to_dict()
    pumer_patch.apply(model, layers=[2], merge_ratio=0.3)
    assert "pumer_reduction" in model.config.to_dict()
    pumer_patch.remove(model)
    assert model.config.to_dict() == before and "pumer_reduction" not in vars(model.config)
    pumer_patch.apply(model, layers=[2], merge_ratio=0.3)
    model.save_pretrained(tmp_path)
    loaded = ViltForQuestionAnswering.from_pretrained(tmp_path).eval()
    record = dict(loaded.config.pumer_reduction)
    pumer_patch.apply_from_config(loaded)
    pumer_patch.apply(loaded, layers=[1, 4], prune_ratio=0.2)  # re-patching replaces the record ...
    assert _record_of(loaded)["ratios"] == {"1": "p0.2-r0-t0", "4": "p0.2-r0-t0"}
    pumer_patch.remove(loaded)  # ... and remove brings back the one the folder had
    assert loaded.config.pumer_reduction == record and not pumer_patch.is_patched(loaded)


def test_the_record_comes_before_the_research_fields():
    model = vilt(prune_r=0.1, merge_r=0.3, reduce_layers=[2, 5])
    model.config.pumer_reduction = {"ratios": {"1": "p0-r0.2-t0"}, "mode": "default", "options": {}}
    pumer_patch.apply_from_config(model)
    plan = model.vilt._pumer.plan
    assert plan.mode == "default" and {i: str(r) for i, r in plan.schedule.items()} == {1: "p0-r0.2-t0"}


def test_copies_of_a_model_with_a_record_run_and_remove_alone():
    model = pumer_patch.apply(vilt(), layers=[1, 3], merge_ratio=0.3)
    x = _text_and_image(64)
    with torch.no_grad():
        expected = model(**x).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
              torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)]
    for other in copies:
        with torch.no_grad():
            assert torch.equal(other(**x).logits, expected)
        assert _record_of(other) == _record_of(model) and other.config is not model.config
        pumer_patch.remove(other)
        assert "pumer_reduction" not in vars(other.config)
    assert "pumer_reduction" in vars(model.config)  # the original keeps its patch and its record


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_a_model_without_a_config_records_nothing(library):
    torch.manual_seed(0)
    if library == "timm":
        model = timm.create_model("test_vit", pretrained=False)
    else:
        vision = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16)
        model = CLIP(embed_dim=16, vision_cfg=vision, text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2,
                                                                      layers=1))
    pumer_patch.apply(model, layers=[1], merge_ratio=0.3)
    assert not any("pumer_reduction" in vars(m) for m in model.modules())
    with pytest.raises(ValueError, match="names no reduction .* pumer_reduction"):
        pumer_patch.apply_from_config(model)


_GOOD = {"ratios": {"2": "p0.1-r0.3-t0.2"}, "mode": "default", "options": {}}


@pytest.mark.parametrize(
    "record, error, message",
    [
        (["p0.1-r0.3-t0.2"], TypeError, r"pumer_reduction=\['p0.1-r0.3-t0.2'\] is a list, not a mapping"),
        ({"ratios": {"2": "p0.1-r0.3-t0.2"}, "mode": "default"}, ValueError, r"has the fields \['mode', 'ratios'\]"),
        ({**_GOOD, "trace": True}, ValueError, r"has the fields \['mode', 'options', 'ratios', 'trace'\]"),
        ({**_GOOD, "ratios": ["p0.1-r0.3-t0.2"]}, TypeError, r"\['ratios'\]=\['p0.1-r0.3-t0.2'\] is not a mapping"),
        ({**_GOOD, "ratios": {"2.7": "p0.1-r0.3-t0.2"}}, TypeError, r"has the key '2.7', not a block index"),
        ({**_GOOD, "ratios": {"True": "p0.1-r0.3-t0.2"}}, TypeError, r"has the key 'True', not a block index"),
        ({**_GOOD, "ratios": {"-1": "p0.1-r0.3-t0.2"}}, TypeError, r"has the key '-1', not a block index"),
        ({**_GOOD, "ratios": {"2": 0.1}}, TypeError, r"\['ratios'\]\['2'\]=0.1 is not a ratios string"),
        ({**_GOOD, "ratios": {"2": "p1.5-r0-t0"}}, ValueError, r"\['ratios'\]\['2'\]: Ratios.prune must lie in"),
        ({**_GOOD, "ratios": {"9": "p0.1-r0.3-t0.2"}}, ValueError, r"layers \[9\] out of range"),
        ({**_GOOD, "mode": "fast"}, ValueError, r"\['mode'\]='fast' is not 'default' or 'reference'"),
        ({**_GOOD, "options": ["sdpa"]}, TypeError, r"\['options'\]=\['sdpa'\] is not a mapping"),
        ({**_GOOD, "options": {"merge_schedule": 2}}, ValueError, r"unknown option\(s\) \['merge_schedule'\]"),
        ({**_GOOD, "options": {"fixed_patch_order": "no"}}, TypeError, r"fixed_patch_order must be True or False"),
    ],
)
def test_a_recorded_reduction_with_a_bad_field_is_refused_and_changes_nothing(record, error, message):
    model = vilt()
    model.config.pumer_reduction = record  # as from_pretrained sets it from a config.json
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        pumer_patch.apply_from_config(model)
    assert not pumer_patch.is_patched(model) and model.config.pumer_reduction == record
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_config_shared_with_a_patched_model_is_refused_and_each_remove_leaves_nothing(tmp_path):
    """Two models built on one config object: re-patching through the second overwrote the first's record, a
    remove of the first then dropped the second's, and removing both left the first's record behind."""
    first = pumer_patch.apply(vilt(), layers=[2], merge_ratio=0.3)
    second = ViltForQuestionAnswering(first.config).eval()
    assert second.config is first.config
    record = dict(_record_of(first))
    with pytest.raises(ValueError, match="wrote for another patched model: the two share one config object"):
        pumer_patch.apply(second, layers=[1], prune_ratio=0.2)
    assert not pumer_patch.is_patched(second) and _record_of(first) == record
    copied = ViltForQuestionAnswering(copy.deepcopy(first.config)).eval()  # copied while the first was patched
    with pytest.raises(ValueError, match="or delete pumer_reduction from a copied config first"):
        pumer_patch.apply(copied, layers=[1], prune_ratio=0.2)
    del copied.config.pumer_reduction
    pumer_patch.apply(copied, layers=[1], prune_ratio=0.2)
    pumer_patch.remove(copied)
    assert "pumer_reduction" not in vars(copied.config)
    pumer_patch.remove(first)  # now the shared config is free: the second patches, and remove leaves nothing
    pumer_patch.apply(second, layers=[1], prune_ratio=0.2)
    with pytest.raises(ValueError, match="wrote for another patched model"):  # and the first is refused in turn
        pumer_patch.apply(first, layers=[2], merge_ratio=0.3)
    pumer_patch.apply(second, layers=[3], merge_ratio=0.3)  # a patched model re-applies over its own record
    pumer_patch.remove(second)
    assert "pumer_reduction" not in vars(first.config)
    first.save_pretrained(tmp_path)
    assert "pumer_reduction" not in json.loads((tmp_path / "config.json").read_text())


def test_remove_keeps_a_record_set_after_apply():
    model = pumer_patch.apply(vilt(), layers=[2], merge_ratio=0.3)
    mine = {"ratios": {"1": "p0-r0.2-t0"}, "mode": "default", "options": {}}
    model.config.pumer_reduction = mine  # the user's own, after the patch
    pumer_patch.remove(model)
    assert model.config.pumer_reduction is mine
