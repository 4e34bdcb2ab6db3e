"""The study's rows: which weights and which ``pumer_patch.apply`` call each variant uses."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

import pumer_patch
from pumer_patch.flops import gflops_per_example, match_gflops
from recipes.laptop.config import MeterStudyConfig, StudyConfig

__all__ = ["Variant", "patch_args", "meter_patches", "build_variants", "build_meter_variants"]

@dataclass(frozen=True)
class Variant:
    """One row of the study: which weights, and which ``pumer_patch.apply`` call (None: unpatched)."""

    name: str
    description: str
    weights: str = "base"  # a key of the study's weights: "base" (trained unpatched), "finetuned", "meter", ...
    patch: Mapping[str, Any] | None = None
    model: str = "vilt"  # the family: speedups and accuracy drops are against its own unpatched row

    def build(self, weights: Mapping[str, nn.Module], trace: bool = False) -> nn.Module:
        """A fresh copy of the weights, patched as this variant says."""
        model = copy.deepcopy(weights[self.weights]).eval()
        if self.patch is not None:
            pumer_patch.apply(model, **self.patch, trace=trace)
        return model


def patch_args(layers: Sequence[int], prune: float, merge: float, text_merge: float, mode: str = "default") -> dict[str, Any]:
    return {"layers": list(layers), "prune_ratio": prune, "merge_ratio": merge, "text_merge_ratio": text_merge, "mode": mode}


def build_variants(cfg: StudyConfig, base: nn.Module, example: Mapping[str, Tensor]) -> list[Variant]:
    """The study's rows; the ToMe baseline's ratio is chosen here to match PuMer's FLOPs."""
    r = cfg.reduce
    pumer = patch_args(r.layers, r.prune, r.merge, r.text_merge)
    pumer_gflops = gflops_per_example(pumer_patch.apply(copy.deepcopy(base), **pumer), example)
    # ToMe merges in every layer: here from PuMer's first reduce layer on, one ratio for image and
    # text (each within its modality), nothing pruned, nothing guided by text
    tome_layers = list(range(min(r.layers), base.config.num_hidden_layers))
    ratio, _ = match_gflops(base, example, pumer_gflops, lambda q: patch_args(tome_layers, 0.0, q, q))
    tome = patch_args(tome_layers, 0.0, ratio, ratio)
    layer_names = ",".join(map(str, r.layers))
    return [
        Variant("unpatched", "the trained ViLT, no reduction"),
        Variant("pumer", f"PuMer {r.name}, default mode, off the shelf", patch=pumer),
        Variant("prune-only", f"text-informed pruning {r.prune:g} at layers {layer_names}, no merging",
                patch=patch_args(r.layers, r.prune, 0.0, 0.0)),
        Variant("merge-only", f"merging {r.merge:g} image / {r.text_merge:g} text at layers {layer_names}, no pruning",
                patch=patch_args(r.layers, 0.0, r.merge, r.text_merge)),
        Variant("tome-equal-flops",
                f"ToMe-style: merge {tome['merge_ratio']:g} of image and text tokens at layers {tome_layers[0]}-{tome_layers[-1]}, "
                f"no text guidance, ratio searched to match PuMer's GFLOPs", patch=tome),
        Variant("pumer-finetuned", f"PuMer {r.name}, default mode, finetuned with the reduction on"
                + (f", distilled from the unpatched model (KL weight {cfg.distill_weight:g})" if cfg.distill_weight > 0 else ""),
                weights="finetuned", patch=pumer),
    ]


def meter_patches(cfg: MeterStudyConfig) -> dict[str, dict[str, Any]]:
    """METER's three reductions as ``pumer_patch.apply`` arguments: PuMer in the fusion blocks, ToMe in
    the CLIP tower (``encoder_merge_schedule``), and both."""
    unknown = set(cfg.finetuned) - {"pumer", "tower-tome", "pumer+tower-tome"}
    if unknown:
        raise ValueError(f"MeterStudyConfig.finetuned names {sorted(unknown)}; finetunable: pumer, tower-tome, "
                         f"pumer+tower-tome")
    r = cfg.reduce
    pumer = patch_args(r.layers, r.prune, r.merge, r.text_merge)
    return {
        "pumer": pumer,
        "tower-tome": {"layers": [], "encoder_merge_schedule": cfg.encoder_merge},
        "pumer+tower-tome": {**pumer, "encoder_merge_schedule": cfg.encoder_merge},
    }


def build_meter_variants(cfg: StudyConfig) -> list[Variant]:
    """METER's rows: unpatched, then each reduction off the shelf, then those of ``finetuned`` finetuned with it on.

    The finetuned weights of reduction ``k`` are ``weights["meter-finetuned-" + k]``.
    """
    if cfg.meter is None:
        return []
    m = cfg.meter
    r = m.reduce
    blocks = ",".join(map(str, r.layers))
    what = {
        "pumer": f"PuMer {r.name} in fusion block(s) {blocks}",
        "tower-tome": f"ToMe r={m.encoder_merge} in each of the CLIP tower's {m.model.vision_layers} blocks",
        "pumer+tower-tome": f"PuMer {r.name} in fusion block(s) {blocks} + ToMe r={m.encoder_merge} in the tower",
    }
    distilled = ""
    if cfg.distill_weight > 0:
        distilled = f", distilled from the unpatched METER (KL weight {cfg.distill_weight:g})"
    patches = meter_patches(m)
    rows = [Variant("meter-unpatched", "the trained METER, no reduction", weights="meter", model="meter")]
    rows += [Variant(f"meter-{k}", f"{what[k]}, default mode, off the shelf", weights="meter", patch=patch,
                     model="meter")
             for k, patch in patches.items()]
    rows += [Variant(f"meter-{k}-finetuned", f"{what[k]}, finetuned with it on{distilled}",
                     weights=f"meter-finetuned-{k}", patch=patch, model="meter")
             for k, patch in patches.items() if k in m.finetuned]
    return rows
