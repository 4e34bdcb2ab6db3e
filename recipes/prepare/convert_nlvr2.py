"""Convert the public NLVR2 files (JSON Lines + the image folders) to our layout.

``python -m recipes.prepare.convert_nlvr2 --raw RAW --images IMAGES --out DATA`` reads ``{train,dev,test1}.json``
from ``RAW`` (github.com/lil-lab/nlvr, ``nlvr2/data``: JSON Lines despite the suffix, one statement
per line, ``{identifier, sentence, label: "True"/"False", ...}``) and the images of each split from
``IMAGES/<split>/``, searched recursively (train's images sit in numbered subfolders), named
``<split>-<set>-<pair>-img0.png`` and ``-img1.png``. It writes ``nlvr2_{train,dev,test1}.jsonl``
with the three fields the task reads and one image store per split, ``nlvr2-{train,dev,test1}.lmdb``,
holding the images its statements name, keyed by file stem. Every named image must exist: a
missing one is an error listing how many and which (the dataset would otherwise drop its
statements at every run).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from recipes.data.records import Nlvr2Record, read_jsonl, write_jsonl
from recipes.data.store import IMAGE_SUFFIXES, write_image_store
from recipes.logs import configure_logging

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


def convert(raw: Path, images: Path | None, out: Path, *, splits: Sequence[str] = SPLITS,
            overwrite: bool = False) -> dict[str, int]:
    """Write the jsonl files and (``images`` given) one image store per split; returns statements per split."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for split in splits:
        path = raw / f"{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (NLVR2's nlvr2/data/{split}.json from "
                                    f"github.com/lil-lab/nlvr; pass its folder as --raw)")
        records = read_jsonl(path, Nlvr2Record.from_json)
        write_jsonl(out / f"nlvr2_{split}.jsonl", [r.to_json() for r in records])
        needed = sorted({stem for r in records for stem in r.images})
        counts[split] = len(records)
        logger.info("%s: %d statements on %d images", split, len(records), len(needed))
        if images is None:
            continue
        files = image_files(images / split)
        missing = [k for k in needed if k not in files]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(needed)} images the {split} statements name are "
                                    f"missing from {images / split}, e.g. {missing[:3]}")
        write_image_store(out / f"nlvr2-{split}.lmdb", ((k, files[k].read_bytes()) for k in needed),
                          overwrite=overwrite)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.prepare.convert_nlvr2", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, required=True, help="folder with {train,dev,test1}.json (nlvr2/data)")
    p.add_argument("--images", type=Path, help="folder holding train/, dev/, test1/; omit to write annotations only")
    p.add_argument("--out", type=Path, required=True, help="output data folder")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--overwrite", action="store_true", help="replace existing image stores")
    args = p.parse_args(argv)
    configure_logging()
    convert(args.raw, args.images, args.out, splits=args.splits, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
