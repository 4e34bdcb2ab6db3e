"""Baseline against patched, in one run: GFLOPs, throughput, batch-1 latency, peak memory, tokens.

    python -m benchmarks.speed                      # ViLT-B/32 (32 and 40 text tokens) and timm ViT-B/16
    python -m benchmarks.speed --models vilt40 --batch-sizes 8 --repeats 5
    python -m benchmarks.speed --models vit_large_patch16_224 open_clip:ViT-B-16 --dtype bf16
    python -m benchmarks.speed --models vit_base_patch16_dinov3 eva02_base_patch14_224   # timm Eva: DINOv3, EVA02

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
"""

from __future__ import annotations

import argparse
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
from typing import Any

import torch
from tqdm import tqdm

import pumer_patch
from pumer_patch.flops import gflops_per_example, match_gflops

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


def build(model: str) -> tuple[torch.nn.Module, Callable[[int], dict], list[Config]]:
    """The model (eval mode), a batch maker and its configs."""
    if model.startswith("meter"):
        from pumer_patch.models.meter import MeterConfig, MeterModel

        size, text = (int(v) for v in model[5:].split("_"))
        net = MeterModel(MeterConfig(image_size=size))

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
        net = ViltModel(ViltConfig(image_size=384, patch_size=32, max_position_embeddings=max(40, text)))

        def batch(b: int) -> dict:
            return {"input_ids": torch.randint(1, 1000, (b, text)), "pixel_values": torch.randn(b, 3, 384, 384)}

        return net.eval(), batch, VILT_CONFIGS
    if model.startswith("hf:"):
        net, size = hf_tower(model)
        # ToMe's schedule and prune+merge; no FLOPs-matched row (its search runs 200 FLOP counts, minutes at 518)
        return net, (lambda b: {"pixel_values": torch.randn(b, 3, size, size)}), vit_configs(12)[:3]
    if model.startswith("open_clip:"):
        import open_clip

        clip = open_clip.create_model(model.split(":", 1)[1])
        size = clip.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        depth = len(clip.visual.transformer.resblocks)
        return clip.eval(), (lambda b: {"image": torch.randn(b, 3, *size)}), vit_configs(depth)
    import timm

    net = timm.create_model(model, pretrained=False)
    size = net.default_cfg["input_size"][1:]
    return net.eval(), (lambda b: {"x": torch.randn(b, 3, *size)}), vit_configs(len(net.blocks))


def hf_tower(model: str) -> tuple[torch.nn.Module, int]:
    """``hf:<arch>:<size>:<attention>`` -> a transformers image tower (random weights, eval mode) and its image size.

    clip_b16: ``CLIPVisionModel`` with CLIP ViT-B/16's sizes; dinov2_b14: ``Dinov2Model`` (DINOv2-B/14).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    _, arch, size, attention = model.split(":")
    towers = {
        "clip_b16": (CLIPVisionModel, CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                      num_attention_heads=12, patch_size=16, image_size=int(size))),
        "dinov2_b14": (Dinov2Model, Dinov2Config(image_size=int(size))),
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


def peak_memory_subprocess(model: str, config: Config, batch_size: int, dtype: str) -> float:
    """Peak RSS (MiB) of a fresh process that builds the model and runs one forward."""
    code = (
        "import json, resource, sys, torch, pumer_patch; from benchmarks.speed import build, Config, patch, forward;"
        f"net, batch, _ = build({model!r}); patch(net, Config('x', json.loads(sys.argv[1])));"
        f"forward(net, batch({batch_size}), torch.device('cpu'), {dtype!r});"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(config.apply)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(model: str, batch_sizes: list[int], repeats: int, device: torch.device, dtype: str, memory: bool) -> list[dict]:
    net, make_batch, configs = build(model)
    flop_batch = make_batch(1)
    resolved = resolve(net, configs, flop_batch)  # on CPU, fp32: FLOPs depend on shapes only
    configs = [c for c, _, _ in resolved]
    net.to(device)
    rows = [
        {"model": model, "config": c.name, "apply": _jsonable(c.apply), "gflops": gflops, "tokens": tokens}
        for c, gflops, tokens in resolved
    ]
    for b in dict.fromkeys([*batch_sizes, 1]):  # batch 1 once, for latency (and throughput when asked for)
        batch = move(make_batch(b), device)
        times: dict[str, list[float]] = {c.name: [] for c in configs}
        for config in configs:  # warm-up
            forward(patch(net, config), batch, device, dtype)
        for _ in tqdm(range(repeats), desc=f"{model} batch {b}", leave=False):
            for config in configs:  # interleaved: A B C ... A B C ...
                patch(net, config)
                start = time.perf_counter()
                forward(net, batch, device, dtype)
                times[config.name].append(time.perf_counter() - start)
        for row in rows:
            median = statistics.median(times[row["config"]])
            if b == 1:
                row["latency_ms"] = median * 1e3
            if b in batch_sizes:
                row[f"throughput_b{b}"] = b / median
    for config, row in zip(configs, rows):
        if device.type == "cuda":
            patch(net, config)
            torch.cuda.reset_peak_memory_stats()
            forward(net, move(make_batch(batch_sizes[-1]), device), device, dtype)
            row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        elif memory:
            row["peak_mem_mib"] = peak_memory_subprocess(model, config, batch_sizes[-1], dtype)
    base = rows[0]
    for row in rows:
        row["flops_ratio"] = row["gflops"] / base["gflops"]
        for b in batch_sizes:
            key = f"throughput_b{b}"
            row[f"speedup_b{b}"] = row[key] / base[key]
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
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
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
    b = batch_sizes[-1]
    head = f"| model | config | GFLOPs | FLOPs ratio | ex/s @{b} | speedup @{b} | efficiency | latency b1 (ms) | peak MiB | tokens (layer:img/txt) |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        tokens = " ".join(f"{t['layer']}:{t['image']}/{t['text']}" for t in r["tokens"]) or "-"
        mem = f"{r['peak_mem_mib']:.0f}" if "peak_mem_mib" in r else "-"
        lines.append(
            f"| {r['model']} | {r['config']} | {r['gflops']:.2f} | {r['flops_ratio']:.3f} | {r[f'throughput_b{b}']:.2f} "
            f"| {r[f'speedup_b{b}']:.2f}x | {r['efficiency']:.2f} | {r['latency_ms']:.1f} | {mem} | {tokens} |"
        )
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
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 8 on CPU, 64 256 on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="bf16 autocast or fp32 (default: bf16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="on CPU, peak RSS of a fresh subprocess per config; at inference batch sizes the import of torch "
        "and transformers sets that peak, so it rarely separates configs (CUDA memory is always measured)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_sizes = args.batch_sizes or ([64, 256] if device.type == "cuda" else [8])
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    machine = {
        **machine_info(device, dtype),
        "peak_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    log.info("machine: %s", machine)
    torch.manual_seed(0)
    rows = []
    for model in args.models:
        log.info("benchmarking %s on %s, batch sizes %s", model, device, batch_sizes)
        rows += measure(model, batch_sizes, args.repeats, device, dtype, memory=args.memory)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    md = f"Machine: {machine}\n\n" + table(rows, batch_sizes)
    (args.out / "results.md").write_text(md + "\n")
    plot(rows, batch_sizes, args.out / "speedup.png")
    print(md)


if __name__ == "__main__":
    main()
