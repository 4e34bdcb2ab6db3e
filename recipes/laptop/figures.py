"""The study's figures: accuracy against throughput, and what PuMer kept, pruned and merged."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import pumer_patch
from recipes.laptop.data import Split

__all__ = ["plot_tradeoff", "plot_kept_merged", "figure_examples"]

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI or over ssh
    import matplotlib.pyplot as plt

    return plt


_MODEL_NAMES = {"vilt": "ViLT", "meter": "METER", "vlm": "LLaVA-style VLM (prefill)"}


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], examples_per_pass: int, threads: int, path: Path) -> None:
    """Test accuracy against throughput, one point per variant; bars span the fastest and slowest round.

    One panel per model (``row["model"]``, ViLT when absent), each against its own unpatched row.
    Variants within 3 points of the unpatched accuracy are crowded at the top, so when some variant
    falls far below, an inset repeats them zoomed in.
    """
    plt = _pyplot()
    models = list(dict.fromkeys(row.get("model", "vilt") for row in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(8 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        _tradeoff_panel(ax, [row for row in rows if row.get("model", "vilt") == model], examples_per_pass, threads,
                        _MODEL_NAMES.get(model, model))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _tradeoff_panel(
    ax: Any, rows: Sequence[Mapping[str, Any]], examples_per_pass: int, threads: int, model: str
) -> None:
    """``plot_tradeoff``'s panel for one model's ``rows``, its unpatched row first."""
    plt = _pyplot()
    base = rows[0]
    palette = plt.get_cmap("tab10")

    def draw(axis: Any, subset: Sequence[Mapping[str, Any]], legend: bool) -> None:
        for row in subset:
            i = rows.index(row)
            x, y = row["throughput"], 100 * row["accuracy"]
            rates = [examples_per_pass / s for s in row["seconds_per_pass"]]
            label = f"{row['name']}: {row['speedup']:.2f}x, {y:.1f}%, {row['gflops']:.3f} GFLOPs" if legend else None
            axis.errorbar(x, y, xerr=[[x - min(rates)], [max(rates) - x]], fmt="o", capsize=3, color=palette(i % 10),
                          label=label)
        axis.axhline(100 * base["accuracy"] - 1, ls="--", color="0.6", lw=1, label="unpatched - 1 point" if legend else None)
        axis.axvline(1.5 * base["throughput"], ls=":", color="0.6", lw=1,
                     label="1.5x unpatched throughput" if legend else None)
        axis.grid(alpha=0.3)

    draw(ax, rows, legend=True)
    close = [r for r in rows if r["accuracy"] >= base["accuracy"] - 0.03]
    if len(close) < len(rows):
        inset = ax.inset_axes([0.5, 0.3, 0.47, 0.4])
        draw(inset, close, legend=False)
        inset.set_title("within 3 points of unpatched", fontsize=7)
        inset.tick_params(labelsize=6)
        ax.indicate_inset_zoom(inset, edgecolor="0.5")
    ax.set_xlabel(f"throughput (examples/s, CPU, {threads} threads, median of rounds)")
    ax.set_ylabel("easy-vqa test accuracy (%)")
    ax.set_title(f"PuMer on a small {model}: accuracy against speed")
    ax.legend(fontsize=7, loc="lower left")


def _draw_tokens(ax: Any, image: np.ndarray, source: np.ndarray, patch_index: np.ndarray, grid: tuple[int, int]) -> int:
    """Draw ``image`` with its patch tokens' fate; returns how many image tokens cover its patches.

    source: (P,) for each patch the index of the final token covering it, -1 if pruned;
    patch_index: (P, 2) the (row, col) of each patch. Pruned patches are greyed; the patches of one
    merged token share a colour and an outline; patches kept as they were are left untouched.
    """
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    gh, gw = grid
    cell = np.full((gh, gw), -2)
    cell[patch_index[:, 0], patch_index[:, 1]] = source
    ax.imshow(image, extent=(0, gw, gh, 0), interpolation="nearest")
    tokens, members = np.unique(cell[cell >= 0], return_counts=True)
    merged = tokens[members > 1]
    palette = plt.get_cmap("tab10")
    for r in range(gh):
        for c in range(gw):
            t = cell[r, c]
            if t == -1:
                ax.add_patch(Rectangle((c, r), 1, 1, facecolor="0.5", alpha=0.85, lw=0))
            elif t in merged:
                colour = palette(int(np.searchsorted(merged, t)) % 10)
                ax.add_patch(Rectangle((c, r), 1, 1, facecolor=colour, alpha=0.3, lw=0))
                # outline the group: an edge wherever the neighbour belongs to another token
                for dr, dc, xs, ys in ((-1, 0, (c, c + 1), (r, r)), (1, 0, (c, c + 1), (r + 1, r + 1)),
                                       (0, -1, (c, c), (r, r + 1)), (0, 1, (c + 1, c + 1), (r, r + 1))):
                    rr, cc = r + dr, c + dc
                    if not (0 <= rr < gh and 0 <= cc < gw) or cell[rr, cc] != t:
                        ax.plot(xs, ys, color=colour, lw=1.6, solid_capstyle="round")
    ax.set_xlim(0, gw)
    ax.set_ylim(gh, 0)
    ax.set_axis_off()
    return len(tokens)


@torch.inference_mode()
def plot_kept_merged(
    models: Sequence[tuple[str, nn.Module]], data: Split, idx: Tensor, answers: Sequence[str], path: Path
) -> None:
    """A few test questions: the image, then for each model (patched with ``trace=True``) what it kept.

    Reads the final image source map and the patches' grid positions from ``pumer_patch.last_trace``
    (METER's trace has no positions: its tower's patches enter the fusion blocks in row-major order).
    """
    plt = _pyplot()
    batch = data.inputs(idx)
    images = data.images[data.image[idx]].permute(0, 2, 3, 1).numpy()  # (K, 3, H, W) -> (K, H, W, 3)
    k = len(idx)
    fig, axes = plt.subplots(1 + len(models), k, figsize=(2.3 * k, 2.5 * (1 + len(models))), squeeze=False)
    for col in range(k):
        question = "\n".join(textwrap.wrap(data.questions[idx[col]], 24))
        axes[0, col].imshow(images[col], interpolation="nearest")
        axes[0, col].set_title(f"{question}\n(answer: {answers[data.label[idx[col]]]})", fontsize=7)
        axes[0, col].set_axis_off()
    for row, (label, model) in enumerate(models, start=1):
        pred = model(**batch).logits.argmax(-1)
        trace = pumer_patch.last_trace(model)
        source = trace.image.source[:, 1:].numpy()  # (K, P): the image [CLS] comes first
        patch_index, grid = _patch_layout(model, trace, source.shape)
        for col in range(k):
            n = _draw_tokens(axes[row, col], images[col], source[col], patch_index[col], grid)
            axes[row, col].set_title(f"{label}\n{n} patch tokens left, says {answers[pred[col]]}", fontsize=7)
    fig.suptitle("grey: pruned; colour + outline: patches merged into one token; plain: kept as is", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _patch_layout(model: nn.Module, trace: Any, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """The (row, col) of each patch (K, P, 2) and the grid (H, W): the trace's, else row-major (METER)."""
    if trace.patch_index is not None:
        return trace.patch_index.numpy(), trace.grid
    side = model.config.image_size // model.config.vit_patch_size
    cells = np.arange(shape[1])
    return np.broadcast_to(np.stack([cells // side, cells % side], axis=-1), (*shape, 2)), (side, side)


def figure_examples(data: Split, count: int) -> Tensor:
    """The first question about each of the first ``count`` images: a deterministic, varied pick."""
    first: dict[int, int] = {}
    for q, img in enumerate(data.image.tolist()):
        first.setdefault(img, q)
        if len(first) == count:
            break
    return torch.tensor(list(first.values()))
