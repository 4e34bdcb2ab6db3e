"""Image-text retrieval (Flickr30k, COCO; Karpathy splits) on the engine: finetune, and evaluate every pair.

    python -m recipes retrieval train --preset meter-retrieval-flickr --model PRETRAINED --data DATA \\
        --output runs/meter-f30k
    python -m recipes retrieval eval  --model runs/meter-f30k/best --data DATA --dataset flickr30k --split test \\
        --output runs/meter-f30k/eval --pumer p0.2r0.2t0.2-0246

``DATA`` is what ``recipes.prepare.convert_retrieval`` writes (``recipes.tasks.retrieval.data``).

**Training.** An epoch walks the images. Image ``i`` in epoch ``e`` gets one of its own captions
and ``--negatives`` (15) captions of 15 other distinct images, all drawn by
``numpy.random.default_rng([seed, e, i])``: reproducible, independent of the number of processes,
workers or a resume, and different each epoch. The model scores the 16 pairs (``rank_output``);
the loss is the cross-entropy of the true caption over the 16 scores plus 0.5 x the ITM
cross-entropy on two pairs per image: the true one ("match") and the *first* negative ("no
match"), a uniformly drawn one, so that ITM sees as many matches as mismatches as in ViLT's ITM.
METER encodes each image once for its 16 pairs. Validation during training is a cheap proxy on the
val split: the fraction of images whose true caption outscores (ties count against) 15 fixed
negatives (a negative with the true caption's text ties it), and ITM accuracy; the full recall comes
from ``eval``.

**Evaluation** (``recipes.tasks.retrieval.scoring``): every image against every caption of the
split, IR and TR R@1/5/10 with ties counting against the model, pairs scored in batches of ``--pair-batch``,
tiles of the score matrix shared out over processes and saved as they finish (a rerun with the
same ``--output`` skips finished tiles), METER on cached unimodal features (``--no-cache`` runs
the whole model per pair). ``--rerank-top K --rerank-pumer CONFIG`` is the approximate shortlist
mode: the model under a strong PuMer config scores every pair first. Identical captions are scored
once per image (``scoring.distinct_texts``), so they tie exactly whatever ``--pair-batch``.
``--on-bad-image skip`` is refused: recall ranks every image against every caption. ``eval.json`` /
``eval.md`` compare the unpatched model with ``--pumer``: recall, pairs/s and speedup (the models
alone on the first tile's pair batches, interleaved: ``recipes.engine.interleaved_seconds``),
GFLOPs per pair (whole model; for cached METER also the fusion alone, what a pair costs on the
cache), the tokens after each reducing layer.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

import pumer_patch
from pumer_patch import token_sizes
from pumer_patch.flops import gflops_per_example
from recipes.engine import Timing, interleaved_seconds
from recipes.data.loader import EpochKeySampler
from recipes.data.records import RETRIEVAL_SPLITS
from recipes.data.store import ImageStore
from recipes.models import Family
from recipes.run import (
    EvalRun,
    Inputs,
    TaskContext,
    TaskSpec,
    TrainRun,
    load_for_eval,
    make_accelerator,
    model_image_size,
    notes,
    patch,
    reduction_of,
    timing_fields,
    timing_note,
    variants_of,
    write_report,
)
from recipes.tasks.classification import ImageTextCall
from recipes.tasks.retrieval.data import CandidateGroups, RetrievalData, SplitData
from recipes.tasks.retrieval.models import CandidateScorer, RetrievalOutput
from recipes.tasks.retrieval.scoring import (
    CachedMeterScorer,
    CachedPairHead,
    FullPairScorer,
    distinct_texts,
    fingerprint,
    recall,
    score_matrix,
    shortlist,
    weights_digest,
)

__all__ = ["ITM_WEIGHT", "RETRIEVAL", "RetrievalTask", "PairScoring", "candidate_set", "evaluate", "markdown_table"]

logger = logging.getLogger("recipes.retrieval")

ITM_WEIGHT = 0.5


class RetrievalTask(ImageTextCall):
    """The engine's task on ``CandidateScorer``'s outputs: ``logits`` (B, K) rank scores, ``itm_logits`` (B, K, 2).

    loss = CE(true caption among the K rank scores) + 0.5 x CE_ITM over two pairs per image (the
    true one, target 1; the first negative, target 0), averaged over valid images.
    """

    def __init__(self, itm_weight: float = ITM_WEIGHT) -> None:
        self.itm_weight = itm_weight

    @classmethod
    def from_context(cls, context: TaskContext) -> RetrievalTask:
        return cls()

    def loss(self, outputs: RetrievalOutput, batch: Mapping[str, Tensor]) -> Tensor:
        rank_logits, itm_logits = outputs.logits.float(), outputs.itm_logits.float()
        b = rank_logits.shape[0]
        rank = F.cross_entropy(rank_logits, torch.zeros(b, dtype=torch.long, device=rank_logits.device),
                               reduction="none")
        pairs = itm_logits[:, :2]  # (B, 2 pairs, 2): the true caption, the first negative
        target = torch.tensor([1, 0], device=pairs.device).expand(b, 2)
        itm = F.cross_entropy(pairs.reshape(2 * b, 2), target.reshape(-1), reduction="none").view(b, 2).mean(1)
        valid = batch["valid"].float()
        return ((rank + self.itm_weight * itm) * valid).sum() / valid.sum().clamp_min(1.0)

    def eval_outputs(self, outputs: RetrievalOutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        scores = outputs.logits.float()  # (B, K)
        # a negative with the true caption's very text is a tie, whatever its slot made of the scores' last bits
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, K, T)
        same_text = ((ids[:, 1:] == ids[:, :1]) & (mask[:, 1:] == mask[:, :1])).all(-1)  # (B, K - 1)
        above = (scores[:, 1:] >= scores[:, :1]) | same_text
        first = above.sum(1) == 0  # ties count against: strictly above every negative
        itm = outputs.itm_logits[:, :2].float()  # (B, 2 pairs, 2 logits); a tie is wrong either way
        itm_correct = (itm[:, 0, 1] > itm[:, 0, 0]).long() + (itm[:, 1, 0] > itm[:, 1, 1]).long()
        return {"index": batch["index"], "first": first, "itm_correct": itm_correct, "valid": batch["valid"]}

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        keep = outputs["valid"].bool()
        n = int(keep.sum())
        return {"score": outputs["first"][keep].float().mean().item() if n else 0.0,
                "itm_accuracy": outputs["itm_correct"][keep].float().sum().item() / (2 * n) if n else 0.0,
                "skipped_images": float((~keep).sum())}




def candidate_set(data: RetrievalData, split: str, inputs: Inputs, run: TrainRun, *, train: bool) -> CandidateGroups:
    """A split's training (or proxy validation) groups: each image with 1 + the preset's ``negatives`` captions
    (validation: at most one caption of every other image)."""
    negatives = run.preset.negatives
    if negatives is None:
        raise ValueError(f"preset {run.preset_name!r} sets no negatives: pass --negatives N")
    images = SplitData(data.records(split, inputs.limit), ImageStore(data.store_path), inputs.tokenizer,
                       family=inputs.family, image_size=inputs.image_size, text_length=inputs.text_length, train=train)
    if not train:
        negatives = min(negatives, len(images.records) - 1)
    return CandidateGroups(images, negatives=negatives, seed=run.seed, on_bad_image=inputs.on_bad_image)


RETRIEVAL = TaskSpec(name="retrieval", title="Image-text retrieval", metric="group R@1", data=RetrievalData,
                     make_task=RetrievalTask.from_context, splits=RETRIEVAL_SPLITS, train_split="train",
                     eval_split="val", text_length=40, converter="recipes.prepare.convert_retrieval",
                     split_set=candidate_set, train_sampler=EpochKeySampler, wrap_model=CandidateScorer,
                     distills=False)


# ---------------------------------------------------------------------------------------- eval


@dataclass(frozen=True)
class PairScoring:
    """How ``evaluate`` scores every pair: ``pair_batch`` pairs per forward, tiles of ``tile_images`` x
    ``tile_captions``, METER on cached unimodal features (``cache``), and the approximate shortlist
    (``rerank_top`` K best candidates of a first pass by the model under ``rerank_pumer``)."""

    pair_batch: int = 256
    tile_images: int = 32
    tile_captions: int = 2048
    cache: bool = True
    rerank_top: int | None = None
    rerank_pumer: str | None = None

    def __post_init__(self) -> None:
        if self.rerank_top is not None and self.rerank_pumer is None:
            raise ValueError("--rerank-top needs --rerank-pumer CONFIG, the cheap first pass (e.g. p0.5r0.5t0.5-0246)")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def _scorer(model: nn.Module, family: Family, split: SplitData, texts: Tensor, accelerator: Accelerator,
            run: EvalRun, scoring: PairScoring) -> FullPairScorer | CachedMeterScorer:
    """The pair scorer over the split's images and its distinct texts (``texts``: (U,) a caption of each)."""
    cls = CachedMeterScorer if family.name == "meter" and scoring.cache else FullPairScorer
    return cls(model, split.images, split.input_ids[texts], split.attention_mask[texts], accelerator,
               batch=run.launch.eval_batch, workers=run.launch.workers)


def _timed_pass(scorer: FullPairScorer | CachedMeterScorer, images: int, texts: int, scoring: PairScoring,
                run: EvalRun, device: torch.device) -> tuple[Callable[[], None], int]:
    """One timed pass of a scorer: its first ``timing_batches`` pair batches of the first tile, inputs
    readied (decoded, encoded, moved) before; returns the pass and its pairs."""
    h, w = min(scoring.tile_images, images), min(scoring.tile_captions, texts)
    fn = scorer.tile(range(h), range(w))
    n = min(h * w, run.timing_batches * scoring.pair_batch)
    r = (torch.arange(n) // w).to(device)  # row-major pairs of the tile, as score_matrix takes them
    c = (torch.arange(n) % w).to(device)
    batches = [(r[j:j + scoring.pair_batch], c[j:j + scoring.pair_batch]) for j in range(0, n, scoring.pair_batch)]

    def one_pass() -> None:
        for rb, cb in batches:
            fn(rb, cb)

    return one_pass, n


def _tokens_per_layer(model: nn.Module, one_pass: Callable[[], None]) -> list[dict[str, int]] | None:
    """The trace of a patched model's last forward in ``one_pass`` (None unpatched)."""
    if not pumer_patch.is_patched(model):
        return None
    with torch.no_grad(), pumer_patch.recording(model) as traces:
        one_pass()
    return [{"layer": c.layer, "image": c.image, "text": c.text} for t in traces[-1:] for c in t.counts]


def _pair_gflops(model: nn.Module, split: SplitData, scorer: FullPairScorer | CachedMeterScorer,
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
                sizes = token_sizes(image)
                text = meter.encode_text(inputs["input_ids"], inputs["attention_mask"])
            cached = {"text": text, "attention_mask": inputs["attention_mask"], "image": image}
            if sizes is not None:
                cached["image_sizes"] = sizes
            out["gflops_per_pair_cached"] = gflops_per_example(CachedPairHead(model), cached)
    return out


def evaluate(run: EvalRun, scoring: PairScoring) -> dict[str, Any]:
    """Recall over every pair of a split, unpatched and with ``--pumer``, side by side: eval.json + eval.md.

    Identical captions are scored once per image (``distinct_texts``). The speed columns come from
    ``recipes.engine.interleaved_seconds`` on the first tile's first pair batches of each variant,
    their inputs ready in device memory; the scoring passes' own wall time is ``seconds``.
    """
    if run.launch.on_bad_image != "error":
        raise ValueError("--on-bad-image skip does not apply to retrieval eval: recall ranks every image against "
                         "every caption, and leaving images out would change what it measures; rewrite the store "
                         "with python -m recipes.prepare.convert_retrieval (it decode-checks every image)")
    data = RetrievalData(run.launch.data, run.dataset)
    data.check([run.split])
    accelerator = make_accelerator(run.launch)
    main = accelerator.is_main_process
    family, model, tokenizer = load_for_eval(RETRIEVAL, run, data)
    image_size = run.image_size or model_image_size(model)
    split = SplitData(data.records(run.split, run.launch.limit), ImageStore(data.store_path), tokenizer,
                      family=family, image_size=image_size, text_length=run.text_length, train=False)
    n_images, n_captions = split.sizes
    texts, text_of = distinct_texts(split.input_ids, split.attention_mask)
    n_texts = len(texts)
    if main:
        logger.info("%s %s: %d images x %d captions (%d distinct texts) = %d pairs", data.dataset, run.split,
                    n_images, n_captions, n_texts, n_images * n_captions)
    base_meta = {"model": str(Path(run.model).resolve()) if Path(run.model).exists() else run.model,
                 "data": fingerprint(ids=[r.img_id for r in split.records], captions=[r.captions for r in split.records]),
                 "weights": weights_digest(model),  # the weights themselves: a path can hold another model later
                 "image_size": image_size, "text_length": run.text_length,
                 "mixed_precision": run.launch.mixed_precision, "cached": scoring.cache}
    tiles = dict(tile_images=scoring.tile_images, tile_captions=scoring.tile_captions, pair_batch=scoring.pair_batch,
                 progress=run.launch.progress)
    rows: list[dict[str, Any]] = []
    variants = variants_of(run)
    # every variant patched before any is scored: a reduction that cannot apply fails before a tile is written
    models = {name: patch(copy.deepcopy(model), pumer, run.pumer_mode).to(accelerator.device).eval()
              for name, pumer in variants}
    cheap = None
    if scoring.rerank_top is not None:
        cheap = patch(copy.deepcopy(model), scoring.rerank_pumer, run.pumer_mode).to(accelerator.device).eval()
    for name, pumer in variants:
        variant = models[name]
        scorer = _scorer(variant, family, split, texts, accelerator, run, scoring)
        folder = run.output / "scores" / _slug(name)
        meta = {**base_meta, "variant": name}
        mask, first_stats = None, None
        if cheap is not None:
            first, first_stats = score_matrix(accelerator,
                                              _scorer(cheap, family, split, texts, accelerator, run, scoring),
                                              n_images, n_texts, folder / "first-pass",
                                              meta={**base_meta, "variant": f"first pass {scoring.rerank_pumer}"},
                                              desc=f"{name}: first pass", **tiles)
            mask = shortlist(first, scoring.rerank_top)
        distinct, stats = score_matrix(accelerator, scorer, n_images, n_texts, folder, meta=meta, mask=mask,
                                       desc=name, **tiles)
        matrix = distinct[:, text_of]  # (I, U) -> (I, C): identical captions share their text's column
        metrics = recall(matrix, split.caption_image)
        row: dict[str, Any] = {"variant": name, "pumer": pumer, "reduction": reduction_of(variant) if pumer else None,
                               **metrics, "images": n_images, "captions": n_captions,
                               "distinct_captions": n_texts, "pairs": stats.pairs, "pairs_scored_now": stats.scored_now,
                               "seconds": stats.seconds, "prepare_seconds": stats.prepare_seconds,
                               "tiles_skipped": stats.tiles_skipped,
                               **_pair_gflops(variant, split, scorer, accelerator.device)}
        if isinstance(scorer, CachedMeterScorer):
            row.update(scorer.cache_bytes())
        if first_stats is not None:
            row.update(rerank_top=scoring.rerank_top, rerank_pumer=scoring.rerank_pumer,
                       first_pass_pairs=first_stats.pairs, first_pass_seconds=first_stats.seconds)
        rows.append(row)
        if main:
            torch.save(matrix, folder / "scores.pt")
        del scorer  # its caches: the timing below needs only the first tile's
    del cheap

    # the speed: every variant's first pair batches, inputs ready, interleaved (no decoding, no loader start-up)
    passes, pairs = {}, 0
    for name, variant in models.items():
        scorer = _scorer(variant, family, split, texts, accelerator, run, scoring)
        passes[name], pairs = _timed_pass(scorer, n_images, n_texts, scoring, run, accelerator.device)
    seconds = interleaved_seconds(accelerator, passes, rounds=run.timing_rounds)
    pairs_all = pairs * accelerator.num_processes  # every process times the same pairs
    timings = {name: Timing(pairs_all, tuple(s), 1) for name, s in seconds.items()}
    base = timings["unpatched"]
    for row in rows:
        name = row["variant"]
        row.update(timing_fields(timings[name], base, unit="pairs"),
                   tokens_per_layer=_tokens_per_layer(models[name], passes[name]))
        if main:
            logger.info("%s: TR@1 %.4f IR@1 %.4f RSUM %.2f, %.1f pairs/s (x%.2f), %.3f GFLOPs/pair", name,
                        row["tr_r1"], row["ir_r1"], row["rsum"], row["pairs_per_s"], row["speedup"],
                        row["gflops_per_pair"])
    report: dict[str, Any] = {"task": "retrieval", "dataset": data.dataset, "model": run.model, "split": run.split,
                              "image_size": image_size, "text_length": run.text_length,
                              "processes": accelerator.num_processes, "approximate": scoring.rerank_top is not None,
                              "tie_rule": "rank = 1 + #(wrong items scoring >= the best true item); identical "
                                          "captions scored once per image",
                              "timing": timing_note(base, run, unit="pairs"), "rows": rows}
    if main:
        write_report(run.output, report, markdown_table(report))
    return report


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per variant: TR and IR R@1/5/10 and RSUM (percent), images and captions ranked, pairs/s,
    speedup, GFLOPs per pair, pairs scored; then what the speed measured and the tokens per layer."""
    head = ("| variant | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | RSUM | images | captions | pairs/s | speedup "
            "| GFLOPs/pair | pairs |")
    lines = [head, "|---|" + "---:|" * 13]
    for r in report["rows"]:
        recalls = " | ".join(f"{100 * r[k]:.2f}" for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"))
        lines.append(f"| {r['variant']} | {recalls} | {r['rsum']:.2f} | {r['images']} | {r['captions']} | "
                     f"{r['pairs_per_s']:.1f} | {r['speedup']:.2f}x | {r['gflops_per_pair']:.3f} | {r['pairs']} |")
    if report.get("approximate"):
        lines.append("\nApproximate: exact scores only for the first pass's shortlist (--rerank-top).")
    return "\n".join(lines + notes(report))


