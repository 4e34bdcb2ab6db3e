"""FLOPs of a forward pass, and the reduction ratio that lands on a FLOPs budget.

Counting is ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention kernels it
knows). Token reduction changes FLOPs only through token counts, which depend on shapes and ratios,
not on values, so one batch tells and random inputs do.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .patch import apply

__all__ = ["gflops_per_example", "match_gflops"]

logger = logging.getLogger(__name__)


def gflops_per_example(model: nn.Module, inputs: Mapping[str, Tensor]) -> float:
    """Forward GFLOPs per example: ``model(**inputs)`` counted without gradient, over the batch size.

    The batch size is the first dimension of the first tensor in ``inputs``. Attention is counted in
    full: ``FlopCounterMode`` misses the fused CPU SDPA kernel and ``nn.MultiheadAttention``'s fast
    path (its projections too), so the count runs SDPA on its math backend and MHA off its fast path.
    """
    batch = next(v for v in inputs.values() if isinstance(v, Tensor)).shape[0]
    counter = FlopCounterMode(display=False)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            model(**inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / batch / 1e9


def match_gflops(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    target: float,
    options: Callable[[float], Mapping[str, Any]],
    steps: int = 100,
) -> tuple[float, float]:
    """The ratio in (0, 1) whose patch comes closest to ``target`` GFLOPs per example, and its GFLOPs.

    ``options(ratio)`` gives the ``pumer_patch.apply`` keyword arguments for a ratio, e.g. a ToMe-style
    baseline ``lambda r: {"layers": range(12), "merge_ratio": r, "text_merge_ratio": r}``. The ratio
    is searched on the grid ``k / steps`` by bisection (FLOPs never grow with a reduction ratio). The
    search patches a deep copy; ``model`` is left as it was. A target below what the grid reaches
    (merging alone at most halves the tokens of a layer) gets the closest ratio and a warning.
    """
    if target <= 0:
        raise ValueError(f"target must be a positive number of GFLOPs per example, got {target!r}")
    probe = copy.deepcopy(model).eval()
    measured: dict[int, float] = {}

    def at(k: int) -> float:
        if k not in measured:
            measured[k] = gflops_per_example(apply(probe, **options(k / steps)), inputs)
        return measured[k]

    lo, hi = 1, steps - 1  # the first grid point at or under the target, else the last one
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    best = min((k for k in (lo - 1, lo) if k >= 1), key=lambda k: abs(at(k) - target))
    if abs(at(best) - target) > 0.02 * target:
        logger.warning(
            "match_gflops: the closest reachable is %.4f GFLOPs at ratio %.2f against a target of %.4f",
            at(best), best / steps, target,
        )
    return best / steps, at(best)
