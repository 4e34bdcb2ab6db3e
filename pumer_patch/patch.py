"""``apply`` / ``remove``: validate first, mutate second; leave nothing behind."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .adapters import REGISTRY, get_adapter, loaded_adapters
from .adapters.base import STATE_ATTR, Adapter, PatchState, Plan, Trace
from .core import _MODES, Mode
from .ratios import Ratios, RatiosLike, parse_config

__all__ = ["apply", "remove", "is_patched", "last_trace", "patched_roots"]

LayerSchedule = Mapping[int, RatiosLike]


def _resolve_schedule(
    layers: Sequence[int] | str | None,
    ratios: RatiosLike | LayerSchedule | None,
    prune_ratio: float | None,
    merge_ratio: float | None,
    text_merge_ratio: float | None,
    adapter_options: bool,
) -> dict[int, Ratios]:
    loose = {"prune": prune_ratio, "merge": merge_ratio, "text_merge": text_merge_ratio}
    loose = {k: v for k, v in loose.items() if v is not None}
    if layers is None and ratios is None and not loose and not adapter_options:
        raise ValueError(
            "nothing to reduce: pass layers=[...] with ratios (layers=[2, 5, 8], prune_ratio=0.1, ...), a paper "
            "config (layers='p0.1-r0.3-t0.2-258'), or an adapter schedule (merge_schedule=16 for timm / open_clip)"
        )
    if isinstance(layers, str):
        if ratios is not None or loose:
            raise ValueError(f"layers={layers!r} is a paper config that names the ratios; do not pass ratios too")
        parsed, layer_list = parse_config(layers)
        schedule = {i: parsed for i in layer_list}
    elif isinstance(ratios, Mapping) and ratios and all(isinstance(k, int) for k in ratios):
        if loose:
            raise ValueError("pass either a per-layer ratios dict or prune_ratio/merge_ratio/text_merge_ratio, not both")
        if layers is not None and sorted(layers) != sorted(ratios):
            raise ValueError(f"layers={list(layers)} differs from the keys of the ratios dict {sorted(ratios)}")
        schedule = {int(k): Ratios.parse(v) for k, v in ratios.items()}
    else:
        if ratios is not None and loose:
            raise ValueError("pass either ratios=... or prune_ratio/merge_ratio/text_merge_ratio, not both")
        one = Ratios.parse(ratios) if ratios is not None else Ratios(**loose)
        if layers is None and not one.is_zero:
            raise ValueError("layers is required with ratios: the block indices to reduce at, e.g. layers=[2, 5, 8]")
        layers = [] if layers is None else layers
        if isinstance(layers, int) or not isinstance(layers, Sequence):
            raise TypeError(f"layers must be a list of block indices such as [2, 5, 8], got {layers!r}")
        schedule = {}
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"layers must hold ints, got {i!r} in {list(layers)}")
            if i in schedule:
                raise ValueError(f"layers={list(layers)} repeats layer {i}; name each layer once")
            schedule[i] = one
    for i in schedule:
        if i < 0:
            raise ValueError(f"layer {i} is negative; count blocks from 0 (layers=[2, 5, 8])")
    return {i: r for i, r in sorted(schedule.items())}


def _find_roots(model: nn.Module) -> list[tuple[Adapter, nn.Module]]:
    found: list[tuple[Adapter, nn.Module]] = []
    claimed: set[int] = set()
    for adapter in loaded_adapters():
        for root in adapter.roots(model):
            if id(root) not in claimed:
                claimed.add(id(root))
                found.append((adapter, root))
    return found


def apply(
    model: nn.Module,
    layers: Sequence[int] | str | None = None,
    ratios: RatiosLike | LayerSchedule | None = None,
    *,
    prune_ratio: float | None = None,
    merge_ratio: float | None = None,
    text_merge_ratio: float | None = None,
    mode: Mode = "default",
    trace: bool = False,
    **options: Any,
) -> nn.Module:
    """Patch ``model`` in place to prune and merge tokens at ``layers``; returns the model.

    Important:
        layers: block indices to reduce at (``[2, 5, 8]``), or a paper config name such as
            ``"p0.1-r0.3-t0.2-258"`` that also gives the ratios. May be left out when an adapter
            option alone says where to reduce (``merge_schedule=16``: plain ToMe).
        ratios / prune_ratio, merge_ratio, text_merge_ratio: fractions in [0, 1) of the current image
            tokens pruned and merged and of the text tokens merged, at each reduce layer. ``ratios``
            takes a ``Ratios``, ``"p0.1-r0.3-t0.2"``, or a dict ``{layer: ratios}`` for a schedule
            that differs per layer.
        mode: ``"default"`` (sizes, proportional attention, protected [CLS], spatial order) or
            ``"reference"`` (the research code's arithmetic, for PuMer's released checkpoints).

    To tinker with:
        trace: record per-token sizes and source maps of the last forward (``last_trace``).
        **options: adapter options, e.g. ViLT ``fixed_patch_order``, ``unmerge_text`` and
            ``attention="sdpa"``, timm and open_clip ``merge_schedule`` and ``relevance``; an unknown
            one is an error that lists the accepted ones.

    Validates everything before changing anything; a model already patched by pumer_patch is
    re-patched (the old patch removed first), never stacked. The state_dict does not change.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    schedule = _resolve_schedule(layers, ratios, prune_ratio, merge_ratio, text_merge_ratio, bool(options))
    roots = _find_roots(model)
    if not roots:
        supported = "; ".join(get_adapter(name).supports for name in REGISTRY)
        raise TypeError(
            f"pumer_patch does not know how to patch {type(model).__name__}. Supported: {supported}. "
            f"Pass the model (or a module containing it), with its library imported."
        )
    planned: list[tuple[Adapter, nn.Module, Plan]] = []
    for adapter, root in roots:
        unknown = set(options) - set(adapter.options)
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for a {adapter.name} model; "
                f"accepted: {sorted(adapter.options) or 'none'}"
            )
        n_blocks = len(adapter.blocks(root))
        bad = [i for i in schedule if i >= n_blocks]
        if bad:
            raise ValueError(
                f"layers {bad} out of range for {type(root).__name__} with {n_blocks} blocks; "
                f"valid indices are 0..{n_blocks - 1}"
            )
        adapter.check(root)
        resolved = adapter.resolve_options(model, root, options, mode)
        kept = {i: r for i, r in schedule.items() if not r.is_zero}
        planned.append((adapter, root, Plan(schedule=kept, mode=mode, trace=trace, options=resolved)))
    for adapter, root, plan in planned:
        if hasattr(root, STATE_ATTR):
            get_adapter(getattr(root, STATE_ATTR).adapter).unpatch(root)
        adapter.patch(root, PatchState(adapter=adapter.name, plan=plan))
    return model


def patched_roots(model: nn.Module) -> list[nn.Module]:
    """The sub-modules of ``model`` that carry a pumer_patch patch."""
    return [m for m in model.modules() if hasattr(m, STATE_ATTR)]


def is_patched(model: nn.Module) -> bool:
    return bool(patched_roots(model))


def remove(model: nn.Module) -> nn.Module:
    """Undo ``apply``: original classes back, every attribute we added gone. No-op if not patched."""
    for root in patched_roots(model):
        get_adapter(getattr(root, STATE_ATTR).adapter).unpatch(root)
    return model


def last_trace(model: nn.Module) -> Trace | list[Trace | None] | None:
    """The ``Trace`` of the last forward of each patched root (one, or a list if several)."""
    traces = [getattr(root, STATE_ATTR).last for root in patched_roots(model)]
    if not traces:
        raise ValueError("the model is not patched; call pumer_patch.apply first")
    return traces[0] if len(traces) == 1 else traces
