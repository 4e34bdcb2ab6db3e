"""What every converter checks at the door, and the tally of what it leaves out.

Refused, with an error naming the file and line (or the question, pair or image): bytes that are
not UTF-8, a file or line that is not JSON (a truncated download), NaN or Infinity, a missing or
mistyped field, an answer list that is not VQAv2's ten, a gold label that is none of SNLI-VE's
three nor its "-", and (by default) an image that does not decode. Dropped and counted, by
reason: what is well formed but cannot be an example (an empty question, hypothesis, statement or
caption; SNLI's "-" pairs; with ``--on-bad-image skip``, an image that is missing or does not
decode, and the records naming it). Every image a converter stores has been decoded the way
training decodes it (``recipes.data.transforms.decode_image``), so a bad one is found here, not
hours into a run. Each converter writes its tally to ``<name>_conversion.json`` in the data folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from recipes.data.records import loads_strict
from recipes.data.transforms import image_problem

__all__ = ["Tally", "ConversionError", "OnBadImage", "read_json_file", "checked_images", "refuse", "write_report"]

OnBadImage = Literal["error", "skip"]
_EXAMPLES = 5  # places kept per reason, for the log and the report


class ConversionError(ValueError):
    """A raw file the converter refuses: the message names the file and the line, question, pair or image."""


class Tally:
    """Counts by reason, each with the first few places it happened (a question id, ``file:line``, a path)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        places = self.examples.setdefault(reason, [])
        if len(places) < _EXAMPLES:
            places.append(where)

    def __getitem__(self, reason: str) -> int:
        return self.counts.get(reason, 0)

    def log(self, logger: logging.Logger, verb: str) -> None:
        """One warning per reason: ``<verb> <count> <reason>, e.g. <places>``."""
        for reason, count in self.counts.items():
            logger.warning("%s %d: %s (e.g. %s)", verb, count, reason, ", ".join(self.examples[reason]))

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {reason: {"count": count, "examples": self.examples[reason]} for reason, count in self.counts.items()}


def read_json_file(path: Path, hint: str) -> Any:
    """The JSON document in ``path``, read strictly: not UTF-8, not JSON, NaN or Infinity is a
    ``ConversionError`` naming ``path:line:column``. hint: where the file comes from, for a missing one."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist ({hint})")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConversionError(f"{path}:{line}: not UTF-8 (byte {err.start}: {data[err.start:err.start + 4]!r}); "
                              f"download the file again") from err
    try:
        return loads_strict(text)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); a truncated "
                              f"or damaged download? fetch it again") from err
    except ValueError as err:  # NaN / Infinity
        raise ConversionError(f"{path}: {err}") from err


def _load_image(item: tuple[str, Path]) -> tuple[str, Path, bytes | None, str | None]:
    key, path = item
    if not path.is_file():
        return key, path, None, "missing"
    data = path.read_bytes()
    return key, path, data, image_problem(data)


def checked_images(items: Iterable[tuple[str, Path]], *, on_bad_image: OnBadImage, dropped: Tally,
                   bad: set[str], threads: int = min(8, os.cpu_count() or 1)) -> Iterator[tuple[str, bytes]]:
    """``(key, raw bytes)`` of every image of ``items`` that exists and decodes, in order.

    A missing or undecodable image is an error naming its path (``on_bad_image="error"``) or,
    with ``"skip"``, left out: its key joins ``bad`` and ``dropped`` counts it. Images are read
    and decoded ``threads`` at a time (PIL decodes without the GIL), a window of them in memory.
    """
    todo = list(items)
    window = 32 * threads
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(todo), window):
            for key, path, data, problem in pool.map(_load_image, todo[start:start + window]):
                if problem is None and data is not None:
                    yield key, data
                    continue
                if on_bad_image == "error":
                    what = "missing" if problem == "missing" else f"bad: {problem}"
                    raise ConversionError(f"image {path} is {what}; --on-bad-image skip leaves it out, with the "
                                          f"records naming it")
                bad.add(key)
                dropped.add("image missing or not decodable (left out of the store)", f"{path} ({problem})")


def write_report(path: Path, splits: Mapping[str, int], dropped: Tally, counted: Tally | None = None,
                 **settings: Any) -> None:
    """``path``: the records written per split, what was dropped by reason, what was kept but counted."""
    report: dict[str, Any] = {"records": dict(splits), **settings, "dropped": dropped.to_json()}
    if counted is not None:
        report["kept_and_counted"] = counted.to_json()
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def refuse(path: Path, where: str, err: Exception) -> ConversionError:
    """The error for a bad entry of a raw file: ``path: <where>: <what is wrong>``."""
    return ConversionError(f"{path}: {where}: {err}")
