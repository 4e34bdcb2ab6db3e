"""The training and evaluation engine: one loop on ``accelerate`` that knows no dataset and no model family.

A task hands it a model, loaders of tensor dicts and a ``Task`` (the model call on a batch, the loss
of its outputs, the per-example outputs to gather, the metrics). The engine does the rest the same
way for every task: AdamW (0.9, 0.98), eps 1e-8 with parameter groups (no decay on biases and norms, learning-rate
multipliers by module-name pattern), linear warm-up then polynomial decay to an end learning rate,
gradient accumulation, mixed precision, distillation from a frozen teacher, evaluation every K
steps with ``gather_for_metrics`` (each example counted exactly once on any number of processes),
the best checkpoint kept as safetensors, early stopping, and resume from saved state that ends
where an uninterrupted run would (same steps, same batches: a digest of every example index seen,
and of its augmentation seed when the batch has one, is part of the state, so that promise is
checked, not assumed). A save is crash-safe: it is written
to a new folder, flushed to disk, listed in a manifest and only then switched in for the previous
one, so a job killed while saving resumes from the last complete save and says which.

Runs on CPU, one GPU, or several GPUs and nodes under ``accelerate launch``. Evaluation alone is the
free function ``evaluate``: it needs a model, a task and a prepared loader, no training settings.

Speed is measured apart from the metrics, by ``time_models``: the models alone on batches already in
device memory (no loader, no image decoding, no worker start-up in the timed region), after an
untimed warm-up, in interleaved rounds (each model one pass per round, the order rotated), the
median round; each pass starts on every process at once and counts as long as its slowest process,
so every process reports the same figure for the whole job.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pumer_patch.flops import gflops_per_example

__all__ = [
    "Task",
    "FitConfig",
    "TrainState",
    "EvalResult",
    "evaluate",
    "Timing",
    "interleaved_seconds",
    "time_models",
    "param_groups",
    "build_optimizer",
    "build_scheduler",
    "distill_loss",
    "Engine",
    "complete_state",
]

logger = get_logger(__name__)  # logs from the main process only (no N copies under accelerate launch)


class Task(Protocol):
    """What the engine needs from a task; batches are dicts of tensors with an ``index`` (B,) entry.

    The task owns the model call: ``forward`` returns whatever the model gives (a ``ModelOutput``, a
    tensor), and ``loss`` and ``eval_outputs`` read it. Distillation reads ``outputs.logits`` (B, L)
    of the student and the teacher, so a task trained with a teacher returns outputs that have them.
    """

    def model_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The keyword arguments of ``model(...)`` (also what a FLOP count runs)."""

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Any:
        """The model's outputs for a batch (the engine runs it under autocast)."""

    def loss(self, outputs: Any, batch: Mapping[str, Tensor]) -> Tensor:
        """The task loss of a batch (a scalar), leaving out examples whose ``valid`` is False."""

    def eval_outputs(self, outputs: Any, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-example tensors (first dimension B) to gather across processes."""

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        """Metrics of the gathered outputs of a whole split; ``"score"`` is the one to maximise."""


@dataclass(frozen=True)
class FitConfig:
    """Optimisation and bookkeeping of one ``Engine.fit`` (a preset fills it for the tasks; the laptop study its own).

    ``lr_multipliers``: fnmatch patterns on module names (``"*classifier*": 10``), first match wins.
    ``epochs`` or ``max_steps`` (optimizer steps; wins when set) fix the schedule's length.
    ``stop_after_steps``: end this job after so many steps of the schedule, saving the state, as a
    cluster job limit would (``--resume`` goes on from there).
    """

    output_dir: Path
    lr: float
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    lr_multipliers: Mapping[str, float] = field(default_factory=dict)
    warmup: float = 0.1
    end_lr: float = 1e-7
    decay_power: float = 1.0
    epochs: float = 10.0
    max_steps: int | None = None
    eval_every: int = 800
    patience: int = 15
    clip_grad: float | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    stop_after_steps: int | None = None
    log_every: int = 50
    progress: bool = True
    checkpoint: bool = True  # False: no best/ and state/ on disk (a caller that keeps the final weights itself)
    fused: bool | None = None  # fused AdamW (one kernel over all parameters; on CPU since torch 2.4)
    name: str = "train"  # progress bar and log prefix


@dataclass
class TrainState:
    """Everything beyond model, optimizer, scheduler and RNGs that a resumed run needs (saved with them)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already taken
    examples: int = 0
    best_score: float = -math.inf
    best_step: int = -1
    evals_without_gain: int = 0
    data_digest: str = ""  # running sha1 over every example index (and augmentation seed) taken, in order
    loss: float | None = None  # running mean of the training loss (0.95 decay), for logs
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class EvalResult:
    """Metrics of one evaluation, its speed (examples/s over the whole loop) and GFLOPs per example.

    The loop's speed includes the loader (and its workers' start-up on a first pass): a progress
    figure, not a comparison of models; ``time_models`` gives that. ``batches``: the first batches
    of this process, as the model received them, when ``evaluate`` was asked to keep some.
    """

    metrics: dict[str, float]
    examples: int
    seconds: float
    gflops: float
    outputs: dict[str, Tensor]
    batches: list[dict[str, Tensor]] = field(default_factory=list)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds

    def summary(self) -> dict[str, float]:
        return {**self.metrics, "examples": self.examples, "examples_per_s": self.examples_per_second,
                "gflops_per_example": self.gflops}


def _is_no_decay(param_name: str, module: nn.Module) -> bool:
    # biases, and every parameter of a normalisation layer (LayerNorm, CLIP's LayerNorm, RMSNorm, ...)
    return param_name.endswith("bias") or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float, lr: float,
                 multipliers: Mapping[str, float]) -> list[dict[str, Any]]:
    """AdamW groups: (decay or not) x (learning-rate multiplier of the first pattern matching the module)."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    matched: set[str] = set()
    for module_name, module in model.named_modules():
        mult = 1.0
        for pattern, value in multipliers.items():
            if fnmatch.fnmatch(module_name, pattern):
                mult = value
                matched.add(pattern)
                break
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                groups.setdefault((_is_no_decay(name, module), mult), []).append(p)
    unmatched = set(multipliers) - matched
    if unmatched:
        raise ValueError(f"learning-rate multiplier patterns {sorted(unmatched)} match no module of "
                         f"{type(model).__name__}; module names look like {[n for n, _ in model.named_modules()][1:6]}")
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr": lr * mult}
            for (no_decay, mult), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.AdamW:
    """AdamW with ``param_groups``."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr, cfg.lr_multipliers),
                             lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=cfg.fused)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float, end_lr: float, base_lr: float,
                    power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup * total_steps`` (the first step already at 1/warm), then
    ``end + (1 - end) * remaining ** power`` of each group's lr, ``end = end_lr / base_lr`` and
    ``remaining`` going linearly from 1 to 0."""
    warm = max(1, round(warmup * total_steps))
    end = end_lr / base_lr

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        # (total - step) / (total - warm), not 1 - progress: exact at end = 0, power = 1 (the laptop study's)
        remaining = max(0.0, (total_steps - step) / max(1, total_steps - warm))
        return end + (1.0 - end) * remaining**power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) on softmax at ``temperature``, batch mean, times T^2 (gradients keep their
    scale across temperatures; at PuMer's T = 1 this is the plain KL). student, teacher: (B, L)."""
    t = temperature
    return F.kl_div((student / t).log_softmax(-1), (teacher / t).log_softmax(-1), log_target=True,
                    reduction="batchmean") * t * t


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, task: Task, loader: DataLoader, *, desc: str = "eval",
             progress: bool = True, gflops: float | None = None, keep_batches: int = 0) -> EvalResult:
    """Metrics of ``model`` on the (prepared) ``loader``, every example exactly once, and its speed.

    gflops: the model's GFLOPs per example when already known; otherwise the first batch counts them
    (outside the timing: they depend on shapes only). keep_batches: hold on to this process's first
    so many batches (``EvalResult.batches``, on the device) for ``time_models``.
    """
    acc = accelerator
    model.eval()
    parts: list[dict[str, Tensor]] = []
    kept: list[dict[str, Tensor]] = []
    start = time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=not (progress and acc.is_local_main_process), unit="batch",
                      dynamic_ncols=True):
        if len(kept) < keep_batches:
            kept.append(dict(batch))
        if gflops is None:
            # the extra forward runs on a forked RNG so that measuring never changes a run's random draws
            flop_start = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                gflops = gflops_per_example(acc.unwrap_model(model), task.model_inputs(batch))
            start += time.perf_counter() - flop_start
        with acc.autocast():
            model_outputs = task.forward(model, batch)
        outputs = task.eval_outputs(model_outputs, batch)
        parts.append({k: v.detach() for k, v in acc.gather_for_metrics(outputs).items()})
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gathered = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]} if parts else {}
    examples = len(gathered["index"]) if gathered else 0
    if examples != len(set(gathered["index"].tolist()) if gathered else ()):
        raise RuntimeError("an evaluation example was gathered twice: build the evaluation loader with "
                           "recipes.data.loader.make_loader and pass it through accelerator.prepare")
    # examples/s of this process's share, times the processes: the job's rate
    return EvalResult(task.metrics(gathered), examples, seconds, gflops or 0.0, gathered, kept)


@dataclass(frozen=True)
class Timing:
    """One model's timed passes: ``examples`` per pass (all processes), ``seconds`` of each round's pass
    (the slowest process's), ``warmup`` untimed passes before them."""

    examples: int
    seconds: tuple[float, ...]
    warmup: int

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.median_seconds

    def speedup_over(self, base: Timing) -> float:
        """How many times faster than ``base`` per example (medians; 1.0 for identical compute, within noise)."""
        return (base.median_seconds / base.examples) / (self.median_seconds / self.examples)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a timer read after it measures the work, not its launch."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


@torch.no_grad()
def interleaved_seconds(accelerator: Accelerator, passes: Mapping[str, Callable[[], object]], *, rounds: int,
                        warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each pass per round, the same for every process: ``{name: [round 0, round 1, ...]}``.

    Each pass runs ``warmup`` times untimed first (one-off costs: kernels chosen, caches and
    allocator filled). Then, in every round, each pass runs once, in an order rotated from round to
    round so that drift in the machine's load hits all of them alike. Every pass starts on all
    processes together and ends with a device sync; its time is that of the slowest process.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"timing needs rounds >= 1 and warmup >= 0, got {rounds} and {warmup}")
    acc, names = accelerator, list(passes)
    for name in names:
        for _ in range(warmup):
            passes[name]()
    _synchronize(acc.device)
    local: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            acc.wait_for_everyone()
            start = time.perf_counter()
            passes[name]()
            _synchronize(acc.device)
            local[name].append(time.perf_counter() - start)
    out = {}
    for name in names:
        per_process = acc.gather(torch.tensor([local[name]], dtype=torch.float64, device=acc.device))  # (P, rounds)
        out[name] = per_process.amax(0).tolist()
    return out


def time_models(accelerator: Accelerator, models: Mapping[str, nn.Module], task: Task,
                batches: Sequence[Mapping[str, Tensor]], *, rounds: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Each model's ``task.forward`` over the same ``batches`` (this process's, on the device), timed by
    ``interleaved_seconds``; examples per pass summed over processes.

    Nothing but the model runs in the timed region: the batches were loaded (and moved) before,
    so the first model pays no loader start-up and every model is timed the same way.
    """
    if not batches:
        raise ValueError("time_models needs at least one batch (evaluate(..., keep_batches=N) keeps them)")
    acc = accelerator
    for model in models.values():
        model.eval()

    def run(model: nn.Module) -> Callable[[], None]:
        def one_pass() -> None:
            for batch in batches:
                with acc.autocast():
                    task.forward(model, batch)
        return one_pass

    seconds = interleaved_seconds(acc, {name: run(model) for name, model in models.items()}, rounds=rounds,
                                  warmup=warmup)
    local = sum(len(b["index"]) for b in batches)
    examples = int(acc.reduce(torch.tensor(local, device=acc.device), reduction="sum").item())
    return {name: Timing(examples, tuple(s), warmup) for name, s in seconds.items()}


class Engine:
    """Trains one model for one task under an ``Accelerator``: ``Engine.prepare(...)``, then ``fit``.

    The model must already be patched (``pumer_patch.apply``) when wanted: patching happens before
    ``accelerator.prepare`` so that DDP and mixed precision wrap the patched modules.
    ``teacher``: a frozen unreduced model; ``teacher_index`` (L,) reorders its logits into the
    student's label order when the two were trained with different label orders.
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, task: Task, cfg: FitConfig, *,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, total_steps: int,
                 teacher: nn.Module | None = None, teacher_index: Tensor | None = None) -> None:
        """model, optimizer: as ``accelerator.prepare`` returned them; scheduler: over ``total_steps``
        optimizer steps of this process, registered for checkpointing."""
        self.accelerator, self.task, self.cfg = accelerator, task, cfg
        self.model, self.optimizer, self.scheduler, self.total_steps = model, optimizer, scheduler, total_steps
        self.teacher: nn.Module | None = None
        self.teacher_index: Tensor | None = None
        if teacher is not None:  # frozen: evaluation mode, run under no_grad
            self.teacher = teacher.eval().to(accelerator.device)
            if teacher_index is not None:
                self.teacher_index = teacher_index.to(accelerator.device)
        self.gflops: float | None = None  # the model's GFLOPs per example, counted at the first evaluation

    @classmethod
    def prepare(cls, accelerator: Accelerator, model: nn.Module, task: Task, cfg: FitConfig, train_loader: DataLoader,
                eval_loader: DataLoader | None = None, *, teacher: nn.Module | None = None,
                teacher_index: Tensor | None = None) -> tuple[Engine, DataLoader, DataLoader | None]:
        """Build the optimizer, ``prepare`` model, optimizer and loaders, then the scheduler for the
        run's length in this process's optimizer steps; returns the engine and the prepared loaders.

        The scheduler is registered for checkpointing rather than prepared: accelerate's wrapper steps
        it once per process per step, for schedules written in single-process steps; ours is
        written in the steps each process actually takes.
        """
        optimizer = build_optimizer(model, cfg)
        if eval_loader is None:
            model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        else:
            model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader,
                                                                              eval_loader)
        if cfg.max_steps is not None:
            total = cfg.max_steps
        else:
            total = max(1, math.ceil(cfg.epochs * math.ceil(len(train_loader) / accelerator.gradient_accumulation_steps)))
        scheduler = build_scheduler(optimizer.optimizer, total, cfg.warmup, cfg.end_lr, cfg.lr, cfg.decay_power)
        accelerator.register_for_checkpointing(scheduler)
        engine = cls(accelerator, model, task, cfg, optimizer=optimizer, scheduler=scheduler, total_steps=total,
                     teacher=teacher, teacher_index=teacher_index)
        return engine, train_loader, eval_loader

    def evaluate(self, loader: DataLoader, *, desc: str = "eval") -> EvalResult:
        """``evaluate`` of the engine's model; its GFLOPs are counted once per engine."""
        result = evaluate(self.accelerator, self.model, self.task, loader, desc=desc, progress=self.cfg.progress,
                          gflops=self.gflops)
        self.gflops = result.gflops
        return result

    def fit(self, train_loader: DataLoader, eval_loader: DataLoader | None, *, resume: bool = False,
            save_extra: Callable[[Path], None] | None = None) -> TrainState:
        """Train with the schedule of ``cfg``; evaluate every ``eval_every`` steps, keep the best in
        ``output_dir/best`` (safetensors), save the resumable state in ``output_dir/state``.

        ``train_loader`` and ``eval_loader``: the prepared loaders ``Engine.prepare`` returned.
        """
        cfg, acc = self.cfg, self.accelerator
        steps_per_epoch = math.ceil(len(train_loader) / acc.gradient_accumulation_steps)
        state = TrainState()
        acc.register_for_checkpointing(state)
        if resume:
            state_dir = complete_state(Path(cfg.output_dir))
            acc.load_state(str(state_dir))
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", state_dir, state.step, state.epoch,
                        state.batch_in_epoch)
        logger.info("%s: %d steps (%d per epoch), %d processes x %d examples x %d accumulation, lr %g%s",
                    cfg.name, self.total_steps, steps_per_epoch, acc.num_processes,
                    train_loader.total_batch_size // acc.num_processes, acc.gradient_accumulation_steps, cfg.lr,
                    f", distilled (weight {cfg.distill_weight:g}, T {cfg.distill_temperature:g})" if self.teacher else "")
        stop_at = self.total_steps if cfg.stop_after_steps is None else min(self.total_steps, cfg.stop_after_steps)
        bar = tqdm(total=self.total_steps, initial=state.step, desc=cfg.name, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_local_main_process))
        stop = state.step >= stop_at
        while not stop:
            train_loader.set_epoch(state.epoch)
            batches: Iterable[dict[str, Tensor]] = (
                acc.skip_first_batches(train_loader, state.batch_in_epoch) if state.batch_in_epoch else train_loader)
            self.model.train()
            for batch in batches:
                loss = self._train_micro_step(batch, state)
                state.loss = loss if state.loss is None else 0.95 * state.loss + 0.05 * loss
                if not acc.sync_gradients:
                    continue
                state.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{state.loss:.4f}", refresh=False)
                stop = self._after_step(state, stop_at, eval_loader, save_extra)
                if stop:
                    break
            else:  # the epoch is used up (a state saved on its last batch resumes here, skipping all of it)
                state.epoch += 1
                state.batch_in_epoch = 0
        bar.close()
        if state.step < stop_at:
            logger.info("early stop at step %d: %d evaluations without gain", state.step, state.evals_without_gain)
        return state

    def _after_step(self, state: TrainState, stop_at: int, eval_loader: DataLoader | None,
                    save_extra: Callable[[Path], None] | None) -> bool:
        """What follows an optimizer step: log, evaluate (keep the best), save the state; True to stop."""
        cfg = self.cfg
        if state.step % cfg.log_every == 0:
            logger.info("%s: step %d/%d: loss %.4f, lr %.3g", cfg.name, state.step, self.total_steps, state.loss,
                        self.scheduler.get_last_lr()[0])
        due = state.step % cfg.eval_every == 0 or state.step == self.total_steps
        stopped_early = False
        if due:
            stopped_early = self._evaluate_and_keep(eval_loader, state, save_extra)
            self.model.train()
        stop = state.step >= stop_at or stopped_early
        if cfg.checkpoint and (due or stop):
            self._save_state(state)
        return stop

    def _train_micro_step(self, batch: Mapping[str, Tensor], state: TrainState) -> float:
        acc, cfg = self.accelerator, self.cfg
        indices = acc.gather(batch["index"]).tolist()
        # the augmentation's seeds too: same examples augmented otherwise are other data
        taken = [indices, acc.gather(batch["augment_seed"]).tolist()] if "augment_seed" in batch else indices
        state.data_digest = hashlib.sha1((state.data_digest + json.dumps(taken)).encode()).hexdigest()
        state.examples += len(indices)
        state.batch_in_epoch += 1
        with acc.accumulate(self.model):
            with acc.autocast():
                outputs = self.task.forward(self.model, batch)
            loss = self.task.loss(outputs, batch)
            if self.teacher is not None and cfg.distill_weight > 0:
                with torch.no_grad(), acc.autocast():
                    t_logits = self.task.forward(self.teacher, batch).logits
                if self.teacher_index is not None:
                    t_logits = t_logits[:, self.teacher_index]  # (B, L_teacher) -> (B, L) in the student's order
                loss = loss + cfg.distill_weight * distill_loss(outputs.logits.float(), t_logits.float(),
                                                                cfg.distill_temperature)
            acc.backward(loss)
            if acc.sync_gradients and cfg.clip_grad is not None:
                acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _evaluate_and_keep(self, eval_loader: DataLoader | None, state: TrainState,
                           save_extra: Callable[[Path], None] | None) -> bool:
        """Evaluate, save the model to ``best/`` if it gained; True when early stopping triggers."""
        if eval_loader is None:
            if self.cfg.checkpoint:
                self._save_model(Path(self.cfg.output_dir) / "best", save_extra)
            return False
        result = self.evaluate(eval_loader)
        score = result.metrics["score"]
        state.history.append({"step": state.step, **result.summary()})
        logger.info("%s: step %d: %s", self.cfg.name, state.step, ", ".join(f"{k} {v:.4g}" for k, v in result.summary().items()))
        if score > state.best_score:
            state.best_score, state.best_step, state.evals_without_gain = score, state.step, 0
            if self.cfg.checkpoint:
                self._save_model(Path(self.cfg.output_dir) / "best", save_extra)
        else:
            state.evals_without_gain += 1
        return state.evals_without_gain >= self.cfg.patience

    def _save_model(self, directory: Path, save_extra: Callable[[Path], None] | None) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        # the patch never touches the state_dict: a patched model saves plain weights
        model = acc.unwrap_model(self.model)
        if hasattr(model, "save_pretrained"):  # transformers >= 5 writes safetensors only
            model.save_pretrained(directory, is_main_process=acc.is_main_process)
        elif acc.is_main_process:  # a plain module: its state_dict as safetensors
            directory.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
        if acc.is_main_process and save_extra is not None:
            save_extra(directory)
        acc.wait_for_everyone()

    def _save_state(self, state: TrainState) -> None:
        """Write the resumable state to ``state.tmp-<step>/``, then switch ``state/`` to it (see ``complete_state``).

        A kill at any moment leaves a complete ``state/`` (the previous one until the switch) or, in
        the instant between the two renames, a complete ``state.old-<step>/`` that resume falls back to.
        """
        acc = self.accelerator
        out = Path(self.cfg.output_dir)
        tmp = out / f"state.tmp-{state.step}"
        if acc.is_main_process and tmp.exists():  # a save of this step that died half-way (a resumed run's own)
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()  # every process's files (RNG states) are in before the manifest lists them
        if acc.is_main_process:
            (tmp / "train_state.json").write_text(json.dumps(state.state_dict(), indent=2, default=float))
            files = sorted(f for f in tmp.iterdir() if f.is_file())
            for f in files:
                _fsync(f)
            manifest = {"step": state.step, "files": {f.name: f.stat().st_size for f in files}}
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
            _fsync(tmp / _MANIFEST)
            _fsync(tmp)
            final, old = out / "state", out / f"state.old-{state.step}"
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            _fsync(out)
            for stale in out.glob("state.*"):  # the previous save, and unfinished saves of other steps
                if stale.is_dir():
                    shutil.rmtree(stale)
        acc.wait_for_everyone()


_MANIFEST = "manifest.json"


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') bytes to disk: a rename after it never points at unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _incomplete(directory: Path) -> str | None:
    """Why ``directory`` is no complete saved state (None when it is): its manifest missing or a file off."""
    manifest = directory / _MANIFEST
    if not manifest.is_file():
        return "no manifest.json (a save that did not finish, or one of a version without manifests)"
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"an unreadable manifest.json ({err})"
    for name, size in listed.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def _saved_step(directory: Path) -> int:
    return int(json.loads((directory / _MANIFEST).read_text())["step"])


def complete_state(output_dir: Path) -> Path:
    """The saved state a resume loads: ``state/`` when complete, else the latest complete leftover of a save.

    A save is complete when its ``manifest.json`` (written last, after every file is on disk)
    lists every file at its size. ``state/`` is only ever replaced by a complete save, so it is
    incomplete only when written by hand or by an older version; a save killed between its two
    renames leaves ``state.old-<step>/`` (the previous one) and ``state.tmp-<step>/`` (the new one).
    Logs which folder it chose and why; raises ``FileNotFoundError`` when there is none.
    """
    final = output_dir / "state"
    reasons: list[str] = []
    if final.is_dir():
        why = _incomplete(final)
        if why is None:
            unfinished = sorted(p.name for p in output_dir.glob("state.tmp-*") if _incomplete(p) is not None)
            if unfinished:
                logger.warning("resume: ignoring the unfinished save %s (the run was killed while saving)",
                               ", ".join(unfinished))
            return final
        reasons.append(f"{final}: {why}")
    leftovers = [p for p in output_dir.glob("state.*-*") if p.is_dir()]
    for p in leftovers:
        why = _incomplete(p)
        if why is not None:
            reasons.append(f"{p}: {why}")
    complete = [p for p in leftovers if _incomplete(p) is None]
    if not complete:
        found = "; ".join(reasons) if reasons else "nothing saved"
        raise FileNotFoundError(f"--resume: no complete saved state in {output_dir} ({found}); a run saves it at "
                                "every evaluation; start afresh without --resume")
    chosen = max(complete, key=_saved_step)
    logger.warning("resume: %s; falling back to %s (step %d), the last complete save",
                   "; ".join(reasons) or f"{final} is missing", chosen, _saved_step(chosen))
    return chosen
