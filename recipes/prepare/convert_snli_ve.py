"""Convert the public SNLI-VE files (jsonl + the Flickr30k image folder) to our layout.

``python -m recipes.prepare.convert_snli_ve --raw RAW --images FLICKR30K_IMAGES --out DATA`` reads
``snli_ve_{train,dev,test}.jsonl`` from ``RAW`` (github.com/necla-ml/SNLI-VE: one SNLI pair per line,
``Flickr30K_ID`` naming the premise image) and the Flickr30k JPEGs (``<Flickr30K_ID>.jpg``), and
writes ``snli_ve_{train,dev,test}.jsonl`` with the four fields the task reads (``pairID``,
``Flickr30K_ID``, ``sentence2``, ``gold_label``) and ``flickr30k_images.lmdb`` (every image of the
folder, keyed by file stem: the Flickr30k retrieval recipe reads the same store, so an existing
store that holds every image the pairs name is kept) and ``snli_ve_conversion.json`` (what was
dropped, by reason).

Checked at the door (``recipes.prepare.checks``): a line that is not UTF-8 or not JSON (a
truncated line), a missing or mistyped field, or a gold label that is none of the three nor
SNLI's "-" is refused, naming file and line. Dropped and counted: pairs whose gold label is "-"
(no annotator majority), pairs with an empty hypothesis, and, with ``--on-bad-image skip``, pairs
whose image is missing or does not decode (every image is decoded once here; by default a bad
one is an error).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from recipes.data.records import RecordError, SnliVeRecord, iter_jsonl, write_jsonl
from recipes.data.store import IMAGE_SUFFIXES, ImageStore, write_image_store
from recipes.logs import configure_logging
from recipes.prepare.checks import OnBadImage, Tally, checked_images, write_report

__all__ = ["SPLITS", "STORE", "convert", "main"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
STORE = "flickr30k_images.lmdb"


NO_GOLD = "no gold label (SNLI's '-': no annotator majority)"
EMPTY = "empty hypothesis"
BAD_IMAGE = "pair on an image missing or not decodable"


def _read(path: Path, dropped: Tally) -> list[SnliVeRecord]:
    """The records of one public file; "-" pairs and empty hypotheses go to ``dropped``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (download SNLI-VE from github.com/necla-ml/SNLI-VE, "
                                f"or pass its folder as --raw)")
    records = []
    for number, obj in iter_jsonl(path):
        where = f"{path.name}:{number}"
        if obj.get("gold_label") == "-":
            dropped.add(NO_GOLD, where)
            continue
        if isinstance(obj.get("sentence2"), str) and not obj["sentence2"].strip():
            dropped.add(EMPTY, where)
            continue
        try:
            records.append(SnliVeRecord.from_json(obj))
        except ValueError as err:
            raise RecordError(f"{path}:{number}: {err}") from err
    return records


def convert(raw: Path, images: Path | None, out: Path, *, splits: Sequence[str] = SPLITS,
            overwrite: bool = False, on_bad_image: OnBadImage = "error") -> dict[str, int]:
    """Write the jsonl files, (``images`` given) the image store and the tally; returns pairs per split.

    Every file is read and checked before anything is written; the store is written to a
    temporary file first.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"--on-bad-image must be 'error' or 'skip', got {on_bad_image!r}")
    dropped = Tally()
    records = {split: _read(raw / f"snli_ve_{split}.jsonl", dropped) for split in splits}
    needed = {r.image_id for rs in records.values() for r in rs}
    bad: set[str] = set()
    store = out / STORE
    if store.exists() and not overwrite:
        absent = sorted(needed - set(ImageStore(store).keys()))
        if absent and on_bad_image == "error":
            raise FileExistsError(f"{store} exists but lacks {len(absent)} images the pairs name, e.g. {absent[:3]}; "
                                  f"pass --overwrite with --images to rewrite it (or --on-bad-image skip to drop "
                                  f"their pairs)")
        bad.update(absent)
        logger.info("%s exists and holds every image the pairs name but %d: kept", store, len(absent))
    elif images is not None:
        if not images.is_dir():
            raise FileNotFoundError(f"image folder {images} does not exist")
        files = {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        absent = sorted(needed - set(files))
        if absent and on_bad_image == "error":
            raise FileNotFoundError(f"{len(absent)} images named by the pairs are missing from {images}, "
                                    f"e.g. {absent[:3]}")
        bad.update(absent)
        out.mkdir(parents=True, exist_ok=True)
        write_image_store(store, checked_images(files.items(), on_bad_image=on_bad_image, dropped=dropped, bad=bad),
                          overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for split, rs in records.items():
        for r in rs:
            if r.image_id in bad:
                dropped.add(BAD_IMAGE, f"{split} pair {r.pair_id} (image {r.image_id})")
        kept = [r for r in rs if r.image_id not in bad]
        write_jsonl(out / f"snli_ve_{split}.jsonl", [r.to_json() for r in kept])
        counts[split] = len(kept)
        logger.info("%s: %d pairs on %d images", split, len(kept), len({r.image_id for r in kept}))
    dropped.log(logger, "dropped")
    write_report(out / "snli_ve_conversion.json", counts, dropped)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.prepare.convert_snli_ve", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, required=True, help="folder with snli_ve_{train,dev,test}.jsonl")
    p.add_argument("--images", type=Path, help="the Flickr30k image folder (<id>.jpg); omit to write annotations only")
    p.add_argument("--out", type=Path, required=True, help="output data folder")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing image store")
    p.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="an image that is missing or does not decode: stop, or leave it and its pairs out [error]")
    args = p.parse_args(argv)
    configure_logging()
    convert(args.raw, args.images, args.out, splits=args.splits, overwrite=args.overwrite,
            on_bad_image=args.on_bad_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
