"""Convert the official VQAv2 files (questions / annotations json + COCO image folders) to our layout.

``python -m recipes.prepare.convert_vqav2 --raw RAW --out DATA`` reads, from ``RAW``:
``v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json``,
``v2_mscoco_{train2014,val2014}_annotations.json`` and the image folders ``train2014/``, ``val2014/``,
``test2015/`` (any may be elsewhere: ``--images-trainval``, ``--images-test``), and writes to ``DATA``:
``vqav2_{train,val,test}.jsonl`` (``{qid, question, img_id, label, answer_type}``), ``answers.json``
(the vocabulary: normalised consensus answers of >= 9 questions over train + val, sorted), and the
image stores ``coco-trainval2014.lmdb`` and ``coco-test2015.lmdb`` (only the images questions name).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.data.records import VqaRecord, write_jsonl
from recipes.data.store import write_image_store
from recipes.logs import configure_logging
from recipes.tasks.vqa_answers import answer_vocabulary, soft_scores

__all__ = ["SPLITS", "convert", "main"]

logger = logging.getLogger(__name__)

# our split -> (COCO split, has annotations)
SPLITS = {"train": ("train2014", True), "val": ("val2014", True), "test": ("test2015", False)}
STORES = {"train2014": "coco-trainval2014.lmdb", "val2014": "coco-trainval2014.lmdb", "test2015": "coco-test2015.lmdb"}


def _load(path: Path, key: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (download it from visualqa.org, or pass its folder as --raw)")
    data = json.loads(path.read_text())
    if key not in data:
        raise ValueError(f"{path} has no {key!r} list; is it the official VQAv2 {key} file?")
    return data[key]


def convert(raw: Path, out: Path, image_dirs: dict[str, Path], *, splits: Sequence[str] = ("train", "val", "test"),
            images: bool = True, overwrite: bool = False) -> dict[str, int]:
    """Write the jsonl files, ``answers.json`` and (``images``) the LMDB stores; returns records per split."""
    out.mkdir(parents=True, exist_ok=True)
    questions = {s: _load(raw / f"v2_OpenEnded_mscoco_{SPLITS[s][0]}_questions.json", "questions") for s in splits}
    annotations = {s: {a["question_id"]: a for a in _load(raw / f"v2_mscoco_{SPLITS[s][0]}_annotations.json", "annotations")}
                   for s in splits if SPLITS[s][1]}
    if not annotations:
        raise ValueError("the vocabulary needs the train and/or val annotations; add 'train' or 'val' to --splits")
    vocabulary = answer_vocabulary((qid, a["multiple_choice_answer"]) for ann in annotations.values() for qid, a in ann.items())
    (out / "answers.json").write_text(json.dumps(vocabulary, indent=0))
    logger.info("vocabulary: %d answers", len(vocabulary))
    vocab = set(vocabulary)
    counts: dict[str, int] = {}
    keys: dict[str, set[str]] = {}
    for split in splits:
        coco = SPLITS[split][0]
        rows = []
        for q in questions[split]:
            img_id = f"COCO_{coco}_{q['image_id']:012d}"
            keys.setdefault(coco, set()).add(img_id)
            ann = annotations.get(split, {}).get(q["question_id"])
            if SPLITS[split][1] and ann is None:
                raise ValueError(f"question {q['question_id']} of {split} has no annotation")
            label = {} if ann is None else soft_scores([a["answer"] for a in ann["answers"]], vocab)
            rows.append(VqaRecord(qid=q["question_id"], question=q["question"], img_id=img_id, label=label,
                                  answer_type=None if ann is None else ann["answer_type"]).to_json())
        write_jsonl(out / f"vqav2_{split}.jsonl", rows)
        counts[split] = len(rows)
        logger.info("%s: %d questions on %d images", split, len(rows), len(keys[coco]))
    if images:
        for store in sorted(set(STORES[c] for c in keys)):
            wanted = {c: keys[c] for c in keys if STORES[c] == store}
            items = [(k, image_dirs[c] / f"{k}.jpg") for c, ks in wanted.items() for k in sorted(ks)]
            missing = [str(p) for _, p in items if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} images named by the questions are missing, e.g. {missing[:3]}")
            _write(out / store, items, overwrite)
    return counts


def _write(path: Path, items: list[tuple[str, Path]], overwrite: bool) -> None:
    write_image_store(path, ((k, p.read_bytes()) for k, p in items), overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.prepare.convert_vqav2", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, required=True, help="folder with the official questions/annotations json")
    p.add_argument("--out", type=Path, required=True, help="output data folder")
    p.add_argument("--images-trainval", type=Path, help="folder holding train2014/ and val2014/ [RAW]")
    p.add_argument("--images-test", type=Path, help="folder holding test2015/ [RAW]")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=list(SPLITS))
    p.add_argument("--no-images", action="store_true", help="annotations only; leave the LMDB stores alone")
    p.add_argument("--overwrite", action="store_true", help="replace existing LMDB stores")
    args = p.parse_args(argv)
    configure_logging()
    trainval, test = args.images_trainval or args.raw, args.images_test or args.raw
    dirs = {"train2014": trainval / "train2014", "val2014": trainval / "val2014", "test2015": test / "test2015"}
    convert(args.raw, args.out, dirs, splits=args.splits, images=not args.no_images, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
