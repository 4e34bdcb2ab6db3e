"""Image-text retrieval evaluation: every image against every caption, recall with a tie rule that cannot flatter.

**The score matrix** ``S`` (I images, C captions) holds one model score per pair. It is cut into
tiles (``tile_images`` x ``tile_captions``); under ``accelerate`` each process takes a contiguous
share of the tiles (so it needs the features of about 1 / P of the images), scores their pairs in
fixed-size batches, and saves each finished tile to the output folder (``tile_<row>_<col>.pt``).
A rerun finds the finished tiles and skips them (resume by tile); ``meta.json`` records what the
tiles were scored from, the model's weights by a digest of their bytes (``weights_digest``), not
by its path: a rerun with other settings is refused rather than mixed in, and a rerun whose model
at the same path now holds other weights discards the stale tiles and scores afresh. At the end
every process adds its tiles into a zero matrix and a count matrix, both are summed over processes,
and every pair must have been counted exactly once (none missing, none twice) or the run fails.

**Pair scorers.** ``FullPairScorer`` runs the whole model on each pair (ViLT: its single stream
needs that). ``CachedMeterScorer`` runs METER's unimodal encoders once per image and once per
caption (``encode_image`` / ``encode_text``) and per pair only the fusion blocks, the poolers and
``rank_output`` (``CachedPairHead``). PuMer reduces inside the fusion blocks, so cached unimodal
features stay valid under it; ToMe merging in the CLIP tower (``encoder_merge_schedule``) changes
the image features, and its token sizes are cached with them and re-attached to every pair batch.

**Recall and the tie rule.** TR@k: the fraction of images whose k best-scored captions contain one
of their own; IR@k: the fraction of captions whose k best-scored images contain their own. Ties
count against the model: a query's rank is ``1 + #{wrong items scoring >= its best true item}``, as
if every tied wrong item were ranked first. A constant scorer thus gets the worst rank, never the
best, and pairs left unscored by a shortlist (``-inf``) rank after every scored one.

**Identical captions are one text.** The same text scored twice can come out a few ulps apart
depending on its slot in a pair batch (batched kernels round differently by position and batch
size), and the tie rule would then break a real tie one way or the other. COCO repeats captions,
so ``distinct_texts`` groups the captions whose tokens (and mask) are identical; the matrix is
scored over distinct texts, once per image, and each caption's column is its text's: identical
captions tie exactly, whatever ``pair_batch``, and the recall cannot depend on it.

**Shortlist (``rerank_top`` K, approximate, off by default).** A first pass scores every pair with
a cheaper variant of the same model (the caller's choice; the CLI's is the model under a strong
PuMer config, ``--rerank-pumer``), keeps each image's K best captions and each caption's K best
images, and the exact model scores only that union; other pairs get ``-inf``. A true item that
misses the shortlist ranks last, so the result can only be lower than the exact one where the
first pass misses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pumer_patch import token_sizes, with_token_sizes

__all__ = ["RECALL_KS", "distinct_texts", "text_ranks", "image_ranks", "recall", "Tile", "make_tiles", "PairFn", "PairScorer",
           "FullPairScorer", "CachedPairHead", "CachedMeterScorer", "ScoreStats", "score_matrix", "shortlist",
           "fingerprint", "weights_digest"]

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
_ROW_BLOCK = 1024  # rows (or columns) ranked at a time: bounds the (block, C) temporaries on COCO 5k x 25k


# ---------------------------------------------------------------------------------------- ranks and recall


def distinct_texts(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Group identical tokenized captions: ``(first, text_of)``.

    input_ids, attention_mask: (C, T). first: (U,) the first caption of each distinct text, in order
    of first appearance; text_of: (C,) each caption's distinct-text index, so ``first[text_of[c]]``
    has caption ``c``'s tokens and a (I, U) matrix over distinct texts expands to (I, C) as
    ``matrix[:, text_of]``.
    """
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)  # (C, 2T)
    _, group = torch.unique(rows, dim=0, return_inverse=True)  # (C,) in sorted-text order
    c = torch.arange(len(rows))
    first_in_group = torch.full((int(group.max()) + 1 if len(rows) else 0,), len(rows)).scatter_reduce(
        0, group, c, reduce="amin")  # (U,) the first caption of each sorted group
    order = first_in_group.argsort()  # the groups in order of first appearance
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    return first_in_group[order], position[group]



def _check_scores(scores: Tensor, caption_image: Tensor) -> None:
    if scores.dim() != 2 or caption_image.shape != (scores.shape[1],):
        raise ValueError(f"scores must be (images, captions) and caption_image (captions,); got "
                         f"{tuple(scores.shape)} and {tuple(caption_image.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"{int(torch.isnan(scores).sum())} pair scores are NaN (unscored or a diverged model)")
    counts = torch.bincount(caption_image, minlength=scores.shape[0])
    if len(counts) != scores.shape[0] or (counts == 0).any():
        raise ValueError("every image needs at least one caption and every caption an image index < images")


def text_ranks(scores: Tensor, caption_image: Tensor) -> Tensor:
    """(I,) rank of each image's best own caption: ``1 + #{other images' captions scoring >= it}``.

    scores: (I, C); caption_image: (C,) the image index of each caption.
    """
    _check_scores(scores, caption_image)
    ranks = []
    for r0 in range(0, scores.shape[0], _ROW_BLOCK):
        s = scores[r0:r0 + _ROW_BLOCK]  # (b, C)
        own = caption_image[None, :] == torch.arange(r0, r0 + len(s))[:, None]  # (b, C)
        best = s.masked_fill(~own, -math.inf).amax(dim=1, keepdim=True)  # (b, 1)
        ranks.append(1 + ((s >= best) & ~own).sum(dim=1))
    return torch.cat(ranks)


def image_ranks(scores: Tensor, caption_image: Tensor) -> Tensor:
    """(C,) rank of each caption's own image: ``1 + #{other images scoring >= it}`` for that caption."""
    _check_scores(scores, caption_image)
    ranks = []
    for c0 in range(0, scores.shape[1], _ROW_BLOCK):
        s = scores[:, c0:c0 + _ROW_BLOCK]  # (I, b)
        mine = caption_image[c0:c0 + _ROW_BLOCK]  # (b,)
        own = torch.arange(scores.shape[0])[:, None] == mine[None, :]  # (I, b)
        true = s.gather(0, mine[None, :])  # (1, b)
        ranks.append(1 + ((s >= true) & ~own).sum(dim=0))
    return torch.cat(ranks)


def recall(scores: Tensor, caption_image: Tensor, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """``tr_r{k}`` and ``ir_r{k}`` (fractions) for each k, and ``rsum`` (their sum, in percent, as papers report)."""
    tr, ir = text_ranks(scores, caption_image), image_ranks(scores, caption_image)
    out = {f"tr_r{k}": (tr <= k).float().mean().item() for k in ks}
    out |= {f"ir_r{k}": (ir <= k).float().mean().item() for k in ks}
    out["rsum"] = 100 * sum(out.values())
    return out


# ---------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class Tile:
    """Images ``r0:r1`` x captions ``c0:c1`` of the score matrix."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def name(self) -> str:
        return f"tile_{self.r0:07d}_{self.c0:07d}.pt"

    @property
    def pairs(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)


def make_tiles(images: int, captions: int, tile_images: int, tile_captions: int) -> list[Tile]:
    """Row-major tiles covering the (images, captions) matrix exactly once."""
    if tile_images < 1 or tile_captions < 1:
        raise ValueError(f"tile sizes must be >= 1, got {tile_images} x {tile_captions}")
    return [Tile(r, min(r + tile_images, images), c, min(c + tile_captions, captions))
            for r in range(0, images, tile_images) for c in range(0, captions, tile_captions)]


def _share(tiles: Sequence[Tile], process: int, processes: int) -> Sequence[Tile]:
    """Process ``process``'s contiguous share of the tiles (row-major: it needs few of the images)."""
    n = len(tiles)
    return tiles[process * n // processes:(process + 1) * n // processes]


# ---------------------------------------------------------------------------------------- pair scorers

PairFn = Callable[[Tensor, Tensor], Tensor]  # (P,) tile-local image and caption indices -> (P,) scores


class PairScorer(Protocol):
    """Scores image-caption pairs; ``tile(rows, cols)`` readies a tile's inputs and returns its pair function."""

    prepare_seconds: float

    def tile(self, rows: range, cols: range) -> PairFn:
        ...


class FullPairScorer:
    """Every pair through the whole model: ``model(input_ids, attention_mask, pixel_values).logits[:, 0]``.

    images: a dataset whose item ``i`` holds ``pixel_values`` (3, S, S) of image ``i``; input_ids /
    attention_mask: (C, T) every caption, tokenized. A tile's images are decoded once for the tile.
    """

    def __init__(self, model: nn.Module, images: Dataset[Mapping[str, Tensor]], input_ids: Tensor,
                 attention_mask: Tensor, accelerator: Accelerator, *, batch: int = 64, workers: int = 0) -> None:
        self.model, self.images, self.acc = model, images, accelerator
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.batch, self.workers = batch, workers
        self.prepare_seconds = 0.0
        self._rows: tuple[range, Tensor] | None = None  # the last tile's images, reused along its row of tiles

    def tile(self, rows: range, cols: range) -> PairFn:
        start = time.perf_counter()
        device = self.acc.device
        if self._rows is None or self._rows[0] != rows:
            self._rows = (rows, _pixels(self.images, rows, self.batch, self.workers).to(device))
        pixels = self._rows[1]  # (h, 3, S, S)
        ids, mask = self.input_ids[cols.start:cols.stop].to(device), self.attention_mask[cols.start:cols.stop].to(device)
        self.prepare_seconds += time.perf_counter() - start

        def score(r: Tensor, c: Tensor) -> Tensor:
            with self.acc.autocast():
                return self.model(input_ids=ids[c], attention_mask=mask[c], pixel_values=pixels[r]).logits[:, 0].float()

        return score


def _pixels(images: Dataset[Mapping[str, Tensor]], rows: Sequence[int], batch: int, workers: int) -> Tensor:
    """(len(rows), 3, S, S) pixel values of the images ``rows``, decoded by ``workers`` processes."""
    subset = torch.utils.data.Subset(images, list(rows))
    loader = DataLoader(subset, batch_size=batch, shuffle=False, num_workers=workers)
    return torch.cat([b["pixel_values"] for b in loader])


class CachedPairHead(nn.Module):
    """What runs per pair on cached unimodal features: METER's fusion blocks, poolers and ``rank_output``.

    text: (B, T, C) from ``encode_text``; attention_mask: (B, T); image: (B, N, C) from
    ``encode_image``; image_sizes: (B, N) the sizes of tokens the CLIP tower merged, or None.
    Returns (B,) scores.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, text: Tensor, attention_mask: Tensor, image: Tensor, image_sizes: Tensor | None = None) -> Tensor:
        with_token_sizes(image, image_sizes)  # the sizes of the cached features reach the fusion
        meter = self.model.meter
        return self.model.rank_output(meter.pool(*meter.fuse(text, attention_mask, image)))[:, 0]


class CachedMeterScorer:
    """METER with each image and caption encoded once (on first use, per process), fusion per pair.

    The caches live in host memory, (I, N, C) image and (C, T, C) text features in the encoders'
    output dtype; a tile moves its rows' and columns' features to the device once. ``cache_bytes``
    reports what they hold; ``prepare_seconds`` the time spent encoding and moving.
    """

    def __init__(self, model: nn.Module, images: Dataset[Mapping[str, Tensor]], input_ids: Tensor,
                 attention_mask: Tensor, accelerator: Accelerator, *, batch: int = 64, workers: int = 0) -> None:
        self.model, self.images, self.acc = model, images, accelerator
        self.head = CachedPairHead(model)
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.batch, self.workers = batch, workers
        self.image_feats: dict[int, Tensor] = {}  # image index -> (N, C)
        self.image_sizes: dict[int, Tensor] = {}  # image index -> (N,), only with ToMe in the tower
        self.text_feats: dict[int, Tensor] = {}  # caption index -> (T, C)
        self.prepare_seconds = 0.0

    @torch.no_grad()
    def _encode_images(self, rows: Sequence[int]) -> None:
        todo = [i for i in rows if i not in self.image_feats]
        if not todo:
            return
        meter = self.model.meter
        loader = DataLoader(torch.utils.data.Subset(self.images, todo), batch_size=self.batch, shuffle=False,
                            num_workers=self.workers)
        for j, batch in zip(range(0, len(todo), self.batch), loader):
            with self.acc.autocast():
                feats = meter.encode_image(batch["pixel_values"].to(self.acc.device))  # (b, N, C)
            size = token_sizes(feats)
            for k, i in enumerate(todo[j:j + self.batch]):
                self.image_feats[i] = feats[k].cpu()
                if size is not None:
                    self.image_sizes[i] = size[k].cpu()

    @torch.no_grad()
    def _encode_captions(self, cols: Sequence[int]) -> None:
        todo = [c for c in cols if c not in self.text_feats]
        meter, device = self.model.meter, self.acc.device
        for j in range(0, len(todo), self.batch):
            part = torch.tensor(todo[j:j + self.batch])
            with self.acc.autocast():
                feats = meter.encode_text(self.input_ids[part].to(device), self.attention_mask[part].to(device))
            for k, c in enumerate(part.tolist()):
                self.text_feats[c] = feats[k].cpu()

    def cache_bytes(self) -> dict[str, float]:
        """Bytes per cached image and per cached caption (features, sizes, mask)."""
        def per(items: Mapping[int, Tensor]) -> float:
            return sum(t.numel() * t.element_size() for t in items.values()) / max(1, len(items))
        return {"bytes_per_image": per(self.image_feats) + per(self.image_sizes),
                "bytes_per_caption": per(self.text_feats) + self.attention_mask[0].numel() * self.attention_mask.element_size()}

    def tile(self, rows: range, cols: range) -> PairFn:
        start = time.perf_counter()
        self._encode_images(rows)
        self._encode_captions(cols)
        device = self.acc.device
        image = torch.stack([self.image_feats[i] for i in rows]).to(device)  # (h, N, C)
        sizes = torch.stack([self.image_sizes[i] for i in rows]).to(device) if self.image_sizes else None
        text = torch.stack([self.text_feats[c] for c in cols]).to(device)  # (w, T, C)
        mask = self.attention_mask[cols.start:cols.stop].to(device)
        self.prepare_seconds += time.perf_counter() - start

        def score(r: Tensor, c: Tensor) -> Tensor:
            with self.acc.autocast():
                return self.head(text[c], mask[c], image[r], None if sizes is None else sizes[r]).float()

        return score


# ---------------------------------------------------------------------------------------- the matrix


@dataclass
class ScoreStats:
    """pairs: scored exactly (all processes; the shortlist's when one is given); scored_now: by this run
    (resumed tiles excluded); seconds: the wall time of scoring, the slowest process's, loading and
    decoding included (the models' speed is timed apart); prepare_seconds: this process's part spent
    decoding / encoding / moving inputs; tiles_skipped: finished tiles a rerun found."""

    pairs: int
    scored_now: int
    seconds: float
    prepare_seconds: float
    tiles_skipped: int


def weights_digest(model: nn.Module) -> str:
    """A sha1 of every entry of ``model``'s state_dict: name, dtype, shape and bytes (one changed weight changes it)."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(**fields: Any) -> str:
    """A short hash of what a score matrix depends on (data, model, settings), for ``meta.json``."""
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_meta(out: Path, meta: Mapping[str, Any], accelerator: Accelerator) -> None:
    """Refuse a folder holding tiles of other settings (every process reads before any writes), else record them.

    Tiles of the same settings but other weights (``meta["weights"]``: the model at the same path
    was retrained, or a folder of an older version that recorded no weights) are stale: deleted,
    with a warning, and scored afresh.
    """
    path = out / "meta.json"
    old = json.loads(path.read_text()) if path.is_file() else None
    accelerator.wait_for_everyone()
    changed = set() if old is None else {k for k in old.keys() | meta.keys() if old.get(k) != meta.get(k)}
    if changed == {"weights"}:
        if accelerator.is_main_process:
            stale = sorted(out.glob("tile_*.pt"))
            logger.warning("%s: the model's weights changed since its %d tiles were scored; scoring afresh",
                           out, len(stale))
            for tile in stale:
                tile.unlink()
            path.unlink()
        old = None
    elif changed:
        raise ValueError(f"{out} holds tiles scored with other settings ({', '.join(sorted(changed))} differ: "
                         f"{old}); pass another --output or delete {out} to score afresh")
    if old is None and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=2))
    accelerator.wait_for_everyone()


@torch.no_grad()
def score_matrix(accelerator: Accelerator, scorer: PairScorer, images: int, captions: int, out: Path, *,
                 meta: Mapping[str, Any], tile_images: int = 32, tile_captions: int = 2048, pair_batch: int = 256,
                 mask: Tensor | None = None, progress: bool = True, desc: str = "pairs") -> tuple[Tensor, ScoreStats]:
    """The (images, captions) score matrix, float32 on the CPU of every process, and how it was made.

    Tiles go to ``out``; finished ones are skipped. ``mask`` (images, captions) bool: score only
    these pairs, the others are ``-inf`` (a shortlist). ``meta``: what the tiles depend on (data,
    model, variant); a folder scored with other ``meta`` is refused.
    """
    acc = accelerator
    tiles = make_tiles(images, captions, tile_images, tile_captions)
    shortlist_hash = None if mask is None else hashlib.sha1(mask.numpy().tobytes()).hexdigest()[:16]
    _check_meta(out, {**meta, "images": images, "captions": captions, "tile_images": tile_images,
                      "tile_captions": tile_captions, "shortlist": shortlist_hash}, acc)
    mine = _share(tiles, acc.process_index, acc.num_processes)

    def pairs_of(t: Tile) -> int:
        return t.pairs if mask is None else int(mask[t.r0:t.r1, t.c0:t.c1].sum())

    todo = [t for t in mine if not (out / t.name).is_file()]
    bar = tqdm(total=sum(pairs_of(t) for t in todo), desc=desc, unit="pair", dynamic_ncols=True,
               disable=not (progress and acc.is_local_main_process))
    prepared_before = scorer.prepare_seconds
    start = time.perf_counter()
    scored = 0
    for t in todo:
        h, w = t.r1 - t.r0, t.c1 - t.c0
        if mask is None:  # every pair of the tile, row-major
            r = torch.arange(h).repeat_interleave(w)
            c = torch.arange(w).repeat(h)
        else:
            r, c = mask[t.r0:t.r1, t.c0:t.c1].nonzero(as_tuple=True)
        result = torch.full((h, w), math.nan if mask is None else -math.inf)
        if len(r):
            fn = scorer.tile(range(t.r0, t.r1), range(t.c0, t.c1))
            device = acc.device
            for j in range(0, len(r), pair_batch):
                rb, cb = r[j:j + pair_batch], c[j:j + pair_batch]
                result[rb, cb] = fn(rb.to(device), cb.to(device)).cpu()
                bar.update(len(rb))
        scored += len(r)
        partial = out / (t.name + ".partial")
        torch.save(result, partial)
        partial.replace(out / t.name)  # a tile file exists only once complete
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    bar.close()

    # every process adds its tiles; the sums over processes must count each pair exactly once
    acc.wait_for_everyone()
    values = torch.zeros(images, captions)
    counts = torch.zeros(images, captions)
    for t in mine:
        values[t.r0:t.r1, t.c0:t.c1] = torch.load(out / t.name, weights_only=True)
        counts[t.r0:t.r1, t.c0:t.c1] += 1
    if acc.num_processes > 1:
        values = acc.reduce(values.to(acc.device), reduction="sum").cpu()
        counts = acc.reduce(counts.to(acc.device), reduction="sum").cpu()
        scored = int(acc.reduce(torch.tensor(scored, device=acc.device), reduction="sum").item())
        seconds = float(acc.gather(torch.tensor([seconds], device=acc.device)).max().item())
    missing, twice = int((counts == 0).sum()), int((counts > 1).sum())
    if missing or twice:
        raise RuntimeError(f"the gathered score matrix has {missing} pairs no process scored and {twice} scored "
                           f"more than once")
    if torch.isnan(values).any():
        raise RuntimeError(f"{int(torch.isnan(values).sum())} pairs have NaN scores in {out}")
    total = images * captions if mask is None else int(mask.sum())
    return values, ScoreStats(pairs=total, scored_now=scored, seconds=seconds,
                              prepare_seconds=scorer.prepare_seconds - prepared_before,
                              tiles_skipped=len(mine) - len(todo))


def shortlist(scores: Tensor, k: int) -> Tensor:
    """(I, C) bool: each image's ``k`` best captions and each caption's ``k`` best images (by ``scores``)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, scores.topk(min(k, scores.shape[1]), dim=1).indices, True)
    mask.scatter_(0, scores.topk(min(k, scores.shape[0]), dim=0).indices, True)
    return mask
