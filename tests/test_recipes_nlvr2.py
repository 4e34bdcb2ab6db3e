"""NLVR2 recipe end to end: public files -> ``recipes.prepare.convert_nlvr2`` -> train / eval for ViLT and METER.

The fixture writes the public layout (JSON Lines ``{train,dev,test1}.json`` with the release's extra
fields; image folders ``<split>/`` with train's images in numbered subfolders, PNG files named
``<split>-<set>-<pair>-img0/img1``); the converter writes the data folder; two-image examples come
out as ``pixel_values`` (2, 3, S, S); tiny random pretrained-style ViLT and METER checkpoints (2 token
types, no NLVR2 head) grow their third token type as a copy of the second, train 3 steps and
evaluate, with and without PuMer, which reduces the GFLOPs of both passes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("lmdb")
pytest.importorskip("accelerate")

from recipe_helpers import image_bytes, train_args  # noqa: E402
from transformers import BertTokenizerFast, ViltForImagesAndTextClassification, ViltForMaskedLM  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

import pumer_patch  # noqa: E402
from pumer_patch.flops import gflops_per_example  # noqa: E402
from pumer_patch.models.meter import MeterForPreTraining, MeterForVisualReasoning  # noqa: E402
from recipes import cli  # noqa: E402
from recipes.prepare import convert_nlvr2  # noqa: E402
from recipes.run import TaskContext  # noqa: E402
from recipes.tasks import nlvr2  # noqa: E402
from recipes.data.dataset import BadImageError  # noqa: E402
from recipes.data.records import Nlvr2Record, RecordError, read_jsonl  # noqa: E402
from recipes.data.store import ImageStore, write_image_store  # noqa: E402
from recipes.models import get_family, load_model  # noqa: E402

pytest_plugins = ["recipe_fixtures"]

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220)}
LABELS = ["False", "True"]


def write_public(root: Path, pairs: dict[str, int] | None = None) -> tuple[Path, Path]:
    """NLVR2's public JSON Lines files and image folders: two statements per image pair.

    Pair k of a split: left image red when k is even, right image red when k % 3 == 0; statement 0
    says "the left image is red", statement 1 "both images are blue".
    """
    pairs = pairs or {"train": 6, "dev": 3, "test1": 3}
    raw, images = root / "nlvr2" / "data", root / "images"
    raw.mkdir(parents=True)
    for split, count in pairs.items():
        lines = []
        for k in range(count):
            left, right = ("red" if k % 2 == 0 else "blue"), ("red" if k % 3 == 0 else "blue")
            folder = images / split / str(k % 2) if split == "train" else images / split  # train: numbered folders
            folder.mkdir(parents=True, exist_ok=True)
            for side, colour in (("img0", left), ("img1", right)):
                (folder / f"{split}-{k}-1-{side}.png").write_bytes(image_bytes(COLOURS[colour], "PNG"))
            for s, (sentence, truth) in enumerate((("the left image is red.", left == "red"),
                                                   ("both images are blue.", left == right == "blue"))):
                line = {"identifier": f"{split}-{k}-1-{s}", "sentence": sentence, "label": str(truth),
                        "left_url": "http://a", "right_url": "http://b", "writer": "w", "synset": "n0", "query": "q",
                        "extra_validations": {}}
                if split == "train":
                    line["directory"] = str(k % 2)
                lines.append(line)
        (raw / f"{split}.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (images / "dev" / "dev-99-1-img0.png").write_bytes(image_bytes((1, 2, 3), "PNG"))  # an image no statement names
    return raw, images


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nlvr2")
    raw, images = write_public(root)
    convert_nlvr2.convert(raw, images, root / "data")
    return root / "data"


# ---------------------------------------------------------------------------------------- data


def test_converter_writes_the_seed_layout(data: Path) -> None:
    train = read_jsonl(data / "nlvr2_train.jsonl", Nlvr2Record.from_json)
    assert len(train) == 12
    assert json.loads((data / "nlvr2_dev.jsonl").read_text().splitlines()[1]) == {
        "identifier": "dev-0-1-1", "sentence": "both images are blue.", "label": "False"}
    assert train[0].images == ("train-0-1-img0", "train-0-1-img1")
    for split, pairs in (("train", 6), ("dev", 3), ("test1", 3)):
        store = ImageStore(data / f"nlvr2-{split}.lmdb")
        assert sorted(store.keys()) == sorted(f"{split}-{k}-1-img{i}" for k in range(pairs) for i in (0, 1))
    store = ImageStore(data / "nlvr2-train.lmdb")  # found in train's numbered subfolders; the right bytes
    assert Image.open(io.BytesIO(store["train-1-1-img0"])).getpixel((5, 5))[2] > 150  # pair 1: left blue


def test_converter_names_a_missing_image(tmp_path: Path) -> None:
    raw, images = write_public(tmp_path, {"dev": 2})
    (images / "dev" / "dev-1-1-img1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 images .*dev-1-1-img1"):
        convert_nlvr2.convert(raw, images, tmp_path / "out", splits=["dev"])
    assert convert_nlvr2.convert(raw, None, tmp_path / "out", splits=["dev"]) == {"dev": 4}  # annotations only


def test_records_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"identifier": "dev-1-2-0", "sentence": "s", "label": "True"}) + "\n"
                    + json.dumps({"identifier": "dev-1-2-1", "sentence": "s", "label": "true"}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: .*label"):
        read_jsonl(path, Nlvr2Record.from_json)
    with pytest.raises(ValueError, match="identifier"):
        Nlvr2Record.from_json({"identifier": "dev-1-2", "sentence": "s", "label": "True"})
    assert Nlvr2Record.from_json({"identifier": "test1-0-1-3", "sentence": "s", "label": "False"}).images == (
        "test1-0-1-img0", "test1-0-1-img1")


def test_examples_hold_both_images_and_a_bad_one_invalidates_the_pair(data: Path, tokenizer_dir: Path,
                                                                       tmp_path: Path) -> None:
    tokenizer = BertTokenizerFast.from_pretrained(str(tokenizer_dir))
    dev = nlvr2.Nlvr2Data(data).dataset("dev", get_family("vilt"), LABELS, tokenizer, image_size=16, text_length=12,
                                        train=False)
    example = dev[0]  # pair 0: left red, right red; "the left image is red." -> True
    assert example["pixel_values"].shape == (2, 3, 16, 16) and example["valid"] and example["target"] == 1
    assert dev[1]["target"] == 0  # "both images are blue." on a red pair
    pair1 = dev[2]["pixel_values"]  # pair 1: left blue, right blue (normalised: blue channel high, red low)
    assert pair1[0, 2].mean() > 0.5 and pair1[1, 0].mean() < -0.5
    assert example["pixel_values"][1, 0].mean() > 0.5  # pair 0's right image is red: the order is left, right

    # a second image that does not decode; one that is missing from the store
    store = ImageStore(data / "nlvr2-dev.lmdb")
    items = [(k, store[k]) for k in store.keys()]
    items = [(k, b"not an image" if k == "dev-2-1-img1" else v) for k, v in items if k != "dev-1-1-img0"]
    write_image_store(tmp_path / "nlvr2-dev.lmdb", items)
    (tmp_path / "nlvr2_dev.jsonl").write_text((data / "nlvr2_dev.jsonl").read_text())
    with pytest.raises(BadImageError, match="dev-1-1-img0"):
        nlvr2.Nlvr2Data(tmp_path).dataset("dev", get_family("vilt"), LABELS, tokenizer, image_size=16,
                                          text_length=12, train=False)
    bad = nlvr2.Nlvr2Data(tmp_path).dataset("dev", get_family("vilt"), LABELS, tokenizer, image_size=16,
                                            text_length=12, train=False, on_bad_image="skip")
    assert [r.identifier for r in bad.records] == ["dev-0-1-0", "dev-0-1-1", "dev-2-1-0", "dev-2-1-1"]
    broken = bad[2]
    assert not broken["valid"] and broken["pixel_values"].shape == (2, 3, 16, 16) and not broken["pixel_values"].any()
    with pytest.raises(ValueError, match="not this task's"):
        nlvr2.Nlvr2Data(data).dataset("dev", get_family("vilt"), ["a", "b", "c"], tokenizer, image_size=16,
                                      text_length=12, train=False)


def test_accuracy_by_hand() -> None:
    task = nlvr2.NLVR2.make_task(TaskContext(LABELS, []))
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1], [0.0, 9.0]])  # argmax 0, 1, 0, 0, 1
    batch = {"index": torch.arange(5), "target": torch.tensor([0, 1, 1, 1, 0]),
             "valid": torch.tensor([True, True, True, True, False])}
    metrics = task.metrics(task.eval_outputs(SequenceClassifierOutput(logits=logits), batch))
    assert metrics == {"score": 0.5, "skipped_images": 1.0}  # 2 of the 4 valid right; the 5th left out
    expected = torch.nn.functional.cross_entropy(logits[:4], batch["target"][:4])
    torch.testing.assert_close(task.loss(SequenceClassifierOutput(logits=logits), batch), expected)


# ---------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("family", ["vilt", "meter"])
def test_a_two_type_checkpoint_grows_its_third_token_type(pretrained_vilt: Path, pretrained_meter: Path,
                                                           family: str) -> None:
    path = pretrained_vilt if family == "vilt" else pretrained_meter
    pretrained = (ViltForMaskedLM if family == "vilt" else MeterForPreTraining).from_pretrained(path)
    model = load_model(get_family(family), "nlvr2", path, LABELS, image_size=32)
    assert isinstance(model, ViltForImagesAndTextClassification if family == "vilt" else MeterForVisualReasoning)
    if family == "vilt":
        before = pretrained.vilt.embeddings.token_type_embeddings.weight
        after = model.vilt.embeddings.token_type_embeddings.weight
        assert model.config.modality_type_vocab_size == 3 and model.config.num_images == 2
        torch.testing.assert_close(model.vilt.encoder.layer[1].output.dense.weight,
                                   pretrained.vilt.encoder.layer[1].output.dense.weight)
    else:
        before, after = pretrained.meter.token_type_embeddings.weight, model.meter.token_type_embeddings.weight
        assert model.config.token_types == 3
        torch.testing.assert_close(model.meter.cross_modal_image_layers[1].output.dense.weight,
                                   pretrained.meter.cross_modal_image_layers[1].output.dense.weight)
    assert after.shape[0] == 3
    torch.testing.assert_close(after[:2], before)
    torch.testing.assert_close(after[2], after[1])  # the second image starts as the first
    assert [model.config.id2label[i] for i in range(2)] == LABELS


@pytest.mark.parametrize("family", ["vilt", "meter"])
def test_a_finetuned_checkpoint_keeps_its_head(pretrained_vilt: Path, pretrained_meter: Path, tmp_path: Path,
                                               family: str) -> None:
    path = pretrained_vilt if family == "vilt" else pretrained_meter
    grown = load_model(get_family(family), "nlvr2", path, LABELS, image_size=32)
    grown.config.id2label, grown.config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {}  # as a converted checkpoint
    grown.save_pretrained(tmp_path)
    model = load_model(get_family(family), "nlvr2", tmp_path, LABELS, image_size=32)
    head = "classifier" if family == "vilt" else "nlvr2_classifier"
    for name, value in getattr(grown, head).state_dict().items():
        torch.testing.assert_close(getattr(model, head).state_dict()[name], value)
    assert [model.config.id2label[i] for i in range(2)] == LABELS


@pytest.mark.parametrize("family", ["vilt", "meter"])
def test_pumer_reduces_in_both_passes(pretrained_vilt: Path, pretrained_meter: Path, family: str) -> None:
    path = pretrained_vilt if family == "vilt" else pretrained_meter
    model = load_model(get_family(family), "nlvr2", path, LABELS, image_size=32).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 2000, (2, 12), generator=generator),
              "attention_mask": torch.ones(2, 12, dtype=torch.long),
              "pixel_values": torch.randn(2, 2, 3, 32, 32, generator=generator)}  # (B, 2 images, 3, S, S)
    inputs["attention_mask"][1, 8:] = 0
    types = model.vilt.embeddings.token_type_embeddings if family == "vilt" else model.meter.token_type_embeddings
    with torch.no_grad():
        types.weight[2] += 0.5  # the second image's type differs from the first's, so parity checks it is used
    # the last layer's FFN sees every token of its stream: one call per pass
    last = model.vilt.encoder.layer[-1] if family == "vilt" else model.meter.cross_modal_image_layers[-1]
    tokens: list[int] = []
    handle = last.output.dense.register_forward_hook(lambda module, args, out: tokens.append(args[0].shape[1]))
    plain = gflops_per_example(model, inputs)
    with torch.no_grad():
        torch.manual_seed(1)  # ViLT draws its patch order each forward
        expected = model(**inputs).logits
        full = tokens[-2:]
        pumer_patch.apply(model, "p0-r0-t0-1" if family == "vilt" else "p0r0t0-02", mode="default")
        torch.manual_seed(1)
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-5)  # zero reduction
        pumer_patch.apply(model, "p0.3-r0.3-t0.2-1" if family == "vilt" else "p0.3r0.3t0.2-02", mode="default")
        assert model(**inputs).logits.shape == (2, 2)
    handle.remove()
    reduced = tokens[-2:]
    assert len(set(full)) == 1 and all(n < full[0] for n in reduced)  # each pass reduces on its own
    assert gflops_per_example(model, inputs) < plain


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("family", ["vilt", "meter"])
@pytest.mark.parametrize("pumer", [None, "default"])
def test_trains_and_evaluates(data: Path, pretrained_vilt: Path, pretrained_meter: Path, tokenizer_dir: Path,
                              tmp_path: Path, family: str, pumer: str | None) -> None:
    model = pretrained_vilt if family == "vilt" else pretrained_meter
    config = "p0.2-r0.2-t0.2-1" if family == "vilt" else "p0.2r0.2t0.2-02"
    extra = [] if pumer is None else ["--pumer", config, "--pumer-mode", pumer]
    out = tmp_path / "run"
    assert cli.main(train_args("nlvr2", f"{family}-nlvr2", data, model, out, tokenizer_dir, *extra)) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["step"] == 3 and info["settings"]["task"] == "nlvr2" and info["examples"] == 12
    assert [h["examples"] for h in info["history"]] == [6, 6]
    best = out / "best"
    head = (ViltForImagesAndTextClassification if family == "vilt" else MeterForVisualReasoning).from_pretrained(best)
    assert [head.config.id2label[i] for i in range(2)] == LABELS

    common = ["--data", str(data), "--model", str(best), "--tokenizer", str(tokenizer_dir), "--workers", "0",
              "--no-progress", "--eval-batch", "4", "--split", "dev"]
    pumer_eval = ["--pumer", "p0.3-r0.3-t0.2-1" if family == "vilt" else "p0.3r0.3t0.2-02", "--pumer-mode", "default"]
    assert cli.main(["nlvr2", "eval", *common, "--output", str(tmp_path / "eval"), *pumer_eval]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    unpatched, patched = report["rows"]
    if pumer is None:  # a reducing model's best score was measured reduced; compare the unreduced run only
        assert unpatched["score"] == pytest.approx(info["best_score"])
    assert unpatched["examples"] == patched["examples"] == 6 and report["image_size"] == 32
    assert patched["gflops_per_example"] < unpatched["gflops_per_example"]
    assert "| accuracy |" in (tmp_path / "eval" / "eval.md").read_text()


def test_a_wrong_preset_or_missing_data_fails_before_loading(data: Path, pretrained_vilt: Path, tokenizer_dir: Path,
                                                             tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # a VQA preset is not offered by the NLVR2 command
        cli.main(train_args("nlvr2", "vilt-vqa", data, pretrained_vilt, tmp_path, tokenizer_dir))
    with pytest.raises(FileNotFoundError, match="convert_nlvr2"):
        cli.main(train_args("nlvr2", "vilt-nlvr2", tmp_path, pretrained_vilt, tmp_path / "o", tokenizer_dir))
