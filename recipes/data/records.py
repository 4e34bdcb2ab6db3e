"""Typed annotation records read from JSON Lines; a bad line names its file and line number.

One record type per task. ``read_jsonl(path, VqaRecord.from_json)`` is how a task reads its split.
A line is refused (``RecordError``, ``file:line: ...``) when it is not UTF-8, not one JSON object
(a truncated line), holds NaN or Infinity, lacks a field or has one of the wrong type, or has an
empty text (question, hypothesis, statement, caption) or a score outside [0, 1]. ``iter_jsonl``
is the same strict reader for the converters' raw files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["RecordError", "require_field", "require_text", "VqaRecord", "VQA_HUMAN_ANSWERS", "SnliVeRecord",
           "SNLI_VE_LABELS", "Nlvr2Record", "NLVR2_LABELS",
           "RETRIEVAL_DATASETS", "RETRIEVAL_SPLITS", "RETRIEVAL_STORES", "retrieval_annotation_file",
           "RetrievalRecord", "iter_jsonl", "read_jsonl", "write_jsonl", "loads_strict"]

R = TypeVar("R")


class RecordError(ValueError):
    """A malformed annotation line: the message starts with ``file:line``."""


def require_field(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """``obj[name]``, which must be present and of ``kind`` (a bool is no int here); else a ``ValueError`` saying which."""
    if name not in obj:
        raise ValueError(f"missing field {name!r} (fields present: {sorted(obj)})")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):  # bool is an int to isinstance; no field is one
        raise ValueError(f"field {name!r} should be {getattr(kind, '__name__', kind)}, got {type(value).__name__} {value!r}")
    return value


def require_text(obj: Mapping[str, Any], name: str) -> str:
    """``obj[name]``: a string with more than white space in it."""
    value = require_field(obj, name, str)
    if not value.strip():
        raise ValueError(f"field {name!r} is empty")
    return value


VQA_HUMAN_ANSWERS = 10  # VQAv2 asks ten people per question; soft scores and the official accuracy assume ten


@dataclass(frozen=True)
class VqaRecord:
    """One VQAv2 question: ``{qid, question, img_id, label: {answer: score}, answer_type, answers}``.

    ``label`` holds the training target, the soft score of every vocabulary answer among the human
    answers (empty for test, or when none of them is in the vocabulary); ``answers`` the ten raw
    human answers in the annotation's order, which the official accuracy reads (empty for test);
    ``answer_type`` is "yes/no", "number" or "other" (None for test).

    Records converted before the raw answers were kept (a label or answer type, no ``answers``) are
    refused: their labels counted normalised answers and the official accuracy cannot be computed
    from them; convert the data folder again.
    """

    qid: int
    question: str
    img_id: str
    label: dict[str, float] = field(default_factory=dict)
    answer_type: str | None = None
    answers: tuple[str, ...] = ()

    @property
    def labelled(self) -> bool:
        """Whether the question has its human answers (train and val do; test does not)."""
        return bool(self.answers)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "VqaRecord":
        label = obj.get("label", {})
        if not isinstance(label, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                  and not isinstance(v, bool) for k, v in label.items()):
            raise ValueError(f"field 'label' should map answer strings to scores, got {label!r}")
        bad = {k: v for k, v in label.items() if not (math.isfinite(v) and 0.0 <= v <= 1.0)}
        if bad:
            raise ValueError(f"field 'label' holds scores outside [0, 1]: {bad}")
        answer_type = obj.get("answer_type")
        if answer_type is not None and not isinstance(answer_type, str):
            raise ValueError(f"field 'answer_type' should be a string, got {answer_type!r}")
        if "answers" not in obj and (label or answer_type is not None):
            raise ValueError("no field 'answers' (the raw human answers): written by an older "
                             "recipes.prepare.convert_vqav2, whose labels counted normalised answers; "
                             "convert the data folder again")
        answers = obj.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"field 'answers' should be a list of strings, got {answers!r}")
        if answers and len(answers) != VQA_HUMAN_ANSWERS:
            raise ValueError(f"field 'answers' should hold the {VQA_HUMAN_ANSWERS} human answers, got {len(answers)}")
        return cls(qid=require_field(obj, "qid", int), question=require_text(obj, "question"),
                   img_id=require_field(obj, "img_id", str), label={k: float(v) for k, v in label.items()},
                   answer_type=answer_type, answers=tuple(answers))

    def to_json(self) -> dict[str, Any]:
        return {"qid": self.qid, "question": self.question, "img_id": self.img_id, "label": self.label,
                "answer_type": self.answer_type, "answers": list(self.answers)}


# SNLI-VE's classes in logit order (the research code's and METER's): contradiction 0, neutral 1, entailment 2
SNLI_VE_LABELS = ("contradiction", "neutral", "entailment")


@dataclass(frozen=True)
class SnliVeRecord:
    """One SNLI-VE pair: ``{pairID, Flickr30K_ID, sentence2, gold_label}`` (the public files' field names).

    The premise is the Flickr30k image ``Flickr30K_ID`` (the image's file stem); ``sentence2`` is the
    hypothesis, the only text the model reads; ``gold_label`` one of ``SNLI_VE_LABELS``.
    """

    pair_id: str
    image_id: str
    hypothesis: str
    gold_label: str

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "SnliVeRecord":
        gold = require_field(obj, "gold_label", str)
        if gold not in SNLI_VE_LABELS:
            raise ValueError(f"field 'gold_label' should be one of {SNLI_VE_LABELS}, got {gold!r}")
        image = require_field(obj, "Flickr30K_ID", (str, int))  # some copies store the id as a number
        return cls(pair_id=str(require_field(obj, "pairID", (str, int))), image_id=str(image),
                   hypothesis=require_text(obj, "sentence2"), gold_label=gold)

    @property
    def label(self) -> int:
        return SNLI_VE_LABELS.index(self.gold_label)

    def to_json(self) -> dict[str, Any]:
        return {"pairID": self.pair_id, "Flickr30K_ID": self.image_id, "sentence2": self.hypothesis,
                "gold_label": self.gold_label}


# NLVR2's classes in logit order (ViLT's and METER's heads: index 1 = True)
NLVR2_LABELS = ("False", "True")


@dataclass(frozen=True)
class Nlvr2Record:
    """One NLVR2 statement: ``{identifier, sentence, label}`` (the public files' field names).

    ``identifier`` is ``<split>-<set>-<pair>-<sentence>``; the pair's two images are the files
    ``<split>-<set>-<pair>-img0`` and ``-img1`` (``images``, in that order: left, right).
    ``label`` is "True" or "False", as the public files write it.
    """

    identifier: str
    sentence: str
    label: str

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Nlvr2Record":
        identifier = require_field(obj, "identifier", str)
        if len(identifier.split("-")) != 4:
            raise ValueError(f"field 'identifier' should read <split>-<set>-<pair>-<sentence>, got {identifier!r}")
        label = require_field(obj, "label", str)
        if label not in NLVR2_LABELS:
            raise ValueError(f"field 'label' should be one of {NLVR2_LABELS}, got {label!r}")
        return cls(identifier=identifier, sentence=require_text(obj, "sentence"), label=label)

    @property
    def images(self) -> tuple[str, str]:
        """The stems of the pair's two images: ``dev-850-0-0`` -> ``(dev-850-0-img0, dev-850-0-img1)``."""
        pair = self.identifier.rsplit("-", 1)[0]
        return f"{pair}-img0", f"{pair}-img1"

    def to_json(self) -> dict[str, Any]:
        return {"identifier": self.identifier, "sentence": self.sentence, "label": self.label}


# a retrieval data folder: one annotation file per dataset and split, the image store of each collection
RETRIEVAL_DATASETS = ("flickr30k", "coco")
RETRIEVAL_SPLITS = ("train", "val", "test")
RETRIEVAL_STORES = {"flickr30k": "flickr30k_images.lmdb", "coco": "coco-trainval2014.lmdb"}


def retrieval_annotation_file(dataset: str, split: str) -> str:
    """The jsonl of a retrieval dataset's split inside a data folder: ``coco_test.jsonl``."""
    return f"{dataset}_{split}.jsonl"


@dataclass(frozen=True)
class RetrievalRecord:
    """One image of a Karpathy retrieval split: ``{item_id, captions: [...], img_id}``.

    ``item_id`` is the image's Karpathy ``imgid``; ``img_id`` its file stem, the key in the image
    store; ``captions`` its reference sentences (five in Flickr30k and COCO, at least one).
    """

    item_id: int
    captions: tuple[str, ...]
    img_id: str

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "RetrievalRecord":
        captions = require_field(obj, "captions", list)
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"field 'captions' should be a non-empty list of non-empty strings, got {captions!r}")
        return cls(item_id=require_field(obj, "item_id", int), captions=tuple(captions), img_id=require_field(obj, "img_id", str))

    def to_json(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "captions": list(self.captions), "img_id": self.img_id}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number (JSON has no NaN or Infinity)")


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity (Python's json takes them by default)."""
    return json.loads(text, parse_constant=_refuse_constant)


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of ``path``.

    A line that is not UTF-8, not JSON (a truncated line), holds NaN or Infinity, or is not an
    object is a ``RecordError`` naming ``path:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                obj = loads_strict(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except UnicodeDecodeError as err:
                raise RecordError(f"{path}:{number}: not UTF-8 (byte {err.start} of the line: "
                                  f"{raw[err.start:err.start + 4]!r}); re-download or re-encode the file") from err
            except ValueError as err:
                raise RecordError(f"{path}:{number}: {err}") from err
            yield number, obj


def read_jsonl(path: str | os.PathLike[str], parse: Callable[[Mapping[str, Any]], R]) -> list[R]:
    """Every non-blank line of ``path`` parsed by ``parse``; any error is a ``RecordError`` naming ``path:line``."""
    records = []
    for number, obj in iter_jsonl(path):
        try:
            records.append(parse(obj))
        except (ValueError, TypeError) as err:
            raise RecordError(f"{Path(path)}:{number}: {err}") from err
    return records


def write_jsonl(path: str | os.PathLike[str], rows: list[Mapping[str, Any]]) -> None:
    """One JSON object per line, UTF-8."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
