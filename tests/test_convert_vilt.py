"""ViLT converters: original ViLT and PuMer ViLT checkpoints -> transformers ViLT, per head.

The source checkpoints are written here from tiny transformers models through a small explicit inverse
(``research_state_dict``), in both layouts, with the key names of the released checkpoints
(``tests/data/pumer-keys``); the converted model must give the very logits of the model the weights
came from. The real key lists (full-size shapes) are converted on the meta device to show every key
is placed or explained.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import (
    PreTrainedModel,
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForImagesAndTextClassification,
    ViltForMaskedLM,
    ViltForQuestionAnswering,
)

import pumer_patch
from pumer_patch.models.convert_vilt import (
    HEADS,
    REDUCTION_FIELDS,
    convert_vilt_state_dict,
    load_vilt_checkpoint,
    main,
    read_vilt_checkpoint,
    restore_text_layer_norm_eps,
    vilt_config_for,
)
from pumer_patch.models.convert import ConversionReport

#: every key (with its shape) of the research code's released checkpoints: data/pumer-keys/README.md
REFERENCE = Path(__file__).parent / "data" / "pumer-keys"
REFERENCE_FILE = {"vqa": "vqa2", "ve": "ve", "nlvr2": "nlvr2", "irtr": "irtr", "pretrain": "pretrain"}
HF_CLASS = {
    "vqa": ViltForQuestionAnswering,
    "ve": ViltForQuestionAnswering,
    "nlvr2": ViltForImagesAndTextClassification,
    "irtr": ViltForImageAndTextRetrieval,
    "pretrain": ViltForMaskedLM,
}
HEAD_PREFIXES = ("mlm_score.", "itm_score.", "rank_output.", "vqa_classifier.", "ve_classifier.", "nlvr2_classifier.")
LAYERS, HIDDEN, HEADS_N, TEXT, VOCAB = 2, 32, 2, 8, 64
REDUCTION = {
    "prune_r": 0.1, "merge_r": 0.3, "merge_text": 0.2, "reduce_layers": [1],
    "sim_method": "mean_head", "merge_style": "tome",
}


def reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of one ``vilt_*.txt`` list (lines ``key (d0, d1)``, ``#`` comments)."""
    shapes = {}
    for line in (REFERENCE / f"vilt_{name}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, dims = re.match(r"(\S+) \(([^)]*)\)", line).groups()
        shapes[key] = tuple(int(d) for d in dims.split(",") if d.strip())
    return shapes


def tiny_model(head: str, seed: int = 0) -> PreTrainedModel:
    """A tiny transformers ViLT with every parameter random (LayerNorms included, so swaps show)."""
    config = ViltConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS_N, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=TEXT, image_size=64, patch_size=32, layer_norm_eps=1e-6,
        modality_type_vocab_size=3 if head == "nlvr2" else 2, num_images=2 if head == "nlvr2" else -1,
        num_labels={"vqa": 5, "ve": 3, "nlvr2": 2}.get(head, 2), pad_token_id=0,
    )
    if head == "pretrain":
        config.tie_word_embeddings = False  # the research MLM decoder is its own weight
    model = HF_CLASS[head](config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    # the research model: BertEmbeddings and the MLM transform are built with BertConfig's eps
    model.vilt.embeddings.text_embeddings.LayerNorm.eps = 1e-12
    if head == "pretrain":
        model.mlm_score.transform.LayerNorm.eps = 1e-12
    return model.eval()


def research_state_dict(model: PreTrainedModel, head: str, layout: str, seed: int = 1) -> dict[str, Tensor]:
    """The research layout of a transformers ViLT: the inverse of the converter, written out by hand.

    Adds what the research checkpoints hold and transformers has no slot for: the ``position_ids``
    buffer and, for retrieval and pretraining, random ITM weights.
    """
    plain = {
        "vilt.embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
        "vilt.embeddings.cls_token": "transformer.cls_token",
        "vilt.embeddings.position_embeddings": "transformer.pos_embed",
        "vilt.embeddings.patch_embeddings.projection.weight": "transformer.patch_embed.proj.weight",
        "vilt.embeddings.patch_embeddings.projection.bias": "transformer.patch_embed.proj.bias",
        "vilt.layernorm.weight": "transformer.norm.weight",
        "vilt.layernorm.bias": "transformer.norm.bias",
        "vilt.pooler.dense.weight": "pooler.dense.weight",
        "vilt.pooler.dense.bias": "pooler.dense.bias",
        "mlm_score.decoder.bias": "mlm_score.bias",
    }
    parts = {
        "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
        "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    }
    hf = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in hf.items():
        layer = re.fullmatch(r"vilt\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in plain:
            out[plain[key]] = value
        elif key.startswith("vilt.embeddings.text_embeddings."):
            out[key.removeprefix("vilt.embeddings.")] = value
        elif key.startswith("classifier."):
            out[{"vqa": "vqa_classifier", "ve": "ve_classifier", "nlvr2": "nlvr2_classifier"}[head] + key[10:]] = value
        elif layer and layer.group(2) == "attention.attention.query":
            i, kind = layer.group(1), layer.group(3)
            qkv = [hf[f"vilt.encoder.layer.{i}.attention.attention.{p}.{kind}"] for p in ("query", "key", "value")]
            out[f"transformer.blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv)
        elif layer and layer.group(2) in parts:
            out[f"transformer.blocks.{layer.group(1)}.{parts[layer.group(2)]}.{layer.group(3)}"] = value
        elif not (layer and layer.group(2).startswith("attention.attention.")):
            out[key] = value  # rank_output, mlm_score.transform.*, mlm_score.decoder.weight
    out["text_embeddings.position_ids"] = torch.arange(TEXT)[None]
    if head in ("irtr", "pretrain"):
        generator = torch.Generator().manual_seed(seed)
        out["itm_score.fc.weight"] = torch.randn(2, HIDDEN, generator=generator)
        out["itm_score.fc.bias"] = torch.randn(2, generator=generator)
    if layout == "pumer":
        out = {(k if k.startswith(HEAD_PREFIXES) else "vilt." + k): v for k, v in out.items()}
    return out


def write_checkpoint(tmp_path: Path, state_dict: dict[str, Tensor], layout: str, extra: dict | None = None) -> Path:
    """An original Lightning-style ``.ckpt`` or a PuMer folder (``config.json`` + ``pytorch_model.bin``)."""
    if layout == "original":
        path = tmp_path / "vilt.ckpt"
        torch.save({"state_dict": state_dict, "epoch": 3, "global_step": 100}, path)
        return path
    path = tmp_path / "pumer"
    path.mkdir()
    config = {"model_type": "vilt", "num_heads": HEADS_N, "hidden_size": HIDDEN, "max_text_len": TEXT, "itm_loss": 1}
    (path / "config.json").write_text(json.dumps({**config, **(extra or {})}))
    torch.save(state_dict, path / "pytorch_model.bin")
    return path


def logits(model: PreTrainedModel, head: str) -> Tensor:
    """Logits on a fixed batch, one text padded (patch sampling seeded: ViLT shuffles patches)."""
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(1, VOCAB, (2, TEXT), generator=generator)
    mask = torch.ones(2, TEXT, dtype=torch.long)
    mask[1, 5:] = 0
    shape = (2, 2, 3, 64, 64) if head == "nlvr2" else (2, 3, 64, 64)
    pixels = torch.randn(shape, generator=generator)
    torch.manual_seed(0)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels).logits


def load(path: Path, head: str, layout: str) -> tuple[PreTrainedModel, ConversionReport]:
    """``load_vilt_checkpoint``; an original checkpoint has no config to name the heads (tiny: not hidden / 64)."""
    return load_vilt_checkpoint(path, head, num_attention_heads=HEADS_N if layout == "original" else None)


@pytest.mark.parametrize("layout", ["original", "pumer"])
@pytest.mark.parametrize("head", HEADS)
def test_converted_model_gives_the_logits_of_the_model_the_weights_came_from(tmp_path, head, layout):
    source = tiny_model(head)
    research = research_state_dict(source, head, layout)
    names = {k.removeprefix("vilt.") if layout == "original" else k for k in reference_shapes(REFERENCE_FILE[head])}
    block = re.compile(r"(?:vilt\.)?transformer\.blocks\.(\d+)\.")
    names = {k for k in names if not (m := block.match(k)) or int(m.group(1)) < LAYERS}
    assert set(research) == names  # the written checkpoint uses exactly the real names

    model, report = load(write_checkpoint(tmp_path, research, layout), head, layout)

    assert type(model) is type(source)
    assert torch.equal(logits(model, head), logits(source, head))
    config = model.config
    assert (config.layer_norm_eps, config.max_position_embeddings, config.num_attention_heads) == (1e-6, TEXT, HEADS_N)
    assert config.hidden_dropout_prob == (0.0 if layout == "pumer" else 0.1)
    assert report.ok and not report.initialized and not report.derived
    assert len(report.mapped) == len(research) - 1 - 2 * (head in ("irtr", "pretrain"))  # all but the buffer and ITM
    if head in ("irtr", "pretrain"):
        assert torch.equal(report.itm_head["weight"], research["itm_score.fc.weight"])
        assert torch.equal(report.itm_head["bias"], research["itm_score.fc.bias"])
    if head == "pretrain":  # untied: neither the word embeddings nor the decoder was overwritten
        words = model.vilt.embeddings.text_embeddings.word_embeddings.weight
        assert torch.equal(words, source.vilt.embeddings.text_embeddings.word_embeddings.weight)
        assert torch.equal(model.mlm_score.decoder.weight, source.mlm_score.decoder.weight)
        assert not torch.equal(words, model.mlm_score.decoder.weight)


@pytest.mark.parametrize("layout", ["original", "pumer"])
@pytest.mark.parametrize("name", list(REFERENCE_FILE.values()))
def test_every_key_of_the_real_lists_is_mapped_or_explained(name, layout):
    shapes = reference_shapes(name)
    names = {k: k.removeprefix("vilt.") if layout == "original" else k for k in shapes}
    state_dict = {names[k]: torch.empty(s, device="meta") for k, s in shapes.items()}
    # the task's own head, and every task head started from the pretrained checkpoint
    heads = list(HEADS) if name == "pretrain" else [h for h, f in REFERENCE_FILE.items() if f == name]
    for head in heads:
        config = vilt_config_for(head, state_dict, source=layout, num_attention_heads=12)
        converted, report = convert_vilt_state_dict(state_dict, head, source=layout, config=config)
        assert report.ok, report.summary()
        assert set(report.mapped) | set(report.set_aside) | set(report.ignored) == set(state_dict)
        assert all(report.ignored.values())  # every drop says why
        with torch.device("meta"):
            expected = HF_CLASS[head](config).state_dict()
        assert {k: tuple(v.shape) for k, v in converted.items()} == {
            k: tuple(v.shape) for k, v in expected.items() if k not in report.initialized
        }
        sizes = (config.vocab_size, config.max_position_embeddings, config.image_size, config.patch_size)
        assert sizes == (30522, 40, 384, 32)
        assert (config.num_hidden_layers, config.hidden_size, config.layer_norm_eps) == (12, 768, 1e-6)
        own_head = name != "pretrain" or head in ("pretrain", "irtr")
        assert report.initialized == ([] if own_head else [k for k in expected if k.startswith("classifier.")])
    if name == "vqa2":
        assert config.num_labels == 3129


@pytest.mark.parametrize("layout", ["original", "pumer"])
def test_nlvr2_and_retrieval_from_a_pretrained_checkpoint_derive_as_the_research_code(tmp_path, layout):
    research = research_state_dict(tiny_model("pretrain"), "pretrain", layout)
    path = write_checkpoint(tmp_path, research, layout)
    prefix = "vilt." if layout == "pumer" else ""
    types = research[prefix + "token_type_embeddings.weight"]

    nlvr2, report = load(path, "nlvr2", layout)
    rows = nlvr2.vilt.embeddings.token_type_embeddings.weight
    assert rows.shape[0] == 3 and nlvr2.config.modality_type_vocab_size == 3
    assert torch.equal(rows[:2], types) and torch.equal(rows[2], types[1])
    assert "vilt.embeddings.token_type_embeddings.weight" in report.derived
    assert report.initialized == [f"classifier.{i}.{k}" for i in (0, 1, 3) for k in ("weight", "bias")]
    assert "pretraining MLM head" in report.ignored["mlm_score.bias"]
    assert logits(nlvr2, "nlvr2").shape == (2, 2)

    irtr, report = load(path, "irtr", layout)
    assert torch.equal(irtr.rank_output.weight, research["itm_score.fc.weight"][1:])
    assert torch.equal(irtr.rank_output.bias, research["itm_score.fc.bias"][1:])
    assert set(report.derived) == {"rank_output.weight", "rank_output.bias"} and report.itm_head is not None


@pytest.mark.parametrize("layout", ["original", "pumer"])
def test_position_ids_buffer_is_dropped_and_reported(layout):
    research = research_state_dict(tiny_model("vqa"), "vqa", layout)
    key = ("vilt." if layout == "pumer" else "") + "text_embeddings.position_ids"
    config = vilt_config_for("vqa", research, num_attention_heads=HEADS_N)
    converted, report = convert_vilt_state_dict(research, "vqa", source=layout, config=config)
    assert "buffer" in report.ignored[key] and key not in report.mapped
    assert not any(k.endswith("position_ids") for k in converted)


@pytest.mark.parametrize("head", ["irtr", "pretrain"])
def test_cli_writes_a_folder_that_from_pretrained_loads(tmp_path, head):
    source = tiny_model(head)
    research = research_state_dict(source, head, "pumer")
    out = tmp_path / "hf"
    main([str(write_checkpoint(tmp_path, research, "pumer")), str(out), "--head", head])
    assert {"config.json", "model.safetensors", "itm_head.safetensors"} <= {p.name for p in out.iterdir()}
    loaded = restore_text_layer_norm_eps(HF_CLASS[head].from_pretrained(out).eval())
    want = source.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    # equal weights, but from_pretrained's tensors sit at other alignments, so BLAS may round otherwise
    torch.testing.assert_close(logits(loaded, head), logits(source, head), rtol=0, atol=1e-6)
    itm = load_file(out / "itm_head.safetensors")
    assert torch.equal(itm["weight"], research["itm_score.fc.weight"])
    assert torch.equal(itm["bias"], research["itm_score.fc.bias"])
    head_module = torch.nn.Linear(HIDDEN, 2)
    head_module.load_state_dict(itm)  # the file is an nn.Linear(hidden, 2) state_dict


def test_text_layer_norms_keep_the_research_eps(tmp_path):
    """1e-12 on the text embeddings' and MLM transform's LayerNorm (BertConfig's), 1e-6 on the rest.

    With embeddings of the real scale (std 0.02) eps 1e-6 there moves the logits visibly, so the
    converted model, and a written folder after ``restore_text_layer_norm_eps``, must carry 1e-12.
    """
    source = tiny_model("pretrain")
    with torch.no_grad():
        for emb in (source.vilt.embeddings.text_embeddings.word_embeddings,
                    source.vilt.embeddings.text_embeddings.position_embeddings,
                    source.vilt.embeddings.text_embeddings.token_type_embeddings):
            emb.weight.mul_(0.1)  # std 0.02, as trained BERT embeddings
    path = write_checkpoint(tmp_path, research_state_dict(source, "pretrain", "pumer"), "pumer")
    model, _ = load(path, "pretrain", "pumer")
    assert model.vilt.embeddings.text_embeddings.LayerNorm.eps == model.mlm_score.transform.LayerNorm.eps == 1e-12
    assert model.vilt.layernorm.eps == model.vilt.encoder.layer[0].layernorm_before.eps == 1e-6
    assert torch.equal(logits(model, "pretrain"), logits(source, "pretrain"))

    out = tmp_path / "hf"
    main([str(path), str(out), "--head", "pretrain"])
    plain = ViltForMaskedLM.from_pretrained(out).eval()  # one layer_norm_eps for every LayerNorm: 1e-6
    assert (logits(plain, "pretrain") - logits(source, "pretrain")).abs().max() > 1e-5
    restored = restore_text_layer_norm_eps(plain)
    torch.testing.assert_close(logits(restored, "pretrain"), logits(source, "pretrain"), rtol=0, atol=1e-6)


def test_a_pumer_config_reduction_survives_into_the_transformers_config(tmp_path):
    research = research_state_dict(tiny_model("vqa"), "vqa", "pumer")
    path = write_checkpoint(tmp_path, research, "pumer", extra={**REDUCTION, "keep_ratio": 1, "prune_method": "x"})
    out = tmp_path / "hf"
    main([str(path), str(out), "--head", "vqa"])
    loaded = ViltForQuestionAnswering.from_pretrained(out).eval()
    assert {k: getattr(loaded.config, k) for k in REDUCTION_FIELDS} == REDUCTION
    assert not hasattr(loaded.config, "prune_method")  # other PuMer fields are not carried
    pumer_patch.apply_from_config(loaded)
    assert pumer_patch.is_patched(loaded)
    assert logits(loaded, "vqa").shape == (2, 5)


def test_layout_mistakes_and_foreign_heads_are_refused_with_the_fix(tmp_path):
    research = research_state_dict(tiny_model("vqa"), "vqa", "pumer")
    with pytest.raises(ValueError, match="pass source='pumer'"):
        convert_vilt_state_dict(research, "vqa", source="original")
    with pytest.raises(ValueError, match="head='vqa2' is not one of"):
        convert_vilt_state_dict(research, "vqa2", source="pumer")
    path = write_checkpoint(tmp_path, research, "pumer")
    with pytest.raises(ValueError, match=r"unexpected .*vqa_classifier.0.weight.*Check --head"):
        load_vilt_checkpoint(path, "nlvr2")


class _Hyperparameters:
    """Stands for the objects a Lightning checkpoint may pickle besides tensors."""


def test_a_pickle_with_objects_is_refused_unless_trusted(tmp_path):
    research = research_state_dict(tiny_model("vqa"), "vqa", "original")
    path = tmp_path / "vilt.ckpt"
    torch.save({"state_dict": research, "hyper_parameters": _Hyperparameters()}, path)
    with pytest.raises(ValueError, match="--trust-pickle"):
        read_vilt_checkpoint(path)
    state_dict, config, source = read_vilt_checkpoint(path, weights_only=False)
    assert (config, source) == (None, "original") and state_dict.keys() == research.keys()


def test_an_incomplete_checkpoint_is_refused_naming_its_keys_and_nothing_is_written(tmp_path, caplog):
    research = research_state_dict(tiny_model("vqa"), "vqa", "pumer")
    first_block = [k for k in research if k.startswith("vilt.transformer.blocks.0.")]
    for key in first_block:
        del research[key]
    research["vqa_classifier.3.weight"] = research["vqa_classifier.3.weight"][:, 1:]  # a head of another width
    path = write_checkpoint(tmp_path, research, "pumer")
    with pytest.raises(ValueError, match=r"missing .*vilt\.encoder\.layer\.0\.\* \(16 keys\)") as error:
        load_vilt_checkpoint(path, "vqa")
    assert "classifier.3.weight: [5, 63] vs [5, 64]" in str(error.value) and "--no-strict" in str(error.value)

    out = tmp_path / "hf"
    with caplog.at_level(logging.ERROR, logger="pumer_patch.models.convert_vilt"):
        assert main([str(path), str(out), "--head", "vqa"]) == 1
    assert "vilt.encoder.layer.0.* (16 keys)" in caplog.text and "classifier.3.weight" in caplog.text
    assert not out.exists()


def test_no_strict_writes_an_incomplete_checkpoint_and_reports_it(tmp_path, caplog):
    source = tiny_model("vqa")
    research = research_state_dict(source, "vqa", "pumer")
    for key in [k for k in research if k.startswith("vilt.transformer.blocks.0.")]:
        del research[key]
    research["vqa_classifier.3.weight"] = research["vqa_classifier.3.weight"][:, 1:]
    research["vilt.transformer.extra.weight"] = torch.zeros(3)  # no place in ViLT
    path = write_checkpoint(tmp_path, research, "pumer")
    model, report = load_vilt_checkpoint(path, "vqa", strict=False)
    assert len(report.missing) == 16 and all(k.startswith("vilt.encoder.layer.0.") for k in report.missing)
    assert report.mismatched == {"classifier.3.weight": ((5, 63), (5, 64))}
    assert report.unexpected == ["vilt.transformer.extra.weight"]
    assert model.config.num_hidden_layers == LAYERS  # the missing first block is not a shallower model
    second = model.vilt.encoder.layer[1].output.dense.weight
    assert torch.equal(second, source.vilt.encoder.layer[1].output.dense.weight)

    out = tmp_path / "hf"
    with caplog.at_level(logging.WARNING, logger="pumer_patch.models.convert_vilt"):
        assert main([str(path), str(out), "--head", "vqa", "--no-strict"]) == 0
    assert "16 missing, 1 unexpected, 1 mismatched" in caplog.text
    assert "missing vilt.encoder.layer.0.attention.attention.query.weight" in caplog.text
    loaded, info = ViltForQuestionAnswering.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_a_pumer_folder_with_a_malformed_config_is_refused_naming_it(tmp_path, caplog):
    path = write_checkpoint(tmp_path, research_state_dict(tiny_model("vqa"), "vqa", "pumer"), "pumer")
    (path / "config.json").write_text('{"num_heads": 2,')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        read_vilt_checkpoint(path)
    with caplog.at_level(logging.ERROR, logger="pumer_patch.models.convert_vilt"):
        assert main([str(path), str(tmp_path / "hf"), "--head", "vqa"]) == 1
    assert str(path / "config.json") in caplog.text and not (tmp_path / "hf").exists()
