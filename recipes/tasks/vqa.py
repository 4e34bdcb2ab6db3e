"""VQAv2 on the engine: finetune (optionally with PuMer), evaluate on val, predict test, compare.

    python -m recipes vqa train   --preset vilt-vqa --data DATA --output runs/vilt-vqa
    python -m recipes vqa eval    --model runs/vilt-vqa/best --data DATA --pumer p0.1-r0.3-t0.2-258
    python -m recipes vqa predict --model runs/vilt-vqa/best --data DATA --output predictions.json

``DATA`` is what ``recipes.prepare.convert_vqav2`` writes: ``vqav2_{train,val,test}.jsonl``, ``answers.json``,
``coco-trainval2014.lmdb``, ``coco-test2015.lmdb``.

Loss scale. The VQA loss is binary cross-entropy over the soft scores of every label. ViLT's code
(and Hugging Face's ``ViltForQuestionAnswering``) takes its mean over labels times the label count
(a per-example sum over labels); PuMer's METER takes the plain mean. The two differ by a factor of
3,129, which matters because distillation adds ``1.0 x KL`` on top: the paper's KL weight was tuned
against each code's own scale, so each preset keeps the scale of the code it reproduces
(``loss_scale``: ``label_count`` for ViLT, ``mean`` for METER). The loss is computed here, not by
the model, so both families follow the preset.

Metrics. ``score`` is the official VQA accuracy (the evaluation script's rules on the raw human
answers the records keep: ``recipes.tasks.vqa_answers.vqa_accuracy``); ``soft_score`` beside it is
ViLT's soft score, the training target's score of the predicted answer, which depends on how the
targets were counted (``convert_vqav2 --targets``). Questions none of whose human answers is in the
vocabulary stay in both, as in the official metric. The best checkpoint is chosen on ``score``.

Labels. Targets and predictions use the model's own ``id2label`` (matched to the data by answer
string): a finetuned checkpoint with another label order (``dandelin/vilt-b32-finetuned-vqa``) is
scored correctly, and answers outside its labels can never be predicted, as with any vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from recipes.data.dataset import ImageTextDataset, OnBadImage
from recipes.data.records import VqaRecord, read_jsonl
from recipes.data.store import ImageStore
from recipes.data.transforms import build_image_transform
from recipes.engine import EvalResult, evaluate
from recipes.models import Family
from recipes.presets import LossScale
from recipes.run import EvalRun, TaskContext, TaskSpec, open_eval_split, patch
from recipes.tasks.classification import ImageTextCall, check_split_files
from recipes.tasks.vqa_answers import vqa_accuracy, vqa_soft_score

__all__ = ["SPLITS", "VQA", "VqaTask", "VqaData", "predict"]

logger = logging.getLogger("recipes.vqa")

# split -> (annotations, image store) inside the data folder
SPLITS = {"train": ("vqav2_train.jsonl", "coco-trainval2014.lmdb"),
          "val": ("vqav2_val.jsonl", "coco-trainval2014.lmdb"),
          "test": ("vqav2_test.jsonl", "coco-test2015.lmdb")}


class VqaTask(ImageTextCall):
    """The engine's ``Task`` for VQA: soft-score BCE at the preset's scale; the official accuracy and
    ViLT's soft score of the argmax answer.

    labels: the model's answers in logit order; records: the evaluation split's, by dataset index.
    """

    def __init__(self, labels: Sequence[str], loss_scale: LossScale, records: Sequence[VqaRecord]) -> None:
        if loss_scale not in ("label_count", "mean"):
            raise ValueError(f"loss_scale must be 'label_count' or 'mean', got {loss_scale!r}")
        self.labels, self.loss_scale, self.records = list(labels), loss_scale, records

    @classmethod
    def from_context(cls, context: TaskContext) -> VqaTask:
        if context.labels is None:
            raise ValueError("VQA needs the model's answer labels")
        return cls(context.labels, context.loss_scale, context.records)

    def loss(self, outputs: Any, batch: Mapping[str, Tensor]) -> Tensor:
        logits = outputs.logits
        per_example = F.binary_cross_entropy_with_logits(logits.float(), batch["target"], reduction="none").mean(-1)
        valid = batch["valid"].float()  # (B,): examples whose image failed to decode weigh nothing
        loss = (per_example * valid).sum() / valid.sum().clamp_min(1.0)
        return loss * logits.shape[-1] if self.loss_scale == "label_count" else loss

    def eval_outputs(self, outputs: Any, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"index": batch["index"], "prediction": outputs.logits.argmax(-1), "valid": batch["valid"]}

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        """``score``: the official accuracy; ``soft_score``: ViLT's soft score (both NaN on a split
        without human answers, whose questions ``unlabelled`` counts); ``skipped_images``."""
        keep = outputs["valid"].bool()
        index, pred = outputs["index"][keep].tolist(), outputs["prediction"][keep].tolist()
        scored = [(self.labels[p], self.records[i]) for i, p in zip(index, pred) if self.records[i].labelled]
        counts = {"unlabelled": float(len(index) - len(scored)), "skipped_images": float((~keep).sum())}
        if not scored:
            return {"score": math.nan, "soft_score": math.nan, **counts}
        answers, records = [a for a, _ in scored], [r for _, r in scored]
        return {"score": vqa_accuracy(answers, [r.answers for r in records]),
                "soft_score": vqa_soft_score(answers, [r.label for r in records]), **counts}

    def answers(self, outputs: Mapping[str, Tensor]) -> list[dict[str, Any]]:
        """The official predictions format: ``[{question_id, answer}]`` in dataset order."""
        order = outputs["index"].argsort()
        return [{"question_id": self.records[i].qid, "answer": self.labels[p]}
                for i, p in zip(outputs["index"][order].tolist(), outputs["prediction"][order].tolist())]


class VqaData:
    """A data folder: the vocabulary and, per split, a dataset for a family's transform and tokenizer."""

    def __init__(self, root: Path, dataset: str | None = None) -> None:
        if dataset is not None:
            raise ValueError(f"{root} holds VQAv2 only; --dataset is for retrieval folders, got {dataset!r}")
        self.root = Path(root)
        answers = self.root / "answers.json"
        if not answers.is_file():
            raise FileNotFoundError(f"{answers} does not exist; write the data folder with python -m recipes.prepare.convert_vqav2")
        self.labels: list[str] = json.loads(answers.read_text())  # the answer vocabulary

    def check(self, splits: Sequence[str]) -> None:
        """Fail now, before any model loads, if a split's annotations or image store is missing."""
        check_split_files(self.root, SPLITS, splits, "recipes.prepare.convert_vqav2")

    def dataset(self, split: str, family: Family, labels: Sequence[str], tokenizer: Any, *, image_size: int,
                text_length: int, train: bool, limit: int | None = None,
                on_bad_image: OnBadImage = "error", seed: int = 0) -> ImageTextDataset[VqaRecord]:
        jsonl, store = SPLITS[split]
        records = read_jsonl(self.root / jsonl, VqaRecord.from_json)[:limit]
        position = {a: i for i, a in enumerate(labels)}

        def target(r: VqaRecord) -> dict[str, Tensor]:
            t = torch.zeros(len(labels))
            for answer, score in r.label.items():
                if answer in position:
                    t[position[answer]] = score
            return {"target": t}

        return ImageTextDataset(records, ImageStore(self.root / store), image_key=lambda r: r.img_id,
                                text=lambda r: r.question, target=target,
                                transform=build_image_transform(family.image, image_size, train=train),
                                tokenizer=tokenizer, max_length=text_length, image_size=image_size,
                                on_bad_image=on_bad_image, seed=seed)


VQA = TaskSpec(name="vqa", title="VQAv2", metric="VQA accuracy (official)", data=VqaData,
               make_task=VqaTask.from_context,
               splits=tuple(SPLITS), train_split="train", eval_split="val", text_length=32,
               converter="recipes.prepare.convert_vqav2",
               extra_metrics=(("soft_score", "VQA soft score (from the targets)"),))


def predict(run: EvalRun) -> list[dict[str, Any]]:
    """Answers for a split (default test) in the official format ``[{question_id, answer}]``."""
    split = open_eval_split(VQA, run)
    task = VqaTask(split.labels, "label_count", split.dataset.records)
    model = split.accelerator.prepare(patch(split.model, run.pumer, run.pumer_mode))
    result: EvalResult = evaluate(split.accelerator, model, task, split.loader, desc="predict",
                                  progress=run.launch.progress)
    answers = task.answers(result.outputs)
    if split.accelerator.is_main_process:
        run.output.parent.mkdir(parents=True, exist_ok=True)
        run.output.write_text(json.dumps(answers))
        logger.info("wrote %d answers to %s", len(answers), run.output)
    return answers
