"""Baseline against patched, in one run: GFLOPs, throughput, batch-1 latency, peak memory, tokens.

    python -m benchmarks.speed                      # ViLT-B/32 (32 and 40 text tokens) and timm ViT-B/16
    python -m benchmarks.speed --models vilt40 --batch-sizes 8 --repeats 5
    python -m benchmarks.speed --models vit_large_patch16_224 open_clip:ViT-B-16 --dtype bf16
    python -m benchmarks.speed --models vit_base_patch16_dinov3 eva02_base_patch14_224   # timm Eva: DINOv3, EVA02
    python -m benchmarks.speed --models vit_base_patch16_224 --configs "ToMe r=16" --compile   # torch.compile pairs
    python -m benchmarks.speed --device cuda --dtype bf16 --batch-sizes 64 256 --models vilt40 meter384_32

Models (random weights: the compute is the same as a trained model's): ``vilt<T>`` is ViLT-B/32 at
384x384 with T text tokens, ``meter<S>_<T>`` full-size METER (CLIP ViT-B/16 with 11 blocks, RoBERTa-base,
6 fusion blocks) at SxS with T text tokens (one pass; NLVR2 runs two), ``open_clip:<name>`` an
open_clip model's image tower, ``hf:<arch>:<S>:<attention>`` a transformers tower at SxS with
``attn_implementation`` eager or sdpa (``hf:clip_b16:224:sdpa``: ``CLIPVisionModel`` with CLIP ViT-B/16's
sizes; ``hf:dinov2_b14:518:eager``: DINOv2-B/14), anything else a timm model name
(``VisionTransformer``, or ``Eva`` / ``Beit``: DINOv3, EVA02, PE). Configs: unpatched, the paper's, prune-only, merge-only and ToMe-style baselines,
one of them with its merge ratio searched to meet a PuMer config's GFLOPs (``match_gflops``).
Baseline and patched run interleaved (A B A B ...) in one process after a warm-up; each figure is
the median of the repeats. Peak memory: CUDA ``max_memory_allocated`` or, on CPU with ``--memory``,
the peak RSS of a fresh subprocess per config. Writes ``results.json``, ``results.md`` and
``speedup.png`` under ``--out``.

``--compile`` adds, beside each eager row, the same config under ``torch.compile`` (``--compile-backend``,
inductor by default; static shapes, one graph set per batch size): a patched copy of the model that
shares its weights, timed interleaved with the eager rows, its speedup taken against the compiled
unpatched model, its compile time (first calls less the steady time, summed over the batch sizes)
apart, and the number of graphs dynamo made of it (1 = no graph break). ``--configs`` keeps only the
named rows (the unpatched baseline always stays); ``--tiny`` builds every model at width 32 with its
depth, image size and token counts (a smoke run of the whole path, not figures).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

import pumer_patch
from pumer_patch.flops import gflops_per_example, match_gflops

if TYPE_CHECKING:
    from torch._dynamo.backends.debugging import ExplainWithBackend

log = logging.getLogger("benchmarks.speed")


@dataclass(frozen=True)
class Config:
    """One row: ``pumer_patch.apply`` keyword arguments ({} is the unpatched baseline).

    With ``match`` set, ``by_ratio`` gives the arguments for a ratio, and the ratio is searched so
    that the GFLOPs equal those of the config named ``match`` (a ToMe-style baseline at equal FLOPs).
    """

    name: str
    apply: Mapping[str, Any] = field(default_factory=dict)
    match: str | None = None
    by_ratio: Callable[[float], dict] | None = None


def _tome_everywhere(layers: int, text: bool) -> Callable[[float], dict]:
    """ToMe-style: the same merge ratio in every layer (image and text alike), no pruning, no guidance."""
    return lambda r: {"layers": list(range(layers)), "merge_ratio": r, "text_merge_ratio": r if text else 0.0}


VILT_CONFIGS = [
    Config("unpatched"),
    Config("p0.1-r0.3-t0.2-258", {"layers": "p0.1-r0.3-t0.2-258"}),
    Config("p0.1-r0.3-t0.2-258 (reference)", {"layers": "p0.1-r0.3-t0.2-258", "mode": "reference"}),
    Config("p0.1r0.3t0.2-2468", {"layers": "p0.1-r0.3-t0.2-2468"}),
    Config("prune-only p0.3-258", {"layers": [2, 5, 8], "prune_ratio": 0.3}),
    Config("merge-only r0.4-258", {"layers": [2, 5, 8], "merge_ratio": 0.4}),
    Config("ToMe-style", match="p0.1-r0.3-t0.2-258", by_ratio=_tome_everywhere(12, text=True)),
    Config("sdpa only (no reduction)", {"layers": [], "attention": "sdpa"}),
    Config("p0.1-r0.3-t0.2-258 + sdpa", {"layers": "p0.1-r0.3-t0.2-258", "attention": "sdpa"}),
]


def vit_configs(depth: int) -> list[Config]:
    """Image-only towers: ToMe's own schedule, PuMer-style prune+merge and ToMe-style at its FLOPs.

    ToMe's r: 16 per block for 12-block models, 8 for deeper ones (ToMe's ViT-L/16 setting).
    """
    r = 16 if depth <= 12 else 8
    third = [depth // 4, depth // 2, 3 * depth // 4]
    sep = "" if third[-1] < 10 else ","  # the paper's names write one digit per layer
    pm = f"prune+merge p0.2-r0.2-{sep.join(map(str, third))}"
    return [
        Config("unpatched"),
        Config(f"ToMe r={r}", {"merge_schedule": r}),
        Config(pm, {"layers": third, "prune_ratio": 0.2, "merge_ratio": 0.2}),
        Config("ToMe-style", match=pm, by_ratio=_tome_everywhere(depth, text=False)),
    ]


def meter_configs(paper: str, encoder_r: int) -> list[Config]:
    """METER: the paper's config for the task (fusion blocks only), ToMe in the CLIP tower, and both.

    encoder_r: ToMe's r per CLIP block; the tower is most of METER's FLOPs and the paper leaves it whole.
    """
    return [
        Config("unpatched"),
        Config(paper, {"layers": paper}),
        Config(f"{paper} (reference)", {"layers": paper, "mode": "reference"}),
        Config(f"encoder ToMe r={encoder_r}", {"layers": [], "encoder_merge_schedule": encoder_r}),
        Config(f"{paper} + encoder ToMe r={encoder_r}", {"layers": paper, "encoder_merge_schedule": encoder_r}),
    ]


#: METER benchmark models -> (the paper's config for that task, ToMe's r in the tower)
METER_MODELS = {
    "meter384_32": ("p0.2r0.2t0.2-0246", 40),  # VQAv2
    "meter384_40": ("p0.3r0.5t0.2-0246", 40),  # SNLI-VE
    "meter288_40": ("p0.3r0.5t0.2-246", 24),  # NLVR2, one of its two passes
}


#: ``--tiny``: every model this wide (attention heads of 16 channels, MLPs 2x), depths and token counts kept
TINY_WIDTH = 32


def build(model: str, tiny: bool = False) -> tuple[torch.nn.Module, Callable[[int], dict], list[Config]]:
    """The model (eval mode), a batch maker and its configs.

    tiny: the same depths, image sizes and token counts at width ``TINY_WIDTH`` (every config keeps
    its layers and counts; seconds instead of minutes on a CPU). Not for open_clip names.
    """
    w, heads = TINY_WIDTH, TINY_WIDTH // 16
    if model.startswith("meter"):
        from pumer_patch.models.meter import MeterConfig, MeterModel

        size, text = (int(v) for v in model[5:].split("_"))
        narrow = dict(hidden_size=w, num_heads=heads, vision_width=w, vision_heads=heads, text_hidden_size=w,
                      text_intermediate_size=2 * w, text_heads=heads, mlp_ratio=2, num_layers=2)
        net = MeterModel(MeterConfig(image_size=size, **(narrow if tiny else {})))

        def batch(b: int) -> dict:
            return {
                "input_ids": torch.randint(3, 1000, (b, text)),
                "attention_mask": torch.ones(b, text, dtype=torch.long),
                "pixel_values": torch.randn(b, 3, size, size),
            }

        paper, encoder_r = METER_MODELS.get(model, ("p0.2r0.2t0.2-0246", 40))
        return net.eval(), batch, meter_configs(paper, encoder_r)
    if model.startswith("vilt"):
        from transformers import ViltConfig, ViltModel

        text = int(model[4:])
        narrow = dict(hidden_size=w, num_attention_heads=heads, intermediate_size=2 * w)
        net = ViltModel(ViltConfig(image_size=384, patch_size=32, max_position_embeddings=max(40, text),
                                   **(narrow if tiny else {})))

        def batch(b: int) -> dict:
            return {"input_ids": torch.randint(1, 1000, (b, text)), "pixel_values": torch.randn(b, 3, 384, 384)}

        return net.eval(), batch, VILT_CONFIGS
    if model.startswith("hf:"):
        net, size = hf_tower(model, tiny)
        # ToMe's schedule and prune+merge; no FLOPs-matched row (its search runs 200 FLOP counts, minutes at 518)
        return net, (lambda b: {"pixel_values": torch.randn(b, 3, size, size)}), vit_configs(12)[:3]
    if model.startswith("open_clip:"):
        if tiny:
            raise ValueError(f"--tiny builds ViLT, METER, hf: and timm models, not {model!r}; leave --tiny out")
        import open_clip

        clip = open_clip.create_model(model.split(":", 1)[1])
        size = clip.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        depth = len(clip.visual.transformer.resblocks)
        return clip.eval(), (lambda b: {"image": torch.randn(b, 3, *size)}), vit_configs(depth)
    import timm

    net = timm.create_model(model, pretrained=False, **(dict(embed_dim=w, num_heads=heads) if tiny else {}))
    size = net.default_cfg["input_size"][1:]
    return net.eval(), (lambda b: {"x": torch.randn(b, 3, *size)}), vit_configs(len(net.blocks))


def hf_tower(model: str, tiny: bool = False) -> tuple[torch.nn.Module, int]:
    """``hf:<arch>:<size>:<attention>`` -> a transformers image tower (random weights, eval mode) and its image size.

    clip_b16: ``CLIPVisionModel`` with CLIP ViT-B/16's sizes; dinov2_b14: ``Dinov2Model`` (DINOv2-B/14).
    tiny: width ``TINY_WIDTH``, the depth and patch grid kept.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    _, arch, size, attention = model.split(":")
    width = dict(hidden_size=TINY_WIDTH, num_attention_heads=TINY_WIDTH // 16)
    towers = {
        "clip_b16": (CLIPVisionModel, CLIPVisionConfig(**{**dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                                num_attention_heads=12, patch_size=16, image_size=int(size)),
                                                         **(dict(width, intermediate_size=2 * TINY_WIDTH) if tiny else {})})),
        "dinov2_b14": (Dinov2Model, Dinov2Config(image_size=int(size), **(dict(width, mlp_ratio=2) if tiny else {}))),
    }
    if arch not in towers:
        raise ValueError(f"unknown transformers tower {arch!r} in {model!r}; known: {sorted(towers)}")
    cls, config = towers[arch]
    return cls._from_config(config, attn_implementation=attention).eval(), int(size)


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def forward(net: torch.nn.Module, batch: dict, device: torch.device, dtype: str) -> None:
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        net(**batch)
    if device.type == "cuda":
        torch.cuda.synchronize()


def patch(net: torch.nn.Module, config: Config) -> torch.nn.Module:
    pumer_patch.remove(net)
    return pumer_patch.apply(net, **config.apply) if config.apply else net


def resolve(net: torch.nn.Module, configs: list[Config], example: dict) -> list[tuple[Config, float, list[dict]]]:
    """Each config with its GFLOPs per example and token counts after each reduce layer (from the
    same forward: counts depend on shapes only); ``match`` configs get their searched ratio."""
    out: list[tuple[Config, float, list[dict]]] = []
    for config in configs:
        if config.match is not None:
            target = next(g for c, g, _ in out if c.name == config.match)
            ratio, _ = match_gflops(pumer_patch.remove(net), example, target, config.by_ratio, steps=200)
            config = Config(f"{config.name} r{ratio:g} (FLOPs of {config.match})", config.by_ratio(ratio))
        gflops = gflops_per_example(patch(net, config), example)
        tokens = [asdict(c) for c in pumer_patch.last_trace(net).counts] if config.apply else []
        out.append((config, gflops, tokens))
    return out


def peak_memory_subprocess(model: str, config: Config, batch_size: int, dtype: str, tiny: bool = False) -> float:
    """Peak RSS (MiB) of a fresh process that builds the model and runs one forward."""
    code = (
        "import json, resource, sys, torch, pumer_patch; from benchmarks.speed import build, Config, patch, forward;"
        f"net, batch, _ = build({model!r}, {tiny!r}); patch(net, Config('x', json.loads(sys.argv[1])));"
        f"forward(net, batch({batch_size}), torch.device('cpu'), {dtype!r});"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(config.apply)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def select(configs: list[Config], keep: list[str] | None, model: str) -> list[Config]:
    """The unpatched baseline and those of ``configs`` named in ``keep`` (all when None), in their order.

    With several models, each keeps the names it has; a model that has none of them is an error.
    """
    if keep is None:
        return configs
    names = [c.name for c in configs]
    kept = [c for c in configs if c.name == "unpatched" or c.name in keep]
    if len(kept) == 1 and "unpatched" not in keep:
        raise ValueError(f"--configs: none of {keep} is a config of {model!r}; its configs: {names}")
    missing = [c.match for c in kept if c.match is not None and c.match not in keep]
    if missing:
        raise ValueError(f"--configs: a FLOPs-matched row needs the config it matches; add {missing} to --configs")
    return kept


def compiled_copy(net: torch.nn.Module, config: Config, backend: str) -> tuple[torch.nn.Module, ExplainWithBackend]:
    """``net`` patched with ``config`` under ``torch.compile``, and the recorder of the graphs dynamo made.

    A copy of the module tree that shares ``net``'s parameters and buffers (no second set of
    weights in memory), so ``net`` itself stays free for the eager rows' patch / remove. Static
    shapes (``dynamic=False``): the token counts are static, each batch size gets its own graphs.
    """
    from torch._dynamo.backends.debugging import ExplainWithBackend  # dynamo loads in a second: only for --compile

    shared = {id(t): t for t in (*net.parameters(), *net.buffers())}
    twin = copy.deepcopy(pumer_patch.remove(net), memo=shared)
    if config.apply:
        pumer_patch.apply(twin, **config.apply)
    recorder = ExplainWithBackend(backend)
    return torch.compile(twin, backend=recorder, dynamic=False), recorder


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds ``fn`` takes, the device synchronised before and after (``forward`` syncs at its end)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model: str, batch_sizes: list[int], repeats: int, device: torch.device, dtype: str, memory: bool,
            keep: list[str] | None = None, compile_backend: str | None = None, tiny: bool = False,
            latency: bool = True) -> list[dict]:
    """One row per config: FLOPs, tokens, eager throughput, latency and memory; with ``compile_backend``
    the compiled twin of each config beside it (``compiled_*`` fields, ``compile_s``, ``graphs``)."""
    net, make_batch, configs = build(model, tiny)
    configs = select(configs, keep, model)
    flop_batch = make_batch(1)
    resolved = resolve(net, configs, flop_batch)  # on CPU, fp32: FLOPs depend on shapes only
    configs = [c for c, _, _ in resolved]
    net.to(device)
    rows = [
        {"model": model, "config": c.name, "apply": _jsonable(c.apply), "gflops": gflops, "tokens": tokens}
        for c, gflops, tokens in resolved
    ]
    twins = {c.name: compiled_copy(net, c, compile_backend) for c in configs} if compile_backend else {}
    compile_s = {c.name: 0.0 for c in configs}
    sizes = list(dict.fromkeys([*batch_sizes, 1])) if latency else batch_sizes  # batch 1 once, for latency
    by_name = {c.name: c for c in configs}
    variants = [(c.name, False) for c in configs] + [(name, True) for name in twins]
    for b in sizes:
        batch = move(make_batch(b), device)

        def call(name: str, is_compiled: bool) -> float:
            module = twins[name][0] if is_compiled else patch(net, by_name[name])  # patching is not timed
            return timed(lambda: forward(module, batch, device, dtype), device)

        first = {name: call(name, True) for name in twins}  # compiles (recompiles) at this shape
        if b == sizes[0]:
            for row in rows:
                if row["config"] in twins:
                    recorder = twins[row["config"]][1]
                    row["graphs"] = len(recorder.graphs)
                    row["graph_breaks"] = sorted({str(r.reason).splitlines()[0] for r in recorder.break_reasons})
        for variant in variants:  # warm-up
            call(*variant)
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in tqdm(range(repeats), desc=f"{model} batch {b}", leave=False):
            for variant in variants:  # interleaved: A B C ... A' B' C' ... A B C ...
                times.setdefault(variant, []).append(call(*variant))
        for row in rows:
            for is_compiled, prefix in ((False, ""), (True, "compiled_")):
                if (row["config"], is_compiled) not in times:
                    continue
                median = statistics.median(times[row["config"], is_compiled])
                if b == 1 and latency:
                    row[f"{prefix}latency_ms"] = median * 1e3
                if b in batch_sizes:
                    row[f"{prefix}throughput_b{b}"] = b / median
                if is_compiled:
                    compile_s[row["config"]] += first[row["config"]] - median
    for config, row in zip(configs, rows):
        if device.type == "cuda":
            batch = move(make_batch(batch_sizes[-1]), device)
            torch.cuda.reset_peak_memory_stats()
            forward(patch(net, config), batch, device, dtype)
            row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
            if config.name in twins:
                torch.cuda.reset_peak_memory_stats()
                forward(twins[config.name][0], batch, device, dtype)
                row["compiled_peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        elif memory:
            row["peak_mem_mib"] = peak_memory_subprocess(model, config, batch_sizes[-1], dtype, tiny)
        if config.name in twins:
            row["compile_s"] = compile_s[config.name]
    base = rows[0]
    for row in rows:
        row["flops_ratio"] = row["gflops"] / base["gflops"]
        for b in batch_sizes:
            row[f"speedup_b{b}"] = row[f"throughput_b{b}"] / base[f"throughput_b{b}"]
            if f"compiled_throughput_b{b}" in row:  # the compiled pair: compiled patched over compiled unpatched
                row[f"compiled_speedup_b{b}"] = row[f"compiled_throughput_b{b}"] / base[f"compiled_throughput_b{b}"]
        b = batch_sizes[-1]
        row["efficiency"] = row[f"speedup_b{b}"] * row["flops_ratio"]  # measured speedup / FLOPs bound
        if "peak_mem_mib" in row:
            row["mem_ratio"] = row["peak_mem_mib"] / base["peak_mem_mib"]
    pumer_patch.remove(net)
    return rows


def _jsonable(options: Mapping[str, Any]) -> dict:
    return {k: list(v) if isinstance(v, range) else v for k, v in options.items()}


def machine_info(device: torch.device, dtype: str) -> dict[str, Any]:
    """What the figures were measured on: device name, torch, threads, dtype and date."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        **({"cuda": torch.version.cuda} if device.type == "cuda" else {}),
        "threads": torch.get_num_threads(),
        "dtype": "bf16 autocast" if dtype == "bf16" else "fp32",
        "date": time.strftime("%Y-%m-%d"),
    }


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: list[dict], batch_sizes: list[int]) -> str:
    """The markdown table; with compiled rows, their throughput, speedup (compiled pair), compile time and graphs too."""
    b = batch_sizes[-1]
    compiled = any("compile_s" in r for r in rows)
    head = (f"| model | config | GFLOPs | FLOPs ratio | ex/s @{b} | speedup @{b} | efficiency | latency b1 (ms) | peak MiB "
            + (f"| compiled ex/s @{b} | compiled speedup @{b} | compiled latency b1 (ms) | compile s | graphs " if compiled else "")
            + "| tokens (layer:img/txt) |")
    lines = [head, "|" + "---|" * head.count(" |")]

    def num(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "-"

    for r in rows:
        tokens = " ".join(f"{t['layer']}:{t['image']}/{t['text']}" for t in r["tokens"]) or "-"
        cells = [r["model"], r["config"], f"{r['gflops']:.2f}", f"{r['flops_ratio']:.3f}", f"{r[f'throughput_b{b}']:.2f}",
                 f"{r[f'speedup_b{b}']:.2f}x", f"{r['efficiency']:.2f}", num(r, "latency_ms", ".1f"), num(r, "peak_mem_mib", ".0f")]
        if compiled:
            cells += [num(r, f"compiled_throughput_b{b}", ".2f"), num(r, f"compiled_speedup_b{b}", ".2f") + "x" * (f"compiled_speedup_b{b}" in r),
                      num(r, "compiled_latency_ms", ".1f"), num(r, "compile_s", ".1f"), num(r, "graphs", "d")]
        lines.append("| " + " | ".join([*cells, tokens]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], batch_sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = batch_sizes[-1]
    labels = [f"{r['model']}\n{r['config']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(rows) * 1.2), 5))
    axes[0].bar(range(len(rows)), [r[f"speedup_b{b}"] for r in rows], label="measured speedup")
    axes[0].plot(range(len(rows)), [1 / r["flops_ratio"] for r in rows], "r_", markersize=20, label="FLOPs bound")
    axes[0].set_ylabel(f"speedup over unpatched (batch {b})")
    axes[0].legend()
    if all("mem_ratio" in r for r in rows):
        axes[1].bar(range(len(rows)), [r["mem_ratio"] for r in rows])
        axes[1].set_ylabel("peak memory / unpatched")
    else:
        axes[1].bar(range(len(rows)), [r["flops_ratio"] for r in rows])
        axes[1].set_ylabel("FLOPs / unpatched")
    for ax in axes:
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vilt40", "vilt32", "vit_base_patch16_224"])
    parser.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                        help="keep only these configs (exact row names; the unpatched baseline always stays)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when there is one")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 8 on CPU, 64 256 on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None,
        help="bf16: torch.autocast to bfloat16 (weights stay fp32), or fp32 (default: bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument("--no-latency", action="store_true", help="no batch-1 latency run (one compile less per row)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each config under torch.compile, beside its eager row (compile time apart)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile [inductor]")
    parser.add_argument("--tiny", action="store_true",
                        help=f"every model {TINY_WIDTH} wide, depths and token counts kept: a smoke run, not figures")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="on CPU, peak RSS of a fresh subprocess per config; at inference batch sizes the import of torch "
        "and transformers sets that peak, so it rarely separates configs (CUDA memory is always measured)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu (or auto)")
    if args.batch_sizes is not None and min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    batch_sizes = args.batch_sizes or ([64, 256] if device.type == "cuda" else [8])
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.compile:
        # a graph break inside the per-block step makes dynamo compile that step again for each block
        # (the block is a guarded input) and each batch size: past the default limit of 8 it would run
        # them eagerly, and the compiled row would time eager code
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
    machine = {
        **machine_info(device, dtype),
        "peak_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **({"compile_backend": args.compile_backend} if args.compile else {}),
        **({"tiny": True} if args.tiny else {}),
    }
    log.info("machine: %s", machine)
    torch.manual_seed(0)
    rows = []
    for model in args.models:
        log.info("benchmarking %s on %s, batch sizes %s", model, device, batch_sizes)
        rows += measure(model, batch_sizes, args.repeats, device, dtype, memory=args.memory, keep=args.configs,
                        compile_backend=args.compile_backend if args.compile else None, tiny=args.tiny,
                        latency=not args.no_latency)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    md = f"Machine: {machine}\n\n" + table(rows, batch_sizes)
    (args.out / "results.md").write_text(md + "\n")
    plot(rows, batch_sizes, args.out / "speedup.png")
    print(md)


if __name__ == "__main__":
    main()
