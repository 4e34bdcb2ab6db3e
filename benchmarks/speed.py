"""Baseline against patched, in one run: GFLOPs, throughput, batch-1 latency, peak memory, tokens.

    python -m benchmarks.speed                      # ViLT-B/32 (32 and 40 text tokens) and timm ViT-B/16
    python -m benchmarks.speed --models vilt40 --batch-sizes 8 --repeats 5

Models carry random weights: the compute is the same as a trained model's. Baseline and patched
run interleaved (A B A B ...) in one process after a warm-up; each figure is the median of the
repeats. Peak memory: CUDA ``max_memory_allocated`` or, on CPU with ``--memory``, the peak RSS of a
fresh subprocess per config. Writes ``results.json``, ``results.md`` and ``speedup.png`` under ``--out``.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import pumer_patch

log = logging.getLogger("benchmarks.speed")


@dataclass(frozen=True)
class Config:
    name: str
    apply: dict  # keyword arguments of pumer_patch.apply; {} is the unpatched baseline


VILT_CONFIGS = [
    Config("unpatched", {}),
    Config("p0.1-r0.3-t0.2-258", {"layers": "p0.1-r0.3-t0.2-258"}),
    Config("p0.1-r0.3-t0.2-258 (reference)", {"layers": "p0.1-r0.3-t0.2-258", "mode": "reference"}),
    Config("p0.1r0.3t0.2-2468", {"layers": "p0.1-r0.3-t0.2-2468"}),
    Config("prune-only p0.3-258", {"layers": [2, 5, 8], "prune_ratio": 0.3}),
    Config("merge-only r0.4-258", {"layers": [2, 5, 8], "merge_ratio": 0.4}),
]
TIMM_CONFIGS = [
    Config("unpatched", {}),
    Config("ToMe r=16", {"layers": [], "merge_schedule": 16}),
    Config("prune+merge p0.2-r0.2-369", {"layers": [3, 6, 9], "prune_ratio": 0.2, "merge_ratio": 0.2}),
]


def build(model: str) -> tuple[torch.nn.Module, Callable[[int], dict], list[Config]]:
    """The model, a batch maker and its configs."""
    if model.startswith("vilt"):
        from transformers import ViltConfig, ViltModel

        text = int(model[4:])
        net = ViltModel(ViltConfig(image_size=384, patch_size=32, max_position_embeddings=40))

        def batch(b: int) -> dict:
            return {"input_ids": torch.randint(1, 1000, (b, text)), "pixel_values": torch.randn(b, 3, 384, 384)}

        return net.eval(), batch, VILT_CONFIGS
    import timm

    net = timm.create_model(model, pretrained=False)
    return net.eval(), (lambda b: {"x": torch.randn(b, 3, 224, 224)}), TIMM_CONFIGS


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def forward(net: torch.nn.Module, batch: dict, device: torch.device) -> None:
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        net(**batch)
    if device.type == "cuda":
        torch.cuda.synchronize()


def patch(net: torch.nn.Module, config: Config) -> torch.nn.Module:
    pumer_patch.remove(net)
    return pumer_patch.apply(net, **config.apply) if config.apply else net


def gflops(net: torch.nn.Module, batch: dict) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(**batch)
    return counter.get_total_flops() / batch[next(iter(batch))].shape[0] / 1e9


def peak_memory_subprocess(model: str, config: Config, batch_size: int) -> float:
    """Peak RSS (MiB) of a fresh process that builds the model and runs one forward."""
    code = (
        "import json, resource, sys, torch, pumer_patch; from benchmarks.speed import build, Config, patch, forward;"
        f"net, batch, _ = build({model!r}); patch(net, Config('x', json.loads(sys.argv[1])));"
        f"forward(net, batch({batch_size}), torch.device('cpu'));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(config.apply)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(model: str, batch_sizes: list[int], repeats: int, device: torch.device, memory: bool) -> list[dict]:
    net, make_batch, configs = build(model)
    net.to(device)
    rows = []
    flop_batch = make_batch(1)
    for config in configs:
        patch(net, config)
        row = {"model": model, "config": config.name, "gflops": gflops(net, flop_batch)}
        forward(net, move(flop_batch, device), device)
        trace = pumer_patch.last_trace(net) if config.apply else None
        row["tokens"] = [asdict(c) for c in trace.counts] if trace is not None else []
        rows.append(row)
    for b in batch_sizes + [1]:
        batch = move(make_batch(b), device)
        times: dict[str, list[float]] = {c.name: [] for c in configs}
        for config in configs:  # warm-up
            forward(patch(net, config), batch, device)
        for _ in tqdm(range(repeats), desc=f"{model} batch {b}", leave=False):
            for config in configs:  # interleaved: A B C ... A B C ...
                patch(net, config)
                start = time.perf_counter()
                forward(net, batch, device)
                times[config.name].append(time.perf_counter() - start)
        for row in rows:
            median = statistics.median(times[row["config"]])
            if b == 1:
                row["latency_ms"] = median * 1e3
            else:
                row[f"throughput_b{b}"] = b / median
    for config, row in zip(configs, rows):
        if device.type == "cuda":
            patch(net, config)
            torch.cuda.reset_peak_memory_stats()
            forward(net, move(make_batch(batch_sizes[-1]), device), device)
            row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        elif memory:
            row["peak_mem_mib"] = peak_memory_subprocess(model, config, batch_sizes[-1])
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
    machine = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
        "date": time.strftime("%Y-%m-%d"),
        "peak_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    log.info("machine: %s", machine)
    torch.manual_seed(0)
    rows = []
    for model in args.models:
        log.info("benchmarking %s on %s, batch sizes %s", model, device, batch_sizes)
        rows += measure(model, batch_sizes, args.repeats, device, memory=args.memory)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    md = f"Machine: {machine}\n\n" + table(rows, batch_sizes)
    (args.out / "results.md").write_text(md + "\n")
    plot(rows, batch_sizes, args.out / "speedup.png")
    print(md)


if __name__ == "__main__":
    main()
