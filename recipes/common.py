"""What every classification task's command line shares: train with a preset, evaluate side by side.

A task module (``recipes.vqa``, ``recipes.snli_ve``, ``recipes.nlvr2``) describes itself with a
``TaskSpec``: its name (the preset's ``task`` and the model family's head key), how to open its
data folder, how to build the engine's ``Task`` and which splits it has. ``train`` and ``evaluate``
below then run the same way for every task: everything that can be checked without loading a model
is checked first (data files, model paths, the batch arithmetic), the model is patched before
``accelerate`` wraps it, and an evaluation writes ``eval.json`` and ``eval.md`` with the metric,
examples/s and GFLOPs per example of the unpatched model and of each PuMer variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.contrib.logging import logging_redirect_tqdm

import pumer_patch
from recipes.data.dataset import ImageTextDataset
from recipes.data.loader import loader_throughput, make_loader
from recipes.data.records import read_jsonl
from recipes.data.store import ImageStore
from recipes.data.transforms import build_image_transform
from recipes.engine import Engine, Task, TrainConfig
from recipes.logs import configure_logging
from recipes.models import FAMILIES, Family, family_of, get_family, label_index, load_model, load_tokenizer, model_labels
from recipes.presets import PRESETS, get_preset

__all__ = ["ClassificationTask", "LabelledData", "check_split_files", "TaskData", "TaskSpec", "classification_main",
           "check_model_path", "resolve_family", "patch", "make_accelerator", "accumulation", "add_common_args",
           "add_train_args", "add_eval_args", "train", "evaluate", "load_for_eval", "eval_loader", "finish_args",
           "write_report", "markdown_table", "model_image_size", "PUMER_MODES"]

logger = logging.getLogger("recipes")

PUMER_MODES = ("reference", "default")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class TaskData(Protocol):
    """A task's data folder: its label names and, per split, a dataset for a family's transform and tokenizer."""

    labels: list[str]

    def check(self, splits: Sequence[str]) -> None:
        """Raise ``FileNotFoundError`` naming the file if a split's annotations or images are missing."""

    def dataset(self, split: str, family: Family, labels: Sequence[str], tokenizer: Any, *, image_size: int,
                text_length: int, train: bool, limit: int | None = None,
                on_bad_image: str = "error") -> ImageTextDataset[Any]:
        """The split's examples, targets ordered by ``labels`` (the model's own label order)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task as the shared commands see it.

    name: the preset's ``task`` and the family's head key. metric: the column title of ``score``.
    data(folder) opens a data folder; make_task(labels, loss_scale, records) builds the engine's task.
    splits: split names; train/eval splits are the defaults of ``train`` and ``eval``.
    """

    name: str
    title: str
    metric: str
    data: Callable[[Path], TaskData]
    make_task: Callable[[Sequence[str], str, Sequence[Any]], Task]
    splits: tuple[str, ...]
    train_split: str
    eval_split: str
    text_length: int
    converter: str  # the module that writes the data folder, named in --data's help


class ClassificationTask:
    """The engine's ``Task`` for single-label classification: cross-entropy and accuracy.

    Targets are class indices in the model's label order (``batch["target"]``, (B,) long); examples
    whose image failed to decode (``valid`` False) count in neither loss nor accuracy.
    """

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)

    def model_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    def loss(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        per_example = F.cross_entropy(logits.float(), batch["target"], reduction="none")
        valid = batch["valid"].float()
        return (per_example * valid).sum() / valid.sum().clamp_min(1.0)

    def eval_outputs(self, logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"index": batch["index"], "prediction": logits.argmax(-1), "target": batch["target"],
                "valid": batch["valid"]}

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        keep = outputs["valid"].bool()
        correct = (outputs["prediction"][keep] == outputs["target"][keep]).float()
        return {"score": correct.mean().item() if len(correct) else 0.0, "skipped_images": float((~keep).sum())}


def check_split_files(root: Path, files: Mapping[str, Sequence[str]], splits: Sequence[str], converter: str) -> None:
    """Raise ``FileNotFoundError`` naming the first of ``files[split]`` (for each of ``splits``) missing in ``root``."""
    for split in splits:
        for name in files[split]:
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root / name} does not exist (needed for the {split} split); "
                                        f"write the data folder with python -m {converter}")


class LabelledData:
    """The data folder of a classification task: per split an annotation jsonl and an image store.

    splits: split -> (annotations, image store) file names in the folder; labels: the class names in
    the task's order; parse: a jsonl object -> record; image_key(record): its image stem, or a tuple
    of stems (several images per example); text(record): what the model reads; label(record): its
    class name. Targets are class indices in the MODEL's label order (a converted head keeps its own).
    """

    def __init__(self, root: Path, *, splits: Mapping[str, tuple[str, str]], labels: Sequence[str],
                 parse: Callable[[Mapping[str, Any]], Any], image_key: Callable[[Any], Any],
                 text: Callable[[Any], str], label: Callable[[Any], str], converter: str) -> None:
        self.root, self.splits, self.labels = Path(root), dict(splits), list(labels)
        self.parse, self.image_key, self.text, self.label, self.converter = parse, image_key, text, label, converter

    def check(self, splits: Sequence[str]) -> None:
        """Fail now, before any model loads, if a split's annotations or image store is missing."""
        check_split_files(self.root, self.splits, splits, self.converter)

    def dataset(self, split: str, family: Family, labels: Sequence[str], tokenizer: Any, *, image_size: int,
                text_length: int, train: bool, limit: int | None = None,
                on_bad_image: str = "error") -> ImageTextDataset[Any]:
        if sorted(labels) != sorted(self.labels):
            raise ValueError(f"the model's labels {list(labels)} are not this task's {self.labels}; "
                             f"load a checkpoint of this task, or one without a task head")
        jsonl, store = self.splits[split]
        records = read_jsonl(self.root / jsonl, self.parse)[:limit]
        position = {name: i for i, name in enumerate(labels)}
        return ImageTextDataset(records, ImageStore(self.root / store), image_key=self.image_key, text=self.text,
                                target=lambda r: {"target": torch.tensor(position[self.label(r)])},
                                transform=build_image_transform(family.image, image_size, train=train),
                                tokenizer=tokenizer, max_length=text_length, image_size=image_size,
                                on_bad_image=on_bad_image)


# ---------------------------------------------------------------------------------------- checks and setup


def check_model_path(path: str | None, what: str) -> None:
    """A local folder or a hub id (``org/name``); anything else fails now, before a model loads."""
    flag = f"--{what.replace(' ', '-')}"
    if path is None:
        raise ValueError(f"no {what}: pass {flag} PATH")
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(path)):
        raise FileNotFoundError(f"{flag} {path} names no folder and is no hub id (org/name)")


def resolve_family(preset_family: str | None, model: str) -> Family:
    """The checkpoint's own family (its config), which must agree with the preset's when both are known."""
    found = family_of(model)
    if found is not None and preset_family is not None and found != preset_family:
        raise ValueError(f"{model} is a {found} model but the preset is for {preset_family}")
    name = found or preset_family
    if name is None:
        raise ValueError(f"cannot tell the family of {model}; pass --family {{{','.join(FAMILIES)}}}")
    return get_family(name)


def patch(model: torch.nn.Module, pumer: str | None, mode: str) -> torch.nn.Module:
    """``pumer_patch.apply(model, pumer, mode=mode)``, or the model itself when ``pumer`` is None."""
    if pumer is None:
        return model
    logger.info("PuMer %s, %s mode", pumer, mode)
    return pumer_patch.apply(model, pumer, mode=mode)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's ``Accelerator``; refuses a multi-process launch that would silently run N separate jobs."""
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise RuntimeError(f"launched as {world} processes but accelerate runs {accelerator.num_processes}: "
                           f"without GPUs pass --cpu (gloo), with GPUs launch with accelerate launch --multi_gpu")
    return accelerator


def accumulation(total_batch: int, per_device: int, processes: int) -> int:
    """Gradient-accumulation steps that make ``total_batch`` examples per optimizer step."""
    per_step = per_device * processes
    if total_batch % per_step:
        raise ValueError(f"--total-batch {total_batch} is not a multiple of --per-device-batch {per_device} x "
                         f"{processes} processes; change one of them")
    return total_batch // per_step


# ---------------------------------------------------------------------------------------- command-line options


def add_common_args(q: argparse.ArgumentParser, spec: TaskSpec) -> None:
    """Options of every command: data, tokenizer, PuMer, precision, processes, loader, logging."""
    q.add_argument("--data", type=Path, required=True, help=f"data folder written by {spec.converter}")
    q.add_argument("--tokenizer", help="tokenizer folder or hub id [the model's, else the family's]")
    q.add_argument("--pumer", help="PuMer config, e.g. p0.1-r0.3-t0.2-258 [none / the preset's]")
    q.add_argument("--pumer-mode", choices=PUMER_MODES, default=None,
                   help="reference: the research code's arithmetic; default: ours [reference / the preset's]")
    q.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    q.add_argument("--cpu", action="store_true", help="run on CPU even with GPUs (several processes: gloo)")
    q.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per process")
    q.add_argument("--eval-batch", type=int, default=None, help="evaluation batch per process [64]")
    q.add_argument("--limit", type=int, help="first N examples of each split only (smoke runs)")
    q.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                   help="a missing or undecodable image: stop, or leave its example out (logged)")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def add_train_args(t: argparse.ArgumentParser, spec: TaskSpec) -> None:
    """``train``: a preset of this task and the fields that override it."""
    t.add_argument("--preset", required=True, choices=sorted(k for k, v in PRESETS.items() if v.task == spec.name))
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


def add_eval_args(e: argparse.ArgumentParser, spec: TaskSpec, *, default_split: str, output_help: str) -> None:
    """``eval`` / ``predict``: the model, its family for hub ids, the split and the input sizes."""
    e.add_argument("--model", required=True)
    e.add_argument("--family", choices=sorted(FAMILIES), help="needed for hub ids only")
    e.add_argument("--split", default=default_split, choices=list(spec.splits))
    e.add_argument("--output", type=Path, required=True, help=output_help)
    e.add_argument("--image-size", type=int, default=None, help="[the model's config, else 384]")
    e.add_argument("--text-length", type=int, default=spec.text_length)


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on the command: evaluation batch 64, reference mode outside training."""
    if args.eval_batch is None and args.command != "train":
        args.eval_batch = 64
    if args.pumer_mode is None and args.command != "train":
        args.pumer_mode = "reference"
    return args


# ---------------------------------------------------------------------------------------- train


def train(spec: TaskSpec, args: argparse.Namespace, *,
          override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Finetune with a preset of ``spec``'s task; returns ``train_info`` (also ``OUTPUT/train_info.json``).

    override: further preset fields from a task's own options (e.g. VQA's ``loss_scale``).
    """
    preset = get_preset(args.preset, model=args.model, lr=args.lr, epochs=args.epochs, eval_every=args.eval_every,
                        total_batch=args.total_batch, image_size=args.image_size, text_length=args.text_length,
                        patience=args.patience, pumer=args.pumer, pumer_mode=args.pumer_mode,
                        distill_weight=args.distill_weight, **(override or {}))
    if preset.task != spec.name:
        raise ValueError(f"preset {args.preset!r} is for {preset.task}, not {spec.name}")
    # everything that can be checked without loading a model is checked first
    data = spec.data(args.data)
    data.check([spec.train_split, spec.eval_split])
    check_model_path(preset.model, "model")
    if preset.distill_weight > 0:
        check_model_path(args.teacher, "teacher")
    family = resolve_family(preset.family, preset.model)
    accelerator = make_accelerator(args)
    accelerator.gradient_accumulation_steps = accumulation(preset.total_batch, args.per_device_batch,
                                                           accelerator.num_processes)
    set_seed(args.seed)
    model = load_model(family, spec.name, preset.model, data.labels, image_size=preset.image_size)
    labels = model_labels(model)
    tokenizer = load_tokenizer(family, preset.model, args.tokenizer)
    teacher, teacher_index = None, None
    if preset.distill_weight > 0:
        teacher = load_model(family, spec.name, args.teacher, data.labels, image_size=preset.image_size)
        teacher_labels = model_labels(teacher)
        teacher_index = None if teacher_labels == labels else label_index(teacher_labels, labels)
    patch(model, preset.pumer, preset.pumer_mode)  # before prepare: DDP and autocast wrap the patched model

    common = dict(family=family, labels=labels, tokenizer=tokenizer, image_size=preset.image_size,
                  text_length=preset.text_length, limit=args.limit, on_bad_image=args.on_bad_image)
    train_set = data.dataset(spec.train_split, train=True, **common)
    val_set = data.dataset(spec.eval_split, train=False, **common)
    train_loader = make_loader(train_set, args.per_device_batch, shuffle=True, workers=args.workers, seed=args.seed,
                               drop_last=True)
    val_loader = make_loader(val_set, args.eval_batch or args.per_device_batch, shuffle=False, workers=args.workers)
    cfg = TrainConfig(output_dir=Path(args.output), lr=preset.lr, weight_decay=preset.weight_decay,
                      lr_multipliers=preset.lr_multipliers, warmup=preset.warmup, end_lr=preset.end_lr,
                      epochs=preset.epochs, max_steps=args.max_steps, eval_every=preset.eval_every,
                      patience=preset.patience, distill_weight=preset.distill_weight,
                      distill_temperature=preset.distill_temperature, stop_after_steps=args.stop_after_steps,
                      progress=not args.no_progress, name=spec.name)
    engine = Engine(accelerator, model, spec.make_task(labels, preset.loss_scale, val_set.records), cfg,
                    teacher=teacher, teacher_index=teacher_index)
    train_loader, val_loader = engine.prepare_training(train_loader, val_loader)
    state = engine.fit(train_loader, val_loader, resume=args.resume, save_extra=tokenizer.save_pretrained)
    info = {"preset": args.preset, "settings": asdict(preset), "processes": accelerator.num_processes,
            "total_steps": engine.total_steps, **state.state_dict()}
    if accelerator.is_main_process:
        Path(args.output, "train_info.json").write_text(json.dumps(info, indent=2, default=str))
    return info


# ---------------------------------------------------------------------------------------- eval


def load_for_eval(spec: TaskSpec, args: argparse.Namespace,
                  data: TaskData) -> tuple[Family, torch.nn.Module, list[str], Any]:
    """The model to score (its family, its labels in logit order, its tokenizer)."""
    check_model_path(args.model, "model")
    family = resolve_family(args.family, args.model)
    model = load_model(family, spec.name, args.model, data.labels, image_size=args.image_size)
    if args.image_size is None:
        args.image_size = model_image_size(model)
    return family, model, model_labels(model), load_tokenizer(family, args.model, args.tokenizer)


def model_image_size(model: torch.nn.Module) -> int:
    """The square input size a checkpoint was trained at: its config's ``image_size``, else 384."""
    return int(getattr(model.config, "image_size", None) or 384)


def eval_loader(spec: TaskSpec, args: argparse.Namespace, accelerator: Accelerator, data: TaskData, family: Family,
                labels: Sequence[str], tokenizer: Any) -> tuple[Any, ImageTextDataset[Any]]:
    """The prepared evaluation loader of ``args.split`` and its dataset."""
    dataset = data.dataset(args.split, family, labels, tokenizer, image_size=args.image_size,
                           text_length=args.text_length, train=False, limit=args.limit, on_bad_image=args.on_bad_image)
    return accelerator.prepare(make_loader(dataset, args.eval_batch, shuffle=False, workers=args.workers)), dataset


def evaluate(spec: TaskSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Score the model on a split, unpatched and (``--pumer``) patched, side by side: eval.json + eval.md."""
    data = spec.data(args.data)
    data.check([args.split])
    accelerator = make_accelerator(args)
    family, model, labels, tokenizer = load_for_eval(spec, args, data)
    loader, dataset = eval_loader(spec, args, accelerator, data, family, labels, tokenizer)
    task = spec.make_task(labels, "mean", dataset.records)
    rows: list[dict[str, Any]] = []
    variants = [("unpatched", None)] + ([(f"PuMer {args.pumer} ({args.pumer_mode})", args.pumer)] if args.pumer else [])
    for name, pumer in variants:
        variant = accelerator.prepare(patch(copy.deepcopy(model), pumer, args.pumer_mode))
        engine = Engine(accelerator, variant, task, TrainConfig(output_dir=Path(args.output), lr=0.0,
                                                                 progress=not args.no_progress))
        result = engine.evaluate(loader, desc=name)
        rows.append({"variant": name, "pumer": pumer, **result.summary()})
        logger.info("%s: %s %.4f, %.1f examples/s, %.3f GFLOPs/example", name, spec.metric, result.metrics["score"],
                    result.examples_per_second, result.gflops)
    report: dict[str, Any] = {"task": spec.name, "model": args.model, "split": args.split, "metric": spec.metric,
                              "image_size": args.image_size, "text_length": args.text_length,
                              "processes": accelerator.num_processes, "rows": rows}
    if getattr(args, "loader_speed", 0):
        report["loader_examples_per_s"] = loader_throughput(loader, batches=args.loader_speed)
        logger.info("loader alone: %.1f examples/s (%d workers)", report["loader_examples_per_s"], args.workers)
    if accelerator.is_main_process:
        write_report(Path(args.output), report, markdown_table(report))
    return report


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per variant: the task's metric (in percent), examples/s, GFLOPs per example, examples."""
    lines = [f"| variant | {report['metric']} | examples/s | GFLOPs/ex | examples |", "|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {100 * r['score']:.2f} | {r['examples_per_s']:.1f} | "
                     f"{r['gflops_per_example']:.3f} | {r['examples']} |")
    return "\n".join(lines)


def write_report(out: Path, report: Mapping[str, Any], table: str, stem: str = "eval") -> None:
    """``out/<stem>.json`` (everything) and ``out/<stem>.md`` (the table a person reads)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")


# ---------------------------------------------------------------------------------------- a task's command line


def classification_main(spec: TaskSpec, argv: Sequence[str] | None, *, prog: str, description: str) -> int:
    """``train`` (a preset; the best checkpoint on the eval split kept) and ``eval`` (side by side with --pumer)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help=f"finetune with a preset (the best checkpoint on {spec.eval_split} is kept)")
    add_common_args(t, spec)
    add_train_args(t, spec)
    e = sub.add_parser("eval", help=f"{spec.metric} on a split, with and without --pumer")
    add_common_args(e, spec)
    add_eval_args(e, spec, default_split=spec.splits[-1], output_help="folder for eval.json / eval.md")
    args = finish_args(p.parse_args(argv))
    configure_logging(args.log_level)
    with logging_redirect_tqdm():
        if args.command == "train":
            train(spec, args)
        else:
            print(markdown_table(evaluate(spec, args)))
    return 0
