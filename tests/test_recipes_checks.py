"""Data checked at the door: every bad datum, written in the real formats, is refused (naming file and
line, or question / pair / image) or dropped and counted by reason, at conversion and when records load.

The raw files are the public layouts (VQAv2's questions / annotations json, SNLI-VE's and NLVR2's
JSON Lines, Karpathy's json), the images JPEG / PNG files and LMDB stores.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

pytest.importorskip("lmdb")

import lmdb  # noqa: E402
from recipe_helpers import image_bytes  # noqa: E402
from transformers import BertTokenizerFast  # noqa: E402

from recipes.data.dataset import ImageTextDataset  # noqa: E402
from recipes.data.records import RecordError, VqaRecord, read_jsonl, write_jsonl  # noqa: E402
from recipes.data.store import ImageStore, write_image_folder, write_image_store  # noqa: E402
from recipes.data.transforms import build_image_transform  # noqa: E402
from recipes.models import FAMILIES  # noqa: E402
from recipes.prepare import convert_nlvr2, convert_retrieval, convert_snli_ve, convert_vqav2  # noqa: E402
from recipes.prepare.checks import ConversionError  # noqa: E402
from recipes.tasks.classification import check_split_files  # noqa: E402

pytest_plugins = ["recipe_fixtures"]

JPEG = image_bytes((200, 30, 30))


def bomb_png(side: int = 20000) -> bytes:
    """A genuine 1-bit PNG of side x side pixels (400M: over twice PIL's limit) that is about 50 kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- VQAv2


def write_vqa_raw(root: Path, change: Callable[[dict[str, Any]], None] | None = None,
                  images: dict[str, bytes] | None = None) -> tuple[Path, dict[str, Path]]:
    """Official-style VQAv2 train/val files (3 + 1 questions, ten answers each) and COCO image folders.

    change(files) may edit the parsed files (keys: file names) before they are written; a value
    that is ``bytes`` is written as is. images: file name -> bytes, replacing the plain JPEGs.
    """
    raw = root / "raw"
    files: dict[str, Any] = {}
    qid = 0
    for split, image_ids in (("train2014", [1, 2]), ("val2014", [3])):
        (raw / split).mkdir(parents=True)
        for i in image_ids:
            name = f"COCO_{split}_{i:012d}.jpg"
            (raw / split / name).write_bytes((images or {}).get(name, JPEG))
        qs, anns = [], []
        for k in range(3 if split == "train2014" else 1):
            qid += 1
            image = image_ids[k % len(image_ids)]
            qs.append({"image_id": image, "question": f"is it red {k}?", "question_id": qid})
            anns.append({"question_type": "is it", "multiple_choice_answer": "yes", "answer_type": "yes/no",
                         "image_id": image, "question_id": qid,
                         "answers": [{"answer": "yes" if j < 8 else "Yes", "answer_confidence": "yes", "answer_id": j + 1}
                                     for j in range(10)]})
        files[f"v2_OpenEnded_mscoco_{split}_questions.json"] = {"task_type": "Open-Ended", "questions": qs}
        files[f"v2_mscoco_{split}_annotations.json"] = {"data_type": "mscoco", "annotations": anns}
    if change is not None:
        change(files)
    for name, content in files.items():
        (raw / name).write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return raw, {"train2014": raw / "train2014", "val2014": raw / "val2014"}


def convert_vqa(root: Path, **kwargs: Any) -> dict[str, int]:
    raw, dirs = write_vqa_raw(root, kwargs.pop("change", None), kwargs.pop("images", None))
    return convert_vqav2.convert(raw, root / "data", dirs, splits=("train", "val"), **kwargs)


def _report(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}_conversion.json").read_text())


def test_vqa_converter_keeps_raw_answers_and_writes_its_tally(tmp_path: Path) -> None:
    assert convert_vqa(tmp_path) == {"train": 3, "val": 1}
    record = read_jsonl(tmp_path / "data" / "vqav2_val.jsonl", VqaRecord.from_json)[0]
    assert record.answers == ("yes",) * 8 + ("Yes",) * 2 and record.labelled
    report = _report(tmp_path / "data", "vqav2")
    assert report["records"] == {"train": 3, "val": 1} and report["dropped"] == {}
    # four questions are too few for a vocabulary answer (9 questions): every one is kept, and counted
    assert [v["count"] for v in report["kept_and_counted"].values()] == [4]


def test_vqa_truncated_annotation_file_names_file_and_line(tmp_path: Path) -> None:
    def truncate(files: dict[str, Any]) -> None:
        text = json.dumps(files["v2_mscoco_val2014_annotations.json"], indent=1)
        files["v2_mscoco_val2014_annotations.json"] = text[: len(text) // 2].encode()  # a download cut short

    with pytest.raises(ConversionError, match=r"v2_mscoco_val2014_annotations\.json:\d+:\d+: not valid JSON"):
        convert_vqa(tmp_path, change=truncate)
    assert not (tmp_path / "data" / "answers.json").exists()  # nothing written


def test_vqa_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    def latin1(files: dict[str, Any]) -> None:
        files["v2_OpenEnded_mscoco_train2014_questions.json"]["questions"][1]["question"] = "caf\u00e9?"
        text = json.dumps(files["v2_OpenEnded_mscoco_train2014_questions.json"], indent=1, ensure_ascii=False)
        files["v2_OpenEnded_mscoco_train2014_questions.json"] = text.encode("latin-1")

    with pytest.raises(ConversionError, match=r"train2014_questions\.json:\d+: not UTF-8"):
        convert_vqa(tmp_path, change=latin1)


def test_vqa_missing_field_names_file_and_question(tmp_path: Path) -> None:
    def no_image(files: dict[str, Any]) -> None:
        del files["v2_OpenEnded_mscoco_train2014_questions.json"]["questions"][2]["image_id"]

    with pytest.raises(ConversionError, match=r"train2014_questions\.json: entry 2 \(question 3\): missing field 'image_id'"):
        convert_vqa(tmp_path, change=no_image)

    def no_answers(files: dict[str, Any]) -> None:
        del files["v2_mscoco_val2014_annotations.json"]["annotations"][0]["answers"]

    with pytest.raises(ConversionError, match=r"val2014_annotations\.json: entry 0 \(question 4\): missing field 'answers'"):
        convert_vqa(tmp_path / "b", change=no_answers)


def test_vqa_annotation_without_ten_answers_is_refused(tmp_path: Path) -> None:
    def nine(files: dict[str, Any]) -> None:
        files["v2_mscoco_train2014_annotations.json"]["annotations"][1]["answers"].pop()

    with pytest.raises(ConversionError, match=r"train2014_annotations\.json: entry 1 \(question 2\): 9 answers"):
        convert_vqa(tmp_path, change=nine)


def test_vqa_empty_question_is_dropped_and_counted(tmp_path: Path) -> None:
    def empty(files: dict[str, Any]) -> None:
        files["v2_OpenEnded_mscoco_train2014_questions.json"]["questions"][0]["question"] = "  "

    assert convert_vqa(tmp_path, change=empty) == {"train": 2, "val": 1}
    assert _report(tmp_path / "data", "vqav2")["dropped"] == {
        "empty question": {"count": 1, "examples": ["train question 1"]}}


@pytest.mark.parametrize("image", ["corrupt", "bomb"])
def test_vqa_images_are_decoded_at_conversion(tmp_path: Path, image: str) -> None:
    bad = {"corrupt": JPEG[: len(JPEG) // 2], "bomb": bomb_png()}[image]  # a truncated JPEG; a decompression bomb
    images = {"COCO_train2014_000000000002.jpg": bad}
    with pytest.raises(ConversionError, match=r"COCO_train2014_000000000002\.jpg is bad"):
        convert_vqa(tmp_path, images=images)
    assert not (tmp_path / "data" / "coco-trainval2014.lmdb").exists()
    assert not (tmp_path / "data" / "coco-trainval2014.lmdb.partial").exists()
    # skip: the image stays out of the store, its question (qid 2 of train) out of the records; both counted
    assert convert_vqa(tmp_path / "skip", images=images, on_bad_image="skip") == {"train": 2, "val": 1}
    out = tmp_path / "skip" / "data"
    assert "COCO_train2014_000000000002" not in ImageStore(out / "coco-trainval2014.lmdb")
    dropped = _report(out, "vqav2")["dropped"]
    assert [d["count"] for d in dropped.values()] == [1, 1]
    assert dropped[convert_vqav2.BAD_IMAGE]["examples"] == ["train question 2 (COCO_train2014_000000000002)"]


# ------------------------------------------------------------------------------------ converted records


def _vqa_line(**fields: Any) -> dict[str, Any]:
    return {"qid": 7, "question": "what?", "img_id": "a", "label": {"yes": 1.0}, "answer_type": "yes/no",
            "answers": ["yes"] * 10, **fields}


@pytest.mark.parametrize("score", ["NaN", "Infinity", "-Infinity", "1e999", "1.5", "-0.3"])
def test_records_refuse_a_label_score_that_is_not_a_soft_score(tmp_path: Path, score: str) -> None:
    path = tmp_path / "vqav2_val.jsonl"
    good = json.dumps(_vqa_line())
    path.write_text(good + "\n" + good.replace('"yes": 1.0', f'"yes": {score}') + "\n")
    with pytest.raises(RecordError, match=r"vqav2_val\.jsonl:2: .*(NaN or Infinity|outside \[0, 1\])"):
        read_jsonl(path, VqaRecord.from_json)


def test_records_refuse_empty_texts_and_other_than_ten_answers(tmp_path: Path) -> None:
    from recipes.data.records import Nlvr2Record, SnliVeRecord

    path = tmp_path / "a.jsonl"
    cases = [(VqaRecord, _vqa_line(question=" "), "field 'question' is empty"),
             (VqaRecord, _vqa_line(answers=["yes"] * 3), "field 'answers' should hold the 10 human answers, got 3"),
             (SnliVeRecord, {"pairID": "p", "Flickr30K_ID": "1", "sentence2": "", "gold_label": "neutral"},
              "field 'sentence2' is empty"),
             (Nlvr2Record, {"identifier": "dev-1-2-0", "sentence": "\t", "label": "True"}, "field 'sentence' is empty")]
    for kind, line, message in cases:
        write_jsonl(path, [line])
        with pytest.raises(RecordError, match=rf"a\.jsonl:1: {message}"):
            read_jsonl(path, kind.from_json)


def test_records_refuse_invalid_utf8_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "vqav2_train.jsonl"
    path.write_bytes(json.dumps(_vqa_line()).encode() + b"\n" + json.dumps(_vqa_line(question="caf\u00e9?"),
                                                                          ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(RecordError, match=r"vqav2_train\.jsonl:2: not UTF-8"):
        read_jsonl(path, VqaRecord.from_json)


def test_records_converted_before_raw_answers_were_kept_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "vqav2_val.jsonl"
    old = _vqa_line()
    del old["answers"]
    write_jsonl(path, [old])
    with pytest.raises(RecordError, match=r"vqav2_val\.jsonl:1: no field 'answers'.*convert the data folder again"):
        read_jsonl(path, VqaRecord.from_json)
    # an old unlabelled (test) line is what a new one is, and still loads
    write_jsonl(path, [{"qid": 1, "question": "what?", "img_id": "a", "label": {}, "answer_type": None}])
    assert not read_jsonl(path, VqaRecord.from_json)[0].labelled


# ------------------------------------------------------------------------------------------ SNLI-VE


def write_snli_raw(root: Path, lines: list[bytes | dict[str, Any]]) -> tuple[Path, Path]:
    raw, images = root / "snli-ve", root / "flickr30k-images"
    raw.mkdir(parents=True)
    images.mkdir()
    (images / "1000.jpg").write_bytes(JPEG)
    good = {"Flickr30K_ID": "1000", "sentence1": "a red square.", "sentence2": "it is red.", "gold_label": "entailment",
            "pairID": "1000.jpg#0r1e", "captionID": "1000.jpg#0", "annotator_labels": ["entailment"]}
    body = [json.dumps(good).encode()] + [x if isinstance(x, bytes) else json.dumps({**good, **x}).encode() for x in lines]
    (raw / "snli_ve_train.jsonl").write_bytes(b"\n".join(body) + b"\n")
    return raw, images


@pytest.mark.parametrize("gold", ["entailed", "", None])
def test_snli_gold_label_outside_the_three_is_refused_not_counted_as_no_gold(tmp_path: Path, gold: str | None) -> None:
    raw, images = write_snli_raw(tmp_path, [{"gold_label": "-"}, {"gold_label": gold}])
    with pytest.raises(RecordError, match=r"snli_ve_train\.jsonl:3: field 'gold_label'"):
        convert_snli_ve.convert(raw, images, tmp_path / "data", splits=["train"])


def test_snli_missing_gold_label_field_is_refused(tmp_path: Path) -> None:
    line = {"Flickr30K_ID": "1000", "sentence2": "it is red.", "pairID": "x"}
    raw, images = write_snli_raw(tmp_path, [json.dumps(line).encode()])
    with pytest.raises(RecordError, match=r"snli_ve_train\.jsonl:2: missing field 'gold_label'"):
        convert_snli_ve.convert(raw, images, tmp_path / "data", splits=["train"])


@pytest.mark.parametrize("line", [b'{"Flickr30K_ID": "1000", "sentence2": "it is', b'{"sentence2": "caf\xe9"}'],
                         ids=["truncated", "latin-1"])
def test_snli_truncated_or_non_utf8_line_names_file_and_line(tmp_path: Path, line: bytes) -> None:
    raw, images = write_snli_raw(tmp_path, [{"pairID": "2"}, line])
    with pytest.raises(RecordError, match=r"snli_ve_train\.jsonl:3: "):
        convert_snli_ve.convert(raw, images, tmp_path / "data", splits=["train"])


def test_snli_dashes_and_empty_hypotheses_are_dropped_and_counted(tmp_path: Path) -> None:
    raw, images = write_snli_raw(tmp_path, [{"gold_label": "-"}, {"sentence2": " "}, {"pairID": "2"}])
    assert convert_snli_ve.convert(raw, images, tmp_path / "data", splits=["train"]) == {"train": 2}
    dropped = _report(tmp_path / "data", "snli_ve")["dropped"]
    assert dropped == {convert_snli_ve.NO_GOLD: {"count": 1, "examples": ["snli_ve_train.jsonl:2"]},
                       convert_snli_ve.EMPTY: {"count": 1, "examples": ["snli_ve_train.jsonl:3"]}}


def test_snli_bad_image_is_an_error_or_skipped_with_its_pairs(tmp_path: Path) -> None:
    raw, images = write_snli_raw(tmp_path, [{"Flickr30K_ID": "1001", "pairID": "b"}])
    (images / "1001.jpg").write_bytes(bomb_png())
    with pytest.raises(ConversionError, match=r"1001\.jpg is bad: DecompressionBombError"):
        convert_snli_ve.convert(raw, images, tmp_path / "data", splits=["train"])
    assert convert_snli_ve.convert(raw, images, tmp_path / "skip", splits=["train"], on_bad_image="skip") == {"train": 1}
    assert sorted(ImageStore(tmp_path / "skip" / "flickr30k_images.lmdb").keys()) == ["1000"]
    dropped = _report(tmp_path / "skip", "snli_ve")["dropped"]
    assert dropped[convert_snli_ve.BAD_IMAGE] == {"count": 1, "examples": ["train pair b (image 1001)"]}


# -------------------------------------------------------------------------------------- NLVR2, retrieval


def test_nlvr2_empty_sentence_is_dropped_and_counted(tmp_path: Path) -> None:
    raw = tmp_path / "nlvr2"
    raw.mkdir()
    lines = [{"identifier": "dev-1-0-0", "sentence": "two dogs.", "label": "True", "left_url": "u", "synset": "dog"},
             {"identifier": "dev-1-0-1", "sentence": " ", "label": "False", "left_url": "u", "synset": "dog"}]
    (raw / "dev.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert convert_nlvr2.convert(raw, None, tmp_path / "data", splits=["dev"]) == {"dev": 1}
    assert _report(tmp_path / "data", "nlvr2")["dropped"] == {
        convert_nlvr2.EMPTY: {"count": 1, "examples": ["dev.json:2"]}}


def _karpathy(root: Path, sentences: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "images" / "10.jpg").write_bytes(JPEG)
    (root / "images" / "11.jpg").write_bytes(JPEG)
    entries = [{"filename": f"{i}.jpg", "imgid": i, "split": "test", "sentid": [],
                "sentences": [{"raw": s, "tokens": s.split(), "imgid": i} for s in (sentences if i == 10 else ["a cat."])]}
               for i in (10, 11)]
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path


def test_retrieval_empty_captions_are_dropped_and_counted(tmp_path: Path) -> None:
    path = _karpathy(tmp_path, ["a dog.", "  ", "a brown dog."])
    assert convert_retrieval.convert(path, tmp_path / "images", tmp_path / "data")["test"] == 2
    lines = [json.loads(x) for x in (tmp_path / "data" / "flickr30k_test.jsonl").read_text().splitlines()]
    assert lines[0]["captions"] == ["a dog.", "a brown dog."]
    assert _report(tmp_path / "data", "flickr30k")["dropped"] == {
        convert_retrieval.EMPTY_CAPTION: {"count": 1, "examples": ["image 0 (10.jpg) sentence 1"]}}


def test_retrieval_truncated_karpathy_file_names_file_and_line(tmp_path: Path) -> None:
    path = _karpathy(tmp_path, ["a dog."])
    path.write_text(path.read_text()[:-40])
    with pytest.raises(ConversionError, match=r"dataset_flickr30k\.json:1:\d+: not valid JSON"):
        convert_retrieval.convert(path, tmp_path / "images", tmp_path / "data")


# ------------------------------------------------------------------------------------ stores, datasets


def test_an_lmdb_in_lmdbs_folder_layout_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "coco-trainval2014.lmdb"
    env = lmdb.open(str(folder), map_size=1 << 24)  # lmdb's default layout: a folder holding data.mdb
    with env.begin(write=True) as txn:
        txn.put(b"COCO_val2014_000000000003", JPEG)
    env.close()
    write_jsonl(tmp_path / "vqav2_val.jsonl", [_vqa_line()])
    check_split_files(tmp_path, {"val": ("vqav2_val.jsonl", "coco-trainval2014.lmdb")}, ["val"], "convert")
    store = ImageStore(folder)
    assert list(store.keys()) == ["COCO_val2014_000000000003"] and store["COCO_val2014_000000000003"] == JPEG
    (tmp_path / "empty.lmdb").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty\.lmdb is a folder without data\.mdb"):
        ImageStore(tmp_path / "empty.lmdb")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, for the 'warning' level
@pytest.mark.parametrize("level", ["error", "warning"])
def test_a_decompression_bomb_is_skipped_and_counted_never_fatal(tmp_path: Path, tokenizer_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture, level: str) -> None:
    if level == "warning":  # between PIL's limit and twice it PIL only warns: 40 x 30 = 1200 pixels over 1000
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        bomb = image_bytes((1, 2, 3), "PNG", (40, 30))
    else:
        bomb = bomb_png()
    write_image_store(tmp_path / "s.lmdb", [("ok", image_bytes((9, 9, 9), "PNG", (20, 20))), ("bomb", bomb)])
    records = [VqaRecord(0, "what?", "ok"), VqaRecord(1, "what?", "bomb")]

    def dataset(on_bad_image: str) -> ImageTextDataset[VqaRecord]:
        return ImageTextDataset(records, ImageStore(tmp_path / "s.lmdb"), image_key=lambda r: r.img_id,
                                text=lambda r: r.question, target=lambda r: {"target": torch.zeros(1)},
                                transform=build_image_transform(FAMILIES["vilt"].image, 16, train=False),
                                tokenizer=BertTokenizerFast.from_pretrained(str(tokenizer_dir)), max_length=8,
                                image_size=16, on_bad_image=on_bad_image)  # type: ignore[arg-type]

    skip = dataset("skip")
    assert bool(skip[0]["valid"]) and not bool(skip[1]["valid"])  # left out of loss and metrics, counted there
    assert "'bomb'" in caplog.text and "DecompressionBomb" in caplog.text
    with pytest.raises(ValueError, match=r"'bomb' in .*s\.lmdb does not decode"):
        dataset("error")[1]


def test_write_image_folder_decodes_every_image_first(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(JPEG)
    (folder / "cut.jpg").write_bytes(JPEG[: len(JPEG) // 2])
    with pytest.raises(ValueError, match=r"cut\.jpg does not decode"):
        write_image_folder(tmp_path / "s.lmdb", folder)
    assert not (tmp_path / "s.lmdb").exists() and not (tmp_path / "s.lmdb.partial").exists()
