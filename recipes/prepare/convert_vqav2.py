"""Convert the official VQAv2 files (questions / annotations json + COCO image folders) to our layout.

``python -m recipes.prepare.convert_vqav2 --raw RAW --out DATA`` reads, from ``RAW``:
``v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json``,
``v2_mscoco_{train2014,val2014}_annotations.json`` and the image folders ``train2014/``, ``val2014/``,
``test2015/`` (any may be elsewhere: ``--images-trainval``, ``--images-test``), and writes to ``DATA``:
``vqav2_{train,val,test}.jsonl`` (``{qid, question, img_id, label, answer_type, answers}``),
``answers.json`` (the vocabulary: normalised consensus answers of >= 9 questions over train + val,
sorted), the image stores ``coco-trainval2014.lmdb`` and ``coco-test2015.lmdb`` (only the images
questions name, each decoded once here) and ``vqav2_conversion.json`` (what was dropped or counted).

``answers`` keeps each question's ten raw human answers (the official accuracy reads them);
``label`` is the training target, the soft score of each vocabulary answer among them, counted as
``--targets`` says: ``raw`` (default) counts the raw answer strings equal to a vocabulary answer, as
the PuMer and ViLT research code does; ``normalised`` normalises each answer first.

Checked at the door (``recipes.prepare.checks``): a file that is not UTF-8 or not JSON, an entry
with a missing or mistyped field, or an annotation without ten answers is refused, naming the file
and question; a question with an empty text is dropped and counted; a question none of whose
answers is in the vocabulary is kept (the official metric scores it 0 for every answer) and
counted; an image that is missing or does not decode is an error, or with ``--on-bad-image skip``
left out with its questions, counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.data.records import VQA_HUMAN_ANSWERS, VqaRecord, require_field, write_jsonl
from recipes.data.store import write_image_store
from recipes.logs import configure_logging
from recipes.prepare.checks import OnBadImage, Tally, checked_images, read_json_file, refuse, write_report
from recipes.tasks.vqa_answers import TARGET_READINGS, TargetReading, answer_vocabulary, soft_scores

__all__ = ["SPLITS", "convert", "main"]

logger = logging.getLogger(__name__)

# our split -> (COCO split, has annotations)
SPLITS = {"train": ("train2014", True), "val": ("val2014", True), "test": ("test2015", False)}
STORES = {"train2014": "coco-trainval2014.lmdb", "val2014": "coco-trainval2014.lmdb", "test2015": "coco-test2015.lmdb"}


_HINT = "download it from visualqa.org, or pass its folder as --raw"
EMPTY = "empty question"
NO_VOCABULARY_ANSWER = "no human answer in the vocabulary (kept: scores 0 for every answer)"
BAD_IMAGE = "question on an image missing or not decodable"


def _load(path: Path, key: str) -> list[dict[str, Any]]:
    data = read_json_file(path, _HINT)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path} has no {key!r} list; is it the official VQAv2 {key} file?")
    return data[key]


def _question(path: Path, n: int, q: Any) -> tuple[int, int, str]:
    """``(question_id, image_id, question)`` of entry ``n`` of a questions file, checked."""
    try:
        if not isinstance(q, dict):
            raise ValueError(f"expected an object, got {type(q).__name__}")
        return require_field(q, "question_id", int), require_field(q, "image_id", int), require_field(q, "question", str)
    except ValueError as err:
        qid = q.get("question_id", "?") if isinstance(q, dict) else "?"
        raise refuse(path, f"entry {n} (question {qid})", err) from err


def _annotation(path: Path, n: int, a: Any) -> dict[str, Any]:
    """``{question_id, multiple_choice_answer, answer_type, answers: [10 raw strings]}`` of entry ``n``, checked."""
    try:
        if not isinstance(a, dict):
            raise ValueError(f"expected an object, got {type(a).__name__}")
        qid = require_field(a, "question_id", int)
        raw = []
        for j, x in enumerate(require_field(a, "answers", list)):
            if not isinstance(x, dict):
                raise ValueError(f"answer {j} should be an object {{answer, ...}}, got {x!r}")
            raw.append(require_field(x, "answer", str))
        if len(raw) != VQA_HUMAN_ANSWERS:
            raise ValueError(f"{len(raw)} answers; VQAv2 has {VQA_HUMAN_ANSWERS} per question (the soft scores "
                             f"and the official accuracy assume them)")
        return {"question_id": qid, "multiple_choice_answer": require_field(a, "multiple_choice_answer", str),
                "answer_type": require_field(a, "answer_type", str), "answers": raw}
    except ValueError as err:
        qid = a.get("question_id", "?") if isinstance(a, dict) else "?"
        raise refuse(path, f"entry {n} (question {qid})", err) from err


def convert(raw: Path, out: Path, image_dirs: dict[str, Path], *, splits: Sequence[str] = ("train", "val", "test"),
            images: bool = True, overwrite: bool = False, targets: TargetReading = "raw",
            on_bad_image: OnBadImage = "error") -> dict[str, int]:
    """Write the jsonl files, ``answers.json``, (``images``) the LMDB stores and the tally; returns records per split.

    Everything is read and checked before anything is written but the image stores (each written
    to a temporary file first); a refused input leaves ``out`` as it was.
    """
    if targets not in TARGET_READINGS:
        raise ValueError(f"--targets must be one of {TARGET_READINGS}, got {targets!r}")
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"--on-bad-image must be 'error' or 'skip', got {on_bad_image!r}")
    questions: dict[str, list[tuple[int, int, str]]] = {}
    annotations: dict[str, dict[int, dict[str, Any]]] = {}
    for s in splits:
        coco, annotated = SPLITS[s]
        path = raw / f"v2_OpenEnded_mscoco_{coco}_questions.json"
        questions[s] = [_question(path, n, q) for n, q in enumerate(_load(path, "questions"))]
        if annotated:
            path = raw / f"v2_mscoco_{coco}_annotations.json"
            checked = (_annotation(path, n, a) for n, a in enumerate(_load(path, "annotations")))
            annotations[s] = {a["question_id"]: a for a in checked}
    if not annotations:
        raise ValueError("the vocabulary needs the train and/or val annotations; add 'train' or 'val' to --splits")
    vocabulary = answer_vocabulary((qid, a["multiple_choice_answer"]) for ann in annotations.values() for qid, a in ann.items())
    vocab = set(vocabulary)
    dropped, counted = Tally(), Tally()
    records: dict[str, list[VqaRecord]] = {}
    for split in splits:
        coco, annotated = SPLITS[split]
        records[split] = []
        for qid, image_id, question in questions[split]:
            ann = annotations.get(split, {}).get(qid)
            if annotated and ann is None:
                raise ValueError(f"question {qid} of {split} has no annotation in v2_mscoco_{coco}_annotations.json")
            if not question.strip():
                dropped.add(EMPTY, f"{split} question {qid}")
                continue
            label = {} if ann is None else soft_scores(ann["answers"], vocab, targets)
            if ann is not None and not label:
                counted.add(NO_VOCABULARY_ANSWER, f"{split} question {qid}")
            records[split].append(VqaRecord(
                qid=qid, question=question, img_id=f"COCO_{coco}_{image_id:012d}", label=label,
                answer_type=None if ann is None else ann["answer_type"],
                answers=() if ann is None else tuple(ann["answers"])))
    out.mkdir(parents=True, exist_ok=True)
    if images:
        bad: set[str] = set()
        keys: dict[str, set[str]] = {}  # COCO split -> image keys its kept questions name
        for split in splits:
            keys.setdefault(SPLITS[split][0], set()).update(r.img_id for r in records[split])
        stores = {store: [(k, image_dirs[c] / f"{k}.jpg") for c in sorted(keys) if STORES[c] == store
                          for k in sorted(keys[c])] for store in sorted({STORES[c] for c in keys})}
        missing = [str(p) for items in stores.values() for _, p in items if not p.is_file()]
        if missing and on_bad_image == "error":
            raise FileNotFoundError(f"{len(missing)} images named by the questions are missing, e.g. {missing[:3]} "
                                    f"(--on-bad-image skip leaves their questions out)")
        existing = [str(out / store) for store in stores if (out / store).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{', '.join(existing)} exist; pass --overwrite to replace them")
        for store, items in stores.items():
            write_image_store(out / store, checked_images(items, on_bad_image=on_bad_image, dropped=dropped, bad=bad),
                              overwrite=overwrite)
        for split in splits:
            for r in records[split]:
                if r.img_id in bad:
                    dropped.add(BAD_IMAGE, f"{split} question {r.qid} ({r.img_id})")
            records[split] = [r for r in records[split] if r.img_id not in bad]
    for split in splits:
        write_jsonl(out / f"vqav2_{split}.jsonl", [r.to_json() for r in records[split]])
        logger.info("%s: %d questions on %d images", split, len(records[split]), len({r.img_id for r in records[split]}))
    (out / "answers.json").write_text(json.dumps(vocabulary, indent=0))
    logger.info("vocabulary: %d answers; targets count %s human answers", len(vocabulary), targets)
    counts = {split: len(records[split]) for split in splits}
    dropped.log(logger, "dropped")
    counted.log(logger, "kept")
    write_report(out / "vqav2_conversion.json", counts, dropped, counted, targets=targets)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.prepare.convert_vqav2", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, required=True, help="folder with the official questions/annotations json")
    p.add_argument("--out", type=Path, required=True, help="output data folder")
    p.add_argument("--images-trainval", type=Path, help="folder holding train2014/ and val2014/ [RAW]")
    p.add_argument("--images-test", type=Path, help="folder holding test2015/ [RAW]")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=list(SPLITS))
    p.add_argument("--no-images", action="store_true", help="annotations only; leave the LMDB stores alone")
    p.add_argument("--overwrite", action="store_true", help="replace existing LMDB stores")
    p.add_argument("--targets", choices=TARGET_READINGS, default="raw",
                   help="how soft-score targets count the human answers: raw strings (the research code's) "
                        "or normalised ones [raw]")
    p.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="an image that is missing or does not decode: stop, or leave it and its questions out [error]")
    args = p.parse_args(argv)
    configure_logging()
    trainval, test = args.images_trainval or args.raw, args.images_test or args.raw
    dirs = {"train2014": trainval / "train2014", "val2014": trainval / "val2014", "test2015": test / "test2015"}
    convert(args.raw, args.out, dirs, splits=args.splits, images=not args.no_images, overwrite=args.overwrite,
            targets=args.targets, on_bad_image=args.on_bad_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
