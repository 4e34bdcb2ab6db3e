"""Vision-language LLMs: prefill time, decode tokens/s, KV-cache bytes and FLOPs, unpatched and reduced.

    python -m benchmarks.vlm                                  # LLaVA-1.5 geometry, width 256, batch 1 and 8
    python -m benchmarks.vlm --width 512 --batch-sizes 1 --decode 16 --repeats 5
    python -m benchmarks.vlm --tiny                           # a smoke run of the whole path, not figures
    python -m benchmarks.vlm --device cuda --dtype bf16       # on a GPU, under bf16 autocast

The model is a ``LlavaForConditionalGeneration`` with LLaVA-1.5's geometry (576 visual tokens per
image, a 24-layer Llama) at a width this machine can run (``--width``; heads of 64, MLP 2.6875x as
Llama-7B's 11008 / 4096, vocabulary 32064), random weights (the compute is a trained model's). The
prompt is LLaVA-1.5's template: 5 tokens, the image, a 40-token question. The vision tower does not
run (no pixel values: the image placeholders' embeddings stand in for the projected features); its
cost is the same with and without the patch, and the patch reduces inside the LLM.

Rows, all at the same kept-token budget (576 -> 288 visual tokens after decoder layer 1, FastV's
K = 2, R = 50%) unless named otherwise: unpatched; PuMer in the LLM (prune 0.3 by the question's
attention, then merge 0.2); FastV's rule (prune 0.5 by the last prompt token's attention); merging
only (0.5); PuMer before the LLM (``where="input"``, the same ratios); and PuMer and FastV at 144
kept (R = 75%). Per row and batch size: the prefill time (a forward that fills the cache, median of
interleaved repeats), decode tokens/s (``--decode`` greedy steps on that cache, each a forward of
one token per sample), the KV cache's bytes after the prefill, the prefill's GFLOPs per example
(``pumer_patch.flops.gflops_per_example``) and the same from the analytic count below, and the
visual tokens kept. A last table gives the analytic prefill TFLOPs and fp16 KV-cache MiB of
LLaVA-1.5-7B (Llama-7B: 32 layers, width 4096, MLP 11008, vocabulary 32064) under the same rows,
without running it.

Analytic count (what ``FlopCounterMode`` counts: a multiply-accumulate is 2 FLOPs, SDPA in full):
a layer on N tokens costs ``2 N d (2 d + 2 d_kv) + 4 N^2 d + 6 N d f``; a reduce layer runs its
attention on N and its MLP on the N' kept; the head reads the last token (``2 d V``). Both figures
are reported for the model run here (``tests/test_hf_vlm.py`` checks that they agree). Timings on a
shared CPU are noisy: the FLOPs and cache bytes are exact. ``--device cuda`` runs every model on the
GPU (timings synchronise it before and after); ``--dtype bf16`` runs the prefills and decodes under
``torch.autocast`` to bfloat16 (weights stay fp32; the cache's values are then bfloat16, its keys leave
the rotary embedding in fp32); the FLOPs are counted in fp32. Writes ``vlm.json`` and ``vlm.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import pumer_patch
from pumer_patch.flops import gflops_per_example

from .speed import machine_info

__all__ = ["Row", "analytic_flops", "build", "main"]

log = logging.getLogger("benchmarks.vlm")

IMAGE = 32000  # the image-placeholder id, inside the vocabulary
VOCAB = 32064
VISUAL = 576
BEFORE, QUESTION = 5, 40


@dataclass(frozen=True)
class Row:
    """One configuration: its name and the ``apply`` keywords (None: unpatched)."""

    name: str
    patch: dict[str, Any] | None = None
    kept: list[int] = field(default_factory=list)  # visual tokens after each reduce layer, for the analytic count


ROWS = [
    Row("unpatched"),
    Row("PuMer in the LLM, 288 kept", {"layers": [1], "prune_ratio": 0.3, "merge_ratio": 0.2}),
    Row("FastV rule, 288 kept", {"layers": [1], "prune_ratio": 0.5, "text_tokens": "last"}),
    Row("merging only, 288 kept", {"layers": [1], "merge_ratio": 0.5}),
    Row("PuMer before the LLM, 288 kept", {"layers": [0], "prune_ratio": 0.3, "merge_ratio": 0.2, "where": "input"}),
    Row("PuMer in the LLM, 144 kept", {"layers": [1], "prune_ratio": 0.6, "merge_ratio": 0.15}),
    Row("FastV rule, 144 kept", {"layers": [1], "prune_ratio": 0.75, "text_tokens": "last"}),
]


def build(width: int, layers: int = 24, tiny: bool = False) -> LlavaForConditionalGeneration:
    """LLaVA-1.5's geometry at ``width``: heads of 64, MLP 2.6875 x width; sdpa; eval, seeded."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)  # never run here
    heads = max(width // 64, 1)
    text = LlamaConfig(hidden_size=width, intermediate_size=int(width * 2.6875), num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB if not tiny else 33000,
                       max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, attn_implementation="sdpa")
    return LlavaForConditionalGeneration(config).eval()


def prompt(batch: int, visual: int = VISUAL, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """LLaVA-1.5's template for ``batch`` samples: 5 tokens, ``visual`` image placeholders, a 40-token question."""
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(1, 31000, (batch, BEFORE), generator=g), torch.full((batch, visual), IMAGE),
                     torch.randint(1, 31000, (batch, QUESTION), generator=g)], dim=1).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def analytic_flops(layers: int, d: int, d_kv: int, f: int, vocab: int, n: int, reduce: dict[int, int]) -> float:
    """Prefill FLOPs of one sample: ``n`` tokens, and ``reduce`` {layer: tokens after it} (-1: before layer 0)."""
    total = 0.0
    if -1 in reduce:
        n = reduce[-1]
    for i in range(layers):
        after = reduce.get(i, n)
        total += 2 * n * d * (2 * d + 2 * d_kv) + 4 * n * n * d + 6 * after * d * f
        n = after
    return total + 2 * d * vocab


def _reductions(row: Row, n_text: int) -> dict[int, int]:
    """The sequence length after each reduce layer of ``row`` (visual tokens from its trace)."""
    if row.patch is None:
        return {}
    layer = row.patch["layers"][0]
    key = -1 if row.patch.get("where") == "input" else layer
    return {key: n_text + row.kept[0]}


def _cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads what ran (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision(device: torch.device, dtype: str) -> AbstractContextManager:
    """bf16: autocast to bfloat16 on ``device``; fp32: nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def _prefill(model: torch.nn.Module, inputs: dict[str, torch.Tensor], dtype: str = "fp32") -> tuple[Any, float]:
    """The prefill's output and its seconds."""
    device = inputs["input_ids"].device
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), _precision(device, dtype):
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    _sync(device)
    return out, time.perf_counter() - start


def _decode(model: torch.nn.Module, inputs: dict[str, torch.Tensor], out: Any, steps: int, dtype: str = "fp32") -> float:
    """Seconds for ``steps`` greedy one-token forwards on the prefill's cache."""
    token = out.logits[:, -1:].argmax(-1)
    mask = inputs["attention_mask"]
    cache = out.cache
    device = token.device
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), _precision(device, dtype):
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            step = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
            token = step.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - start


def measure(
    width: int, batch_sizes: list[int], repeats: int, steps: int, tiny: bool,
    device: torch.device = torch.device("cpu"), dtype: str = "fp32",
) -> tuple[list[dict], dict]:
    layers = 2 if tiny else 24
    model = build(width, layers, tiny)
    visual = 16 if tiny else VISUAL
    rows = [r for r in ROWS if not tiny or r.patch is None or r.patch["layers"][0] < layers]
    n_text = BEFORE + QUESTION
    models: dict[str, torch.nn.Module] = {}
    kept: dict[str, int] = {}
    gflops: dict[str, float] = {}
    for row in rows:
        net = build(width, layers, tiny)
        net.load_state_dict(model.state_dict())
        net.to(device)
        if row.patch is not None:
            pumer_patch.apply(net, **row.patch)
        example = prompt(1, visual, device)
        gflops[row.name] = gflops_per_example(net, {**example, "logits_to_keep": 1})
        if row.patch is not None:
            kept[row.name] = pumer_patch.last_trace(net).counts[-1].image
        models[row.name] = net
    results = []
    for batch in batch_sizes:
        inputs = prompt(batch, visual, device)
        prefill: dict[str, list[float]] = {r.name: [] for r in rows}
        decode: dict[str, list[float]] = {r.name: [] for r in rows}
        cache_bytes: dict[str, int] = {}
        for r in rows:  # warm-up
            _decode(models[r.name], inputs, _prefill(models[r.name], inputs, dtype)[0], 1, dtype)
        for _ in range(repeats):  # interleaved: A B C ... A B C ...
            for r in rows:
                out, seconds = _prefill(models[r.name], inputs, dtype)
                prefill[r.name].append(seconds)
                cache_bytes[r.name] = _cache_bytes(out.cache)
                decode[r.name].append(_decode(models[r.name], inputs, out, steps, dtype))
        log.info("batch %d: prefill ms %s", batch, {k: round(1e3 * statistics.median(v), 1) for k, v in prefill.items()})
        base = statistics.median(prefill["unpatched"])
        for r in rows:
            d = model.config.text_config
            reduced = Row(r.name, r.patch, [kept.get(r.name, visual)])
            count = analytic_flops(d.num_hidden_layers, d.hidden_size, d.hidden_size * d.num_key_value_heads
                                   // d.num_attention_heads, d.intermediate_size, d.vocab_size,
                                   n_text + visual, _reductions(reduced, n_text))
            t = statistics.median(prefill[r.name])
            results.append({
                "config": r.name, "batch": batch, "visual_kept": kept.get(r.name, visual), "prefill_ms": 1e3 * t,
                "prefill_speedup": base / t, "decode_tokens_per_s": batch * steps / statistics.median(decode[r.name]),
                "kv_cache_mib": cache_bytes[r.name] / 2**20, "gflops": gflops[r.name], "gflops_analytic": count / 1e9,
            })
    return results, {r.name: kept.get(r.name, visual) for r in rows}


def full_size(kept: dict[str, int]) -> list[dict]:
    """LLaVA-1.5-7B, analytically: prefill TFLOPs and the fp16 KV cache after the prefill, per row."""
    layers, d, f = 32, 4096, 11008
    n_text = BEFORE + QUESTION
    rows = []
    for row in ROWS:
        if row.name not in kept:
            continue
        reduced = Row(row.name, row.patch, [kept[row.name]])
        steps = _reductions(reduced, n_text)
        flops = analytic_flops(layers, d, d, f, VOCAB, n_text + VISUAL, steps)
        lengths, n = [], n_text + VISUAL
        if -1 in steps:
            n = steps[-1]
        for i in range(layers):
            lengths.append(n)  # layer i caches what its attention saw
            n = steps.get(i, n)
        kv = sum(2 * length * d * 2 for length in lengths) / 2**20
        rows.append({"config": row.name, "tflops": flops / 1e12, "kv_cache_mib_fp16": kv})
    return rows


def table(rows: list[dict], big: list[dict]) -> str:
    lines = ["| config | batch | visual kept | prefill ms | speedup | decode tok/s | KV MiB | GFLOPs/ex (counted) "
             "| GFLOPs/ex (analytic) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['batch']} | {r['visual_kept']} | {r['prefill_ms']:.1f} | "
                     f"{r['prefill_speedup']:.2f}x | {r['decode_tokens_per_s']:.1f} | {r['kv_cache_mib']:.2f} | "
                     f"{r['gflops']:.2f} | {r['gflops_analytic']:.2f} |")
    lines += ["", "LLaVA-1.5-7B, analytic (prompt of 621 tokens):", "",
              "| config | prefill TFLOPs | ratio | KV cache MiB (fp16) |", "|---|---:|---:|---:|"]
    for r in big:
        lines.append(f"| {r['config']} | {r['tflops']:.2f} | {r['tflops'] / big[0]['tflops']:.3f} | "
                     f"{r['kv_cache_mib_fp16']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode", type=int, default=8, help="greedy decode steps timed after each prefill")
    parser.add_argument("--tiny", action="store_true", help="width 64, 2 layers, 16 visual tokens: a smoke run")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the models run [cpu]")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: prefill and decode under torch.autocast to bfloat16, weights fp32 [fp32]")
    parser.add_argument("--out", type=Path, default=Path("results/vlm"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    device = torch.device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    width = 64 if args.tiny else args.width
    rows, kept = measure(width, args.batch_sizes, args.repeats, args.decode, args.tiny, device, args.dtype)
    big = full_size(kept) if not args.tiny else []
    args.out.mkdir(parents=True, exist_ok=True)
    info = {**machine_info(device, args.dtype), "width": width}
    (args.out / "vlm.json").write_text(json.dumps({"machine": info, "rows": rows, "llava_7b": big}, indent=2))
    text = table(rows, big)
    (args.out / "vlm.md").write_text(f"{info}\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
