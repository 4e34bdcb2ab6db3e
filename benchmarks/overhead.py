"""What the reduction costs beyond running fewer tokens: the patched model against its own blocks on the same counts.

    python -m benchmarks.overhead                           # ViLT-B/32 (40 text tokens) and timm ViT-B/16
    python -m benchmarks.overhead --models vit_large_patch16_224 --batch-size 8 --repeats 7

The "same counts" forward runs the library's own blocks with the token counts the patched model
had: a block's attention half on the tokens it receives, its MLP half on the tokens it keeps, the
reduction replaced by slicing (no relevance, no matching, no gathers, no attention bias). So

* ``overhead`` = patched / same-counts - 1: what the reduction itself costs (what is left for
  pumer_patch to win);
* ``hardware efficiency`` = (unpatched / same-counts) x FLOPs ratio: how well this machine turns
  fewer tokens into time (smaller matrices run at lower FLOP rates);

and ``benchmarks.speed``'s efficiency is about their product. Models: ``vilt<T>`` and timm names
(as in ``benchmarks.speed``); configs: theirs, without the FLOPs-matched and SDPA rows. Unpatched,
patched and same-counts run interleaved after a warm-up; medians. Writes ``overhead.json`` and
``overhead.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from tqdm import tqdm
from transformers import ViltModel

import pumer_patch
from benchmarks.speed import build, machine_info, patch
from pumer_patch.flops import gflops_per_example

log = logging.getLogger("benchmarks.overhead")

Halves = tuple[Callable[[nn.Module, Tensor], Tensor], Callable[[nn.Module, Tensor], Tensor]]


def _vilt_parts(net: nn.Module, batch: dict) -> tuple[Callable[[], Tensor], list[nn.Module], Halves, Callable[[Tensor], Tensor]]:
    """ViLT: the embedding step, its layers as halves, the final norm and pooler."""
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    ones = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long)

    def embed() -> Tensor:
        return net.embeddings(ids, torch.ones_like(ids), None, pixels, ones, None, None)[0]

    def attend(layer: nn.Module, h: Tensor) -> Tensor:  # the library's eager attention, nothing captured
        return layer.attention(layer.layernorm_before(h))[0] + h

    def finish(layer: nn.Module, h: Tensor) -> Tensor:  # ViltLayer.forward after the first residual
        return layer.output(layer.intermediate(layer.layernorm_after(h)), h)

    return embed, list(net.encoder.layer), (attend, finish), lambda h: net.pooler(net.layernorm(h))


def _timm_parts(net: nn.Module, batch: dict) -> tuple[Callable[[], Tensor], list[nn.Module], Halves, Callable[[Tensor], Tensor]]:
    """timm ViT: the patch embedding, its blocks as halves, the final norm and head."""

    def embed() -> Tensor:
        return net.norm_pre(net._pos_embed(net.patch_embed(batch["x"])))

    def attend(block: nn.Module, x: Tensor) -> Tensor:  # no q/k captured, unlike the adapter's
        return x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))

    def finish(block: nn.Module, x: Tensor) -> Tensor:  # Block.forward's MLP line
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    return embed, list(net.blocks), (attend, finish), lambda x: net.forward_head(net.norm(x))


def same_counts(net: nn.Module, model: str, batch: dict, counts: dict[int, int]) -> Callable[[], Tensor]:
    """A forward over the library's blocks that keeps ``counts[i]`` tokens after block ``i``'s attention.

    The family is the network's type; ``model`` (the benchmark's name for it) only labels the error.
    """
    if isinstance(net, ViltModel):
        parts = _vilt_parts
    elif isinstance(net, VisionTransformer):
        parts = _timm_parts
    else:
        raise TypeError(f"benchmarks.overhead knows ViltModel and timm VisionTransformer; {model} is a {type(net).__name__}")
    embed, blocks, (attend, finish), head = parts(net, batch)

    def run() -> Tensor:
        x = embed()
        for i, block in enumerate(blocks):
            x = attend(block, x)
            x = finish(block, x[:, : counts[i]] if i in counts else x)
        return head(x)

    return run


def measure(model: str, batch_size: int, repeats: int) -> list[dict]:
    net, make_batch, configs = build(model)
    configs = [c for c in configs if c.apply and c.match is None and "attention" not in c.apply]
    batch = make_batch(batch_size)
    base_gflops = gflops_per_example(net, make_batch(1))
    rows = []
    for config in configs:
        patched = patch(copy.deepcopy(net), config)
        flops_ratio = gflops_per_example(patched, make_batch(1)) / base_gflops
        # counts depend on shapes only: the batch-1 FLOPs forward tells them
        counts = {c.layer: c.image + c.text for c in pumer_patch.last_trace(patched).counts}
        runs = {
            "unpatched": lambda: net(**batch),
            "patched": lambda patched=patched: patched(**batch),
            "same counts": same_counts(net, model, batch, counts),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        with torch.no_grad():
            for fn in runs.values():  # warm-up
                fn()
            for _ in tqdm(range(repeats), desc=f"{model} {config.name}", leave=False):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append({
            "model": model, "config": config.name, "batch": batch_size, "flops_ratio": flops_ratio,
            "unpatched_ms": ms["unpatched"], "patched_ms": ms["patched"], "same_counts_ms": ms["same counts"],
            "overhead": ms["patched"] / ms["same counts"] - 1,
            "hardware_efficiency": ms["unpatched"] / ms["same counts"] * flops_ratio,
            "efficiency": ms["unpatched"] / ms["patched"] * flops_ratio,
        })
        log.info("%s %s: overhead %+.1f%%, hardware efficiency %.2f", model, config.name,
                 100 * rows[-1]["overhead"], rows[-1]["hardware_efficiency"])
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | config | FLOPs ratio | unpatched ms | patched ms | same counts ms | overhead | hardware efficiency | efficiency |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['config']} | {r['flops_ratio']:.3f} | {r['unpatched_ms']:.1f} | {r['patched_ms']:.1f} "
            f"| {r['same_counts_ms']:.1f} | {100 * r['overhead']:+.1f}% | {r['hardware_efficiency']:.2f} | {r['efficiency']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vilt40", "vit_base_patch16_224"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(torch.device("cpu"), "fp32")
    log.info("machine: %s", machine)
    torch.manual_seed(0)
    rows = [row for model in args.models for row in measure(model, args.batch_size, args.repeats)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    md = f"Machine: {machine}\n\n" + table(rows)
    (args.out / "overhead.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
