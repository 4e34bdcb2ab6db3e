"""Named training presets: the paper's hyperparameters per model and task (``docs/design.md``, "Tasks").

``--preset vilt-vqa`` picks one; any field can be overridden on the command line. PuMer presets
start from the pretrained checkpoint, reduce while training, and distil from the finetuned,
unreduced model (``--teacher``, required because it is the output of the non-PuMer preset).

Retrieval (``recipes.tasks.retrieval``; the research code has none, so these are ours): the retrieval
finetuning configs of ViLT (``task_finetune_irtr_{f30k,coco}``: lr 1e-4, batch 256, 10 epochs, no
learning-rate multiplier) and METER (``task_finetune_irtr_{f30k,coco}_clip_bert``: lr 5e-6, batch
512, 10 epochs, heads and cross-modal layers x5; its head list names ``itm_score``, not
``rank_output``), 15 negative captions per image, ITM weight 0.5, RandAugment, images at 384, text 40
(checked against both repositories' ``config.py``).
``total_batch`` counts images (each with 16 captions). Evaluation on val about once per epoch
(Flickr30k: 29k training images; COCO: 113k with restval). No distillation (retrieval has no
finetuned teacher to distil from); the ``-pumer`` presets reduce while training with the VQA configs of the released
checkpoints. ``model`` is None: start from a pretraining checkpoint with its ITM head (ViLT: the
original ``vilt_200k_mlm_itm.ckpt`` through ``convert_vilt --head irtr``; METER: PuMer's
pretrained folder), whose ITM "match" row starts ``rank_output``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["LossScale", "Preset", "PRESETS", "get_preset"]

LossScale = Literal["label_count", "mean"]


@dataclass(frozen=True)
class Preset:
    """One run's recipe. ``total_batch`` is examples per optimizer step over all processes (the CLI
    derives gradient accumulation from it); ``loss_scale`` is the VQA loss scale (see ``recipes.tasks.vqa``).
    ``dataset``: which dataset of a data folder the task trains on (retrieval: ``flickr30k`` or
    ``coco``; None for a folder of one); ``negatives``: captions of other images per training image
    (retrieval)."""

    family: str
    task: str
    model: str | None
    lr: float
    total_batch: int
    epochs: float
    eval_every: int
    image_size: int
    text_length: int
    lr_multipliers: Mapping[str, float] = field(default_factory=dict)
    loss_scale: LossScale = "label_count"
    weight_decay: float = 0.01
    warmup: float = 0.1
    end_lr: float = 1e-7
    patience: int = 15
    pumer: str | None = None
    pumer_mode: Literal["reference", "default"] = "reference"
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    dataset: str | None = None
    negatives: int | None = None


_VILT_VQA = Preset(family="vilt", task="vqa", model="dandelin/vilt-b32-mlm", lr=1e-4, total_batch=512, epochs=10,
                   eval_every=800, image_size=384, text_length=32, lr_multipliers={"*classifier*": 10.0},
                   loss_scale="label_count")
# METER's checkpoint is PuMer's pretrained folder (no hub id): --model is required
_METER_VQA = Preset(family="meter", task="vqa", model=None, lr=5e-6, total_batch=256, epochs=10, eval_every=2000,
                    image_size=384, text_length=32, lr_multipliers={"*classifier*": 50.0, "*cross_modal*": 5.0},
                    loss_scale="mean")

# SNLI-VE and NLVR2: cross-entropy, so ``loss_scale`` plays no part. ViLT's NLVR2 starts from the hub's
# MLM checkpoint with its token types grown to 3 (the second image's row copies the first's)
_VILT_VE = Preset(family="vilt", task="snli_ve", model="dandelin/vilt-b32-mlm", lr=1e-4, total_batch=512, epochs=20,
                  eval_every=800, image_size=384, text_length=40, lr_multipliers={"*classifier*": 10.0})
_VILT_NLVR2 = Preset(family="vilt", task="nlvr2", model="dandelin/vilt-b32-mlm", lr=1e-4, total_batch=256, epochs=10,
                     eval_every=300, image_size=384, text_length=40, lr_multipliers={"*classifier*": 10.0})
_METER_VE = Preset(family="meter", task="snli_ve", model=None, lr=2e-6, total_batch=192, epochs=10, eval_every=2500,
                   image_size=384, text_length=40, lr_multipliers={"*classifier*": 10.0, "*cross_modal*": 5.0})
_METER_NLVR2 = Preset(family="meter", task="nlvr2", model=None, lr=5e-6, total_batch=96, epochs=10, eval_every=800,
                      image_size=288, text_length=40, lr_multipliers={"*classifier*": 50.0, "*cross_modal*": 5.0})

# retrieval (module docstring): total_batch counts images; evaluation about once an epoch, i.e. every
# len(train images) / total_batch steps (Flickr30k 29k images, COCO 113k with restval)
_VILT_IRTR = Preset(family="vilt", task="retrieval", model=None, lr=1e-4, total_batch=256, epochs=10,
                    eval_every=113, image_size=384, text_length=40, dataset="flickr30k", negatives=15)
_METER_IRTR = Preset(family="meter", task="retrieval", model=None, lr=5e-6, total_batch=512, epochs=10,
                     eval_every=56, image_size=384, text_length=40,
                     lr_multipliers={"*itm_score*": 5.0, "*cross_modal*": 5.0}, dataset="flickr30k", negatives=15)
_VILT_IRTR_COCO = dataclasses.replace(_VILT_IRTR, eval_every=442, dataset="coco")
_METER_IRTR_COCO = dataclasses.replace(_METER_IRTR, eval_every=221, dataset="coco")

# the PuMer configs of the research code's released checkpoints (its README), one per model and task;
# retrieval has none released: its -pumer presets use the VQA configs, without a teacher
PRESETS: dict[str, Preset] = {
    "vilt-vqa": _VILT_VQA,
    "vilt-vqa-pumer": dataclasses.replace(_VILT_VQA, epochs=20, pumer="p0.1-r0.3-t0.2-258", distill_weight=1.0),
    "meter-vqa": _METER_VQA,
    "meter-vqa-pumer": dataclasses.replace(_METER_VQA, epochs=20, pumer="p0.2r0.2t0.2-0246", distill_weight=1.0),
    "vilt-ve": _VILT_VE,
    "vilt-ve-pumer": dataclasses.replace(_VILT_VE, pumer="p0.1r0.3t0.2-2468", distill_weight=1.0),
    "meter-ve": _METER_VE,
    "meter-ve-pumer": dataclasses.replace(_METER_VE, epochs=20, pumer="p0.3r0.5t0.2-0246", distill_weight=1.0),
    "vilt-nlvr2": _VILT_NLVR2,
    "vilt-nlvr2-pumer": dataclasses.replace(_VILT_NLVR2, pumer="p0.1r0.3t0.2-258", distill_weight=1.0),
    "meter-nlvr2": _METER_NLVR2,
    "meter-nlvr2-pumer": dataclasses.replace(_METER_NLVR2, epochs=20, pumer="p0.3r0.5t0.2-246", distill_weight=1.0),
    "vilt-retrieval-flickr": _VILT_IRTR,
    "vilt-retrieval-flickr-pumer": dataclasses.replace(_VILT_IRTR, pumer="p0.1-r0.3-t0.2-258"),
    "vilt-retrieval-coco": _VILT_IRTR_COCO,
    "vilt-retrieval-coco-pumer": dataclasses.replace(_VILT_IRTR_COCO, pumer="p0.1-r0.3-t0.2-258"),
    "meter-retrieval-flickr": _METER_IRTR,
    "meter-retrieval-flickr-pumer": dataclasses.replace(_METER_IRTR, pumer="p0.2r0.2t0.2-0246"),
    "meter-retrieval-coco": _METER_IRTR_COCO,
    "meter-retrieval-coco-pumer": dataclasses.replace(_METER_IRTR_COCO, pumer="p0.2r0.2t0.2-0246"),
}


def get_preset(name: str, **overrides: object) -> Preset:
    """``PRESETS[name]`` with the fields in ``overrides`` that are not None replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(Preset)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"presets have no fields {sorted(unknown)}; fields: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
