"""``ImageTextDataset``: records + an image store + a transform + a tokenizer -> fixed-shape examples.

Task-agnostic: the task says which image a record names (or which images: NLVR2 names two, and
its examples then hold ``pixel_values`` (2, 3, S, S)), which text it asks and what its target
tensors are. Text is tokenized once, up front, padded to one fixed length (static shapes).
Bad images are never silent: a key missing from the store is found before any training starts and
either dropped (a warning names every key count and the store) or an error; an image that fails to
decode is either an error naming key and store, or (``on_bad_image="skip"``) an example marked
``valid = False`` with zero pixels (all its images) and a warning, which losses and metrics leave
out, so batch shapes and the gathered evaluation count stay exact. The random augmentation of
example ``i`` in epoch ``e`` is drawn from ``augment_seed(seed, e, i)``, whichever process reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar

import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from .store import ImageStore
from .transforms import IMAGE_ERRORS, augment_seed, to_pixels

__all__ = ["ImageTextDataset", "BadImageError", "ImageKey", "OnBadImage"]

logger = logging.getLogger(__name__)

R = TypeVar("R")
ImageKey = str | tuple[str, ...]  # one image's stem, or the stems of an example's images in order
OnBadImage = Literal["skip", "error"]


class BadImageError(ValueError):
    """An image that is missing from its store or does not decode; names the key and the LMDB file."""


class ImageTextDataset(Dataset[dict[str, Tensor]], Generic[R]):
    """Example ``i``: ``{"index", "input_ids" (T,), "attention_mask" (T,), "pixel_values" (3, S, S), "valid",
    "augment_seed", **target}``.

    records: the annotations; image_key(record) -> the stem in ``store``, or a tuple of K stems, which
    makes ``pixel_values`` (K, 3, S, S) in that order; text(record) -> the string to tokenize;
    target(record) -> the task's target tensors (e.g. soft scores (L,)). Key ``e * N + i``
    (``EpochKeySampler``) is example ``i`` in epoch ``e``, a plain index epoch 0; ``seed`` and the two
    seed its augmentation (``augment_seed``, returned so that the run's data digest covers it).
    """

    def __init__(
        self,
        records: Sequence[R],
        store: ImageStore,
        *,
        image_key: Callable[[R], ImageKey],
        text: Callable[[R], str],
        target: Callable[[R], Mapping[str, Tensor]],
        transform: Callable[[Any], Tensor],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        image_size: int,
        on_bad_image: OnBadImage = "error",
        seed: int = 0,
    ) -> None:
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.store, self.transform, self.image_size, self.on_bad_image = store, transform, image_size, on_bad_image
        self.seed = seed
        keys = {k for r in records for k in _stems(image_key(r))}
        missing = sorted(k for k in keys if k not in store)
        dropped = 0
        if missing:
            message = (f"{len(missing)} of {len(keys)} images are missing from {store.path}, "
                       f"e.g. {', '.join(missing[:5])}")
            if on_bad_image == "error":
                raise BadImageError(message + " (--on-bad-image skip drops their questions)")
            gone = set(missing)
            kept = [r for r in records if gone.isdisjoint(_stems(image_key(r)))]
            dropped, records = len(records) - len(kept), kept
            logger.warning("%s: skipping their %d records", message, dropped)
        self.dropped = dropped  # records left out for a missing image: evaluation counts them as skipped
        self.records = list(records)
        self.keys = [image_key(r) for r in self.records]
        enc = tokenizer([text(r) for r in self.records], padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]  # (Q, T) each
        self.targets = [dict(target(r)) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int) -> dict[str, Tensor]:
        epoch, i = divmod(int(key), len(self))
        seed = augment_seed(self.seed, epoch, i)
        stems, valid, images = self.keys[i], True, []
        for k, stem in enumerate(_stems(stems)):
            try:
                # seed + k: the K images of one example (NLVR2's pair) are augmented independently
                images.append(to_pixels(self.transform, self.store[stem], seed + k))
            except IMAGE_ERRORS as err:  # corrupt, truncated or oversized
                message = f"image {stem!r} in {self.store.path} does not decode: {type(err).__name__}: {err}"
                if self.on_bad_image == "error":
                    raise BadImageError(message + " (--on-bad-image skip leaves it out)") from err
                logger.warning("%s; example %d left out of loss and metrics", message, i)
                valid = False
                break
        if valid:
            pixels = images[0] if isinstance(stems, str) else torch.stack(images)  # (3, S, S) or (K, 3, S, S)
        else:
            size = (self.image_size, self.image_size)
            pixels = torch.zeros(3, *size) if isinstance(stems, str) else torch.zeros(len(stems), 3, *size)
        return {"index": torch.tensor(i), "input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "pixel_values": pixels, "valid": torch.tensor(valid), "augment_seed": torch.tensor(seed),
                **self.targets[i]}


def _stems(key: ImageKey) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else tuple(key)
