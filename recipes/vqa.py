"""VQAv2 on the engine: finetune (optionally with PuMer), evaluate on val, predict test, compare.

    python -m recipes.vqa train   --preset vilt-vqa --data DATA --output runs/vilt-vqa
    python -m recipes.vqa eval    --model runs/vilt-vqa/best --data DATA --pumer p0.1-r0.3-t0.2-258
    python -m recipes.vqa predict --model runs/vilt-vqa/best --data DATA --output predictions.json

``DATA`` is what ``recipes.convert_vqav2`` writes: ``vqav2_{train,val,test}.jsonl``, ``answers.json``,
``coco-trainval2014.lmdb``, ``coco-test2015.lmdb``.

Loss scale. The VQA loss is binary cross-entropy over the soft scores of every label. ViLT's code
(and Hugging Face's ``ViltForQuestionAnswering``) takes its mean over labels times the label count
(a per-example sum over labels); PuMer's METER takes the plain mean. The two differ by a factor of
3,129, which matters because distillation adds ``1.0 x KL`` on top: the paper's KL weight was tuned
against each code's own scale, so each preset keeps the scale of the code it reproduces
(``loss_scale``: ``label_count`` for ViLT, ``mean`` for METER). The loss is computed here, not by
the model, so both families follow the preset.

Labels. Targets and predictions use the model's own ``id2label`` (matched to the data by answer
string): a finetuned checkpoint with another label order (``dandelin/vilt-b32-finetuned-vqa``) is
scored correctly, and answers outside its labels can never be predicted, as with any vocabulary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.contrib.logging import logging_redirect_tqdm

from recipes.common import (
    TaskSpec,
    add_common_args,
    add_eval_args,
    add_train_args,
    check_split_files,
    eval_loader,
    evaluate,
    finish_args,
    load_for_eval,
    make_accelerator,
    markdown_table,
    patch,
    train,
)
from recipes.data.dataset import ImageTextDataset
from recipes.data.records import VqaRecord, read_jsonl
from recipes.data.store import ImageStore
from recipes.data.transforms import build_image_transform
from recipes.engine import Engine, EvalResult, TrainConfig
from recipes.logs import configure_logging
from recipes.models import Family
from recipes.vqa_answers import vqa_score

__all__ = ["SPLITS", "VQA", "VqaTask", "VqaData", "main", "parse_args", "predict"]

logger = logging.getLogger("recipes.vqa")

# split -> (annotations, image store) inside the data folder
SPLITS = {"train": ("vqav2_train.jsonl", "coco-trainval2014.lmdb"),
          "val": ("vqav2_val.jsonl", "coco-trainval2014.lmdb"),
          "test": ("vqav2_test.jsonl", "coco-test2015.lmdb")}


class VqaTask:
    """The engine's ``Task`` for VQA: soft-score BCE at the preset's scale; VQA score of the argmax answer.

    labels: the model's answers in logit order; records: the evaluation split's, by dataset index.
    """

    def __init__(self, labels: Sequence[str], loss_scale: str, records: Sequence[VqaRecord]) -> None:
        if loss_scale not in ("label_count", "mean"):
            raise ValueError(f"loss_scale must be 'label_count' or 'mean', got {loss_scale!r}")
        self.labels, self.loss_scale, self.records = list(labels), loss_scale, records

    def model_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    def loss(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        per_example = F.binary_cross_entropy_with_logits(logits.float(), batch["target"], reduction="none").mean(-1)
        valid = batch["valid"].float()  # (B,): examples whose image failed to decode weigh nothing
        loss = (per_example * valid).sum() / valid.sum().clamp_min(1.0)
        return loss * logits.shape[-1] if self.loss_scale == "label_count" else loss

    def eval_outputs(self, logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"index": batch["index"], "prediction": logits.argmax(-1), "valid": batch["valid"]}

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        keep = outputs["valid"].bool()
        index, pred = outputs["index"][keep].tolist(), outputs["prediction"][keep].tolist()
        score = vqa_score([self.labels[p] for p in pred], [self.records[i].label for i in index])
        return {"score": score, "skipped_images": float((~keep).sum())}

    def answers(self, outputs: Mapping[str, Tensor]) -> list[dict[str, Any]]:
        """The official predictions format: ``[{question_id, answer}]`` in dataset order."""
        order = outputs["index"].argsort()
        return [{"question_id": self.records[i].qid, "answer": self.labels[p]}
                for i, p in zip(outputs["index"][order].tolist(), outputs["prediction"][order].tolist())]


class VqaData:
    """A data folder: the vocabulary and, per split, a dataset for a family's transform and tokenizer."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        answers = self.root / "answers.json"
        if not answers.is_file():
            raise FileNotFoundError(f"{answers} does not exist; write the data folder with python -m recipes.convert_vqav2")
        self.labels: list[str] = json.loads(answers.read_text())  # the answer vocabulary

    def check(self, splits: Sequence[str]) -> None:
        """Fail now, before any model loads, if a split's annotations or image store is missing."""
        check_split_files(self.root, SPLITS, splits, "recipes.convert_vqav2")

    def dataset(self, split: str, family: Family, labels: Sequence[str], tokenizer: Any, *, image_size: int,
                text_length: int, train: bool, limit: int | None = None, on_bad_image: str = "error") -> ImageTextDataset:
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
                                on_bad_image=on_bad_image)


VQA = TaskSpec(name="vqa", title="VQAv2", metric="VQA score", data=VqaData,
               make_task=lambda labels, loss_scale, records: VqaTask(labels, loss_scale, records),
               splits=tuple(SPLITS), train_split="train", eval_split="val", text_length=32,
               converter="recipes.convert_vqav2")


def predict(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Answers for a split (default test) in the official format ``[{question_id, answer}]``."""
    data = VqaData(args.data)
    data.check([args.split])
    accelerator = make_accelerator(args)
    family, model, labels, tokenizer = load_for_eval(VQA, args, data)
    loader, dataset = eval_loader(VQA, args, accelerator, data, family, labels, tokenizer)
    task = VqaTask(labels, "label_count", dataset.records)
    model = accelerator.prepare(patch(model, args.pumer, args.pumer_mode))
    engine = Engine(accelerator, model, task, TrainConfig(output_dir=Path(args.output).parent, lr=0.0,
                                                           progress=not args.no_progress))
    result: EvalResult = engine.evaluate(loader, desc="predict")
    answers = task.answers(result.outputs)
    if accelerator.is_main_process:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(answers))
        logger.info("wrote %d answers to %s", len(answers), args.output)
    return answers


# ---------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.vqa", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="finetune with a preset")
    add_common_args(t, VQA)
    add_train_args(t, VQA)
    t.add_argument("--loss-scale", choices=["label_count", "mean"], help="override the preset")
    for name, helptext in (("eval", "score a model on a split, with and without --pumer"),
                           ("predict", "answers in the official format")):
        e = sub.add_parser(name, help=helptext)
        add_common_args(e, VQA)
        add_eval_args(e, VQA, default_split="val" if name == "eval" else "test",
                      output_help="folder for eval.json / eval.md" if name == "eval" else "predictions json file")
        if name == "eval":
            e.add_argument("--loader-speed", type=int, default=0, metavar="BATCHES",
                           help="also time the loader alone over this many batches")
    return finish_args(p.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    with logging_redirect_tqdm():
        if args.command == "train":
            train(VQA, args, override={"loss_scale": args.loss_scale})
        elif args.command == "eval":
            print(markdown_table(evaluate(VQA, args)))
        else:
            predict(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
