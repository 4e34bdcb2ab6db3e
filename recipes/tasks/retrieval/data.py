"""A retrieval data folder and the examples read from it: every image and caption of a split, and
the training groups (one image, its true caption and captions of other images).

``DATA`` is what ``recipes.prepare.convert_retrieval`` writes: ``<dataset>_{train,val,test}.jsonl``
(one line per image, ``{item_id, captions, img_id}``) and the image store (``flickr30k_images.lmdb``
or ``coco-trainval2014.lmdb``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from recipes.data.dataset import BadImageError, OnBadImage
from recipes.data.records import (
    RETRIEVAL_DATASETS,
    RETRIEVAL_SPLITS,
    RETRIEVAL_STORES,
    RetrievalRecord,
    read_jsonl,
    retrieval_annotation_file,
)
from recipes.data.store import ImageStore, is_image_store
from recipes.data.transforms import IMAGE_ERRORS, augment_seed, build_image_transform, to_pixels
from recipes.models import Family

__all__ = ["RetrievalData", "SplitData", "ImagePixels", "CandidateGroups"]

logger = logging.getLogger("recipes.retrieval")


class RetrievalData:
    """A data folder written by ``recipes.prepare.convert_retrieval`` for ``dataset`` (None: the one it holds)."""

    def __init__(self, root: Path, dataset: str | None = None) -> None:
        self.root = Path(root)
        self.labels: list[str] = []  # retrieval has no labels: a ranking score and ITM logits
        if dataset is None:
            found = [d for d in RETRIEVAL_DATASETS
                     if any((self.root / retrieval_annotation_file(d, s)).is_file() for s in RETRIEVAL_SPLITS)]
            if len(found) != 1:
                raise FileNotFoundError(f"{self.root} holds {'both' if found else 'neither'} Flickr30k "
                                        f"{'and' if found else 'nor'} COCO retrieval files; pass --dataset "
                                        f"(write them with python -m recipes.prepare.convert_retrieval)")
            dataset = found[0]
        if dataset not in RETRIEVAL_DATASETS:
            raise ValueError(f"--dataset must be one of {RETRIEVAL_DATASETS}, got {dataset!r}")
        self.dataset = dataset

    @property
    def store_path(self) -> Path:
        return self.root / RETRIEVAL_STORES[self.dataset]

    def check(self, splits: Sequence[str]) -> None:
        """Fail now, before any model loads, if a split's annotations or the image store is missing."""
        for path in [self.root / retrieval_annotation_file(self.dataset, s) for s in splits] + [self.store_path]:
            if not is_image_store(path):  # a file, or the store as an LMDB folder
                raise FileNotFoundError(f"{path} does not exist; write the data folder with "
                                        f"python -m recipes.prepare.convert_retrieval")

    def records(self, split: str, limit: int | None = None) -> list[RetrievalRecord]:
        """The split's images (the first ``limit``), each with its captions."""
        records = read_jsonl(self.root / retrieval_annotation_file(self.dataset, split), RetrievalRecord.from_json)[:limit]
        store = ImageStore(self.store_path)
        missing = [r.img_id for r in records if r.img_id not in store]
        if missing:  # leaving an image out would change the retrieval task itself: never skipped
            raise BadImageError(f"{len(missing)} of the {split} images are missing from {store.path}, "
                                f"e.g. {missing[:5]}")
        return records


class SplitData:
    """A split tokenized once: every caption (C, T), the image each belongs to (C,), the images' pixels."""

    def __init__(self, records: Sequence[RetrievalRecord], store: ImageStore, tokenizer: Any, *, family: Family,
                 image_size: int, text_length: int, train: bool) -> None:
        self.records = list(records)
        captions = [c for r in self.records for c in r.captions]
        counts = torch.tensor([len(r.captions) for r in self.records])
        self.caption_image = torch.repeat_interleave(torch.arange(len(self.records)), counts)  # (C,)
        self.first_caption = torch.cumsum(counts, 0) - counts  # (I,) index of each image's first caption
        self.caption_counts = counts
        enc = tokenizer(captions, padding="max_length", max_length=text_length, truncation=True, return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]  # (C, T) each
        self.images = ImagePixels(self.records, store, build_image_transform(family.image, image_size, train=train),
                                  image_size)

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.records), len(self.caption_image)


class ImagePixels(Dataset[dict[str, Tensor]]):
    """Item ``i``: ``{"index", "pixel_values" (3, S, S), "valid", "augment_seed"}`` of image ``i``.

    Key ``e * I + i`` is image ``i`` in epoch ``e`` (a plain index epoch 0): its random augmentation
    is drawn from ``augment_seed(seed, e, i)`` alone, whichever loader worker reads it.

    ``on_bad_image="skip"`` turns an undecodable image into zeros with ``valid`` False (training
    leaves its example out); evaluation keeps ``"error"``: every image is part of the task.
    """

    def __init__(self, records: Sequence[RetrievalRecord], store: ImageStore, transform: Any, image_size: int,
                 on_bad_image: OnBadImage = "error", seed: int = 0) -> None:
        self.keys = [r.img_id for r in records]
        self.store, self.transform, self.image_size, self.on_bad_image = store, transform, image_size, on_bad_image
        self.seed = seed

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, key: int) -> dict[str, Tensor]:
        epoch, i = divmod(int(key), len(self))
        seed = augment_seed(self.seed, epoch, i)
        try:
            pixels, valid = to_pixels(self.transform, self.store[self.keys[i]], seed), True
        except IMAGE_ERRORS as err:  # corrupt, truncated or oversized
            message = f"image {self.keys[i]!r} in {self.store.path} does not decode: {type(err).__name__}: {err}"
            if self.on_bad_image == "error":
                raise BadImageError(message + " (--on-bad-image skip leaves it out of training)") from err
            logger.warning("%s; left out of loss and metrics", message)
            pixels, valid = torch.zeros(3, self.image_size, self.image_size), False
        return {"index": torch.tensor(i), "pixel_values": pixels, "valid": torch.tensor(valid),
                "augment_seed": torch.tensor(seed)}


class CandidateGroups(Dataset[dict[str, Tensor]]):
    """Training (and proxy validation) examples: one image with 1 + ``negatives`` captions.

    Key ``e * I + i`` (``EpochKeySampler``) is image ``i`` in epoch ``e``; a plain index is epoch 0.
    ``input_ids`` / ``attention_mask`` (K, T) hold the true caption first, then one caption of each of
    ``negatives`` distinct other images, all drawn by ``default_rng([seed, e, i])``.
    """

    def __init__(self, split: SplitData, *, negatives: int, seed: int, on_bad_image: OnBadImage = "error") -> None:
        images = len(split.records)
        if negatives < 1 or negatives > images - 1:
            raise ValueError(f"--negatives {negatives} needs 1 to {images - 1} (the split has {images} images)")
        self.split, self.negatives, self.seed = split, negatives, seed
        self.pixels = ImagePixels(split.records, split.images.store, split.images.transform, split.images.image_size,
                                  on_bad_image, seed)

    def __len__(self) -> int:
        return len(self.split.records)

    @property
    def records(self) -> list[RetrievalRecord]:
        return self.split.records

    def candidates(self, key: int) -> tuple[int, Tensor]:
        """(image index, (1 + negatives,) caption indices, the true one first) of a key."""
        epoch, i = divmod(key, len(self))
        s = self.split
        rng = np.random.default_rng([self.seed, epoch, i])
        others = rng.choice(len(self) - 1, size=self.negatives, replace=False)
        others = others + (others >= i)  # (negatives,) distinct images other than i
        images = np.concatenate([[i], others])
        pick = rng.integers(0, s.caption_counts[images].numpy())  # one caption of each
        return i, s.first_caption[images] + torch.from_numpy(pick)

    def __getitem__(self, key: int) -> dict[str, Tensor]:
        _, captions = self.candidates(key)
        example = self.pixels[key]  # image i, augmented as epoch e's
        return {**example, "input_ids": self.split.input_ids[captions],
                "attention_mask": self.split.attention_mask[captions]}
