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
"""

from __future__ import annotations

import argparse
import json
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

__all__ = ["convert", "main"]

logger = logging.getLogger(__name__)

_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


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
            overwrite: bool = False) -> dict[str, int]:
    """Write the three jsonl files and (``images`` given) the image store; returns images per split."""
    if not karpathy.is_file():
        raise FileNotFoundError(f"{karpathy} does not exist (Karpathy's dataset_flickr30k.json / dataset_coco.json "
                                f"from caption_datasets.zip)")
    data = json.loads(karpathy.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{karpathy} has no 'images' list; is it Karpathy's dataset_*.json?")
    dataset = dataset or _dataset_of(karpathy, data)
    if dataset not in RETRIEVAL_DATASETS:
        raise ValueError(f"--dataset must be one of {RETRIEVAL_DATASETS}, got {dataset!r}")
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in RETRIEVAL_SPLITS}
    files: dict[str, Path] = {}
    for n, entry in enumerate(data["images"]):
        try:
            split = _KARPATHY_SPLITS[entry["split"]]
            if entry["split"] == "restval" and not restval:
                continue
            stem = Path(entry["filename"]).stem
            record = RetrievalRecord(item_id=int(entry["imgid"]), img_id=stem,
                                     captions=tuple(s["raw"].strip() for s in entry["sentences"]))
            record = RetrievalRecord.from_json(record.to_json())  # validated as the task will read it
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{karpathy}: image {n} ({entry.get('filename', '?')}): bad or missing field {err}") from err
        if stem in files:
            raise ValueError(f"{karpathy}: two images with the file stem {stem!r}")
        files[stem] = _image_path(images, entry) if images is not None else Path(entry["filename"])
        rows[split].append(record.to_json())
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        write_jsonl(out / retrieval_annotation_file(dataset, split), lines)
        logger.info("%s %s: %d images, %d captions", dataset, split, len(lines), sum(len(r["captions"]) for r in lines))
    store = out / RETRIEVAL_STORES[dataset]
    if store.exists() and not overwrite:
        missing = sorted(set(files) - set(ImageStore(store).keys()))
        if missing:
            raise FileExistsError(f"{store} exists but lacks {len(missing)} images the splits name, e.g. {missing[:3]}; "
                                  f"pass --overwrite with --images to rewrite it")
        logger.info("%s exists and holds every image the splits name: kept", store)
    elif images is not None:
        absent = sorted(str(p) for p in files.values() if not p.is_file())
        if absent:
            raise FileNotFoundError(f"{len(absent)} of the {len(files)} images the splits name are missing, "
                                    f"e.g. {absent[:3]}")
        write_image_store(store, ((k, p.read_bytes()) for k, p in sorted(files.items())), overwrite=overwrite)
    return {split: len(lines) for split, lines in rows.items()}


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
    args = p.parse_args(argv)
    configure_logging()
    convert(args.karpathy, args.images, args.out, dataset=args.dataset, restval=not args.no_restval,
            overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
