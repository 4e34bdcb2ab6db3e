"""The cost of the reduction op itself, as a share of one transformer layer, for N = 64 ... 1024.

    python -m benchmarks.reduce_op --batch 8 --threads 2

For each image-token count N (with 40 text tokens, hidden 768, 12 heads: ViLT-B and METER shapes)
it times ``reduce_tokens`` with the paper's ratios against one ViLT layer on the same sequence, with
``torch.utils.benchmark`` (which syncs CUDA). Writes ``reduce_op.json`` and ``reduce_op.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.utils.benchmark as tbench
from transformers import ViltConfig
from transformers.models.vilt.modeling_vilt import ViltLayer

from benchmarks.speed import machine_info
from pumer_patch import Tokens, init_source, reduce_tokens

log = logging.getLogger("benchmarks.reduce_op")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 145, 256, 577, 1024])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer = ViltLayer(ViltConfig()).eval().to(device)
    b, t, c, h = args.batch, 40, 768, 12
    rows = []
    for n in args.tokens:
        g = torch.Generator(device="cpu").manual_seed(n)
        x = torch.randn(b, t + n, c, generator=g).to(device)
        attn = torch.rand(b, h, t, n, generator=g).softmax(-1).to(device)
        relevance = attn.mean(1).mean(1)
        metric = torch.randn(b, t + n, c // h, generator=g).to(device)
        image = Tokens(x[:, t:], size=torch.ones(b, n, device=device), source=init_source(b, n, device))
        text = Tokens(x[:, :t], size=torch.ones(b, t, device=device), mask=torch.ones(b, t, dtype=torch.bool, device=device))

        def op() -> None:
            reduce_tokens(relevance, image, "p0.1-r0.3-t0.2", image_metric=metric[:, t:], text_tokens=text, text_metric=metric[:, :t])

        def full_layer() -> None:
            with torch.no_grad():
                layer(x)

        op_s = tbench.Timer("op()", globals={"op": op}).blocked_autorange(min_run_time=1.0).median
        layer_s = tbench.Timer("f()", globals={"f": full_layer}).blocked_autorange(min_run_time=1.0).median
        rows.append({"image_tokens": n, "op_ms": op_s * 1e3, "layer_ms": layer_s * 1e3, "share": op_s / layer_s})
        log.info("N=%d: op %.2f ms, layer %.2f ms (%.1f%%)", n, op_s * 1e3, layer_s * 1e3, 100 * op_s / layer_s)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {**machine_info(device, "fp32"), "batch": b}
    (args.out / "reduce_op.json").write_text(json.dumps({"machine": meta, "rows": rows}, indent=2))
    lines = [f"Machine: {meta}", "", "| N image | reduce_tokens (ms) | one ViLT layer (ms) | share |", "|---|---|---|---|"]
    lines += [f"| {r['image_tokens']} | {r['op_ms']:.2f} | {r['layer_ms']:.2f} | {100 * r['share']:.1f}% |" for r in rows]
    (args.out / "reduce_op.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
