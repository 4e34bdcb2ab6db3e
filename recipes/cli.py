"""The recipes' command line: ``python -m recipes TASK COMMAND [options]``, the only module that sees ``argparse``.

    python -m recipes vqa       train | eval | predict
    python -m recipes snli_ve   train | eval
    python -m recipes nlvr2     train | eval
    python -m recipes retrieval train | eval
    python -m recipes easy_vqa  [--quick]          (the laptop study)

``parse`` turns the arguments into a frozen run configuration: a ``TrainRun`` (the preset merged
with the options that override it), an ``EvalRun`` (with retrieval's ``PairScoring``), or the
study's ``StudyRun``. ``main`` sets up logging (the console, and a log file in the run's folder:
``train.log``, ``eval.log``) and hands that configuration to the task; nothing below this module
reads an ``argparse.Namespace``. The converters (``recipes.prepare``) load no
model and have command lines of their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from tqdm.contrib.logging import logging_redirect_tqdm

from recipes.data.records import RETRIEVAL_DATASETS
from recipes.laptop.config import QUICK, MeterStudyConfig, StudyConfig
from recipes.logs import configure_logging, log_file
from recipes.models import FAMILIES
from recipes.presets import PRESETS, get_preset
from recipes.run import PUMER_MODES, EvalRun, Launch, TaskSpec, TrainRun, evaluate, markdown_table, train
from recipes.tasks import easy_vqa, vqa
from recipes.tasks.nlvr2 import NLVR2
from recipes.tasks.retrieval import task as retrieval
from recipes.tasks.retrieval.task import PairScoring
from recipes.tasks.snli_ve import SNLI_VE
from recipes.tasks.vqa import VQA

__all__ = ["TASKS", "Invocation", "build_parser", "parse", "main"]

TASKS: dict[str, TaskSpec[Any]] = {spec.name: spec for spec in (VQA, SNLI_VE, NLVR2, retrieval.RETRIEVAL)}


@dataclass(frozen=True)
class Invocation:
    """One parsed command: the task, the command, its run configuration and the log level.

    scoring: retrieval ``eval``'s pair scoring (None otherwise).
    """

    task: str
    command: str
    run: TrainRun | EvalRun | easy_vqa.StudyRun
    scoring: PairScoring | None = None
    log_level: str = "INFO"


# ---------------------------------------------------------------------------------------- argument groups


def _add_common(q: argparse.ArgumentParser, spec: TaskSpec[Any]) -> None:
    """Options of every command: data, tokenizer, PuMer, precision, processes, loader, logging."""
    q.add_argument("--data", type=Path, required=True, help=f"data folder written by {spec.converter}")
    q.add_argument("--tokenizer", help="tokenizer folder or hub id [the model's, else the family's]")
    q.add_argument("--pumer", help="PuMer config, e.g. p0.1-r0.3-t0.2-258; eval: 'config', the reduction the "
                                   "checkpoint's config records (a -pumer run's best/) [none / the preset's]")
    q.add_argument("--pumer-mode", choices=PUMER_MODES, default=None,
                   help="reference: the research code's arithmetic; default: ours [reference / the preset's]")
    q.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    q.add_argument("--cpu", action="store_true", help="run on CPU even with GPUs (several processes: gloo)")
    q.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per process")
    q.add_argument("--eval-batch", type=int, default=None,
                   help="evaluation batch per process [train: --per-device-batch; eval: 64]")
    q.add_argument("--limit", type=int, help="first N examples of each split only (smoke runs)")
    q.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                   help="a missing or undecodable image: stop, or leave its example out (logged)")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


_PRESET_OVERRIDES = (("lr", float), ("epochs", float), ("eval-every", int), ("total-batch", int), ("image-size", int),
                     ("text-length", int), ("patience", int), ("distill-weight", float))


def _add_train(t: argparse.ArgumentParser, spec: TaskSpec[Any]) -> None:
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
    for name, kind in _PRESET_OVERRIDES:
        t.add_argument(f"--{name}", type=kind, help="override the preset")


def _add_eval(e: argparse.ArgumentParser, spec: TaskSpec[Any], *, default_split: str, output_help: str,
              timing: bool = True) -> None:
    """``eval`` / ``predict``: the model, its family for hub ids, the split and the input sizes; ``eval``
    (``timing``) also how its speed comparison is timed."""
    e.add_argument("--model", required=True)
    e.add_argument("--family", choices=sorted(FAMILIES), help="needed for hub ids only")
    e.add_argument("--split", default=default_split, choices=list(spec.splits))
    e.add_argument("--output", type=Path, required=True, help=output_help)
    e.add_argument("--image-size", type=int, default=None, help="[the model's config, else 384]")
    e.add_argument("--text-length", type=int, default=spec.text_length)
    if not timing:
        return
    e.add_argument("--timing-batches", type=int, default=4,
                   help="speed: batches (retrieval: pair batches) per timed pass, held in device memory [4]")
    e.add_argument("--timing-rounds", type=int, default=5, help="speed: interleaved timed rounds per variant [5]")


def _task_parser(sub: Any, spec: TaskSpec[Any]) -> tuple[Any, argparse.ArgumentParser, argparse.ArgumentParser]:
    """The task's commands, and its ``train`` and ``eval`` parsers with their common options."""
    task = sub.add_parser(spec.name, help=f"{spec.title}: train and evaluate",
                          description=f"{spec.title} on the engine")
    commands = task.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help=f"finetune with a preset (the best checkpoint on {spec.eval_split} is kept)")
    _add_common(t, spec)
    _add_train(t, spec)
    e = commands.add_parser("eval", help=f"{spec.metric} on a split, with and without --pumer")
    _add_common(e, spec)
    return commands, t, e


def _add_study(p: argparse.ArgumentParser) -> None:
    """The laptop study's options: every field of ``StudyConfig`` that a person tunes."""
    default = StudyConfig()
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
    g.add_argument("--reduce-layers", type=_layers,
                   help=f"PuMer's reduce layers [{','.join(map(str, default.reduce.layers))}]")
    g.add_argument("--prune", type=float, help=f"prune ratio [{default.reduce.prune:g}]")
    g.add_argument("--merge", type=float, help=f"image merge ratio [{default.reduce.merge:g}]")
    g.add_argument("--text-merge", type=float, help=f"text merge ratio [{default.reduce.text_merge:g}]")
    g.add_argument("--finetune-epochs", type=float, help=f"finetuning epochs [{default.finetune.epochs:g}]")
    g.add_argument("--finetune-lr", type=float, help=f"finetuning learning rate [{default.finetune.lr:g}]")
    g.add_argument("--distill-weight", type=float, help=f"KL-to-teacher weight, 0 for none [{default.distill_weight:g}]")

    g = p.add_argument_group("METER")
    meter = MeterStudyConfig()
    g.add_argument("--no-meter", action="store_true", help="the ViLT alone")
    g.add_argument("--meter-epochs", type=float, help=f"METER's training epochs [{meter.train.epochs:g}]")
    g.add_argument("--meter-finetune-epochs", type=float, help=f"METER's finetuning epochs [{meter.finetune.epochs:g}]")
    g.add_argument("--meter-encoder-merge", type=int,
                   help=f"ToMe's r per block of METER's CLIP tower [{meter.encoder_merge}]")

    g = p.add_argument_group("measurement")
    g.add_argument("--eval-batch-size", type=int, help=f"batch size of evaluation and timing [{default.eval_batch_size}]")
    g.add_argument("--timing-batches", type=int, help=f"batches per timed pass [{default.timing_batches}]")
    g.add_argument("--timing-rounds", type=int, help=f"interleaved timed passes per variant [{default.timing_rounds}]")


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 0,1; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes",
                                description="Train and evaluate with PuMer on VQAv2, SNLI-VE, NLVR2 and retrieval "
                                            "(TASK COMMAND), or run the laptop study (easy_vqa).")
    # the options only some tasks have, so that every train or eval namespace has them
    p.set_defaults(loss_scale=None, dataset=None, negatives=None, loader_speed=0, timing_batches=4, timing_rounds=5)
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    commands, t, e = _task_parser(sub, VQA)
    t.add_argument("--loss-scale", choices=["label_count", "mean"], help="override the preset")
    _add_eval(e, VQA, default_split="val", output_help="folder for eval.json / eval.md")
    e.add_argument("--loader-speed", type=int, default=0, metavar="BATCHES",
                   help="also time the loader alone over this many batches")
    predict = commands.add_parser("predict", help="answers in the official format")
    _add_common(predict, VQA)
    _add_eval(predict, VQA, default_split="test", output_help="predictions json file", timing=False)

    for spec in (SNLI_VE, NLVR2):
        _, _, e = _task_parser(sub, spec)
        _add_eval(e, spec, default_split=spec.splits[-1], output_help="folder for eval.json / eval.md")

    _, t, e = _task_parser(sub, retrieval.RETRIEVAL)
    for q in (t, e):
        q.add_argument("--dataset", choices=RETRIEVAL_DATASETS,
                       help="[train: the preset's; eval: the one DATA holds]")
        q.add_argument("--limit-images", dest="limit", type=int, help="first N images of each split (smoke runs)")
    t.add_argument("--negatives", type=int, help="captions of other images per image [the preset's: 15]")
    _add_eval(e, retrieval.RETRIEVAL, default_split="test", output_help="folder for eval.json / eval.md and scores/")
    e.add_argument("--pair-batch", type=int, default=256, help="pairs scored per forward [256]")
    e.add_argument("--tile-images", type=int, default=32, help="score-matrix tile height: images [32]")
    e.add_argument("--tile-captions", type=int, default=2048, help="score-matrix tile width: captions [2048]")
    e.add_argument("--no-cache", action="store_true", help="METER: run the whole model per pair (no feature cache)")
    e.add_argument("--rerank-top", type=int, help="approximate: exact scores only for each query's K best first-pass "
                                                  "candidates [off]")
    e.add_argument("--rerank-pumer", help="the first pass: the model under this PuMer config (with --rerank-top)")

    study = sub.add_parser("easy_vqa", help="the laptop study: a small ViLT and METER from scratch on easy-vqa",
                           description=easy_vqa.__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_study(study)
    return p


# ---------------------------------------------------------------------------------------- arguments -> run configuration


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _launch(args: argparse.Namespace, *, eval_batch: int) -> Launch:
    return Launch(data=args.data, eval_batch=args.eval_batch or eval_batch, tokenizer=args.tokenizer,
                  mixed_precision=args.mixed_precision, cpu=args.cpu, workers=args.workers, limit=args.limit,
                  on_bad_image=args.on_bad_image, progress=not args.no_progress)


def _train_run(args: argparse.Namespace) -> TrainRun:
    task_options = _given(loss_scale=args.loss_scale, dataset=args.dataset, negatives=args.negatives)
    preset = get_preset(args.preset, model=args.model, lr=args.lr, epochs=args.epochs, eval_every=args.eval_every,
                        total_batch=args.total_batch, image_size=args.image_size, text_length=args.text_length,
                        patience=args.patience, pumer=args.pumer, pumer_mode=args.pumer_mode,
                        distill_weight=args.distill_weight, **task_options)
    return TrainRun(preset_name=args.preset, preset=preset, output=args.output,
                    launch=_launch(args, eval_batch=args.per_device_batch), teacher=args.teacher,
                    per_device_batch=args.per_device_batch, resume=args.resume,
                    stop_after_steps=args.stop_after_steps, max_steps=args.max_steps, seed=args.seed)


def _eval_run(args: argparse.Namespace) -> EvalRun:
    return EvalRun(model=args.model, output=args.output, split=args.split, launch=_launch(args, eval_batch=64),
                   text_length=args.text_length, family=args.family, image_size=args.image_size, pumer=args.pumer,
                   pumer_mode=args.pumer_mode or "reference", dataset=args.dataset,
                   loader_speed=args.loader_speed, timing_batches=args.timing_batches,
                   timing_rounds=args.timing_rounds)


def _study_run(args: argparse.Namespace) -> easy_vqa.StudyRun:
    """``StudyConfig()`` (or the quick one) with the options given on the command line."""
    cfg = QUICK if args.quick else StudyConfig()
    model = dataclasses.replace(cfg.model, **_given(hidden=args.hidden, layers=args.layers, heads=args.heads,
                                                    intermediate=args.intermediate))
    train_cfg = dataclasses.replace(cfg.train, **_given(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr))
    reduce = dataclasses.replace(cfg.reduce, **_given(layers=args.reduce_layers, prune=args.prune, merge=args.merge,
                                                      text_merge=args.text_merge))
    finetune = dataclasses.replace(cfg.finetune, **_given(epochs=args.finetune_epochs, lr=args.finetune_lr))
    meter = None
    if cfg.meter is not None and not args.no_meter:
        meter = dataclasses.replace(
            cfg.meter,
            train=dataclasses.replace(cfg.meter.train, **_given(epochs=args.meter_epochs)),
            finetune=dataclasses.replace(cfg.meter.finetune, **_given(epochs=args.meter_finetune_epochs)),
            **_given(encoder_merge=args.meter_encoder_merge),
        )
    config = dataclasses.replace(
        cfg, model=model, train=train_cfg, reduce=reduce, finetune=finetune, meter=meter,
        **_given(distill_weight=args.distill_weight, train_images=args.train_images, test_images=args.test_images,
                 seed=args.seed, eval_batch_size=args.eval_batch_size, timing_batches=args.timing_batches,
                 timing_rounds=args.timing_rounds),
    )
    return easy_vqa.StudyRun(config=config, out=args.out, cache_dir=args.cache_dir, retrain=args.retrain,
                             quick=args.quick, threads=args.threads, progress=not args.no_progress)


def parse(argv: Sequence[str] | None = None) -> Invocation:
    """The command line as a frozen run configuration (validated: a bad option exits with its usage)."""
    args = build_parser().parse_args(argv)
    if args.task == "easy_vqa":
        return Invocation("easy_vqa", "study", _study_run(args), log_level=args.log_level)
    if args.command == "train":
        return Invocation(args.task, "train", _train_run(args), log_level=args.log_level)
    scoring = None
    if args.task == "retrieval":
        scoring = PairScoring(pair_batch=args.pair_batch, tile_images=args.tile_images,
                              tile_captions=args.tile_captions, cache=not args.no_cache, rerank_top=args.rerank_top,
                              rerank_pumer=args.rerank_pumer)
    return Invocation(args.task, args.command, _eval_run(args), scoring=scoring, log_level=args.log_level)


# ---------------------------------------------------------------------------------------- commands


def _run(invocation: Invocation) -> None:
    run, task = invocation.run, invocation.task
    if isinstance(run, easy_vqa.StudyRun):
        print(easy_vqa.markdown_table(easy_vqa.study(run)))
    elif isinstance(run, TrainRun):
        train(TASKS[task], run)
    elif invocation.command == "predict":
        vqa.predict(run)
    else:
        if invocation.scoring is not None:
            table = retrieval.markdown_table(retrieval.evaluate(run, invocation.scoring))
        else:
            table = markdown_table(evaluate(TASKS[task], run))
        if PartialState().is_main_process:  # one table per job, not one per process
            print(table)


def _log_path(invocation: Invocation) -> Path:
    """Where a command keeps its log: ``OUTPUT/<command>.log`` (predict: beside its predictions file)."""
    run = invocation.run
    if isinstance(run, easy_vqa.StudyRun):
        return run.out / "study.log"
    if invocation.command == "predict":
        return run.output.with_suffix(".log")
    return run.output / f"{invocation.command}.log"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recipes ...``: parse, set up logging (the console, and the run folder's log file), run."""
    args = list(sys.argv[1:] if argv is None else argv)
    invocation = parse(args)
    configure_logging(invocation.log_level)
    with log_file(_log_path(invocation), "python -m recipes " + " ".join(args)), logging_redirect_tqdm():
        _run(invocation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
