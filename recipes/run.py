"""One train path for every task, and the side-by-side evaluation of the classification tasks.

A task module (``recipes.tasks.vqa``, ``snli_ve``, ``nlvr2``, ``retrieval``) describes itself with a
``TaskSpec``: its name (the preset's ``task`` and the model family's head key), how to open its
data folder, how to build the engine's ``Task`` and each split's training or validation set, and
which splits it has. ``train`` then runs the same way for every task and ``evaluate`` for every
classification task, both on a frozen run configuration (``TrainRun``, ``EvalRun``) that
``recipes.cli`` builds from the command line: everything that can be checked without loading a
model is checked first (data files, model paths, the batch arithmetic), the model is patched before
``accelerate`` wraps it, and an evaluation writes ``eval.json`` and ``eval.md`` with the metric,
the examples scored and skipped, examples/s, speedup and GFLOPs per example of the unpatched model
and of each PuMer variant. The speed is the models' alone (``recipes.engine.time_models``: the same
batches held in device memory, a warm-up, interleaved rounds, one figure for all processes), not
the evaluation loop's, which would charge the first variant for the loader's start-up.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

import pumer_patch
from recipes.data.dataset import ImageTextDataset, OnBadImage
from recipes.data.loader import EpochKeySampler, EpochSampler, loader_throughput, make_loader
from recipes.engine import Engine, FitConfig, Task, Timing, evaluate as evaluate_model, time_models
from recipes.launch import check_launch
from recipes.models import FAMILIES, Family, family_of, get_family, label_index, load_model, load_tokenizer, model_labels
from recipes.presets import LossScale, Preset

__all__ = ["PUMER_MODES", "Launch", "TrainRun", "EvalRun", "Inputs", "TaskContext", "TaskData", "ClassificationData",
           "SplitSet", "TaskSpec", "labelled_set", "check_model_path", "resolve_family", "FROM_CONFIG", "patch",
           "reduction_of", "make_accelerator", "accumulation", "model_image_size", "train",
           "load_for_eval", "EvalSplit", "open_eval_split", "check_labelled", "variants_of", "timing_fields",
           "timing_note", "tokens_per_layer", "evaluate", "markdown_table", "notes", "write_report"]

logger = logging.getLogger("recipes")

PUMER_MODES = ("reference", "default")
PumerMode = Literal["reference", "default"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---------------------------------------------------------------------------------------- run configuration


@dataclass(frozen=True)
class Launch:
    """How a job runs, whatever its command: its data folder, processes, precision and loaders.

    eval_batch: evaluation batch per process; limit: the first N examples (images, for retrieval) of
    each split only (smoke runs).
    """

    data: Path
    eval_batch: int
    tokenizer: str | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False
    workers: int = 4
    limit: int | None = None
    on_bad_image: OnBadImage = "error"
    progress: bool = True


@dataclass(frozen=True)
class TrainRun:
    """``train``: a preset, already merged with the command line's overrides, and the job's own settings.

    stop_after_steps: end this job after N steps of the schedule (state saved); max_steps: the
    schedule's length in optimizer steps (else from the epochs).
    """

    preset_name: str
    preset: Preset
    output: Path
    launch: Launch
    teacher: str | None = None
    per_device_batch: int = 32
    resume: bool = False
    stop_after_steps: int | None = None
    max_steps: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class EvalRun:
    """``eval`` / ``predict``: the model to score, the split, and the PuMer variant beside the unpatched model.

    family: needed for hub ids only; image_size: None reads it from the model's config;
    dataset: for a data folder that can hold several (retrieval); loader_speed: also time the
    loader alone over this many batches. timing_batches / timing_rounds: the speed comparison's
    batches per timed pass and interleaved rounds (``recipes.engine.time_models``).
    """

    model: str
    output: Path
    split: str
    launch: Launch
    text_length: int
    family: str | None = None
    image_size: int | None = None
    pumer: str | None = None
    pumer_mode: PumerMode = "reference"
    dataset: str | None = None
    loader_speed: int = 0
    timing_batches: int = 4
    timing_rounds: int = 5

    def __post_init__(self) -> None:
        if self.timing_batches < 1 or self.timing_rounds < 1:
            raise ValueError(f"--timing-batches and --timing-rounds must be >= 1, got {self.timing_batches} and "
                             f"{self.timing_rounds}")


# ---------------------------------------------------------------------------------------- what a task declares


@dataclass(frozen=True)
class Inputs:
    """What turns a split's records into model inputs: the family's transform, the tokenizer, the sizes.

    labels: the model's labels in logit order (None for a task without labels: retrieval).
    """

    family: Family
    labels: Sequence[str] | None
    tokenizer: Any
    image_size: int
    text_length: int
    limit: int | None = None
    on_bad_image: OnBadImage = "error"


@dataclass(frozen=True)
class TaskContext:
    """What a task's loss and metric may need: the model's labels in logit order, the evaluation
    split's records (by dataset index) and VQA's loss scale."""

    labels: Sequence[str] | None
    records: Sequence[Any]
    loss_scale: LossScale = "mean"


class TaskData(Protocol):
    """A task's data folder: its label names (empty without labels) and the check of its files."""

    labels: list[str]

    def check(self, splits: Sequence[str]) -> None:
        """Raise ``FileNotFoundError`` naming the file if a split's annotations or images are missing."""


class ClassificationData(TaskData, Protocol):
    """A classification task's data folder: per split, a dataset for a family's transform and tokenizer."""

    def dataset(self, split: str, family: Family, labels: Sequence[str], tokenizer: Any, *, image_size: int,
                text_length: int, train: bool, limit: int | None = None,
                on_bad_image: OnBadImage = "error", seed: int = 0) -> ImageTextDataset[Any]:
        """The split's examples, targets ordered by ``labels`` (the model's own label order); ``seed``
        seeds the training augmentation (with each example's epoch and index)."""


D = TypeVar("D", bound=TaskData)


class SplitSet(Protocol[D]):
    """A split's training (``train``) or validation set; its dataset has the split's ``records``."""

    def __call__(self, data: D, split: str, inputs: Inputs, run: TrainRun, *, train: bool) -> Dataset[Any]:
        ...


def labelled_set(data: ClassificationData, split: str, inputs: Inputs, run: TrainRun, *,
                 train: bool) -> ImageTextDataset[Any]:
    """A classification task's split: ``data.dataset`` with the inputs' transform, tokenizer and sizes,
    its augmentation seeded by the run's seed."""
    if inputs.labels is None:
        raise ValueError("a classification task needs the model's labels")
    return data.dataset(split, inputs.family, inputs.labels, inputs.tokenizer, image_size=inputs.image_size,
                        text_length=inputs.text_length, train=train, limit=inputs.limit,
                        on_bad_image=inputs.on_bad_image, seed=run.seed)


def _same_model(model: nn.Module) -> nn.Module:
    return model


@dataclass(frozen=True)
class TaskSpec(Generic[D]):
    """One task as the shared commands see it.

    name: the preset's ``task`` and the family's head key. metric: the column title of ``score``.
    data(folder, dataset) opens a data folder (``dataset``: which of several it holds, None for the
    one it holds); make_task builds the engine's task; split_set builds a split's training or
    validation set; train_sampler orders the training set (an ``EpochSampler`` type; the default sends each
example's epoch with its index, which seeds its augmentation); wrap_model
    wraps the model for training (what the engine calls and saves). distills: whether presets may
    distil from a teacher. splits: split names; train/eval splits are the defaults of ``train``
    and ``eval``. converter: the module that writes the data folder, named in errors and help.
    extra_metrics: other metrics of the task's ``metrics`` shown as columns after ``score``.
    """

    name: str
    title: str
    metric: str
    data: Callable[[Path, str | None], D]
    make_task: Callable[[TaskContext], Task]
    splits: tuple[str, ...]
    train_split: str
    eval_split: str
    text_length: int
    converter: str
    split_set: SplitSet[D] = labelled_set
    train_sampler: type[EpochSampler] = EpochKeySampler
    wrap_model: Callable[[nn.Module], nn.Module] = _same_model
    distills: bool = True
    extra_metrics: tuple[tuple[str, str], ...] = ()  # (metric key, column title) shown beside ``score``


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


FROM_CONFIG = "config"  # --pumer config: the reduction the checkpoint's config records


def patch(model: nn.Module, pumer: str | None, mode: str) -> nn.Module:
    """``pumer_patch.apply(model, pumer, mode=mode)``, or the model itself when ``pumer`` is None.

    ``pumer="config"``: ``pumer_patch.apply_from_config``, the reduction the checkpoint records (a
    ``-pumer`` run's ``best/`` writes its own as ``pumer_reduction``; PuMer's released folders name
    theirs in research fields), with the mode it records; ``mode`` is not used.
    """
    if pumer is None:
        return model
    if pumer == FROM_CONFIG:
        try:
            patched = pumer_patch.apply_from_config(model)
        except ValueError as err:
            raise ValueError(f"--pumer config: {err}; on the command line, pass --pumer with a config such as "
                             f"p0.1-r0.3-t0.2-258") from err
        logger.info("PuMer from the checkpoint's config: %s", reduction_of(patched))
        return patched
    logger.info("PuMer %s, %s mode", pumer, mode)
    return pumer_patch.apply(model, pumer, mode=mode)


def reduction_of(model: nn.Module) -> Any:
    """The reduction ``pumer_patch.apply`` recorded in a transformers model's config (``pumer_reduction``),
    as ``save_pretrained`` writes it; None for a model that records none."""
    config = getattr(getattr(model, "module", model), "config", None)  # DDP's wrapper holds the model
    return copy.deepcopy(getattr(config, "pumer_reduction", None))


def make_accelerator(launch: Launch) -> Accelerator:
    """The run's ``Accelerator``; refuses a multi-process launch that would silently run N separate jobs,
    or one process where N were asked for (``check_launch``)."""
    check_launch()
    accelerator = Accelerator(mixed_precision=launch.mixed_precision, cpu=launch.cpu)
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


def model_image_size(model: nn.Module) -> int:
    """The square input size a checkpoint was trained at: its config's ``image_size``, else 384."""
    return int(getattr(model.config, "image_size", None) or 384)


# ---------------------------------------------------------------------------------------- train


def _fit_config(spec: TaskSpec[Any], run: TrainRun) -> FitConfig:
    p = run.preset
    return FitConfig(output_dir=run.output, lr=p.lr, weight_decay=p.weight_decay, lr_multipliers=p.lr_multipliers,
                     warmup=p.warmup, end_lr=p.end_lr, epochs=p.epochs, max_steps=run.max_steps,
                     eval_every=p.eval_every, patience=p.patience, distill_weight=p.distill_weight,
                     distill_temperature=p.distill_temperature, stop_after_steps=run.stop_after_steps,
                     progress=run.launch.progress, name=spec.name)


def train(spec: TaskSpec[Any], run: TrainRun) -> dict[str, Any]:
    """Finetune with a preset of ``spec``'s task; returns ``train_info`` (also ``OUTPUT/train_info.json``)."""
    preset, launch = run.preset, run.launch
    if preset.task != spec.name:
        raise ValueError(f"preset {run.preset_name!r} is for {preset.task}, not {spec.name}")
    if not spec.distills and (preset.distill_weight > 0 or run.teacher is not None):
        raise ValueError(f"{spec.title} has no distillation teacher: leave out --teacher and --distill-weight")
    # everything that can be checked without loading a model is checked first
    data = spec.data(launch.data, preset.dataset)
    data.check([spec.train_split, spec.eval_split])
    check_model_path(preset.model, "model")
    if preset.distill_weight > 0:
        check_model_path(run.teacher, "teacher")
    family = resolve_family(preset.family, preset.model)
    accelerator = make_accelerator(launch)
    accelerator.gradient_accumulation_steps = accumulation(preset.total_batch, run.per_device_batch,
                                                           accelerator.num_processes)
    set_seed(run.seed)
    model = load_model(family, spec.name, preset.model, data.labels, image_size=preset.image_size)
    labels = model_labels(model)
    tokenizer = load_tokenizer(family, preset.model, launch.tokenizer)
    teacher, teacher_index = None, None
    if preset.distill_weight > 0:
        teacher = load_model(family, spec.name, run.teacher, data.labels, image_size=preset.image_size)
        teacher_labels = model_labels(teacher)
        teacher_index = None if teacher_labels == labels else label_index(teacher_labels, labels)
    if preset.pumer is None and reduction_of(model) is not None:  # its checkpoints would claim a reduction
        logger.warning("%s records the reduction %s, which this run does not apply (no --pumer): left out of the "
                       "checkpoints it saves", preset.model, reduction_of(model))
        delattr(model.config, "pumer_reduction")
    patch(model, preset.pumer, preset.pumer_mode)  # before prepare: DDP and autocast wrap the patched model

    inputs = Inputs(family, labels, tokenizer, preset.image_size, preset.text_length, launch.limit,
                    launch.on_bad_image)
    train_set = spec.split_set(data, spec.train_split, inputs, run, train=True)
    val_set = spec.split_set(data, spec.eval_split, inputs, run, train=False)
    train_loader = make_loader(train_set, run.per_device_batch, shuffle=True, workers=launch.workers, seed=run.seed,
                               drop_last=True, sampler=spec.train_sampler)
    val_loader = make_loader(val_set, launch.eval_batch, shuffle=False, workers=launch.workers)
    task = spec.make_task(TaskContext(labels, val_set.records, preset.loss_scale))
    engine, train_loader, val_loader = Engine.prepare(accelerator, spec.wrap_model(model), task,
                                                      _fit_config(spec, run), train_loader, val_loader,
                                                      teacher=teacher, teacher_index=teacher_index)
    state = engine.fit(train_loader, val_loader, resume=run.resume, save_extra=tokenizer.save_pretrained)
    info = {"preset": run.preset_name, "settings": asdict(preset), "processes": accelerator.num_processes,
            "total_steps": engine.total_steps, **state.state_dict()}
    if accelerator.is_main_process:
        (run.output / "train_info.json").write_text(json.dumps(info, indent=2, default=str))
    return info


# ---------------------------------------------------------------------------------------- eval


def load_for_eval(spec: TaskSpec[Any], run: EvalRun, data: TaskData) -> tuple[Family, nn.Module, Any]:
    """The model to score, its family and its tokenizer."""
    check_model_path(run.model, "model")
    family = resolve_family(run.family, run.model)
    model = load_model(family, spec.name, run.model, data.labels, image_size=run.image_size)
    return family, model, load_tokenizer(family, run.model, run.launch.tokenizer)


@dataclass(frozen=True)
class EvalSplit:
    """A classification evaluation made ready: the model (unpatched), its labels, the split and its loader."""

    accelerator: Accelerator
    model: nn.Module
    labels: Sequence[str]
    image_size: int
    dataset: ImageTextDataset[Any]
    loader: DataLoader  # prepared: each process's share


def open_eval_split(spec: TaskSpec[ClassificationData], run: EvalRun) -> EvalSplit:
    """Check the data, load the model, and prepare the loader of ``run.split`` (before any variant)."""
    data = spec.data(run.launch.data, run.dataset)
    data.check([run.split])
    accelerator = make_accelerator(run.launch)
    family, model, tokenizer = load_for_eval(spec, run, data)
    labels = model_labels(model)
    if labels is None:
        raise ValueError(f"{run.model} has no labels in its config: load a checkpoint of this task")
    image_size = run.image_size or model_image_size(model)
    launch = run.launch
    dataset = data.dataset(run.split, family, labels, tokenizer, image_size=image_size, text_length=run.text_length,
                           train=False, limit=launch.limit, on_bad_image=launch.on_bad_image)
    loader = accelerator.prepare(make_loader(dataset, launch.eval_batch, shuffle=False, workers=launch.workers))
    return EvalSplit(accelerator, model, labels, image_size, dataset, loader)


def _labelled(record: Any) -> bool:
    """Whether a record carries anything to score against (VQA's test questions carry no answers)."""
    return any(getattr(record, name, None) for name in ("label", "answers", "answer_type", "gold_label"))


def check_labelled(spec: TaskSpec[Any], split: str, records: Sequence[Any]) -> None:
    """Refuse to score a split none of whose records has a label: its score would read 0, not "unknown"."""
    if records and not any(_labelled(r) for r in records):
        fix = (f"write its answers with python -m recipes {spec.name} predict --split {split} and submit them"
               if spec.name == "vqa" else "evaluate a labelled split")
        raise ValueError(f"the {split} split of {spec.title} has no labels ({len(records)} unlabelled examples): "
                         f"eval has nothing to score it against; {fix}")


def variants_of(run: EvalRun) -> list[tuple[str, str | None]]:
    """(row name, PuMer config) of each variant an evaluation compares: the unpatched model first."""
    if run.pumer is None:
        return [("unpatched", None)]
    name = "PuMer from the checkpoint's config" if run.pumer == FROM_CONFIG else f"PuMer {run.pumer} ({run.pumer_mode})"
    return [("unpatched", None), (name, run.pumer)]


def timing_fields(timing: Timing, base: Timing, unit: str = "examples") -> dict[str, Any]:
    """A row's speed: ``<unit>_per_s`` (the median round, all processes), the speedup over ``base``
    (the unpatched row), and every round's seconds."""
    return {f"{unit}_per_s": timing.examples / timing.median_seconds, "speedup": timing.speedup_over(base),
            "seconds_per_pass": timing.median_seconds, "round_seconds": list(timing.seconds)}


def evaluate(spec: TaskSpec[ClassificationData], run: EvalRun) -> dict[str, Any]:
    """Score the model on a split, unpatched and (``--pumer``) patched, side by side: eval.json + eval.md.

    The metrics come from one pass of each variant over the whole split; the speed from
    ``time_models`` on the first ``timing_batches`` batches afterwards (the variants interleaved).
    """
    split = open_eval_split(spec, run)
    check_labelled(spec, run.split, split.dataset.records)
    accelerator = split.accelerator
    task = spec.make_task(TaskContext(split.labels, split.dataset.records))
    variants = variants_of(run)
    models = {name: accelerator.prepare(patch(copy.deepcopy(split.model), pumer, run.pumer_mode))
              for name, pumer in variants}
    results = {name: evaluate_model(accelerator, model, task, split.loader, desc=name, progress=run.launch.progress,
                                    keep_batches=run.timing_batches if i == 0 else 0)
               for i, (name, model) in enumerate(models.items())}
    timings = time_models(accelerator, models, task, results["unpatched"].batches, rounds=run.timing_rounds)
    base = timings["unpatched"]
    rows: list[dict[str, Any]] = []
    for name, pumer in variants:
        result, timing = results[name], timings[name]
        skipped = int(result.metrics.get("skipped_images", 0))
        rows.append({"variant": name, "pumer": pumer, "reduction": reduction_of(models[name]) if pumer else None,
                     **result.metrics, "examples": result.examples - skipped,
                     "skipped": skipped + split.dataset.dropped, **timing_fields(timing, base), "gflops_per_example": result.gflops,
                     "tokens_per_layer": tokens_per_layer(models[name], task, results["unpatched"].batches[0])})
        if accelerator.is_main_process:
            logger.info("%s: %s %.4f on %d examples (%d skipped), %.1f examples/s (x%.2f), %.3f GFLOPs/example", name,
                        spec.metric, result.metrics["score"], result.examples - skipped,
                        skipped + split.dataset.dropped,
                        timing.examples_per_second, timing.speedup_over(base), result.gflops)
    report: dict[str, Any] = {"task": spec.name, "model": run.model, "split": run.split, "metric": spec.metric,
                              "extra_metrics": [list(m) for m in spec.extra_metrics],
                              "image_size": split.image_size, "text_length": run.text_length,
                              "processes": accelerator.num_processes, "timing": timing_note(base, run), "rows": rows}
    if run.loader_speed:
        report["loader_examples_per_s"] = loader_throughput(split.loader, batches=run.loader_speed)
        if accelerator.is_main_process:
            logger.info("loader alone: %.1f examples/s (%d workers)", report["loader_examples_per_s"],
                        run.launch.workers)
    if accelerator.is_main_process:
        write_report(run.output, report, markdown_table(report))
    return report


def timing_note(base: Timing, run: EvalRun, unit: str = "examples") -> dict[str, Any]:
    """What the speed columns measured, for eval.json."""
    return {"what": "the model alone on batches held in device memory (no loader), after a warm-up; variants "
                    "interleaved round by round; median round; each pass as long as its slowest process",
            f"{unit}_per_pass": base.examples, "rounds": run.timing_rounds, "warmup_passes": base.warmup}


def tokens_per_layer(model: nn.Module, task: Task, batch: Mapping[str, Any]) -> list[dict[str, int]] | None:
    """The trace of one forward of a patched model on ``batch``: image and text tokens after each layer
    that reduces (None for an unpatched model)."""
    if not pumer_patch.is_patched(model):  # through DDP's wrapper too
        return None
    with torch.no_grad(), pumer_patch.recording(model) as traces:
        task.forward(model, batch)
    return [{"layer": c.layer, "image": c.image, "text": c.text} for t in traces[-1:] for c in t.counts]


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per variant: the task's metric (in percent; then its extra metrics), examples scored and skipped, examples/s,
    speedup, GFLOPs per example; then what the speed measured and the tokens per layer."""
    extra = report.get("extra_metrics", [])
    titles = "".join(f" {title} |" for _, title in extra)
    lines = [f"| variant | {report['metric']} |{titles} examples | skipped | examples/s | speedup | GFLOPs/ex |",
             "|---|---:|" + "---:|" * len(extra) + "---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        values = "".join(f" {100 * r[key]:.2f} |" for key, _ in extra)
        lines.append(f"| {r['variant']} | {100 * r['score']:.2f} |{values} {r['examples']} | {r['skipped']} | "
                     f"{r['examples_per_s']:.1f} | {r['speedup']:.2f}x | {r['gflops_per_example']:.3f} |")
    return "\n".join(lines + notes(report))


def notes(report: Mapping[str, Any]) -> list[str]:
    """The lines under a table: how the speed was measured, and each reduced variant's tokens per layer."""
    timing = report.get("timing")
    lines = []
    if timing:
        unit = "pairs" if "pairs_per_pass" in timing else "examples"
        lines += ["", f"Speed: {timing['what']} ({timing[f'{unit}_per_pass']} {unit} per pass, "
                      f"{timing['rounds']} rounds, {timing['warmup_passes']} warm-up pass)."]
    for r in report["rows"]:
        if r.get("tokens_per_layer"):
            counts = ", ".join(f"{c['layer']}: {c['image']} image / {c['text']} text" for c in r["tokens_per_layer"])
            lines += ["", f"Tokens after each reducing layer, {r['variant']}: {counts}."]
    return lines


def write_report(out: Path, report: Mapping[str, Any], table: str, stem: str = "eval") -> None:
    """``out/<stem>.json`` (everything) and ``out/<stem>.md`` (the table a person reads)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")
