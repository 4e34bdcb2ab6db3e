"""Convert the public NLVR2 files (JSON Lines + the image folders) to our layout.

``python -m recipes.prepare.convert_nlvr2 --raw RAW --images IMAGES --out DATA`` reads ``{train,dev,test1}.json``
from ``RAW`` (github.com/lil-lab/nlvr, ``nlvr2/data``: JSON Lines despite the suffix, one statement
per line, ``{identifier, sentence, label: "True"/"False", ...}``) and the images of each split from
``IMAGES/<split>/``, searched recursively (train's images sit in numbered subfolders), named
``<split>-<set>-<pair>-img0.png`` and ``-img1.png``. It writes ``nlvr2_{train,dev,test1}.jsonl``
with the three fields the task reads and one image store per split, ``nlvr2-{train,dev,test1}.lmdb``,
holding the images its statements name, keyed by file stem, and ``nlvr2_conversion.json`` (what
was dropped, by reason). Every named image must exist and decode (each is decoded once here): a
missing or bad one is an error listing which (the dataset would otherwise drop its statements at
every run), or with ``--on-bad-image skip`` left out with its statements, counted.

Checked at the door (``recipes.prepare.checks``): a line that is not UTF-8 or not JSON (a
truncated line), a missing or mistyped field, or a label other than "True" / "False" is refused,
naming file and line; a statement with an empty sentence is dropped and counted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from recipes.data.records import Nlvr2Record, RecordError, iter_jsonl, write_jsonl
from recipes.data.store import IMAGE_SUFFIXES, write_image_store
from recipes.logs import configure_logging
from recipes.prepare.checks import OnBadImage, Tally, checked_images, write_report

__all__ = ["SPLITS", "convert", "image_files", "main"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test1")


def image_files(folder: Path) -> dict[str, Path]:
    """Every image under ``folder`` (recursively) by file stem; one stem in two places is an error."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (pass the folder holding "
                                f"{'/, '.join(SPLITS)}/ as --images)")
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in files:
            raise ValueError(f"two images named {path.stem!r}: {files[path.stem]} and {path}")
        files[path.stem] = path
    return files


EMPTY = "empty sentence"
BAD_IMAGE = "statement on an image missing or not decodable"


def _read(path: Path, dropped: Tally) -> list[Nlvr2Record]:
    """The statements of one public file; empty sentences go to ``dropped``."""
    records = []
    for number, obj in iter_jsonl(path):
        if isinstance(obj.get("sentence"), str) and not obj["sentence"].strip():
            dropped.add(EMPTY, f"{path.name}:{number}")
            continue
        try:
            records.append(Nlvr2Record.from_json(obj))
        except ValueError as err:
            raise RecordError(f"{path}:{number}: {err}") from err
    return records


def convert(raw: Path, images: Path | None, out: Path, *, splits: Sequence[str] = SPLITS,
            overwrite: bool = False, on_bad_image: OnBadImage = "error") -> dict[str, int]:
    """Write the jsonl files, (``images`` given) one image store per split and the tally; returns
    statements per split. Every annotation file is read and checked before anything is written."""
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"--on-bad-image must be 'error' or 'skip', got {on_bad_image!r}")
    dropped = Tally()
    records: dict[str, list[Nlvr2Record]] = {}
    for split in splits:
        path = raw / f"{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (NLVR2's nlvr2/data/{split}.json from "
                                    f"github.com/lil-lab/nlvr; pass its folder as --raw)")
        records[split] = _read(path, dropped)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for split, rs in records.items():
        needed = sorted({stem for r in rs for stem in r.images})
        if images is not None:
            files = image_files(images / split)
            missing = [k for k in needed if k not in files]
            if missing and on_bad_image == "error":
                raise FileNotFoundError(f"{len(missing)} of the {len(needed)} images the {split} statements name are "
                                        f"missing from {images / split}, e.g. {missing[:3]}")
            bad = set(missing)
            items = [(k, files[k]) for k in needed if k in files]
            write_image_store(out / f"nlvr2-{split}.lmdb",
                              checked_images(items, on_bad_image=on_bad_image, dropped=dropped, bad=bad),
                              overwrite=overwrite)
            for r in rs:
                if bad.intersection(r.images):
                    dropped.add(BAD_IMAGE, f"{split} statement {r.identifier}")
            rs = [r for r in rs if bad.isdisjoint(r.images)]
        write_jsonl(out / f"nlvr2_{split}.jsonl", [r.to_json() for r in rs])
        counts[split] = len(rs)
        logger.info("%s: %d statements on %d images", split, len(rs), len({stem for r in rs for stem in r.images}))
    dropped.log(logger, "dropped")
    write_report(out / "nlvr2_conversion.json", counts, dropped)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.prepare.convert_nlvr2", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, required=True, help="folder with {train,dev,test1}.json (nlvr2/data)")
    p.add_argument("--images", type=Path, help="folder holding train/, dev/, test1/; omit to write annotations only")
    p.add_argument("--out", type=Path, required=True, help="output data folder")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--overwrite", action="store_true", help="replace existing image stores")
    p.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="an image that is missing or does not decode: stop, or leave it and its statements out [error]")
    args = p.parse_args(argv)
    configure_logging()
    convert(args.raw, args.images, args.out, splits=args.splits, overwrite=args.overwrite,
            on_bad_image=args.on_bad_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
