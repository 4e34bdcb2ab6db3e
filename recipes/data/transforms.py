"""Per-model image transforms: decode, square resize S x S, RandAugment(2, 9) in training, normalise.

The resize ignores aspect (every image becomes S x S), so ViLT needs no pixel mask and every batch
has one static shape. The augmentation of an example is drawn from ``augment_seed(seed, epoch,
index)`` alone (``to_pixels(..., seed=...)``), not from whichever loader worker decodes it: a
resumed run, or one with another number of workers, augments every example the same way.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = ["ImageSpec", "build_image_transform", "decode_image", "image_problem", "IMAGE_ERRORS", "augment_seed",
           "to_pixels"]

# What PIL raises on a corrupt, truncated or oversized image (UnidentifiedImageError is an OSError;
# DecompressionBombError is not, and the warning is raised where warnings are errors).
IMAGE_ERRORS: tuple[type[Exception], ...] = (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                                             Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageSpec:
    """How a model family wants its pixels: interpolation and per-channel mean/std (size comes per run)."""

    interpolation: InterpolationMode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def decode_image(data: bytes) -> Image.Image:
    """Raw JPEG/PNG bytes -> an RGB PIL image (fully loaded, so a truncated file fails here, not later).

    An image of more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` is refused (a
    ``DecompressionBombError``) before it is decoded: PIL itself only warns below twice the limit.
    """
    image = Image.open(io.BytesIO(data))
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise Image.DecompressionBombError(
            f"{image.width} x {image.height} pixels exceed PIL's decompression-bomb limit of {limit} "
            f"(PIL.Image.MAX_IMAGE_PIXELS)")
    image.load()
    return image.convert("RGB")


def image_problem(data: bytes) -> str | None:
    """Why ``decode_image`` cannot decode ``data`` (the exception's type and message), or None when it can."""
    try:
        decode_image(data)
    except IMAGE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def build_image_transform(spec: ImageSpec, size: int, *, train: bool) -> T.Compose:
    """PIL RGB -> (3, size, size) float tensor.

    Training adds RandAugment(2, 9) after the resize: its geometric ops are relative to the image
    size, so the order changes little, and augmenting S x S instead of a 640 x 480 COCO image is
    several times cheaper per example.
    """
    steps: list[object] = [T.Resize((size, size), interpolation=spec.interpolation, antialias=True)]
    if train:
        steps.append(T.RandAugment(num_ops=2, magnitude=9))
    steps += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(steps)


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of example ``index``'s random augmentation in ``epoch`` of a run seeded ``seed`` (0 <= it < 2^63)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def to_pixels(transform: T.Compose, data: bytes, seed: int | None = None) -> Tensor:
    """Decode ``data`` and apply ``transform``: (3, S, S).

    seed: the transform's random draws (RandAugment draws from torch's global generator) come from
    ``torch.manual_seed(seed)`` on a forked generator, so they depend on the seed alone and the
    caller's random stream is left as it was.
    """
    image = decode_image(data)
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)
