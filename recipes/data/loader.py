"""DataLoaders that keep an accelerator busy, a resumable epoch sampler, and the loader's own speed.

``EpochSampler`` draws epoch ``e``'s order from ``(seed, e)`` alone, so a resumed run that skips the
batches it already took sees exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sized

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochSampler", "EpochKeySampler", "make_loader", "loader_throughput"]


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``: shuffled by ``torch.Generator(seed + epoch)`` when ``shuffle``, else in order.

    accelerate's prepared loader calls ``set_epoch`` on it (``loader.set_epoch(e)``).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class EpochKeySampler(EpochSampler):
    """``EpochSampler``'s order, index ``i`` sent as ``epoch * n + i``: a dataset that draws per epoch
    (the training augmentation, retrieval's negatives) reads the epoch from the key in whichever
    worker process receives it (persistent workers never see ``set_epoch``)."""

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.n
        return (base + i for i in super().__iter__())


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int = 4, seed: int = 0,
                drop_last: bool = False, pin_memory: bool | None = None,
                sampler: type[EpochSampler] = EpochSampler) -> DataLoader:
    """A DataLoader with ``workers`` processes, pinned memory (default: when CUDA is present) and
    persistent workers (no re-fork of the image decoders every epoch); ``sampler`` orders it.

    ``drop_last`` for training (static shapes, a constant step size); never for evaluation, where
    accelerate pads the last batch and ``gather_for_metrics`` drops the padding.
    """
    if not isinstance(dataset, Sized):
        raise TypeError("make_loader needs a sized dataset")
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler(len(dataset), shuffle=shuffle, seed=seed),
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=drop_last,
        # the workers' base seeds derive from it; the augmentation does not use them (it is seeded per example)
        generator=torch.Generator().manual_seed(seed),
    )


def loader_throughput(loader: Iterable[dict[str, torch.Tensor]], batches: int, warmup: int = 2) -> float:
    """Examples/s the loader alone delivers (decode, augment, collate, pin), over ``batches`` after ``warmup``.

    Compare with the model's examples/s from evaluation: when the loader is slower, add workers.
    """
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        count += batch["input_ids"].shape[0]
    seconds = time.perf_counter() - start
    if count == 0:
        raise ValueError(f"the loader ran out within the {warmup} warm-up batches; measure on more data")
    return count / seconds
