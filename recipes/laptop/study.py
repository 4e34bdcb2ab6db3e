"""The laptop study end to end: train (or load) the models, measure every variant, write results and figures."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, PreTrainedModel, PreTrainedTokenizerBase, ViltForQuestionAnswering

import pumer_patch
from pumer_patch.flops import gflops_per_example
from pumer_patch.models.meter import MeterForQuestionAnswering
from recipes.laptop.config import StudyConfig
from recipes.laptop.data import Split, build_tokenizer, load_splits
from recipes.laptop.figures import figure_examples, plot_kept_merged, plot_tradeoff
from recipes.laptop.measure import measure_throughput, tokens_per_layer
from recipes.laptop.model import build_meter, build_model
from recipes.laptop.train import accuracy, predict, train
from recipes.laptop.variants import Variant, build_meter_variants, build_variants, meter_patches, patch_args
from recipes.laptop.vlm import (VlmSplit, VlmVariant, build_vlm, generate_answers, visual_tokens, vlm_accuracy,
                                vlm_patches, vlm_split, vlm_tokens_per_layer, vlm_variants)

__all__ = ["Trained", "markdown_table", "train_or_load", "evaluate_variants", "time_variants", "write_results",
           "run_study"]

logger = logging.getLogger(__name__)


def _cached(
    directory: Path,
    retrain: bool,
    fit: Any,
    tokenizer: PreTrainedTokenizerBase | None = None,
    cls: type[PreTrainedModel] = ViltForQuestionAnswering,
) -> tuple[PreTrainedModel, dict[str, Any], bool]:
    """Load the ``cls`` saved in ``directory``, or call ``fit() -> (model, info)`` and save it there.

    Saved with ``save_pretrained`` (plus ``train_info.json``) into a temporary folder that is renamed
    into place last, so an interrupted run never leaves a half-written cache behind.
    """
    info_path = directory / "train_info.json"
    if not retrain and info_path.is_file():
        info = json.loads(info_path.read_text())
        logger.info("loading cached weights from %s (trained in %.0f s; --retrain to train again)",
                    directory, info["seconds"])
        return cls.from_pretrained(directory).eval(), info, True
    model, info = fit()
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    (partial / "train_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(directory, ignore_errors=True)  # also drops models finetuned from stale weights
    partial.rename(directory)
    logger.info("saved weights to %s", directory)
    return model, info, False


def _meter_weights(
    cfg: StudyConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_split: Split,
    val: Split,
    answers: Sequence[str],
    cache_dir: Path,
    retrain: bool,
    progress: bool,
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Train (or load) the METER, then finetune (or load) it once per reduction of ``meter_patches``.

    Returns the weights under the names ``build_meter_variants`` reads (``"meter"``,
    ``"meter-finetuned-<reduction>"``) and each run's training info. The finetuned folders live below
    the trained METER's, which a retrain replaces whole.
    """
    m = cfg.meter
    if m is None:
        raise ValueError("cfg.meter is None: this study trains no METER")

    def fit_base() -> tuple[nn.Module, dict[str, Any]]:
        model = build_meter(m.model, tokenizer, train_split.input_ids.shape[1], answers, cfg.seed)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        logger.info("training a METER from scratch: %s, %.2fM parameters (%.2fM of them the word embedding)", m.model,
                    n_params, model.meter.text_transformer.embeddings.word_embeddings.weight.numel() / 1e6)
        info = train(model, train_split, m.train, seed=cfg.seed, val=val, eval_batch_size=cfg.eval_batch_size,
                     desc="train-meter", progress=progress)
        return model, info

    meter_dir = cache_dir / f"meter-{cfg.meter_key(tokenizer.get_vocab())}"
    base, info, cached = _cached(meter_dir, retrain, fit_base, tokenizer, MeterForQuestionAnswering)
    weights: dict[str, nn.Module] = {"meter": base}
    infos: dict[str, Any] = {"base": {**info, "cached": cached, "cache_dir": str(meter_dir)}}
    for name, patch in meter_patches(m).items():
        if name not in m.finetuned:
            continue

        def fit_finetuned(patch: dict[str, Any] = patch, name: str = name) -> tuple[nn.Module, dict[str, Any]]:
            model = pumer_patch.apply(copy.deepcopy(base), **patch)
            logger.info("finetuning the METER with %s on: %s", name, patch)
            info = train(model, train_split, m.finetune, seed=cfg.seed, val=val,
                         teacher=base if cfg.distill_weight > 0 else None, distill_weight=cfg.distill_weight,
                         eval_batch_size=cfg.eval_batch_size, desc=f"finetune-meter-{name}", progress=progress)
            return pumer_patch.remove(model), info

        ft_dir = meter_dir / f"finetuned-{name}-{cfg.meter_finetune_key(patch)}"
        model, info, cached = _cached(ft_dir, retrain, fit_finetuned, cls=MeterForQuestionAnswering)
        weights[f"meter-finetuned-{name}"] = model
        infos[f"finetune-{name}"] = {**info, "cached": cached, "cache_dir": str(ft_dir)}
    return weights, infos


def _vlm_weights(
    cfg: StudyConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_split: VlmSplit,
    val: VlmSplit,
    cache_dir: Path,
    retrain: bool,
    progress: bool,
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Train (or load) the VLM, then finetune (or load) it once per variant of ``cfg.vlm.finetuned``.

    Weights under ``"vlm"`` and ``"vlm-finetuned-<variant>"``; finetuned folders below the VLM's.
    """
    v = cfg.vlm
    if v is None:
        raise ValueError("cfg.vlm is None: this study trains no VLM")

    def fit_base() -> tuple[nn.Module, dict[str, Any]]:
        model = build_vlm(v.model, tokenizer, cfg.seed)
        logger.info("training a LLaVA-style VLM from scratch: %s, %.2fM parameters", v.model,
                    sum(p.numel() for p in model.parameters()) / 1e6)
        info = train(model, train_split, v.train, seed=cfg.seed, val=val, eval_batch_size=cfg.eval_batch_size,
                     desc="train-vlm", progress=progress)
        return model, info

    vlm_dir = cache_dir / f"vlm-{cfg.vlm_key(tokenizer.get_vocab())}"
    base, info, cached = _cached(vlm_dir, retrain, fit_base, tokenizer, LlavaForConditionalGeneration)
    weights: dict[str, nn.Module] = {"vlm": base}
    infos: dict[str, Any] = {"base": {**info, "cached": cached, "cache_dir": str(vlm_dir)}}
    patches = vlm_patches(v)
    for name in v.finetuned:
        patch = patches[name]

        def fit_finetuned(patch: dict[str, Any] = patch, name: str = name) -> tuple[nn.Module, dict[str, Any]]:
            model = pumer_patch.apply(copy.deepcopy(base), **patch)
            logger.info("finetuning the VLM with %s on: %s", name, patch)
            info = train(model, train_split, v.finetune, seed=cfg.seed, val=val, eval_batch_size=cfg.eval_batch_size,
                         desc=f"finetune-vlm-{name}", progress=progress)
            return pumer_patch.remove(model), info

        ft_dir = vlm_dir / f"finetuned-{name}-{cfg.vlm_finetune_key(patch)}"
        model, info, cached = _cached(ft_dir, retrain, fit_finetuned, cls=LlavaForConditionalGeneration)
        weights[f"vlm-finetuned-{name}"] = model
        infos[f"finetune-{name}"] = {**info, "cached": cached, "cache_dir": str(ft_dir)}
    return weights, infos


def _environment() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pumer_patch": pumer_patch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _arrow(counts: Sequence[int]) -> str:
    """``[65, 17, 5, 5, 5]`` -> ``"65→17→5→5→5"``."""
    return "→".join(map(str, counts))


def markdown_table(results: Mapping[str, Any]) -> str:
    """The study's results as a markdown table, one row per variant (speedup and Δ against its model's unpatched row).

    Speedup: the ratio of the medians, then in brackets the lowest and highest of the per-round
    ratios (each round times every variant once, interleaved). The VLM's examples/s are prefills
    (the prompt's forward); its image tokens are those entering the LLM, then after each decoder layer.
    """
    lines = [
        "| variant | test acc | Δ acc (pt) | examples/s | speedup | GFLOPs/ex | image tokens by layer | text tokens by layer |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in results["variants"]:
        low, _, high = row["speedup_spread"]
        lines.append(
            f"| {row['name']} | {100 * row['accuracy']:.2f} | {row['accuracy_drop_points']:+.2f} | "
            f"{row['throughput']:.0f} | {row['speedup']:.2f}x ({low:.2f}-{high:.2f}) | {row['gflops']:.4f} | "
            f"{_arrow(row['tokens']['image'])} | {_arrow(row['tokens']['text'])} |"
        )
    return "\n".join(lines)


@dataclass
class Trained:
    """The study's weights by variant key (``"base"``, ``"finetuned"``, ``"meter"``, ...) and how each was got."""

    weights: dict[str, nn.Module]
    base_info: dict[str, Any]
    finetune_info: dict[str, Any]
    meter_info: dict[str, Any] | None
    vlm_info: dict[str, Any] | None = None


def train_or_load(cfg: StudyConfig, tokenizer: PreTrainedTokenizerBase, train_split: Split, val: Split,
                  answers: Sequence[str], cache_dir: Path, *, retrain: bool, progress: bool,
                  vlm_data: tuple[VlmSplit, VlmSplit] | None = None) -> Trained:
    """Train (or load from ``cache_dir``) the ViLT, its PuMer finetune, the METER and the VLM with their finetunes.

    ``vlm_data``: the VLM's (train, val) prompts, needed when ``cfg.vlm`` is set.
    """
    r = cfg.reduce
    pumer = patch_args(r.layers, r.prune, r.merge, r.text_merge)

    def fit_base() -> tuple[nn.Module, dict[str, Any]]:
        model = build_model(cfg.model, len(tokenizer), answers, cfg.seed)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        logger.info("training a ViLT from scratch: %s, %.2fM parameters (%.2fM of them the word embedding)",
                    cfg.model, n_params, model.vilt.embeddings.text_embeddings.word_embeddings.weight.numel() / 1e6)
        info = train(model, train_split, cfg.train, seed=cfg.seed, val=val,
                     eval_batch_size=cfg.eval_batch_size, desc="train", progress=progress)
        return model, info

    base_dir = cache_dir / cfg.base_key(tokenizer.get_vocab())
    base, base_info, base_cached = _cached(base_dir, retrain, fit_base, tokenizer)

    def fit_finetuned() -> tuple[nn.Module, dict[str, Any]]:
        model = pumer_patch.apply(copy.deepcopy(base), **pumer)
        logger.info("finetuning with PuMer %s on", r.name)
        info = train(model, train_split, cfg.finetune, seed=cfg.seed, val=val,
                     teacher=base if cfg.distill_weight > 0 else None, distill_weight=cfg.distill_weight,
                     eval_batch_size=cfg.eval_batch_size, desc="finetune", progress=progress)
        return pumer_patch.remove(model), info  # the patch leaves the state_dict alone: save plain weights

    ft_dir = base_dir / f"finetuned-{cfg.finetune_key()}"
    finetuned, ft_info, ft_cached = _cached(ft_dir, retrain, fit_finetuned)
    weights = {"base": base, "finetuned": finetuned}
    meter_info = None
    if cfg.meter is not None:
        # on a forked RNG: METER's training draws (RoBERTa's dropout) leave the ViLT's rows as they were
        with torch.random.fork_rng(devices=[]):
            meter_weights, meter_info = _meter_weights(cfg, tokenizer, train_split, val, answers, cache_dir, retrain,
                                                       progress)
        weights.update(meter_weights)
    vlm_info = None
    if cfg.vlm is not None:
        if vlm_data is None:
            raise ValueError("cfg.vlm is set: pass the VLM's (train, val) prompts as vlm_data")
        with torch.random.fork_rng(devices=[]):
            vlm_weights, vlm_info = _vlm_weights(cfg, tokenizer, *vlm_data, cache_dir, retrain, progress)
        weights.update(vlm_weights)
    return Trained(weights, {**base_info, "cached": base_cached, "cache_dir": str(base_dir)},
                   {**ft_info, "cached": ft_cached, "cache_dir": str(ft_dir)}, meter_info, vlm_info)


def evaluate_variants(cfg: StudyConfig, variants: Sequence[Variant], models: Mapping[str, nn.Module], test: Split,
                      *, progress: bool) -> list[dict[str, Any]]:
    """One row per variant: test accuracy, GFLOPs per example and tokens after each layer."""
    probe = test.inputs(torch.arange(min(len(test), cfg.eval_batch_size)))  # shapes only: FLOPs and counts
    rows: list[dict[str, Any]] = []
    for v in variants:
        logger.info("evaluating %s: %s", v.name, v.description)
        acc = accuracy(predict(models[v.name], test, cfg.eval_batch_size, desc=v.name, progress=progress), test.label)
        row = {
            "name": v.name,
            "model": v.model,
            "description": v.description,
            "weights": v.weights,
            "patch": None if v.patch is None else dict(v.patch),
            "accuracy": acc,
            "gflops": gflops_per_example(models[v.name], probe),
            "tokens": tokens_per_layer(models[v.name], probe),
        }
        logger.info("%s: test accuracy %.4f, %.4f GFLOPs/example, image tokens %s",
                    v.name, acc, row["gflops"], _arrow(row["tokens"]["image"]))
        rows.append(row)
    return rows


def evaluate_vlm_variants(cfg: StudyConfig, variants: Sequence[VlmVariant], models: Mapping[str, nn.Module],
                          test: VlmSplit, n_visual: int) -> list[dict[str, Any]]:
    """The VLM's rows: exact match of the greedy answers, prefill GFLOPs per example, tokens per layer."""
    probe = test.prompt_inputs(torch.arange(min(len(test), cfg.eval_batch_size)))
    rows: list[dict[str, Any]] = []
    for v in variants:
        logger.info("evaluating %s: %s", v.name, v.description)
        model = models[v.name]
        acc = vlm_accuracy(generate_answers(model, test, cfg.eval_batch_size), test)
        row = {"name": v.name, "model": v.model, "description": v.description, "weights": v.weights,
               "patch": None if v.patch is None else dict(v.patch), "random_keep": v.random_keep, "accuracy": acc,
               "gflops": gflops_per_example(model, {**probe, "logits_to_keep": 1}),
               "tokens": vlm_tokens_per_layer(model, v, test, n_visual)}
        logger.info("%s: test exact match %.4f, %.4f GFLOPs/prefill, visual tokens %s", v.name, acc, row["gflops"],
                    _arrow(row["tokens"]["image"]))
        rows.append(row)
    return rows


def time_variants(cfg: StudyConfig, models: Mapping[str, nn.Module], test: Split, rows: Sequence[dict[str, Any]],
                  *, progress: bool, vlm_test: VlmSplit | None = None) -> tuple[int, dict[str, Any]]:
    """Time every model on the same batches, interleaved; add throughput and the ratios against each
    model's unpatched row to ``rows``. Returns the examples in one timed pass and how it was timed.

    The VLM's rows (``model == "vlm"``) are timed apart, on prefills of ``vlm_test``'s prompts (the
    same questions). ``speedup_spread``: the lowest, median and highest of the per-round ratios.
    """
    batches = test.batches(cfg.eval_batch_size)[: cfg.timing_batches]
    timing = [test.inputs(idx) for idx in batches]
    per_pass = sum(b["input_ids"].shape[0] for b in timing)
    groups = {"encoders": [r["name"] for r in rows if r["model"] != "vlm"],
              "vlm": [r["name"] for r in rows if r["model"] == "vlm"]}
    times: dict[str, list[float]] = {}
    for group, names in groups.items():
        if not names:
            continue
        if group == "vlm":
            if vlm_test is None:
                raise ValueError("VLM rows need vlm_test, the VLM's prompts")
            vlm_batches = vlm_test.batches(cfg.eval_batch_size)[: cfg.timing_batches]
            data = [{**vlm_test.prompt_inputs(idx), "logits_to_keep": 1} for idx in vlm_batches]
            if sum(b["input_ids"].shape[0] for b in data) != per_pass:
                raise ValueError("the VLM's timing batches must hold as many questions as the other models'")
        else:
            data = timing
        logger.info("timing %d variants (%s): %d rounds of %d batches of %d, interleaved, %d threads", len(names),
                    group, cfg.timing_rounds, len(data), cfg.eval_batch_size, torch.get_num_threads())
        times.update(measure_throughput({n: models[n] for n in names}, data, rounds=cfg.timing_rounds,
                                        warmup=cfg.timing_warmup, progress=progress))
    for row in rows:
        row["seconds_per_pass"] = times[row["name"]]
        row["throughput"] = per_pass / statistics.median(times[row["name"]])
    unpatched = {row["model"]: row for row in rows if row["patch"] is None and row.get("random_keep") is None}
    for row in rows:
        base_row = unpatched[row["model"]]
        row["speedup"] = row["throughput"] / base_row["throughput"]
        ratios = [b / t for b, t in zip(base_row["seconds_per_pass"], row["seconds_per_pass"])]
        row["speedup_spread"] = [min(ratios), statistics.median(ratios), max(ratios)]
        row["accuracy_drop_points"] = 100 * (row["accuracy"] - base_row["accuracy"])
        row["gflops_ratio"] = row["gflops"] / base_row["gflops"]
    return per_pass, {"batch_size": cfg.eval_batch_size, "batches": len(timing), "rounds": cfg.timing_rounds,
                      "warmup_batches": cfg.timing_warmup, "statistic": "median seconds per pass",
                      "spread": "lowest, median and highest per-round speedup", "vlm": "prefill of the prompt"}


def write_results(results: Mapping[str, Any], cfg: StudyConfig, out_dir: Path) -> None:
    """``results.json`` (everything) and ``results.md`` (the table, the variants, how it was timed)."""
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    descriptions = "\n".join(f"- **{row['name']}**: {row['description']}" for row in results["variants"])
    (out_dir / "results.md").write_text(
        f"# easy-vqa: PuMer on a small ViLT{', a small METER' if cfg.meter is not None else ''}"
        f"{' and a small LLaVA-style VLM' if cfg.vlm is not None else ''}\n\n"
        f"{markdown_table(results)}\n\n{descriptions}\n\n"
        f"Throughput: examples/s on {results['environment']['cpu']}, {torch.get_num_threads()} threads, "
        f"batch {cfg.eval_batch_size}, median of {cfg.timing_rounds} interleaved rounds (in brackets: the lowest "
        f"and highest per-round speedup). Speedup and Δ acc: against the same model's unpatched row. VLM: "
        f"accuracy is the exact match of the greedy answer through generate() on "
        f"{results['data']['vlm_test']} test questions, examples/s are prefills of the prompt.\n"
    )


def run_study(
    cfg: StudyConfig,
    out_dir: Path,
    cache_dir: Path,
    *,
    retrain: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or load) the models, measure every variant, write ``results.json``, ``results.md`` and the figures."""
    import easy_vqa

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(easy_vqa.get_train_questions()[0], easy_vqa.get_answers(), cache_dir / "tokenizer")
    train_split, val, test, answers = load_splits(tokenizer, cfg)
    vlm_data = vlm_test = None
    n_visual = 0
    if cfg.vlm is not None:
        n_visual = visual_tokens(cfg.vlm.model)
        image_token = len(tokenizer)  # build_vlm's placeholder id
        vlm_train, vlm_val, vlm_test = (vlm_split(s, tokenizer, answers, image_token, n_visual)
                                        for s in (train_split, val, test.first_images(cfg.vlm.test_images)))
        vlm_data = (vlm_train, vlm_val)
    trained = train_or_load(cfg, tokenizer, train_split, val, answers, cache_dir, retrain=retrain, progress=progress,
                            vlm_data=vlm_data)
    variants = build_variants(cfg, trained.weights["base"], test.inputs(torch.arange(1))) + build_meter_variants(cfg)
    models = {v.name: v.build(trained.weights) for v in variants}
    rows = evaluate_variants(cfg, variants, models, test, progress=progress)
    vlm_rows: list[VlmVariant] = []
    if cfg.vlm is not None and vlm_test is not None:
        vlm_rows = vlm_variants(cfg.vlm, n_visual, cfg.seed)
        models.update({v.name: v.build(trained.weights) for v in vlm_rows})
        rows += evaluate_vlm_variants(cfg, vlm_rows, models, vlm_test, n_visual)
    per_pass, timing = time_variants(cfg, models, test, rows, progress=progress, vlm_test=vlm_test)

    plot_tradeoff(rows, per_pass, torch.get_num_threads(), out_dir / "tradeoff.png")
    shown = figure_examples(test, cfg.figure_examples)
    # METER's tower-merging rows are left out: their source maps start at the fusion blocks, not at the patches
    shown_variants = ("pumer", "pumer-finetuned", "meter-pumer")
    traced = [(v.name, v.build(trained.weights, trace=True)) for v in variants if v.name in shown_variants]
    plot_kept_merged(traced, test, shown, answers, out_dir / "kept_merged.png")

    results = {
        "config": dataclasses.asdict(cfg),
        "environment": _environment(),
        "data": {"train": len(train_split), "val": len(val), "test": len(test), "answers": answers,
                 "text_tokens": int(test.input_ids.shape[1]), "vocabulary": len(tokenizer),
                 "vlm_test": None if vlm_test is None else len(vlm_test),
                 "vlm_prompt_tokens": None if vlm_test is None else vlm_test.prompt_length},
        "base": trained.base_info,
        "finetune": trained.finetune_info,
        "meter": trained.meter_info,
        "vlm": trained.vlm_info,
        "timing": timing,
        "variants": rows,
        "figures": {"tradeoff": "tradeoff.png", "kept_merged": "kept_merged.png"},
        "runtime_seconds": time.perf_counter() - start,
    }
    write_results(results, cfg, out_dir)
    logger.info("wrote %s (results.json, results.md, tradeoff.png, kept_merged.png) in %.0f s",
                out_dir, results["runtime_seconds"])
    return results
