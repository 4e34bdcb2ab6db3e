"""Image-text retrieval (Flickr30k, COCO; Karpathy splits) on the engine: finetune, and evaluate every pair.

    python -m recipes.retrieval train --preset meter-retrieval-flickr --model PRETRAINED --data DATA --output runs/meter-f30k
    python -m recipes.retrieval eval  --model runs/meter-f30k/best --data DATA --dataset flickr30k --split test \\
        --output runs/meter-f30k/eval --pumer p0.2r0.2t0.2-0246

``DATA`` is what ``recipes.convert_retrieval`` writes: ``<dataset>_{train,val,test}.jsonl`` (one line
per image, ``{item_id, captions, img_id}``) and the image store (``flickr30k_images.lmdb`` or
``coco-trainval2014.lmdb``).

**Training.** An epoch walks the images. Image ``i`` in epoch ``e`` gets one of its own captions
and ``--negatives`` (15) captions of 15 other distinct images, all drawn by
``numpy.random.default_rng([seed, e, i])``: reproducible, independent of the number of processes,
workers or a resume, and different each epoch. The model scores the 16 pairs (``rank_output``);
the loss is the cross-entropy of the true caption over the 16 scores plus 0.5 x the ITM
cross-entropy on two pairs per image: the true one ("match") and the *first* negative ("no
match"), a uniformly drawn one, so that ITM sees as many matches as mismatches as in ViLT's ITM.
METER encodes each image once for its 16 pairs. Validation during training is a cheap proxy on the
val split: the fraction of images whose true caption outscores (ties count against) 15 fixed
negatives, and ITM accuracy; the full recall comes from ``eval``.

**Evaluation** (``recipes.retrieval_eval``): every image against every caption of the split, IR and
TR R@1/5/10 with ties counting against the model, pairs scored in batches of ``--pair-batch``,
tiles of the score matrix shared out over processes and saved as they finish (a rerun with the
same ``--output`` skips finished tiles), METER on cached unimodal features (``--no-cache`` runs
the whole model per pair). ``--rerank-top K --rerank-pumer CONFIG`` is the approximate shortlist
mode: the model under a strong PuMer config scores every pair first. ``eval.json`` / ``eval.md``
compare the unpatched model with ``--pumer``: recall, pairs/s, GFLOPs per pair (whole model; for
cached METER also the fusion alone, what a pair costs on the cache).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.contrib.logging import logging_redirect_tqdm

from pumer_patch.adapters._vit import sizes_of
from pumer_patch.flops import gflops_per_example
from recipes.common import (
    TaskSpec,
    accumulation,
    add_common_args,
    add_eval_args,
    add_train_args,
    check_model_path,
    finish_args,
    make_accelerator,
    model_image_size,
    patch,
    resolve_family,
    write_report,
)
from recipes.convert_retrieval import DATASETS, STORES, annotation_file
from recipes.data.dataset import BadImageError
from recipes.data.loader import EpochSampler, make_loader
from recipes.data.records import RetrievalRecord, read_jsonl
from recipes.data.store import ImageStore
from recipes.data.transforms import build_image_transform, to_pixels
from recipes.engine import Engine, TrainConfig
from recipes.logs import configure_logging
from recipes.models import Family, load_model, load_tokenizer
from recipes.presets import get_preset
from recipes.retrieval_eval import (
    CachedMeterScorer,
    CachedPairHead,
    FullPairScorer,
    fingerprint,
    recall,
    score_matrix,
    shortlist,
)
from recipes.retrieval_models import CandidateScorer

__all__ = ["SPLITS", "RETRIEVAL", "RetrievalData", "SplitData", "CandidateGroups", "ImagePixels", "EpochKeySampler",
           "train_loader", "RetrievalTask", "train", "evaluate", "markdown_table", "main", "parse_args"]

logger = logging.getLogger("recipes.retrieval")

SPLITS = ("train", "val", "test")
ITM_WEIGHT = 0.5


class RetrievalData:
    """A data folder written by ``recipes.convert_retrieval`` for ``dataset`` (None: the one it holds)."""

    def __init__(self, root: Path, dataset: str | None = None) -> None:
        self.root = Path(root)
        if dataset is None:
            found = [d for d in DATASETS if any((self.root / annotation_file(d, s)).is_file() for s in SPLITS)]
            if len(found) != 1:
                raise FileNotFoundError(f"{self.root} holds {'both' if found else 'neither'} Flickr30k "
                                        f"{'and' if found else 'nor'} COCO retrieval files; pass --dataset "
                                        f"(write them with python -m recipes.convert_retrieval)")
            dataset = found[0]
        if dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {dataset!r}")
        self.dataset = dataset

    @property
    def store_path(self) -> Path:
        return self.root / STORES[self.dataset]

    def check(self, splits: Sequence[str]) -> None:
        """Fail now, before any model loads, if a split's annotations or the image store is missing."""
        for path in [self.root / annotation_file(self.dataset, s) for s in splits] + [self.store_path]:
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist; write the data folder with "
                                        f"python -m recipes.convert_retrieval")

    def records(self, split: str, limit: int | None = None) -> list[RetrievalRecord]:
        """The split's images (the first ``limit``), each with its captions."""
        records = read_jsonl(self.root / annotation_file(self.dataset, split), RetrievalRecord.from_json)[:limit]
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
    """Item ``i``: ``{"index", "pixel_values" (3, S, S), "valid"}`` of image ``i``.

    ``on_bad_image="skip"`` turns an undecodable image into zeros with ``valid`` False (training
    leaves its example out); evaluation keeps ``"error"``: every image is part of the task.
    """

    def __init__(self, records: Sequence[RetrievalRecord], store: ImageStore, transform: Any, image_size: int,
                 on_bad_image: str = "error") -> None:
        self.keys = [r.img_id for r in records]
        self.store, self.transform, self.image_size, self.on_bad_image = store, transform, image_size, on_bad_image

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        try:
            pixels, valid = to_pixels(self.transform, self.store[self.keys[i]]), True
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:  # what PIL raises on corrupt data
            message = f"image {self.keys[i]!r} in {self.store.path} does not decode: {err}"
            if self.on_bad_image == "error":
                raise BadImageError(message + " (--on-bad-image skip leaves it out of training)") from err
            logger.warning("%s; left out of loss and metrics", message)
            pixels, valid = torch.zeros(3, self.image_size, self.image_size), False
        return {"index": torch.tensor(i), "pixel_values": pixels, "valid": torch.tensor(valid)}


# ---------------------------------------------------------------------------------------- training data


class CandidateGroups(Dataset[dict[str, Tensor]]):
    """Training (and proxy validation) examples: one image with 1 + ``negatives`` captions.

    Key ``e * I + i`` (``EpochKeySampler``) is image ``i`` in epoch ``e``; a plain index is epoch 0.
    ``input_ids`` / ``attention_mask`` (K, T) hold the true caption first, then one caption of each of
    ``negatives`` distinct other images, all drawn by ``default_rng([seed, e, i])``.
    """

    def __init__(self, split: SplitData, *, negatives: int, seed: int, on_bad_image: str = "error") -> None:
        images = len(split.records)
        if negatives < 1 or negatives > images - 1:
            raise ValueError(f"--negatives {negatives} needs 1 to {images - 1} (the split has {images} images)")
        self.split, self.negatives, self.seed = split, negatives, seed
        self.pixels = ImagePixels(split.records, split.images.store, split.images.transform, split.images.image_size,
                                  on_bad_image)

    def __len__(self) -> int:
        return len(self.split.records)

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
        i, captions = self.candidates(key)
        example = self.pixels[i]
        return {**example, "input_ids": self.split.input_ids[captions],
                "attention_mask": self.split.attention_mask[captions]}


class EpochKeySampler(EpochSampler):
    """``EpochSampler``'s order, index ``i`` sent as ``epoch * n + i``: the dataset draws that epoch's
    negatives in whichever worker process receives it (persistent workers never see ``set_epoch``)."""

    def __iter__(self):  # type: ignore[override]
        base = self.epoch * self.n
        return (base + i for i in super().__iter__())


def train_loader(dataset: CandidateGroups, batch: int, *, workers: int, seed: int) -> DataLoader:
    """``make_loader``'s training loader with ``EpochKeySampler`` instead of ``EpochSampler``."""
    pin = torch.cuda.is_available()
    return DataLoader(dataset, batch_size=batch, sampler=EpochKeySampler(len(dataset), shuffle=True, seed=seed),
                      num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


class RetrievalTask:
    """The engine's task: logits (B, K, 3) from ``CandidateScorer`` ([..., 0] rank score, [..., 1:] ITM).

    loss = CE(true caption among the K rank scores) + 0.5 x CE_ITM over two pairs per image (the
    true one, target 1; the first negative, target 0), averaged over valid images.
    """

    def __init__(self, itm_weight: float = ITM_WEIGHT) -> None:
        self.itm_weight = itm_weight

    def model_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    def loss(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        logits = logits.float()
        b = logits.shape[0]
        rank = F.cross_entropy(logits[..., 0], torch.zeros(b, dtype=torch.long, device=logits.device), reduction="none")
        itm_logits = logits[:, :2, 1:]  # (B, 2 pairs, 2): the true caption, the first negative
        itm_target = torch.tensor([1, 0], device=logits.device).expand(b, 2)
        itm = F.cross_entropy(itm_logits.reshape(2 * b, 2), itm_target.reshape(-1), reduction="none").view(b, 2).mean(1)
        valid = batch["valid"].float()
        return ((rank + self.itm_weight * itm) * valid).sum() / valid.sum().clamp_min(1.0)

    def eval_outputs(self, logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        scores = logits[..., 0].float()  # (B, K)
        first = (scores[:, 1:] >= scores[:, :1]).sum(1) == 0  # ties count against: strictly above every negative
        itm = logits[:, :2, 1:].float()  # (B, 2 pairs, 2 logits); a tie is wrong either way
        itm_correct = (itm[:, 0, 1] > itm[:, 0, 0]).long() + (itm[:, 1, 0] > itm[:, 1, 1]).long()
        return {"index": batch["index"], "first": first, "itm_correct": itm_correct, "valid": batch["valid"]}

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        keep = outputs["valid"].bool()
        n = int(keep.sum())
        return {"score": outputs["first"][keep].float().mean().item() if n else 0.0,
                "itm_accuracy": outputs["itm_correct"][keep].float().sum().item() / (2 * n) if n else 0.0,
                "skipped_images": float((~keep).sum())}


RETRIEVAL = TaskSpec(name="retrieval", title="Image-text retrieval", metric="group R@1",
                     data=RetrievalData, make_task=lambda labels, loss_scale, records: RetrievalTask(),
                     splits=SPLITS, train_split="train", eval_split="val", text_length=40,
                     converter="recipes.convert_retrieval")


# ---------------------------------------------------------------------------------------- train


def _dataset_of_preset(preset: str) -> str:
    return "coco" if "-coco" in preset else "flickr30k"


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Finetune with a retrieval preset; returns ``train_info`` (also ``OUTPUT/train_info.json``)."""
    preset = get_preset(args.preset, model=args.model, lr=args.lr, epochs=args.epochs, eval_every=args.eval_every,
                        total_batch=args.total_batch, image_size=args.image_size, text_length=args.text_length,
                        patience=args.patience, pumer=args.pumer, pumer_mode=args.pumer_mode,
                        distill_weight=args.distill_weight)
    if preset.distill_weight > 0 or args.teacher is not None:
        raise ValueError("retrieval has no distillation teacher (DESIGN.md): leave out --teacher and --distill-weight")
    data = RetrievalData(args.data, args.dataset or _dataset_of_preset(args.preset))
    data.check(["train", "val"])
    check_model_path(preset.model, "model")
    family = resolve_family(preset.family, preset.model)
    accelerator = make_accelerator(args)
    accelerator.gradient_accumulation_steps = accumulation(preset.total_batch, args.per_device_batch,
                                                           accelerator.num_processes)
    set_seed(args.seed)
    model = load_model(family, "retrieval", preset.model, [], image_size=preset.image_size)
    tokenizer = load_tokenizer(family, preset.model, args.tokenizer)
    patch(model, preset.pumer, preset.pumer_mode)  # before prepare: DDP and autocast wrap the patched model
    store = ImageStore(data.store_path)
    common = dict(family=family, image_size=preset.image_size, text_length=preset.text_length)
    train_split = SplitData(data.records("train", args.limit), store, tokenizer, train=True, **common)
    val_split = SplitData(data.records("val", args.limit), store, tokenizer, train=False, **common)
    train_set = CandidateGroups(train_split, negatives=args.negatives, seed=args.seed, on_bad_image=args.on_bad_image)
    val_set = CandidateGroups(val_split, negatives=min(args.negatives, len(val_split.records) - 1), seed=args.seed,
                              on_bad_image=args.on_bad_image)
    loader = train_loader(train_set, args.per_device_batch, workers=args.workers, seed=args.seed)
    val_loader = make_loader(val_set, args.eval_batch or args.per_device_batch, shuffle=False, workers=args.workers)
    cfg = TrainConfig(output_dir=Path(args.output), lr=preset.lr, weight_decay=preset.weight_decay,
                      lr_multipliers=preset.lr_multipliers, warmup=preset.warmup, end_lr=preset.end_lr,
                      epochs=preset.epochs, max_steps=args.max_steps, eval_every=preset.eval_every,
                      patience=preset.patience, stop_after_steps=args.stop_after_steps,
                      progress=not args.no_progress, name="retrieval")
    engine = Engine(accelerator, CandidateScorer(model), RetrievalTask(), cfg)
    loader, val_loader = engine.prepare_training(loader, val_loader)
    state = engine.fit(loader, val_loader, resume=args.resume, save_extra=tokenizer.save_pretrained)
    info = {"preset": args.preset, "dataset": data.dataset, "negatives": args.negatives, "settings": asdict(preset),
            "processes": accelerator.num_processes, "total_steps": engine.total_steps, **state.state_dict()}
    if accelerator.is_main_process:
        Path(args.output, "train_info.json").write_text(json.dumps(info, indent=2, default=str))
    return info


# ---------------------------------------------------------------------------------------- eval


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def _scorer(model: torch.nn.Module, split: SplitData, accelerator: Accelerator, args: argparse.Namespace,
            ) -> FullPairScorer | CachedMeterScorer:
    cls = CachedMeterScorer if hasattr(model, "meter") and not args.no_cache else FullPairScorer
    return cls(model, split.images, split.input_ids, split.attention_mask, accelerator, batch=args.eval_batch,
               workers=args.workers)


def _pair_gflops(model: torch.nn.Module, split: SplitData, scorer: FullPairScorer | CachedMeterScorer,
                 device: torch.device) -> dict[str, float]:
    """GFLOPs of one pair: the whole model, and (cached METER) the fusion, poolers and head alone."""
    n = min(2, len(split.records))
    c = split.first_caption[:n]
    pixels = torch.stack([split.images[i]["pixel_values"] for i in range(n)]).to(device)
    inputs = {"input_ids": split.input_ids[c].to(device), "attention_mask": split.attention_mask[c].to(device),
              "pixel_values": pixels}
    with torch.random.fork_rng(devices=[]):  # counting never changes a run's random draws
        out = {"gflops_per_pair": gflops_per_example(model, inputs)}
        if isinstance(scorer, CachedMeterScorer):
            meter = model.meter
            with torch.no_grad():
                image = meter.encode_image(pixels)
                sizes = sizes_of(image)
                text = meter.encode_text(inputs["input_ids"], inputs["attention_mask"])
            cached = {"text": text, "attention_mask": inputs["attention_mask"], "image": image}
            if sizes is not None:
                cached["image_sizes"] = sizes
            out["gflops_per_pair_cached"] = gflops_per_example(CachedPairHead(model), cached)
    return out


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Recall over every pair of a split, unpatched and with ``--pumer``, side by side: eval.json + eval.md."""
    data = RetrievalData(args.data, args.dataset)
    data.check([args.split])
    if args.rerank_top is not None and args.rerank_pumer is None:
        raise ValueError("--rerank-top needs --rerank-pumer CONFIG, the cheap first pass (e.g. p0.5r0.5t0.5-0246)")
    accelerator = make_accelerator(args)
    check_model_path(args.model, "model")
    family = resolve_family(args.family, args.model)
    model = load_model(family, "retrieval", args.model, [], image_size=args.image_size)
    if args.image_size is None:
        args.image_size = model_image_size(model)
    tokenizer = load_tokenizer(family, args.model, args.tokenizer)
    split = SplitData(data.records(args.split, args.limit), ImageStore(data.store_path), tokenizer, family=family,
                      image_size=args.image_size, text_length=args.text_length, train=False)
    n_images, n_captions = split.sizes
    logger.info("%s %s: %d images x %d captions = %d pairs", data.dataset, args.split, n_images, n_captions,
                n_images * n_captions)
    base_meta = {"model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
                 "data": fingerprint(ids=[r.img_id for r in split.records], captions=[r.captions for r in split.records]),
                 "image_size": args.image_size, "text_length": args.text_length,
                 "mixed_precision": args.mixed_precision, "cached": not args.no_cache}
    tiles = dict(tile_images=args.tile_images, tile_captions=args.tile_captions, pair_batch=args.pair_batch,
                 progress=not args.no_progress)
    rows: list[dict[str, Any]] = []
    variants = [("unpatched", None)] + ([(f"PuMer {args.pumer} ({args.pumer_mode})", args.pumer)] if args.pumer else [])
    for name, pumer in variants:
        variant = patch(copy.deepcopy(model), pumer, args.pumer_mode).to(accelerator.device).eval()
        scorer = _scorer(variant, split, accelerator, args)
        folder = Path(args.output) / "scores" / _slug(name)
        meta = {**base_meta, "variant": name}
        mask, first_stats = None, None
        if args.rerank_top is not None:
            cheap = patch(copy.deepcopy(model), args.rerank_pumer, args.pumer_mode).to(accelerator.device).eval()
            first, first_stats = score_matrix(accelerator, _scorer(cheap, split, accelerator, args), n_images,
                                              n_captions, folder / "first-pass",
                                              meta={**base_meta, "variant": f"first pass {args.rerank_pumer}"},
                                              desc=f"{name}: first pass", **tiles)
            mask = shortlist(first, args.rerank_top)
            del cheap
        matrix, stats = score_matrix(accelerator, scorer, n_images, n_captions, folder, meta=meta, mask=mask,
                                     desc=name, **tiles)
        metrics = recall(matrix, split.caption_image)
        row: dict[str, Any] = {"variant": name, "pumer": pumer, **metrics, "images": n_images, "captions": n_captions,
                               "pairs": stats.pairs, "pairs_scored_now": stats.scored_now,
                               "pairs_per_s": stats.pairs_per_second, "seconds": stats.seconds,
                               "prepare_seconds": stats.prepare_seconds, "tiles_skipped": stats.tiles_skipped,
                               **_pair_gflops(variant, split, scorer, accelerator.device)}
        if isinstance(scorer, CachedMeterScorer):
            row.update(scorer.cache_bytes())
        if first_stats is not None:
            row.update(rerank_top=args.rerank_top, rerank_pumer=args.rerank_pumer, first_pass_pairs=first_stats.pairs,
                       first_pass_seconds=first_stats.seconds)
        rows.append(row)
        if accelerator.is_main_process:
            torch.save(matrix, folder / "scores.pt")
        logger.info("%s: TR@1 %.4f IR@1 %.4f RSUM %.2f, %.1f pairs/s, %.3f GFLOPs/pair", name, metrics["tr_r1"],
                    metrics["ir_r1"], metrics["rsum"], stats.pairs_per_second, row["gflops_per_pair"])
        del variant, scorer
    report: dict[str, Any] = {"task": "retrieval", "dataset": data.dataset, "model": args.model, "split": args.split,
                              "image_size": args.image_size, "text_length": args.text_length,
                              "processes": accelerator.num_processes, "approximate": args.rerank_top is not None,
                              "tie_rule": "rank = 1 + #(wrong items scoring >= the best true item)", "rows": rows}
    if accelerator.is_main_process:
        write_report(Path(args.output), report, markdown_table(report))
    return report


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per variant: TR and IR R@1/5/10 and RSUM (percent), pairs/s, GFLOPs per pair, pairs."""
    head = "| variant | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | RSUM | pairs/s | GFLOPs/pair | pairs |"
    lines = [head, "|---|" + "---:|" * 10]
    for r in report["rows"]:
        recalls = " | ".join(f"{100 * r[k]:.2f}" for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"))
        lines.append(f"| {r['variant']} | {recalls} | {r['rsum']:.2f} | {r['pairs_per_s']:.1f} | "
                     f"{r['gflops_per_pair']:.3f} | {r['pairs']} |")
    if report.get("approximate"):
        lines.append("\nApproximate: exact scores only for the first pass's shortlist (--rerank-top).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.retrieval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="finetune with a preset (the best checkpoint on the val proxy is kept)")
    e = sub.add_parser("eval", help="IR / TR recall over every pair of a split, with and without --pumer")
    for q in (t, e):
        add_common_args(q, RETRIEVAL)
        q.add_argument("--dataset", choices=DATASETS, help="[train: the preset's; eval: the one DATA holds]")
        q.add_argument("--limit-images", dest="limit", type=int, help="first N images of each split (smoke runs)")
    add_train_args(t, RETRIEVAL)
    t.add_argument("--negatives", type=int, default=15, help="captions of other images per image [15]")
    add_eval_args(e, RETRIEVAL, default_split="test", output_help="folder for eval.json / eval.md and scores/")
    e.add_argument("--pair-batch", type=int, default=256, help="pairs scored per forward [256]")
    e.add_argument("--tile-images", type=int, default=32, help="score-matrix tile height: images [32]")
    e.add_argument("--tile-captions", type=int, default=2048, help="score-matrix tile width: captions [2048]")
    e.add_argument("--no-cache", action="store_true", help="METER: run the whole model per pair (no feature cache)")
    e.add_argument("--rerank-top", type=int, help="approximate: exact scores only for each query's K best first-pass "
                                                  "candidates [off]")
    e.add_argument("--rerank-pumer", help="the first pass: the model under this PuMer config (with --rerank-top)")
    return finish_args(p.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    with logging_redirect_tqdm():
        if args.command == "train":
            train(args)
        else:
            print(markdown_table(evaluate(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
