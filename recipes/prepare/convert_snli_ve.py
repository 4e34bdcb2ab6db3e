"""Convert the public SNLI-VE files (jsonl + the Flickr30k image folder) to our layout.

``python -m recipes.prepare.convert_snli_ve --raw RAW --images FLICKR30K_IMAGES --out DATA`` reads
``snli_ve_{train,dev,test}.jsonl`` from ``RAW`` (github.com/necla-ml/SNLI-VE: one SNLI pair per line,
``Flickr30K_ID`` naming the premise image) and the Flickr30k JPEGs (``<Flickr30K_ID>.jpg``), and
writes ``snli_ve_{train,dev,test}.jsonl`` with the four fields the task reads (``pairID``,
``Flickr30K_ID``, ``sentence2``, ``gold_label``) and ``flickr30k_images.lmdb`` (every image of the
folder, keyed by file stem: the Flickr30k retrieval recipe reads the same store, so an existing
store that holds every image the pairs name is kept). Pairs without one of the three gold labels
(SNLI's "-": no annotator majority) are dropped and counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from recipes.data.records import SNLI_VE_LABELS, SnliVeRecord, write_jsonl
from recipes.data.store import ImageStore, write_image_folder
from recipes.logs import configure_logging

__all__ = ["SPLITS", "STORE", "convert", "main"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
STORE = "flickr30k_images.lmdb"


def _read(path: Path) -> tuple[list[SnliVeRecord], int]:
    """The records of one public file and how many lines had no gold label."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (download SNLI-VE from github.com/necla-ml/SNLI-VE, "
                                f"or pass its folder as --raw)")
    records, dropped = [], 0
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if obj.get("gold_label") not in SNLI_VE_LABELS:
                dropped += 1
                continue
            try:
                records.append(SnliVeRecord.from_json(obj))
            except ValueError as err:
                raise ValueError(f"{path}:{number}: {err}") from err
    return records, dropped


def convert(raw: Path, images: Path | None, out: Path, *, splits: Sequence[str] = SPLITS,
            overwrite: bool = False) -> dict[str, int]:
    """Write the jsonl files and (``images`` given) the image store; returns pairs per split."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    needed: set[str] = set()
    for split in splits:
        records, dropped = _read(raw / f"snli_ve_{split}.jsonl")
        write_jsonl(out / f"snli_ve_{split}.jsonl", [r.to_json() for r in records])
        needed.update(r.image_id for r in records)
        counts[split] = len(records)
        logger.info("%s: %d pairs on %d images (%d without a gold label dropped)", split, len(records),
                    len({r.image_id for r in records}), dropped)
    store = out / STORE
    if store.exists() and not overwrite:
        missing = sorted(needed - set(ImageStore(store).keys()))
        if missing:
            raise FileExistsError(f"{store} exists but lacks {len(missing)} images the pairs name, e.g. {missing[:3]}; "
                                  f"pass --overwrite with --images to rewrite it")
        logger.info("%s exists and holds every image the pairs name: kept", store)
    elif images is not None:
        missing = sorted(k for k in needed if not (images / f"{k}.jpg").is_file())
        if missing:
            raise FileNotFoundError(f"{len(missing)} images named by the pairs are missing from {images}, "
                                    f"e.g. {missing[:3]}")
        write_image_folder(store, images, overwrite=overwrite)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.prepare.convert_snli_ve", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, required=True, help="folder with snli_ve_{train,dev,test}.jsonl")
    p.add_argument("--images", type=Path, help="the Flickr30k image folder (<id>.jpg); omit to write annotations only")
    p.add_argument("--out", type=Path, required=True, help="output data folder")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing image store")
    args = p.parse_args(argv)
    configure_logging()
    convert(args.raw, args.images, args.out, splits=args.splits, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
