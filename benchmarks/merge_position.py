"""Where should a merged token stand? ``merge_position="mean"`` against ``"destination"`` on EVA and BEiT.

    python -m benchmarks.merge_position                          # about 10 minutes on one busy CPU core
    python -m benchmarks.merge_position --steps 20 --seeds 1 --eval 64   # smoke run

A task whose answer is positional: each 64 x 64 image (8 x 8 patches) holds two Gaussian blobs, one
in the red and one in the green channel, on noise; the model regresses the displacement from the red
to the green blob, in patches. Tiny ViTs with no absolute position embedding (positions come only from
RoPE, or from BEiT's relative bias) are trained on it for ``--steps`` steps, then reduced without
retraining. Per reduction and position rule: the mean distance (patches) between the reduced and the
unreduced model's answers, the error against the truth, and the mean cosine of the pre-logits
features against the unreduced ones. The same figures for the untrained (random) models come last.
Writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

import pumer_patch

log = logging.getLogger("benchmarks.merge_position")

TINY = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=2)

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "eva02-like (rope cat, [CLS])": ("eva02_tiny_patch14_224", dict(use_abs_pos_emb=False)),
    "dinov3-like (rope dinov3, 4 registers)": ("vit_small_patch16_dinov3", dict(use_abs_pos_emb=False)),
    "pe-like (AttentionRope, map pool)": ("vit_pe_core_tiny_patch16_384", dict(use_abs_pos_emb=False)),
    "beit (relative bias)": ("beit_base_patch16_224", dict(use_abs_pos_emb=False, use_rel_pos_bias=True)),
}

REDUCTIONS: dict[str, dict[str, Any]] = {
    "merge 0.3 @ 1,2": dict(layers=[1, 2], merge_ratio=0.3),
    "ToMe r=8 every block": dict(layers=[], merge_schedule=8),
    "prune 0.2 + merge 0.3 @ 1,2": dict(layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3),
}


def blobs(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Images (n, 3, 64, 64) and displacements (n, 2) in patches (green blob minus red blob)."""
    centres = torch.rand(n, 2, 2, generator=g) * 56 + 4  # (n, blob, (row, col)) in pixels
    axis = torch.arange(64).float() + 0.5
    images = torch.randn(n, 3, 64, 64, generator=g) * 0.3
    for blob in range(2):
        rows = (axis[None, :] - centres[:, blob, :1]) ** 2  # (n, 64)
        cols = (axis[None, :] - centres[:, blob, 1:]) ** 2
        images[:, blob] += 2 * torch.exp(-(rows[:, :, None] + cols[:, None, :]) / 18)
    return images, (centres[:, 1] - centres[:, 0]) / 8


def build(name: str, seed: int) -> nn.Module:
    model, extra = MODELS[name]
    torch.manual_seed(seed)
    return timm.create_model(model, pretrained=False, **TINY, **extra)


def train(model: nn.Module, steps: int, seed: int) -> float:
    """AdamW on fresh batches of 64; returns the last 20 steps' mean squared error."""
    g = torch.Generator().manual_seed(1000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    losses = []
    for _ in range(steps):
        x, y = blobs(64, g)
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


@torch.no_grad()
def compare(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """Per reduction and merge position: distance to the unreduced answer, error, feature cosine."""
    pumer_patch.remove(model)
    base_features = model.forward_head(model.forward_features(x), pre_logits=True)
    base = model.head(base_features)
    out: dict[str, dict[str, dict[str, float]]] = {"unreduced": {"-": {"error": (base - y).norm(dim=1).mean().item()}}}
    for reduction, kwargs in REDUCTIONS.items():
        out[reduction] = {}
        for position in ("mean", "destination"):
            pumer_patch.apply(model, **kwargs, merge_position=position)
            features = model.forward_head(model.forward_features(x), pre_logits=True)
            answer = model.head(features)
            out[reduction][position] = {
                "vs_unreduced": (answer - base).norm(dim=1).mean().item(),
                "error": (answer - y).norm(dim=1).mean().item(),
                "cosine": nn.functional.cosine_similarity(features, base_features).mean().item(),
            }
        pumer_patch.remove(model)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--eval", type=int, default=256, help="test images")
    parser.add_argument("--out", type=Path, default=Path("results/merge_position"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    x, y = blobs(args.eval, torch.Generator().manual_seed(12345))
    results: dict[str, Any] = {"steps": args.steps, "seeds": args.seeds, "trained": {}, "random": {}}
    for name in MODELS:
        for seed in range(args.seeds):
            model = build(name, seed)
            results["random"].setdefault(name, []).append(compare(model.eval(), x, y))
            final = train(model, args.steps, seed)
            log.info("%s seed %d: training MSE %.3f", name, seed, final)
            results["trained"].setdefault(name, []).append(compare(model, x, y))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    figures = "vs unreduced / error / cosine"
    lines = [f"| weights | model | reduction | mean: {figures} | destination: {figures} |",
             "|---|---|---|---|---|"]
    for weights in ("trained", "random"):
        for name, runs in results[weights].items():
            for reduction in REDUCTIONS:
                cells = []
                for position in ("mean", "destination"):
                    keys = ("vs_unreduced", "error", "cosine")
                    avg = {k: sum(r[reduction][position][k] for r in runs) / len(runs) for k in keys}
                    cells.append(f"{avg['vs_unreduced']:.3f} / {avg['error']:.3f} / {avg['cosine']:.4f}")
                lines.append(f"| {weights} | {name} | {reduction} | {cells[0]} | {cells[1]} |")
            base = sum(r["unreduced"]["-"]["error"] for r in runs) / len(runs)
            lines.append(f"| {weights} | {name} | unreduced error | {base:.3f} | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
