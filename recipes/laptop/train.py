"""The laptop study as a task on the engine: cross-entropy (optionally distilled) training, accuracy."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from packaging.version import Version
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from recipes.engine import Engine, FitConfig
from recipes.laptop.config import TrainConfig
from recipes.laptop.data import SampledBatches, Split, SplitDataset
from recipes.laptop.vlm import VlmDataset, VlmSplit, VlmTask
from recipes.tasks.classification import ImageTextCall

__all__ = ["EasyVqaTask", "train", "predict", "accuracy"]

logger = logging.getLogger(__name__)


class EasyVqaTask(ImageTextCall):
    """The engine's ``Task`` for easy-vqa: ``task_weight x`` cross-entropy on the answer index; accuracy.

    With distillation the engine adds ``w x KL``; the study's loss is ``(1 - w) CE + w KL``, so
    ``task_weight = 1 - w`` then.
    """

    def __init__(self, task_weight: float = 1.0) -> None:
        self.task_weight = task_weight

    def loss(self, outputs: Any, batch: Mapping[str, Tensor]) -> Tensor:
        loss = F.cross_entropy(outputs.logits, batch["label"])
        return loss if self.task_weight == 1.0 else self.task_weight * loss

    def eval_outputs(self, outputs: Any, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"index": batch["index"], "prediction": outputs.logits.argmax(-1), "label": batch["label"]}

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        return {"score": accuracy(outputs["prediction"], outputs["label"])}


def train(
    model: nn.Module,
    data: Split | VlmSplit,
    cfg: TrainConfig,
    *,
    seed: int,
    val: Split | VlmSplit | None = None,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.0,
    eval_batch_size: int = 64,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` (patched or not) in place on the engine, optionally distilled from ``teacher``.

    The study's schedule: AdamW (0.9, 0.98), linear warm-up then linear decay to 0, gradient norm
    clipped at 1 (from scratch at lr 1e-3: keeps early steps sane), batches drawn with replacement
    (``SampledBatches``), validation accuracy every epoch, the final weights kept (no early stop,
    no checkpoints: the study caches the result itself). Returns the final validation accuracy,
    the final running loss and the wall time. A ``VlmSplit`` trains the VLM (``VlmTask``: teacher
    forcing on the answer; validation scores its teacher-forced exact match).
    """
    vlm = isinstance(data, VlmSplit)
    labels = data.split.label if vlm else data.label
    dataset = VlmDataset if vlm else SplitDataset
    if vlm and teacher is not None and distill_weight > 0:
        raise ValueError("the VLM trains on its answers alone: pass no teacher (distill_weight 0)")
    steps = max(1, math.ceil(cfg.epochs * len(data) / cfg.batch_size))
    per_epoch = math.ceil(len(data) / cfg.batch_size)
    distill = teacher is not None and distill_weight > 0
    # fused: one kernel over all parameters; the 30,522-row word embedding is most of them (only a few
    # dozen rows ever occur in easy-vqa) and the default per-tensor update spends a fifth of a step on it
    fused = Version(torch.__version__.split("+")[0]) >= Version("2.4")  # fused AdamW on CPU since 2.4
    with tempfile.TemporaryDirectory() as scratch:
        fit_cfg = FitConfig(
            output_dir=Path(scratch), lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, end_lr=0.0,
            max_steps=steps, eval_every=per_epoch, patience=steps + 1, clip_grad=1.0,
            distill_weight=distill_weight if distill else 0.0, progress=progress, checkpoint=False, fused=fused,
            name=desc, log_every=steps + 1,
        )
        accelerator = Accelerator(cpu=True)
        sampler = SampledBatches(labels, cfg.batch_size, steps, cfg.answer_balance, seed)
        # generators for the loaders: their per-iteration seeds must not come from (and advance) torch's
        # global RNG, which ViLT's patch sampling draws from (the study's results would change with them)
        loader = DataLoader(dataset(data), batch_sampler=sampler, generator=torch.Generator().manual_seed(seed))
        val_loader = None if val is None else DataLoader(dataset(val), batch_size=eval_batch_size,
                                                         generator=torch.Generator().manual_seed(seed))
        task = VlmTask(data.prompt_length) if vlm else EasyVqaTask(1.0 - distill_weight if distill else 1.0)
        engine, loader, val_loader = Engine.prepare(accelerator, model, task, fit_cfg, loader, val_loader,
                                                    teacher=teacher if distill else None)
        logger.info("%s: %d steps (%.2g epochs of %d questions), batch %d, lr %g%s", desc, steps, cfg.epochs,
                    len(data), cfg.batch_size, cfg.lr, f", distilled (weight {distill_weight:g})" if distill else "")
        start = time.perf_counter()
        state = engine.fit(loader, val_loader)
        seconds = time.perf_counter() - start
    model.eval()
    val_acc = state.history[-1]["score"] if state.history else None
    logger.info("%s: done in %.1f s", desc, seconds)
    return {"steps": steps, "seconds": seconds, "final_loss": state.loss, "val_accuracy": val_acc}


@torch.inference_mode()
def predict(model: nn.Module, data: Split, batch_size: int, *, desc: str = "eval", progress: bool = True) -> Tensor:
    """Predicted answer indices (Q,) for every question of ``data``."""
    model.eval()
    batches = data.batches(batch_size)
    out = [model(**data.inputs(idx)).logits.argmax(-1)
           for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch", dynamic_ncols=True)]
    return torch.cat(out)


def accuracy(pred: Tensor, label: Tensor) -> float:
    return (pred == label).float().mean().item()
