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
import copy
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.contrib.logging import logging_redirect_tqdm

import pumer_patch
from recipes.data.dataset import ImageTextDataset
from recipes.data.loader import loader_throughput, make_loader
from recipes.data.records import VqaRecord, read_jsonl
from recipes.data.store import ImageStore
from recipes.data.transforms import build_image_transform
from recipes.engine import Engine, EvalResult, TrainConfig
from recipes.models import Family, get_family, family_of, label_index, load_model, load_tokenizer, model_labels
from recipes.presets import PRESETS, get_preset
from recipes.vqa_answers import vqa_score

__all__ = ["SPLITS", "VqaTask", "VqaData", "main", "parse_args"]

logger = logging.getLogger("recipes.vqa")

# split -> (annotations, image store) inside the data folder
SPLITS = {"train": ("vqav2_train.jsonl", "coco-trainval2014.lmdb"),
          "val": ("vqav2_val.jsonl", "coco-trainval2014.lmdb"),
          "test": ("vqav2_test.jsonl", "coco-test2015.lmdb")}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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
        self.vocabulary: list[str] = json.loads(answers.read_text())

    def check(self, splits: Sequence[str]) -> None:
        """Fail now, before any model loads, if a split's annotations or image store is missing."""
        for split in splits:
            for name in SPLITS[split]:
                if not (self.root / name).is_file():
                    raise FileNotFoundError(f"{self.root / name} does not exist (needed for the {split} split)")

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


def _check_model_path(path: str | None, what: str) -> None:
    if path is None:
        raise ValueError(f"no {what}: pass --{what.replace(' ', '-')} PATH")
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(path)):
        raise FileNotFoundError(f"--{what.replace(' ', '-')} {path} names no folder and is no hub id (org/name)")


def _family(preset_family: str | None, model: str) -> Family:
    found = family_of(model)
    if found is not None and preset_family is not None and found != preset_family:
        raise ValueError(f"{model} is a {found} model but the preset is for {preset_family}")
    name = found or preset_family
    if name is None:
        raise ValueError(f"cannot tell the family of {model}; pass --family {{{','.join(['vilt', 'meter'])}}}")
    return get_family(name)


def _patch(model: torch.nn.Module, pumer: str | None, mode: str) -> torch.nn.Module:
    if pumer is None:
        return model
    logger.info("PuMer %s, %s mode", pumer, mode)
    return pumer_patch.apply(model, pumer, mode=mode)


# ---------------------------------------------------------------------------------------- train


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Finetune with a preset; returns ``train_info`` (also written to ``OUTPUT/train_info.json``)."""
    preset = get_preset(args.preset, model=args.model, lr=args.lr, epochs=args.epochs, eval_every=args.eval_every,
                        total_batch=args.total_batch, image_size=args.image_size, text_length=args.text_length,
                        patience=args.patience, pumer=args.pumer, pumer_mode=args.pumer_mode,
                        distill_weight=args.distill_weight, loss_scale=args.loss_scale)
    # everything that can be checked without loading a model is checked first
    data = VqaData(args.data)
    data.check(["train", "val"])
    _check_model_path(preset.model, "model")
    if preset.distill_weight > 0:
        _check_model_path(args.teacher, "teacher")
    family = _family(preset.family, preset.model)
    accelerator = _accelerator(args)
    accelerator.gradient_accumulation_steps = _accumulation(preset.total_batch, args.per_device_batch,
                                                            accelerator.num_processes)
    set_seed(args.seed)
    model = load_model(family, preset.task, preset.model, data.vocabulary)
    labels = model_labels(model)
    tokenizer = load_tokenizer(family, preset.model, args.tokenizer)
    teacher, teacher_index = None, None
    if preset.distill_weight > 0:
        teacher = load_model(family, preset.task, args.teacher, data.vocabulary)
        teacher_labels = model_labels(teacher)
        teacher_index = None if teacher_labels == labels else label_index(teacher_labels, labels)
    _patch(model, preset.pumer, preset.pumer_mode)  # before prepare: DDP and autocast wrap the patched model

    common = dict(family=family, labels=labels, tokenizer=tokenizer, image_size=preset.image_size,
                  text_length=preset.text_length, limit=args.limit, on_bad_image=args.on_bad_image)
    train_set = data.dataset("train", train=True, **common)
    val_set = data.dataset("val", train=False, **common)
    train_loader = make_loader(train_set, args.per_device_batch, shuffle=True, workers=args.workers, seed=args.seed,
                               drop_last=True)
    val_loader = make_loader(val_set, args.eval_batch or args.per_device_batch, shuffle=False, workers=args.workers)
    cfg = TrainConfig(output_dir=Path(args.output), lr=preset.lr, weight_decay=preset.weight_decay,
                      lr_multipliers=preset.lr_multipliers, warmup=preset.warmup, end_lr=preset.end_lr,
                      epochs=preset.epochs, max_steps=args.max_steps, eval_every=preset.eval_every,
                      patience=preset.patience, distill_weight=preset.distill_weight,
                      distill_temperature=preset.distill_temperature, stop_after_steps=args.stop_after_steps,
                      progress=not args.no_progress)
    engine = Engine(accelerator, model, VqaTask(labels, preset.loss_scale, val_set.records), cfg,
                    teacher=teacher, teacher_index=teacher_index)
    train_loader, val_loader = engine.prepare_training(train_loader, val_loader)
    state = engine.fit(train_loader, val_loader, resume=args.resume, save_extra=tokenizer.save_pretrained)
    info = {"preset": args.preset, "settings": {k: v for k, v in asdict(preset).items()},
            "processes": accelerator.num_processes, "total_steps": engine.total_steps, **state.state_dict()}
    if accelerator.is_main_process:
        Path(args.output, "train_info.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def _accumulation(total_batch: int, per_device: int, processes: int) -> int:
    per_step = per_device * processes
    if total_batch % per_step:
        raise ValueError(f"--total-batch {total_batch} is not a multiple of --per-device-batch {per_device} x "
                         f"{processes} processes; change one of them")
    return total_batch // per_step


def _accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's ``Accelerator``; refuses a multi-process launch that would silently run N separate jobs."""
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise RuntimeError(f"launched as {world} processes but accelerate runs {accelerator.num_processes}: "
                           f"without GPUs pass --cpu (gloo), with GPUs launch with accelerate launch --multi_gpu")
    return accelerator


# ---------------------------------------------------------------------------------------- eval / predict


def _load_for_eval(args: argparse.Namespace, data: VqaData) -> tuple[Family, torch.nn.Module, list[str], Any]:
    _check_model_path(args.model, "model")
    family = _family(args.family, args.model)
    model = load_model(family, "vqa", args.model, data.vocabulary)
    labels = model_labels(model)
    return family, model, labels, load_tokenizer(family, args.model, args.tokenizer)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Score the model on a split, unpatched and (``--pumer``) patched, side by side: JSON + markdown."""
    data = VqaData(args.data)
    data.check([args.split])
    accelerator = _accelerator(args)
    family, model, labels, tokenizer = _load_for_eval(args, data)
    dataset = data.dataset(args.split, family, labels, tokenizer, image_size=args.image_size,
                           text_length=args.text_length, train=False, limit=args.limit, on_bad_image=args.on_bad_image)
    loader = accelerator.prepare(make_loader(dataset, args.eval_batch, shuffle=False, workers=args.workers))
    task = VqaTask(labels, "label_count", dataset.records)
    rows: list[dict[str, Any]] = []
    variants = [("unpatched", None)] + ([(f"PuMer {args.pumer} ({args.pumer_mode})", args.pumer)] if args.pumer else [])
    for name, pumer in variants:
        variant = accelerator.prepare(_patch(copy.deepcopy(model), pumer, args.pumer_mode))
        engine = Engine(accelerator, variant, task, TrainConfig(output_dir=Path(args.output), lr=0.0,
                                                                 progress=not args.no_progress))
        result = engine.evaluate(loader, desc=name)
        rows.append({"variant": name, "pumer": pumer, **result.summary()})
        logger.info("%s: VQA score %.4f, %.1f examples/s, %.3f GFLOPs/example", name, result.metrics["score"],
                    result.examples_per_second, result.gflops)
    report: dict[str, Any] = {"model": args.model, "split": args.split, "rows": rows}
    if args.loader_speed:
        report["loader_examples_per_s"] = loader_throughput(loader, batches=args.loader_speed)
        logger.info("loader alone: %.1f examples/s (%d workers)", report["loader_examples_per_s"], args.workers)
    if accelerator.is_main_process:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        (out / "eval.md").write_text(markdown_table(report) + "\n")
    return report


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per variant: VQA score, examples/s, GFLOPs per example."""
    lines = ["| variant | VQA score | examples/s | GFLOPs/ex | examples |", "|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {100 * r['score']:.2f} | {r['examples_per_s']:.1f} | "
                     f"{r['gflops_per_example']:.3f} | {r['examples']} |")
    return "\n".join(lines)


def predict(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Answers for a split (default test) in the official format ``[{question_id, answer}]``."""
    data = VqaData(args.data)
    data.check([args.split])
    accelerator = _accelerator(args)
    family, model, labels, tokenizer = _load_for_eval(args, data)
    dataset = data.dataset(args.split, family, labels, tokenizer, image_size=args.image_size,
                           text_length=args.text_length, train=False, limit=args.limit, on_bad_image=args.on_bad_image)
    loader = accelerator.prepare(make_loader(dataset, args.eval_batch, shuffle=False, workers=args.workers))
    task = VqaTask(labels, "label_count", dataset.records)
    model = accelerator.prepare(_patch(model, args.pumer, args.pumer_mode))
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

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data", type=Path, required=True, help="data folder written by recipes.convert_vqav2")
        q.add_argument("--tokenizer", help="tokenizer folder or hub id [the model's, else the family's]")
        q.add_argument("--pumer", help="PuMer config, e.g. p0.1-r0.3-t0.2-258 [none / the preset's]")
        q.add_argument("--pumer-mode", choices=["reference", "default"], default=None)
        q.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
        q.add_argument("--cpu", action="store_true", help="run on CPU even with GPUs (several processes: gloo)")
        q.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per process")
        q.add_argument("--eval-batch", type=int, default=None, help="evaluation batch per process")
        q.add_argument("--limit", type=int, help="first N questions of each split only (smoke runs)")
        q.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                       help="a missing or undecodable image: stop, or leave its question out (logged)")
        q.add_argument("--no-progress", action="store_true")
        q.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    t = sub.add_parser("train", help="finetune with a preset")
    common(t)
    t.add_argument("--preset", required=True, choices=sorted(PRESETS))
    t.add_argument("--output", type=Path, required=True, help="run folder: best/, state/, train_info.json")
    t.add_argument("--model", help="checkpoint to start from [the preset's]")
    t.add_argument("--teacher", help="finetuned unreduced model to distil from (PuMer presets)")
    t.add_argument("--per-device-batch", type=int, default=32)
    t.add_argument("--resume", action="store_true", help="go on from OUTPUT/state")
    t.add_argument("--stop-after-steps", type=int, help="end this job after N steps of the schedule (state saved)")
    t.add_argument("--max-steps", type=int, help="schedule length in optimizer steps [from the epochs]")
    t.add_argument("--seed", type=int, default=0)
    for name, kind in (("lr", float), ("epochs", float), ("eval-every", int), ("total-batch", int),
                       ("image-size", int), ("text-length", int), ("patience", int), ("distill-weight", float)):
        t.add_argument(f"--{name}", type=kind, help="override the preset")
    t.add_argument("--loss-scale", choices=["label_count", "mean"], help="override the preset")

    for name, helptext in (("eval", "score a model on a split, with and without --pumer"),
                           ("predict", "answers in the official format")):
        e = sub.add_parser(name, help=helptext)
        common(e)
        e.add_argument("--model", required=True)
        e.add_argument("--family", choices=["vilt", "meter"], help="needed for hub ids only")
        e.add_argument("--split", default="val" if name == "eval" else "test", choices=list(SPLITS))
        e.add_argument("--output", type=Path, required=True,
                       help="folder for eval.json / eval.md" if name == "eval" else "predictions json file")
        e.add_argument("--image-size", type=int, default=384)
        e.add_argument("--text-length", type=int, default=32)
        if name == "eval":
            e.add_argument("--loader-speed", type=int, default=0, metavar="BATCHES",
                           help="also time the loader alone over this many batches")
    args = p.parse_args(argv)
    if args.eval_batch is None and args.command != "train":
        args.eval_batch = 64
    if args.pumer_mode is None and args.command != "train":
        args.pumer_mode = "reference"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    with logging_redirect_tqdm():
        if args.command == "train":
            train(args)
        elif args.command == "eval":
            print(markdown_table(evaluate(args)))
        else:
            predict(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
