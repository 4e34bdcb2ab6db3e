"""The METER model (no reduction): PuMer checkpoint layout, loading, converters, attention, heads."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pumer_patch.models.convert import read_checkpoint
from pumer_patch.models.convert_meter import (
    HEADS,
    convert_original_meter,
    main,
    resize_position_embedding,
)
from pumer_patch.models.meter import (
    MeterAttention,
    MeterConfig,
    MeterForImageAndTextRetrieval,
    MeterForPreTraining,
    MeterForQuestionAnswering,
    MeterForVisualEntailment,
    MeterForVisualReasoning,
    MeterModel,
)

#: every key (with its shape) of the research code's released checkpoints: data/pumer-keys/README.md
REFERENCE = Path(__file__).parent / "data" / "pumer-keys"
REFERENCE_FILES = {"vqa": "vqa2", "ve": "ve", "nlvr2": "nlvr2", "irtr": "irtr", "pretrain": "pretrain"}
POSITION_IDS = "meter.text_transformer.embeddings.position_ids"
TINY = dict(
    image_size=32, vit_patch_size=8, hidden_size=16, num_heads=2, num_layers=2, num_top_layer=2, vocab_size=60,
    vision_width=24, vision_layers=2, vision_heads=2, text_hidden_size=12, text_heads=2, text_intermediate_size=20,
    max_position_embeddings=20, vqa_label_size=5, max_text_len=8,
)


def tiny(**kw) -> MeterConfig:
    return MeterConfig(**{**TINY, **kw})


def make(cls, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(tiny(**({"token_types": 3} if cls is MeterForVisualReasoning else {}) | kw)).eval()


def batch(b: int = 2, t: int = 8, seed: int = 1, size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, t - 3 :] = 0  # the last sample is padded
    ids = torch.randint(3, 60, (b, t), generator=g).masked_fill(mask == 0, 1)
    ids[:, 0] = 0  # <s>
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(b, 3, size, size, generator=g)}


def inputs_for(cls, b: int = 2) -> dict[str, torch.Tensor]:
    inputs = batch(b)
    if cls is MeterForVisualReasoning:
        g = torch.Generator().manual_seed(5)
        inputs["pixel_values"] = torch.stack([inputs["pixel_values"], torch.randn(b, 3, 32, 32, generator=g)], dim=1)
    return inputs


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if out.itm_logits is None else torch.cat([out.logits.flatten(1), out.itm_logits], dim=1)


# ---------------------------------------------------------------------------------------------
# PuMer's key layout and loading
# ---------------------------------------------------------------------------------------------


def reference_keys(head: str) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Keys and shapes of PuMer's checkpoint of this head, and the config its header names."""
    text = (REFERENCE / f"meter_{REFERENCE_FILES[head]}.txt").read_text()
    config = {k: int(v) for k, v in re.findall(r"(image_size|token_types)=(\d+)", text.split("Format:")[0])}
    keys = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, shape = re.match(r"(\S+) \(([\d, ]*)\)", line).groups()
            keys[name] = tuple(int(s) for s in shape.split(",") if s.strip())
    return keys, config


@pytest.mark.parametrize("head", sorted(HEADS))
def test_full_size_state_dict_is_pumers_layout(head):
    reference, header = reference_keys(head)
    assert reference.pop(POSITION_IDS) == (1, 514)  # the 4.24-era buffer: the only key we do not hold
    with torch.device("meta"):
        model = HEADS[head](MeterConfig(**header))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference


def pumer_folder(path: Path, model, **extra) -> Path:
    """A folder as PuMer wrote it: config.json with its extra fields, pytorch_model.bin with the buffer."""
    config = model.config.to_dict() | {"itm_loss": 1, "keep_ratio": 0.5, "prune_method": "mlp_states",
                                        "from_scratch": False, "prune_layers": None, "sim_method": "mean_head",
                                        "merge_style": "tip"} | extra
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    state = model.state_dict() | {POSITION_IDS: torch.arange(model.config.max_position_embeddings)[None]}
    torch.save(state, path / "pytorch_model.bin")
    return path


def test_pumer_folder_loads_strictly_and_reports_the_buffer(tmp_path, caplog):
    model = make(MeterForQuestionAnswering)
    folder = pumer_folder(tmp_path / "pumer", model, prune_r=0.2, merge_r=0.2, merge_text=0.2, reduce_layers=[0, 2])
    with caplog.at_level(logging.INFO, logger="pumer_patch.models.meter"):
        loaded, info = MeterForQuestionAnswering.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert POSITION_IDS in caplog.text
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    config = loaded.config
    assert (config.prune_r, config.merge_r, config.merge_text, config.reduce_layers) == (0.2, 0.2, 0.2, [0, 2])
    assert (config.fusion_order, config.fusion_masking) == ("sequential", "pumer")  # PuMer's arithmetic by default
    inputs = batch()
    assert torch.equal(logits_of(loaded.eval(), inputs), logits_of(model, inputs))


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_save_and_load_round_trip(head, fmt, tmp_path):
    model = make(HEADS[head], fusion_order="parallel", fusion_masking="additive")
    if fmt == "safetensors":
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:
        model.config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded, info = HEADS[head].from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert (loaded.config.fusion_order, loaded.config.fusion_masking) == ("parallel", "additive")
    inputs = inputs_for(HEADS[head])
    torch.testing.assert_close(logits_of(loaded.eval(), inputs), logits_of(model, inputs), rtol=0, atol=1e-6)


def test_config_validates_its_switches_and_sizes():
    with pytest.raises(ValueError, match="fusion_order"):
        tiny(fusion_order="interleaved")
    with pytest.raises(ValueError, match="fusion_masking"):
        tiny(fusion_masking="causal")
    with pytest.raises(ValueError, match="multiple of vit_patch_size"):
        tiny(image_size=30)
    with pytest.raises(ValueError, match="text_hidden_size"):
        tiny(text_heads=5)
    with pytest.raises(ValueError, match="token_types=3"):
        MeterForVisualReasoning(tiny())
    model = make(MeterModel)
    with pytest.raises(ValueError, match="no run-time interpolation"):
        model.encode_image(torch.randn(1, 3, 48, 48))


# ---------------------------------------------------------------------------------------------
# Converters from original METER checkpoints
# ---------------------------------------------------------------------------------------------


def original_layout(model) -> dict[str, torch.Tensor]:
    """Our weights under original METER's names, with the keys METER carries that we do not."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("meter.vit_model."):
            key = "vit_model.visual." + key[len("meter.vit_model.") :]
        elif key.startswith("meter."):
            key = key[len("meter.") :]
        elif key.startswith("ve_classifier."):
            key = "snli_classifier." + key[len("ve_classifier.") :]
        out[key] = value.clone()
    c = model.config.text_hidden_size
    g = torch.Generator().manual_seed(3)
    out |= {
        "vit_model.positional_embedding": torch.randn(77, 8, generator=g),  # CLIP's text stub
        "vit_model.ln_final.weight": torch.ones(8),
        "vit_model.ln_final.bias": torch.zeros(8),
        "text_transformer.pooler.dense.weight": torch.randn(c, c, generator=g),
        "text_transformer.pooler.dense.bias": torch.zeros(c),
        "text_transformer.embeddings.position_ids": torch.arange(model.config.max_position_embeddings)[None],
        "train_vqa_score.score": torch.zeros(()),  # a Lightning metric state
    }
    return out


def lightning_file(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "1.3.2", "state_dict": state}, path)
    return path


ORIGINAL_IGNORED = {
    "vit_model.positional_embedding", "vit_model.ln_final.weight", "vit_model.ln_final.bias",
    "text_transformer.pooler.dense.weight", "text_transformer.pooler.dense.bias",
    "text_transformer.embeddings.position_ids", "train_vqa_score.score",
}


@pytest.mark.parametrize("head", ["vqa", "ve", "pretrain", "irtr"])
def test_converting_a_finetuned_checkpoint_reproduces_it(head, tmp_path):
    source = make(HEADS[head], fusion_order="parallel", fusion_masking="additive")
    path = lightning_file(tmp_path / "meter.ckpt", original_layout(source))
    converted = convert_original_meter(read_checkpoint(path), head, config=tiny())
    report = converted.report
    assert report.ok and not report.missing and not report.unexpected and not report.initialized
    assert set(report.ignored) == ORIGINAL_IGNORED
    assert report.mapped["vit_model.visual.conv1.weight"] == ("meter.vit_model.conv1.weight",)
    assert report.mapped["text_transformer.encoder.layer.0.output.dense.weight"] == (
        "meter.text_transformer.encoder.layer.0.output.dense.weight",
    )
    assert set(report.mapped) | set(report.ignored) == set(read_checkpoint(path))  # every key placed or explained
    assert (report.mapped.get("snli_classifier.3.weight") == ("ve_classifier.3.weight",)) == (head == "ve")
    assert (converted.config.fusion_order, converted.config.fusion_masking) == ("parallel", "additive")
    model = converted.model_class(converted.config).eval()
    model.load_state_dict(converted.state_dict, strict=True)
    inputs = batch()
    assert torch.equal(logits_of(model, inputs), logits_of(source, inputs))


def test_command_writes_a_loadable_folder_and_logs_the_report(tmp_path, caplog):
    source = make(MeterForVisualEntailment, fusion_order="parallel", fusion_masking="additive")
    path = lightning_file(tmp_path / "meter_snli.ckpt", original_layout(source))
    # what the weights cannot tell (heads) comes from --config; every size from the weights
    base = MeterConfig(**TINY | {"hidden_size": 64, "vision_layers": 5, "vocab_size": 7})
    base.to_json_file(tmp_path / "base.json")
    out = tmp_path / "out"
    command = [str(path), str(out), "--head", "ve", "--config", str(tmp_path / "base.json")]
    command += ["--fusion-order", "sequential"]
    with caplog.at_level(logging.INFO, logger="pumer_patch.models.convert_meter"):
        assert main(command) == 0
    assert "CLIP text stub" in caplog.text and "0 missing, 0 unexpected" in caplog.text
    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["vision_layers"], config["vocab_size"]) == (16, 2, 60)
    assert (config["fusion_order"], config["fusion_masking"]) == ("sequential", "additive")
    loaded, info = MeterForVisualEntailment.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.equal(loaded.ve_classifier[3].weight, source.ve_classifier[3].weight)


def test_pretrain_to_nlvr2_grows_the_token_types(tmp_path):
    source = make(MeterForPreTraining)
    converted = convert_original_meter(original_layout(source), "nlvr2", config=tiny())
    types = converted.state_dict["meter.token_type_embeddings.weight"]
    old = source.meter.token_type_embeddings.weight
    assert types.shape[0] == converted.config.token_types == 3
    assert torch.equal(types[:2], old) and torch.equal(types[2], old[1])
    report = converted.report
    assert report.initialized == [f"nlvr2_classifier.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")]
    assert report.ok  # a task head started from the pretraining checkpoint is not missing
    assert {k for k in report.ignored if k.startswith(("mlm_score", "itm_score"))} == {
        k for k in source.state_dict() if k.startswith(("mlm_score", "itm_score"))
    }
    assert "2 -> 3 rows" in report.derived["meter.token_type_embeddings.weight"]
    model = MeterForVisualReasoning(converted.config).eval()
    result = model.load_state_dict(converted.state_dict, strict=False)
    assert sorted(result.missing_keys) == sorted(report.initialized) and not result.unexpected_keys


def test_pretrain_to_retrieval_takes_rank_output_from_the_match_row():
    source = make(MeterForPreTraining)
    converted = convert_original_meter(original_layout(source), "irtr", config=tiny())
    fc = source.itm_score.fc
    assert torch.equal(converted.state_dict["rank_output.weight"], fc.weight[1:])
    assert torch.equal(converted.state_dict["rank_output.bias"], fc.bias[1:])
    assert not converted.report.missing and not converted.report.unexpected and not converted.report.initialized
    assert set(converted.report.derived) == {"rank_output.weight", "rank_output.bias"}
    model = MeterForImageAndTextRetrieval(converted.config).eval()
    model.load_state_dict(converted.state_dict, strict=True)
    out = model(**batch())
    torch.testing.assert_close(out.logits[:, 0], out.itm_logits[:, 1])  # the rank score starts as the match logit


def test_resizing_the_positions_keeps_cls_and_resizes_the_grid_bicubically():
    source = make(MeterForQuestionAnswering)
    original = original_layout(source)
    original["cross_modal_text_transform.scale"] = torch.ones(3)  # looks like ours, is not: unexpected
    with pytest.raises(ValueError, match=r"unexpected .*meter\.cross_modal_text_transform\.scale"):
        convert_original_meter(original, "vqa", image_size=48, config=tiny())
    converted = convert_original_meter(original, "vqa", image_size=48, config=tiny(), strict=False)
    old = source.meter.vit_model.positional_embedding.detach()  # (1 + 4 * 4, C)
    new = converted.state_dict["meter.vit_model.positional_embedding"]
    assert new.shape == (1 + 6 * 6, old.shape[1]) and converted.config.image_size == 48
    assert torch.equal(new[0], old[0])
    grid = F.interpolate(old[1:].T.reshape(1, -1, 4, 4), size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new[1:], grid.reshape(-1, 36).T)
    assert converted.report.unexpected == ["meter.cross_modal_text_transform.scale"]
    assert "grid resized bicubically" in converted.report.derived["meter.vit_model.positional_embedding"]
    assert converted.config.vqa_label_size == 5
    model = MeterForQuestionAnswering(converted.config).eval()
    model.load_state_dict(converted.state_dict, strict=True)
    assert model(**batch(size=48)).logits.shape == (2, 5)
    torch.testing.assert_close(resize_position_embedding(old, 4), old)  # same grid: unchanged


def damaged_original(path: Path) -> tuple[Path, MeterForVisualEntailment]:
    """A 3-block METER's VE checkpoint without fusion block 1 (both streams) and with a 4-way classifier."""
    source = make(MeterForVisualEntailment, num_top_layer=3, fusion_order="parallel", fusion_masking="additive")
    original = original_layout(source)
    for key in [k for k in original if k.startswith(("cross_modal_text_layers.1.", "cross_modal_image_layers.1."))]:
        del original[key]
    original["snli_classifier.3.weight"] = torch.cat([original["snli_classifier.3.weight"]] * 2)[:4]
    original["snli_classifier.3.bias"] = torch.zeros(4)
    return lightning_file(path, original), source


def test_an_incomplete_checkpoint_is_refused_naming_its_keys_and_nothing_is_written(tmp_path, caplog):
    path, source = damaged_original(tmp_path / "meter_snli.ckpt")
    block = [k for k in source.state_dict() if k.startswith("meter.cross_modal_text_layers.1.")]
    width = source.ve_classifier[3].weight.shape[1]
    with pytest.raises(ValueError) as error:
        convert_original_meter(read_checkpoint(path), "ve", config=tiny())
    message = str(error.value)
    assert "missing (the 've' model needs them): " in message
    assert f"meter.cross_modal_text_layers.1.* ({len(block)} keys)" in message
    assert "meter.cross_modal_image_layers.1.* (" in message
    assert f"ve_classifier.3.weight: [4, {width}] vs [3, {width}]" in message and "ve_classifier.3.bias" in message
    assert "--no-strict" in message

    tiny().to_json_file(tmp_path / "base.json")
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="pumer_patch.models.convert_meter"):
        assert main([str(path), str(out), "--head", "ve", "--config", str(tmp_path / "base.json")]) == 1
    assert "meter.cross_modal_text_layers.1.*" in caplog.text and "ve_classifier.3.weight" in caplog.text
    assert not out.exists()


def test_no_strict_writes_an_incomplete_checkpoint_and_reports_it(tmp_path, caplog):
    path, source = damaged_original(tmp_path / "meter_snli.ckpt")
    converted = convert_original_meter(read_checkpoint(path), "ve", config=tiny(), strict=False)
    report = converted.report
    assert converted.config.num_top_layer == 3  # the missing block is not a 2-block METER
    fusion_block_1 = {"meter.cross_modal_text_layers", "meter.cross_modal_image_layers"}
    assert {k.split(".1.")[0] for k in report.missing} == fusion_block_1
    assert set(report.mismatched) == {"ve_classifier.3.weight", "ve_classifier.3.bias"} and not report.unexpected
    assert not set(report.missing) & set(converted.state_dict)
    assert not set(report.mismatched) & set(converted.state_dict)

    tiny().to_json_file(tmp_path / "base.json")
    out = tmp_path / "out"
    command = [str(path), str(out), "--head", "ve", "--config", str(tmp_path / "base.json"), "--no-strict"]
    with caplog.at_level(logging.WARNING, logger="pumer_patch.models.convert_meter"):
        assert main(command) == 0
    assert f"{len(report.missing)} missing, 0 unexpected, 2 mismatched" in caplog.text
    assert "missing meter.cross_modal_text_layers.1.attention.self.key.weight" in caplog.text
    loaded, info = MeterForVisualEntailment.from_pretrained(out, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted([*report.missing, *report.mismatched])
    assert torch.equal(loaded.meter.cross_modal_text_layers[2].attention.self.key.weight,
                       source.meter.cross_modal_text_layers[2].attention.self.key.weight)


def test_what_the_weights_cannot_tell_is_asked_of_config_by_name(tmp_path, caplog):
    path = lightning_file(tmp_path / "meter.ckpt", original_layout(make(MeterForQuestionAnswering)))
    with pytest.raises(ValueError, match=r"hidden_size=16 must be a multiple .*num_heads.*--config"):
        convert_original_meter(read_checkpoint(path), "vqa")  # full-size METER's 12 heads do not fit 16
    (tmp_path / "bad.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="pumer_patch.models.convert_meter"):
        assert main([str(path), str(tmp_path / "out"), "--head", "vqa", "--config", str(tmp_path / "bad.json")]) == 1
    assert f"--config {tmp_path / 'bad.json'} is not a METER config.json" in caplog.text
    assert not (tmp_path / "out").exists()


class HyperParameters(dict):
    """Stands for Lightning's AttributeDict: a class torch.load(weights_only=True) refuses."""


def test_a_checkpoint_that_needs_more_than_weights_only_is_refused_clearly(tmp_path):
    path = tmp_path / "meter.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": HyperParameters(lr=1e-5)}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="head must be one of"):
        convert_original_meter({}, "snli")
    with pytest.raises(ValueError, match="not an original METER"):
        convert_original_meter({"x": torch.zeros(1)}, "vqa")


# ---------------------------------------------------------------------------------------------
# Attention and fusion
# ---------------------------------------------------------------------------------------------

ATTENTION_PATHS = [("pumer", False), ("pumer", True), ("additive", False), ("additive", True)]  # (masking, probs)


@pytest.mark.parametrize("masking, probs", ATTENTION_PATHS)
def test_attention_is_bidirectional_on_every_path(masking, probs):
    torch.manual_seed(0)
    attention = MeterAttention(tiny(fusion_masking=masking)).eval()
    g = torch.Generator().manual_seed(2)
    hidden, context = torch.randn(2, 6, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    weight = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.5, 1.0]])
    changed_hidden, changed_context = hidden.clone(), context.clone()
    changed_hidden[:, -1] += 1.0
    changed_context[:, -1] += 1.0
    with torch.no_grad():
        own = attention(hidden, key_weight=weight, output_probs=probs).hidden
        own_changed = attention(changed_hidden, key_weight=weight, output_probs=probs).hidden
        cross = attention(hidden, context=context, output_probs=probs).hidden
        cross_changed = attention(hidden, context=changed_context, output_probs=probs).hidden
    assert not torch.allclose(own[:, 0], own_changed[:, 0])  # the first query sees the last key
    assert not torch.allclose(cross[:, 0], cross_changed[:, 0])


@pytest.mark.parametrize("masking", ["pumer", "additive"])
def test_fusion_is_bidirectional_and_orders_differ(masking):
    sequential = make(MeterModel, fusion_masking=masking)
    parallel = MeterModel(tiny(fusion_masking=masking, fusion_order="parallel")).eval()
    parallel.load_state_dict(sequential.state_dict())
    inputs = batch()
    mask = inputs["attention_mask"].float()
    with torch.no_grad():
        text, image = sequential.encode_text(inputs["input_ids"], mask), sequential.encode_image(inputs["pixel_values"])
        changed = text.clone()
        changed[0, -1] += 1.0
        first, first_changed = sequential.fuse(text, mask, image)[0][0, 0], sequential.fuse(changed, mask, image)[0][0, 0]
        assert not torch.allclose(first, first_changed)  # the last text token reaches the first
        x, y = text, image
        for text_layer, image_layer in zip(parallel.cross_modal_text_layers, parallel.cross_modal_image_layers):
            x, y = text_layer(x, y, mask, None), image_layer(y, x, None, mask)  # both read the previous states
        fused = parallel.fuse(text, mask, image)
        assert torch.equal(fused[0], x) and torch.equal(fused[1], y)
        x, y = text, image
        for text_layer, image_layer in zip(sequential.cross_modal_text_layers, sequential.cross_modal_image_layers):
            x = text_layer(x, y, mask, None)
            y = image_layer(y, x, None, mask)  # the image layer reads the text this block just produced
        fused_sequential = sequential.fuse(text, mask, image)
        assert torch.equal(fused_sequential[1], y)
        assert not torch.allclose(fused_sequential[1], fused[1])


def one_dim_attention(masking: str) -> MeterAttention:
    """One head of width 1 whose query is 1 and key is the input: score(i, j) = context_j."""
    attention = MeterAttention(MeterConfig(hidden_size=1, num_heads=1, fusion_masking=masking)).double().eval()
    with torch.no_grad():
        attention.self.query.weight.zero_()
        attention.self.query.bias.fill_(1.0)
        attention.self.key.weight.fill_(1.0)
        attention.self.key.bias.zero_()
    return attention


def test_masked_softmax_on_a_hand_computed_example():
    context = torch.tensor([[[0.0], [math.log(2.0)], [math.log(3.0)]]], dtype=torch.float64)  # scores 0, ln 2, ln 3
    hidden = torch.zeros(1, 2, 1, dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64)  # a pad, and a real token merged with a pad
    probs = one_dim_attention("pumer")(hidden, context, key_weight=weight, output_probs=True).probs[0, 0]
    eps = 1e-6
    # weight * exp(score - max score), max = ln 3: query 0 -> [1/3, 0, 0.5]; query 1 sees its diagonal key 1
    # although it is masked -> [1/3, 2/3, 0.5]; every key gets eps / 3 on top, the sum eps
    expected = torch.tensor([[1 / 3, 0.0, 0.5], [1 / 3, 2 / 3, 0.5]], dtype=torch.float64)
    expected = (expected + eps / 3) / (expected.sum(-1, keepdim=True) + eps)
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=0)
    assert probs[0, 1] > 0  # the epsilon reaches a masked key
    additive = one_dim_attention("additive")(hidden, context, key_weight=weight, output_probs=True).probs[0, 0]
    torch.testing.assert_close(additive, torch.tensor([[1.0, 0.0, 1.5]] * 2, dtype=torch.float64) / 2.5)


@pytest.mark.parametrize("masking, probs", ATTENTION_PATHS)
def test_a_log_2_key_bias_counts_a_key_twice(masking, probs):
    torch.manual_seed(0)
    attention = MeterAttention(tiny(fusion_masking=masking)).double().eval()
    g = torch.Generator().manual_seed(4)
    hidden, context = torch.randn(2, 4, 16, generator=g).double(), torch.randn(2, 3, 16, generator=g).double()
    bias = torch.tensor([[0.0, math.log(2.0), 0.0]] * 2, dtype=torch.float64)
    twice = torch.cat([context, context[:, 1:2]], dim=1)
    with torch.no_grad():
        biased = attention(hidden, context, key_bias=bias, output_probs=probs).hidden
        duplicated = attention(hidden, twice, output_probs=probs).hidden
    torch.testing.assert_close(biased, duplicated, rtol=0, atol=1e-5)  # pumer: only the epsilon (1e-6 / N) differs


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


def labels_for(cls, b: int = 2) -> torch.Tensor | None:
    if cls is MeterForQuestionAnswering:
        return torch.tensor([[0.0, 0.3, 1.0, 0.0, 0.6]] * b)
    if cls is MeterForPreTraining:
        return None
    return torch.arange(b) % 2


@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_head_trains(head):
    cls = HEADS[head]
    model = make(cls).train()
    inputs = inputs_for(cls)
    labels = labels_for(cls)
    out = model(**inputs, **({} if labels is None else {"labels": labels}))
    loss = out.logits.float().logsumexp(-1).mean() if out.loss is None else out.loss
    if cls is MeterForQuestionAnswering:  # PuMer's scale: the mean over all labels
        torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))
    loss.backward()
    assert model.meter.vit_model.conv1.weight.grad.abs().sum() > 0
    assert model.meter.cross_modal_text_layers[0].attention.self.key.weight.grad.abs().sum() > 0


def test_nlvr2_takes_two_images_either_way():
    model = make(MeterForVisualReasoning)
    inputs = inputs_for(MeterForVisualReasoning)
    stacked = logits_of(model, inputs)
    pair = inputs["pixel_values"]
    apart = logits_of(model, inputs | {"pixel_values": pair[:, 0], "pixel_values_2": pair[:, 1]})
    assert torch.equal(stacked, apart) and stacked.shape == (2, 2)
    swapped = logits_of(model, inputs | {"pixel_values": pair.flip(1)})
    assert not torch.allclose(stacked, swapped)  # token types 1 and 2 tell the images apart
    with pytest.raises(ValueError, match="two images"):
        model(**inputs | {"pixel_values": pair[:, 0]})


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("masking", ["pumer", "additive"])
def test_runs_in_float64_and_bfloat16(dtype, masking):
    model = make(MeterForQuestionAnswering, fusion_masking=masking)
    reference = logits_of(model, batch())
    out = logits_of(model.to(dtype), batch())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=1e-5 if dtype == torch.float64 else 0.15)
