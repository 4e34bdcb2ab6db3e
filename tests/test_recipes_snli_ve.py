"""SNLI-VE recipe end to end: public files -> ``recipes.prepare.convert_snli_ve`` -> train / eval for ViLT and METER.

The fixture writes the public layout (SNLI-VE jsonl lines with every field the release has, a "-"
pair without a gold label, a Flickr30k folder of JPEGs); the converter writes the data folder; tiny
random ViLT and METER checkpoints (pretrained-style: no task head) train 3 steps and evaluate, with
and without PuMer; accuracy is checked against a hand count and against the saved best checkpoint.
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
from transformers import ViltForQuestionAnswering  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from pumer_patch.models.meter import MeterForVisualEntailment  # noqa: E402
from recipes import cli  # noqa: E402
from recipes.prepare import convert_snli_ve  # noqa: E402
from recipes.tasks.classification import ClassificationTask  # noqa: E402
from recipes.data.records import RecordError, SnliVeRecord, read_jsonl  # noqa: E402
from recipes.data.store import ImageStore  # noqa: E402

pytest_plugins = ["recipe_fixtures"]

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}


def write_public(root: Path, n: dict[str, int] | None = None) -> tuple[Path, Path]:
    """SNLI-VE's public jsonl files (with their extra fields) and a Flickr30k image folder."""
    n = n or {"train": 12, "dev": 6, "test": 6}
    raw, images = root / "snli-ve", root / "flickr30k-images"
    raw.mkdir(parents=True)
    images.mkdir()
    for k, colour in enumerate(COLOURS):
        (images / f"{1000 + k}.jpg").write_bytes(image_bytes(COLOURS[colour]))
    (images / "9999.jpg").write_bytes(image_bytes((1, 2, 3)))  # an image no pair names
    labels = ["entailment", "neutral", "contradiction"]
    for split, count in n.items():
        lines = []
        for i in range(count):
            k = i % len(COLOURS)
            colour = list(COLOURS)[k]
            lines.append({"Flickr30K_ID": str(1000 + k), "sentence1": f"a {colour} square.", "captionID": f"{1000 + k}.jpg#0",
                          "sentence2": f"the square is {colour if i % 3 == 0 else 'purple'}.",
                          "gold_label": labels[i % 3], "pairID": f"{1000 + k}.jpg#0r1{'enc'[i % 3]}",
                          "annotator_labels": [labels[i % 3]], "similarity": 0.5})
        lines.append({"Flickr30K_ID": "1000", "sentence2": "no majority.", "gold_label": "-", "pairID": "x"})
        (raw / f"snli_ve_{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return raw, images


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("snli-ve")
    raw, images = write_public(root)
    convert_snli_ve.convert(raw, images, root / "data")
    return root / "data"


def test_converter_writes_the_seed_layout(data: Path) -> None:
    train = read_jsonl(data / "snli_ve_train.jsonl", SnliVeRecord.from_json)
    assert len(train) == 12  # the "-" pair is dropped
    assert json.loads((data / "snli_ve_train.jsonl").read_text().splitlines()[0]) == {
        "pairID": "1000.jpg#0r1e", "Flickr30K_ID": "1000", "sentence2": "the square is red.", "gold_label": "entailment"}
    assert [r.label for r in train[:3]] == [2, 1, 0]  # contradiction 0, neutral 1, entailment 2
    store = ImageStore(data / "flickr30k_images.lmdb")
    assert sorted(store.keys()) == ["1000", "1001", "1002", "9999"]  # the whole folder: retrieval shares it
    assert Image.open(io.BytesIO(store["1001"])).getpixel((10, 10))[2] > 150  # blue, the right bytes


def test_converter_keeps_a_complete_store_and_refuses_an_incomplete_one(tmp_path: Path) -> None:
    raw, images = write_public(tmp_path)
    out = tmp_path / "out"
    convert_snli_ve.convert(raw, images, out)
    before = (out / "flickr30k_images.lmdb").stat().st_mtime_ns
    convert_snli_ve.convert(raw, None, out)  # annotations again; the store holds every image: kept
    assert (out / "flickr30k_images.lmdb").stat().st_mtime_ns == before
    (images / "1002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1002"):
        convert_snli_ve.convert(raw, images, tmp_path / "other")


def test_records_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"pairID": "a", "Flickr30K_ID": 12, "sentence2": "s", "gold_label": "entailment"}) + "\n"
                    + json.dumps({"pairID": "b", "Flickr30K_ID": "1", "sentence2": "s", "gold_label": "yes"}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: .*gold_label"):
        read_jsonl(path, SnliVeRecord.from_json)
    assert SnliVeRecord.from_json({"pairID": "a", "Flickr30K_ID": 12, "sentence2": "s",
                                   "gold_label": "neutral"}).image_id == "12"


def test_accuracy_by_hand() -> None:
    task = ClassificationTask(["contradiction", "neutral", "entailment"])
    logits = torch.tensor([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [5.0, 0, 0], [0, 0, 9.0]])
    batch = {"index": torch.arange(5), "target": torch.tensor([0, 2, 2, 1, 2]),
             "valid": torch.tensor([True, True, True, True, False])}
    metrics = task.metrics(task.eval_outputs(SequenceClassifierOutput(logits=logits), batch))
    assert metrics == {"score": 0.5, "skipped_images": 1.0}  # 2 of the 4 valid right; the 5th left out
    # loss: the mean cross-entropy of the valid examples only
    expected = torch.nn.functional.cross_entropy(logits[:4], batch["target"][:4])
    torch.testing.assert_close(task.loss(SequenceClassifierOutput(logits=logits), batch), expected)


@pytest.mark.parametrize("family", ["vilt", "meter"])
@pytest.mark.parametrize("pumer", [None, "default"])
def test_trains_evaluates_and_reloads(data: Path, pretrained_vilt: Path, pretrained_meter: Path, tokenizer_dir: Path,
                                      tmp_path: Path, family: str, pumer: str | None) -> None:
    model = pretrained_vilt if family == "vilt" else pretrained_meter
    extra = [] if pumer is None else ["--pumer", "p0.2-r0.2-t0.2-1" if family == "vilt" else "p0.2r0.2t0.2-02",
                                      "--pumer-mode", pumer]
    out = tmp_path / "run"
    assert cli.main(train_args("snli_ve", f"{family}-ve", data, model, out, tokenizer_dir, *extra)) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["step"] == 3 and info["settings"]["task"] == "snli_ve"
    best = out / "best"
    head = (ViltForQuestionAnswering if family == "vilt" else MeterForVisualEntailment).from_pretrained(best)
    assert [head.config.id2label[i] for i in range(3)] == ["contradiction", "neutral", "entailment"]

    # eval-only on dev reproduces the score training recorded for its best checkpoint
    common = ["--data", str(data), "--model", str(best), "--tokenizer", str(tokenizer_dir), "--workers", "0",
              "--no-progress", "--eval-batch", "4", "--split", "dev"]
    pumer_eval = ["--pumer", "p0.3-r0.3-t0.2-1" if family == "vilt" else "p0.3r0.3t0.2-02", "--pumer-mode", "default"]
    assert cli.main(["snli_ve", "eval", *common, "--output", str(tmp_path / "eval"), *pumer_eval]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    unpatched, patched = report["rows"]
    if pumer is None:  # a reducing model's best score was measured reduced; compare the unreduced run only
        assert unpatched["score"] == pytest.approx(info["best_score"])
    assert unpatched["examples"] == patched["examples"] == 6
    assert report["image_size"] == 32  # read from the checkpoint's config
    assert patched["gflops_per_example"] < unpatched["gflops_per_example"]
    assert "| accuracy |" in (tmp_path / "eval" / "eval.md").read_text()


def test_a_wrong_preset_or_missing_data_fails_before_loading(data: Path, pretrained_vilt: Path, tokenizer_dir: Path,
                                                             tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # a VQA preset is not offered by the SNLI-VE command
        cli.main(train_args("snli_ve", "vilt-vqa", data, pretrained_vilt, tmp_path, tokenizer_dir))
    with pytest.raises(FileNotFoundError, match="convert_snli_ve"):
        cli.main(train_args("snli_ve", "vilt-ve", tmp_path, pretrained_vilt, tmp_path / "o", tokenizer_dir))
