"""The laptop study's configuration: model, training, reduction, and the whole run (cache keys)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["IMAGE_SIZE", "CACHE_VERSION", "ModelConfig", "MeterModelConfig", "VlmModelConfig", "TrainConfig",
           "ReduceConfig", "MeterStudyConfig", "VlmStudyConfig", "StudyConfig", "QUICK"]

IMAGE_SIZE = 64  # every easy-vqa image is 64 x 64 RGB


CACHE_VERSION = 2  # bump when training code changes in a way that invalidates cached weights (2: the ten-minute budget)


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
class MeterModelConfig:
    """The METER trained from scratch beside the ViLT: both towers, the fusion and the heads at width 64.

    A CLIP-style image tower (patch 8: 64 patches + [CLS], QuickGELU, pre-LN), a RoBERTa-style text
    encoder (post-LN, on the ViLT's BERT WordPiece vocabulary: pad id 0, not RoBERTa's 1), and fusion
    blocks of a text and an image layer each (self-attention, cross-attention, FFN); every MLP 4x wide.
    Two layers per tower and two fusion blocks: the two-stream model already costs about twice the
    ViLT's time per update, and the study's whole default run aims at 15 minutes on two cores.
    """

    hidden: int = 64
    heads: int = 4
    vision_layers: int = 2
    text_layers: int = 2
    fusion_blocks: int = 2
    patch: int = 8


@dataclass(frozen=True)
class VlmModelConfig:
    """The LLaVA-style VLM trained from scratch: a CLIP tower, LLaVA's two-layer projector, a Llama.

    The tower (patch 8, pre-LN) gives 64 patch features per image (LLaVA drops its [CLS]) from its
    last layer; the projector maps them into the Llama's width; the Llama (grouped-query attention,
    ``kv_heads`` key heads, rotary positions) reads ``[CLS] <64 visual tokens> question [SEP]`` and
    generates the answer's word pieces and ``[SEP]``. Width 64 as the other two models.
    """

    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 4
    intermediate: int = 256
    vision_layers: int = 2
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

    epochs: float = 3.0
    # more updates per second than 64 on two cores; the skills need updates, not examples (batch 64 at
    # lr 2e-3 reached 83% test accuracy after 3 epochs, under the 85% this study keeps)
    batch_size: int = 32
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
class MeterStudyConfig:
    """The METER half of the study: its model, training, PuMer in the fusion blocks, ToMe in the tower.

    ``reduce.layers`` index fusion blocks: PuMer at block 0 prunes and merges the image states that
    leave the tower, so every fusion image layer runs on the survivors. ``encoder_merge`` is ToMe's r
    per block of the CLIP tower (``encoder_merge_schedule``). Each reduced variant (PuMer, the tower's
    ToMe, both) is also finetuned with its reduction on, distilled from the unpatched METER.

    Trained 1 epoch (the ViLT 3) and finetuned a quarter epoch, only with both reductions on
    (``finetuned``), to keep the default run within its ten minutes (README gives the measured run
    time); a METER step costs about what a ViLT step does, and more epochs buy accuracy.
    """

    model: MeterModelConfig = field(default_factory=MeterModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0))
    reduce: ReduceConfig = field(default_factory=ReduceConfig)
    encoder_merge: int = 16
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0.25))
    finetuned: tuple[str, ...] = ("pumer+tower-tome",)  # reductions also finetuned ("pumer", "tower-tome", ...)


@dataclass(frozen=True)
class VlmStudyConfig:
    """The VLM third of the study: a LLaVA-style model that generates the answer, and its reductions.

    ``budgets``: the visual tokens kept, as divisors of the 64 (4: a quarter, 16 tokens). At each
    budget: PuMer in the LLM at decoder layer ``reduce_layer`` (prune to twice the budget by the
    prompt's attention, then merge half the survivors), the same before the LLM (``where="input"``),
    FastV's rule (the last prompt token's attention, pruning only), merging only (half per layer
    from ``reduce_layer`` on, as many layers as the budget needs) and a random keep before the LLM.
    ``finetuned``: the variants also finetuned (``<variant>-<budget>``, e.g. ``"pumer-llm-4"``), on
    the answers alone. ``test_images``: the VLM is scored on the first N test images (generation
    costs a few forwards per question); None: those of the study.
    """

    model: VlmModelConfig = field(default_factory=VlmModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.25))
    reduce_layer: int = 1
    budgets: tuple[int, ...] = (4, 8)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0.25))
    finetuned: tuple[str, ...] = ("pumer-llm-4",)
    test_images: int | None = 300


@dataclass(frozen=True)
class StudyConfig:
    """Everything one run does; the parts that shape trained weights key the cache."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reduce: ReduceConfig = field(default_factory=ReduceConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0.25))
    meter: MeterStudyConfig | None = field(default_factory=MeterStudyConfig)  # None: no METER
    vlm: VlmStudyConfig | None = field(default_factory=VlmStudyConfig)  # None: no VLM
    distill_weight: float = 0.5  # KL to the unpatched model's logits; 0 trains on the labels alone
    val_fraction: float = 0.1  # of the training images, held out for validation
    train_images: int | None = None  # first N training images only (``--quick``); None = all 4,000
    test_images: int | None = 500  # first N test images only (about 4,800 questions); None = all 1,000
    # evaluation and timing at batch 256: at width 64 a batch of 64 is mostly per-operation overhead,
    # whose share (and so the speedups) moves with the machine's load
    eval_batch_size: int = 256
    timing_batches: int = 2
    timing_rounds: int = 7
    timing_warmup: int = 1
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

    def meter_key(self, vocabulary: Mapping[str, int]) -> str:
        """Cache key of the trained METER (the ViLT's keys leave METER out, so they never change with it)."""
        if self.meter is None:
            raise ValueError("this study has no METER (meter=None)")
        return _digest(
            {
                "version": CACHE_VERSION,
                "vocabulary": _digest(vocabulary),
                "model": dataclasses.asdict(self.meter.model),
                "train": dataclasses.asdict(self.meter.train),
                "val_fraction": self.val_fraction,
                "train_images": self.train_images,
                "seed": self.seed,
            }
        )

    def vlm_key(self, vocabulary: Mapping[str, int]) -> str:
        """Cache key of the trained VLM (its settings move no other model's keys)."""
        if self.vlm is None:
            raise ValueError("this study has no VLM (vlm=None)")
        return _digest(
            {
                "version": CACHE_VERSION,
                "vocabulary": _digest(vocabulary),
                "model": dataclasses.asdict(self.vlm.model),
                "train": dataclasses.asdict(self.vlm.train),
                "val_fraction": self.val_fraction,
                "train_images": self.train_images,
                "seed": self.seed,
            }
        )

    def vlm_finetune_key(self, patch: Mapping[str, Any]) -> str:
        """Cache key of a VLM finetuned with ``patch`` (a variant's reduction) on."""
        if self.vlm is None:
            raise ValueError("this study has no VLM (vlm=None)")
        return _digest({"patch": dict(patch), "finetune": dataclasses.asdict(self.vlm.finetune)})

    def meter_finetune_key(self, patch: Mapping[str, Any]) -> str:
        """Cache key of a METER finetuned with ``patch`` (``pumer_patch.apply`` arguments) on."""
        if self.meter is None:
            raise ValueError("this study has no METER (meter=None)")
        return _digest(
            {
                "patch": dict(patch),
                "finetune": dataclasses.asdict(self.meter.finetune),
                "distill_weight": self.distill_weight,
            }
        )


def _digest(obj: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


QUICK = StudyConfig(
    train=TrainConfig(epochs=1.0),
    finetune=TrainConfig(epochs=0.2),
    # one layer per tower (two fusion blocks still): METER's share of the smoke run stays small
    meter=MeterStudyConfig(model=MeterModelConfig(vision_layers=1, text_layers=1), train=TrainConfig(epochs=0.5),
                           finetune=TrainConfig(epochs=0.1)),
    vlm=VlmStudyConfig(model=VlmModelConfig(vision_layers=1), train=TrainConfig(epochs=0.5),
                       finetune=TrainConfig(epochs=0.1), test_images=20),
    train_images=200,
    test_images=40,
    eval_batch_size=32,
    timing_batches=2,
    timing_rounds=2,
    timing_warmup=1,
    figure_examples=3,
)
