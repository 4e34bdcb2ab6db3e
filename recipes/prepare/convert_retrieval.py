"""Convert Karpathy's retrieval splits (``dataset_flickr30k.json`` / ``dataset_coco.json`` + images) to our layout.

``python -m recipes.prepare.convert_retrieval --karpathy dataset_coco.json --images COCO --out DATA`` reads
Karpathy's file (``{"images": [{"filename", "split", "sentences": [{"raw", "tokens"}], "imgid",
"cocoid"?, "filepath"?}]}``, split ``train``, ``restval``, ``val`` or ``test``) and writes
``<dataset>_{train,val,test}.jsonl``, one line per image ``{item_id, captions, img_id}``
(``item_id`` = Karpathy's ``imgid``, ``img_id`` = the file stem, ``captions`` = the ``raw``
sentences, stripped), where ``<dataset>`` is ``flickr30k`` or ``coco`` (from the file's own
``dataset`` field, else its name). ``restval`` (COCO's 30k images outside the 5k val and test) joins
``train`` as in ViLT's and METER's training (``--no-restval`` leaves it out).

Images go into the single-file LMDB store of the collection, keyed by file stem:
``flickr30k_images.lmdb`` (Flickr30k: ``IMAGES/<filename>``; the SNLI-VE recipe reads the same store)
or ``coco-trainval2014.lmdb`` (COCO: ``IMAGES/<filepath>/<filename>``, ``filepath`` being
``train2014`` or ``val2014``; the VQAv2 recipe reads the same store). An existing store that already
holds every image the splits name is kept; one that lacks some is an error unless ``--overwrite``.
Every image stored is decoded once here. ``<dataset>_conversion.json`` holds what was dropped.

Checked at the door (``recipes.prepare.checks``): a file that is not UTF-8 or not JSON, or an
entry with a missing or mistyped field, is refused, naming the file and the image. Dropped and
counted: empty captions (and an image left with none), and, with ``--on-bad-image skip``, images
that are missing or do not decode (by default an error: leaving an evaluation image out changes
the benchmark).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from recipes.data.records import (
    RETRIEVAL_DATASETS,
    RETRIEVAL_SPLITS,
    RETRIEVAL_STORES,
    RetrievalRecord,
    retrieval_annotation_file,
    write_jsonl,
)
from recipes.data.store import ImageStore, write_image_store
from recipes.logs import configure_logging
from recipes.prepare.checks import OnBadImage, Tally, checked_images, read_json_file, refuse, write_report

__all__ = ["convert", "main"]

logger = logging.getLogger(__name__)

_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
EMPTY_CAPTION = "empty caption"
NO_CAPTION = "image without a non-empty caption"
BAD_IMAGE = "image missing or not decodable"


def _dataset_of(path: Path, data: Mapping[str, Any]) -> str:
    name = str(data.get("dataset", "")).lower() or path.stem.lower()
    for dataset in RETRIEVAL_DATASETS:
        if dataset in name or (dataset == "flickr30k" and "f30k" in name):
            return dataset
    raise ValueError(f"cannot tell whether {path} is Flickr30k or COCO (its 'dataset' field and name say "
                     f"{name!r}); pass --dataset")


def _image_path(images: Path, entry: Mapping[str, Any]) -> Path:
    """Where an image's file is: ``IMAGES/<filepath>/<filename>`` (COCO) or ``IMAGES/<filename>`` (Flickr30k)."""
    return images / entry.get("filepath", "") / entry["filename"]


def convert(karpathy: Path, images: Path | None, out: Path, *, dataset: str | None = None, restval: bool = True,
            overwrite: bool = False, on_bad_image: OnBadImage = "error") -> dict[str, int]:
    """Write the three jsonl files, (``images`` given) the image store and the tally; returns images per split."""
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"--on-bad-image must be 'error' or 'skip', got {on_bad_image!r}")
    data = read_json_file(karpathy, "Karpathy's dataset_flickr30k.json / dataset_coco.json from caption_datasets.zip")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{karpathy} has no 'images' list; is it Karpathy's dataset_*.json?")
    dataset = dataset or _dataset_of(karpathy, data)
    if dataset not in RETRIEVAL_DATASETS:
        raise ValueError(f"--dataset must be one of {RETRIEVAL_DATASETS}, got {dataset!r}")
    dropped = Tally()
    rows: dict[str, list[RetrievalRecord]] = {split: [] for split in RETRIEVAL_SPLITS}
    files: dict[str, Path] = {}
    for n, entry in enumerate(data["images"]):
        name = entry.get("filename", "?") if isinstance(entry, dict) else "?"
        try:
            split = _KARPATHY_SPLITS[entry["split"]]
            if entry["split"] == "restval" and not restval:
                continue
            stem = Path(entry["filename"]).stem
            captions = []
            for j, sentence in enumerate(entry["sentences"]):
                if not sentence["raw"].strip():
                    dropped.add(EMPTY_CAPTION, f"image {n} ({name}) sentence {j}")
                    continue
                captions.append(sentence["raw"].strip())
            if not captions:
                dropped.add(NO_CAPTION, f"image {n} ({name})")
                continue
            record = RetrievalRecord(item_id=int(entry["imgid"]), img_id=stem, captions=tuple(captions))
            record = RetrievalRecord.from_json(record.to_json())  # validated as the task will read it
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise refuse(karpathy, f"image {n} ({name})", ValueError(f"bad or missing field {err}")) from err
        if stem in files:
            raise ValueError(f"{karpathy}: two images with the file stem {stem!r}")
        files[stem] = _image_path(images, entry) if images is not None else Path(entry["filename"])
        rows[split].append(record)
    bad: set[str] = set()
    store = out / RETRIEVAL_STORES[dataset]
    if store.exists() and not overwrite:
        absent = sorted(set(files) - set(ImageStore(store).keys()))
        if absent and on_bad_image == "error":
            raise FileExistsError(f"{store} exists but lacks {len(absent)} images the splits name, e.g. {absent[:3]}; "
                                  f"pass --overwrite with --images to rewrite it (or --on-bad-image skip to drop them)")
        bad.update(absent)
        logger.info("%s exists and holds every image the splits name but %d: kept", store, len(absent))
    elif images is not None:
        absent = sorted(str(p) for p in files.values() if not p.is_file())
        if absent and on_bad_image == "error":
            raise FileNotFoundError(f"{len(absent)} of the {len(files)} images the splits name are missing, "
                                    f"e.g. {absent[:3]}")
        out.mkdir(parents=True, exist_ok=True)
        write_image_store(store, checked_images(sorted(files.items()), on_bad_image=on_bad_image, dropped=dropped,
                                                bad=bad), overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for split, records in rows.items():
        for r in records:
            if r.img_id in bad:
                dropped.add(BAD_IMAGE, f"{split} image {r.img_id}")
        kept = [r for r in records if r.img_id not in bad]
        write_jsonl(out / retrieval_annotation_file(dataset, split), [r.to_json() for r in kept])
        counts[split] = len(kept)
        logger.info("%s %s: %d images, %d captions", dataset, split, len(kept), sum(len(r.captions) for r in kept))
    dropped.log(logger, "dropped")
    write_report(out / f"{dataset}_conversion.json", counts, dropped)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.prepare.convert_retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--karpathy", type=Path, required=True, help="dataset_flickr30k.json or dataset_coco.json")
    p.add_argument("--images", type=Path,
                   help="Flickr30k: the folder of <id>.jpg; COCO: the folder holding train2014/ and val2014/; "
                        "omit to write annotations only")
    p.add_argument("--out", type=Path, required=True, help="output data folder")
    p.add_argument("--dataset", choices=RETRIEVAL_DATASETS, help="[from the file's 'dataset' field or name]")
    p.add_argument("--no-restval", action="store_true", help="leave COCO's restval images out of train")
    p.add_argument("--overwrite", action="store_true", help="replace an existing image store")
    p.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="an image that is missing or does not decode: stop, or leave it out [error]")
    args = p.parse_args(argv)
    configure_logging()
    convert(args.karpathy, args.images, args.out, dataset=args.dataset, restval=not args.no_restval,
            overwrite=args.overwrite, on_bad_image=args.on_bad_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
