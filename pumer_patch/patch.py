"""``apply`` / ``remove``: validate first, mutate second; leave nothing behind."""

from __future__ import annotations

import numbers
import operator
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from .adapters import REGISTRY, get_adapter, loaded_adapters
from .adapters.base import (
    RECORD_ATTR,
    STATE_ATTR,
    Adapter,
    PatchState,
    Plan,
    Trace,
    WrittenRecord,
    check_restorable,
    collecting_traces,
    own_trace,
    saved_config,
)
from .core import Mode, check_mode
from .ratios import Ratios, RatiosLike, parse_config

__all__ = ["apply", "apply_from_config", "remove", "is_patched", "last_trace", "recording", "patched_roots"]

LayerSchedule = Mapping[int, RatiosLike]


def _index(value: Any, what: str) -> int:
    """An int block index from any integer type (numpy's too), never from a bool or a float."""
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):  # numpy 1 and 2 names
        raise TypeError(f"{what} must be an int block index, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int block index such as 2, got {type(value).__name__} {value!r}") from None


def _resolve_schedule(
    layers: Sequence[int] | str | None,
    ratios: RatiosLike | LayerSchedule | None,
    prune_ratio: float | None,
    merge_ratio: float | None,
    text_merge_ratio: float | None,
    adapter_options: bool,
) -> tuple[dict[int, Ratios], bool, str | None]:
    """The block schedule ``{index: Ratios}``, whether it came from a paper config string, and a warning.

    A paper string keeps the research code's layer numbering, which an adapter may translate
    (METER counts two per fusion block); numeric ``layers`` are the adapter's own block indices.
    The warning, or None, says when the layers and ratios given reduce nothing (all ratios zero, or
    ratios with ``layers=[]``): legal (a zero-ratio patch is bit-identical to the model), but more
    often a slip than meant. ``layers=[]`` with an adapter schedule alone (plain ToMe) is no slip.
    """
    loose = {"prune": prune_ratio, "merge": merge_ratio, "text_merge": text_merge_ratio}
    loose = {k: v for k, v in loose.items() if v is not None}
    idle: str | None = None
    if layers is None and ratios is None and not loose and not adapter_options:
        raise ValueError(
            "nothing to reduce: pass layers=[...] with ratios (layers=[2, 5, 8], prune_ratio=0.1, ...), a paper "
            "config (layers='p0.1-r0.3-t0.2-258'), or an adapter schedule (merge_schedule=16 for timm / open_clip)"
        )
    if isinstance(layers, str):
        if layers.strip().isdigit():  # before the ratios check: with ratios, "3" is surely meant as [3]
            raise TypeError(
                f"layers={layers!r} is a string, which apply reads as a paper config ('p0.1-r0.3-t0.2-258'); "
                f"pass block indices as a list of ints, e.g. layers=[{', '.join(layers.strip())}]"
            )
        if ratios is not None or loose:
            raise ValueError(f"layers={layers!r} is a paper config that names the ratios; do not pass ratios too")
        parsed, layer_list = parse_config(layers)
        return {i: parsed for i in sorted(layer_list)}, True, _zero_warning(f"layers={layers!r}", parsed)
    if isinstance(ratios, Mapping) and not ratios:
        raise ValueError("ratios={} names no layer; pass {layer: ratios, ...} or leave ratios out")
    # a mapping with any string key is one layer's ratios (a typo such as "merg" is then named as such),
    # one keyed by block indices only is a per-layer schedule
    per_layer = isinstance(ratios, Mapping) and not any(isinstance(k, str) for k in ratios)
    if per_layer:
        if loose:
            raise ValueError("pass either a per-layer ratios dict or prune_ratio/merge_ratio/text_merge_ratio, not both")
        schedule = {_index(k, "a key of the ratios dict"): Ratios.parse(v) for k, v in ratios.items()}
        if len(schedule) != len(ratios):
            raise ValueError(f"the ratios dict names a layer twice: {list(ratios)}")
        if layers is not None and sorted(_index(i, "layers") for i in layers) != sorted(schedule):
            raise ValueError(f"layers={list(layers)} differs from the keys of the ratios dict {sorted(schedule)}")
    else:
        if ratios is not None and loose:
            raise ValueError("pass either ratios=... or prune_ratio/merge_ratio/text_merge_ratio, not both")
        one = Ratios.parse(ratios) if ratios is not None else Ratios(**loose)
        if layers is None and not one.is_zero:
            raise ValueError("layers is required with ratios: the block indices to reduce at, e.g. layers=[2, 5, 8]")
        layers = [] if layers is None else layers
        if not isinstance(layers, Sequence):
            raise TypeError(f"layers must be a list of block indices such as [2, 5, 8], got {layers!r}")
        if not layers and not one.is_zero:  # layers=[] given: without layers, ratios were refused above
            idle = f"ratios {one} with layers=[] reduce nothing: name the blocks to reduce at, e.g. layers=[2, 5, 8]"
        schedule = {}
        for value in layers:
            i = _index(value, f"each entry of layers={list(layers)}")
            if i in schedule:
                raise ValueError(f"layers={list(layers)} repeats layer {i}; name each layer once")
            schedule[i] = one
    for i in schedule:
        if i < 0:
            raise ValueError(f"layer {i} is negative; count blocks from 0 (layers=[2, 5, 8])")
    if schedule and all(r.is_zero for r in schedule.values()):
        idle = _zero_warning(f"layers={sorted(schedule)}", Ratios())
    return {i: r for i, r in sorted(schedule.items())}, False, idle


def _zero_warning(layers: str, ratios: Ratios) -> str | None:
    """The warning for reduce layers whose ratios are all zero, or None when they reduce."""
    if not ratios.is_zero:
        return None
    return (
        f"{layers} with all ratios zero reduces nothing there; give a non-zero prune_ratio, merge_ratio or "
        f"text_merge_ratio (a zero-ratio patch is bit-identical to the model)"
    )


_CONFIG_RATIOS = ("prune_r", "merge_r", "merge_text")
_CONFIG_NAMES = {"sim_method": "sim_method='mean_head'", "merge_style": "merge_style='tome'"}


def _check_config_fields(config: Any) -> None:
    """Refuse a malformed reduction in a checkpoint's config instead of coercing it.

    ``int()`` and ``float()`` would read ``[0.9, 2.7]`` as layers 0 and 2, ``True`` as layer 1, a
    dict as its keys and ``"0.1"`` as a ratio: a reduction the checkpoint was never trained with.
    ``sim_method`` and ``merge_style`` are names (a list would fail inside a lookup, unnamed).
    """
    layers = getattr(config, "reduce_layers", None)
    if layers is not None:
        fix = "write the layer indices as a list of ints, e.g. reduce_layers=[2, 5, 8]"
        if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Sequence):
            raise TypeError(f"config.reduce_layers={layers!r} is a {type(layers).__name__}; {fix}")
        for value in layers:
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(
                    f"config.reduce_layers={list(layers)} holds {type(value).__name__} {value!r}, "
                    f"not a layer index; {fix}"
                )
    for name in _CONFIG_RATIOS:
        value = getattr(config, name, None)
        if value is None:
            continue
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(
                f"config.{name}={value!r} is a {type(value).__name__}; "
                f"write the ratio as a number in [0, 1), e.g. {name}=0.1"
            )
    for name, example in _CONFIG_NAMES.items():
        value = getattr(config, name, None)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"config.{name}={value!r} is a {type(value).__name__}; write it as a string, e.g. {example}")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside the wrappers that delegate attribute lookups to it: ``torch.compile``'s
    ``OptimizedModule`` (``_orig_mod``), ``DataParallel`` and ``DistributedDataParallel`` (``module``).

    Through them ``getattr`` finds the inner model's attributes on the wrapper too, which would count
    one patch twice; our state is read from the instance (``vars``) of the model they wrap.
    """
    while True:
        # no OptimizedModule exists unless dynamo was imported, and importing it here would cost seconds
        dynamo = sys.modules.get("torch._dynamo.eval_frame")
        if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _state(module: nn.Module) -> PatchState | None:
    """Our state on ``module`` itself, never one that a wrapper's ``__getattr__`` finds further in."""
    return vars(module).get(STATE_ATTR)


def _find_roots(model: nn.Module) -> list[tuple[Adapter, nn.Module]]:
    """Every root of every loaded adapter, less those nested inside another root (its owner's business).

    Where two adapters claim the same module, the first in registry order keeps it.
    """
    found: list[tuple[Adapter, nn.Module]] = []
    seen: set[int] = set()
    for adapter in loaded_adapters():
        for root in adapter.roots(model):
            if id(root) not in seen:
                seen.add(id(root))
                found.append((adapter, root))
    nested: set[int] = set()
    for _, root in found:
        nested.update(id(m) for m in root.modules() if m is not root)
    return [(adapter, root) for adapter, root in found if id(root) not in nested]


def _refuse_unknown_timm_vits(model: nn.Module, roots: list[tuple[Adapter, nn.Module]]) -> None:
    """Refuse a timm ViT-like model that no adapter claimed (its own block classes: ``VisionTransformerRelPos``, ...).

    Left alone, it would run unreduced while the user asked for a reduction.
    """
    owned = {id(m) for _, root in roots for m in root.modules()}
    for module in model.modules():
        if (
            id(module) not in owned
            and type(module).__module__.startswith("timm.models.")
            and hasattr(module, "blocks")
            and hasattr(module, "patch_embed")
        ):
            supported = "; ".join(get_adapter(name).supports for name in ("timm", "timm_eva"))
            raise ValueError(
                f"timm's {type(module).__qualname__} has its own block classes; pumer_patch supports {supported}"
            )


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
        trace: record per-token sizes and source maps in each forward's trace (``last_trace``, ``recording``).
        **options: adapter options, e.g. ViLT ``fixed_patch_order``, ``unmerge_text`` and
            ``attention="sdpa"``, timm and open_clip ``merge_schedule`` and ``relevance``; an unknown
            one is an error that lists the accepted ones.

    Validates everything before changing anything; a model already patched by pumer_patch is
    re-patched (the old patch removed first), never stacked. The state_dict does not change.

    On a transformers model (ViLT, METER, the transformers ViT towers) the reduction is recorded in
    the root's config as ``pumer_reduction``: ``save_pretrained`` writes it to config.json,
    ``apply_from_config`` after ``from_pretrained`` re-applies it exactly, and ``remove`` puts the
    config back as it was. timm and open_clip models have no config: nothing is recorded, and
    after loading their weights ``apply`` is called again.
    """
    check_mode(mode)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = _unwrap(model)
    if not isinstance(trace, bool):
        raise TypeError(f"trace must be True or False, got {trace!r}")
    schedule, from_paper, idle = _resolve_schedule(
        layers, ratios, prune_ratio, merge_ratio, text_merge_ratio, bool(options)
    )
    roots = _find_roots(inner)
    _refuse_unknown_timm_vits(inner, roots)
    if not roots:
        supported = "; ".join(get_adapter(name).supports for name in REGISTRY)
        raise TypeError(
            f"pumer_patch does not know how to patch {type(model).__name__}. Supported: {supported}. "
            f"Pass the model (or a module containing it), with its library imported."
        )
    planned: list[tuple[Adapter, nn.Module, Plan, dict[str, Any] | None]] = []
    recorded: set[int] = set()  # configs already given a record (two roots sharing one config get one)
    own = {id(s.written) for s in (_state(m) for m in inner.modules()) if s is not None and s.written is not None}
    for adapter, root in roots:
        unknown = set(options) - set(adapter.option_names())
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for a {adapter.name} model; "
                f"accepted: {adapter.option_names() or 'none'}"
            )
        blocks = adapter.paper_layers(schedule) if from_paper else schedule
        n_blocks = len(adapter.blocks(root))
        bad = [i for i in blocks if i >= n_blocks]
        if bad:
            raise ValueError(
                f"layers {bad} out of range for {type(root).__name__} with {n_blocks} blocks; "
                f"valid indices are 0..{n_blocks - 1}"
            )
        if "_original_forward" in vars(root):  # accelerate's mark where prepare wraps forward for mixed precision
            raise ValueError(
                f"{type(root).__name__}'s forward was wrapped by accelerate's Accelerator.prepare (mixed precision); "
                f"call pumer_patch.apply(model, ...) before accelerator.prepare(model)"
            )
        adapter.check(root)
        kept = {i: r for i, r in blocks.items() if not r.is_zero}
        resolved = adapter.resolve_options(inner, root, dict(options), mode, kept)
        config = saved_config(root)
        _refuse_foreign_record(config, own, root)
        record = None
        if config is not None and id(config) not in recorded:
            recorded.add(id(config))
            record = _record(blocks, mode, options)
        planned.append((adapter, root, Plan(schedule=kept, mode=mode, trace=trace, options=resolved), record))
    if idle is not None:  # after validation: a call that raises does not warn first
        warnings.warn(idle, stacklevel=2)
    for adapter, root, plan, record in planned:
        if (old := _state(root)) is not None:
            get_adapter(old.adapter).unpatch(root)
        adapter.patch(root, PatchState(adapter=adapter.name, plan=plan, record=record))
    return model


def _refuse_foreign_record(config: Any, own: set[int], root: nn.Module) -> None:
    """Refuse a config that holds the record ``apply`` wrote for another model (ids in ``own``: this model's)."""
    written = vars(config).get(RECORD_ATTR) if config is not None else None
    if isinstance(written, WrittenRecord) and id(written) not in own:
        raise ValueError(
            f"{type(root).__name__}'s config holds the {RECORD_ATTR} that pumer_patch.apply wrote for another patched "
            f"model: the two share one config object (a model built from another's config), or this config was "
            f"copied from it while patched. Patching this one would overwrite the other's record (and its remove "
            f"would then drop this one's). Build this model with its own config (copy.deepcopy(config) before "
            f"the other is patched), or delete {RECORD_ATTR} from a copied config first"
        )


def _plain(value: Any, where: str) -> Any:
    """``value`` in JSON's types (numpy numbers as Python's, tuples as lists), for the config's record."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral) and type(value).__name__ not in ("bool_", "bool"):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return float(value)
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where) for k, v in value.items()}
    raise TypeError(
        f"{where}={value!r} ({type(value).__name__}) cannot be recorded in the model's config for save_pretrained; "
        f"pass it as ints, floats, strings, bools or lists of them"
    )


def _record(blocks: Mapping[int, Ratios], mode: Mode, options: Mapping[str, Any]) -> dict[str, Any]:
    """The reduction as ``apply`` arguments in JSON types, for the config's ``RECORD_ATTR``.

    ``{"ratios": {"2": "p0.1-r0.3-t0.2", ...}, "mode": ..., "options": {...}}``: the adapter's own
    block indices (a paper config's numbering already translated), every layer named (zero ratios
    too), the adapter options as given. ``trace`` decides nothing and is not kept.
    """
    plain = {name: _plain(value, name) for name, value in options.items()}
    return {"ratios": {str(i): str(r) for i, r in sorted(blocks.items())}, "mode": mode, "options": plain}


_RECORD_FIELDS = ("ratios", "mode", "options")


def _recorded_arguments(record: Any) -> dict[str, Any]:
    """The ``apply`` arguments of a config's ``RECORD_ATTR``, each field checked; ValueError / TypeError naming it."""
    what = f"config.{RECORD_ATTR}"
    fix = "it is what pumer_patch.apply writes; delete it from config.json and call pumer_patch.apply instead"
    if not isinstance(record, Mapping):
        raise TypeError(f"{what}={record!r} is a {type(record).__name__}, not a mapping of {list(_RECORD_FIELDS)}; {fix}")
    fields = sorted(str(k) for k in record)
    if fields != sorted(_RECORD_FIELDS):
        raise ValueError(f"{what} has the fields {fields}, not {sorted(_RECORD_FIELDS)}; {fix}")
    ratios, mode, options = record["ratios"], record["mode"], record["options"]
    if not isinstance(ratios, Mapping):
        raise TypeError(f"{what}['ratios']={ratios!r} is not a mapping {{block index: 'p0.1-r0.3-t0.2'}}; {fix}")
    schedule: dict[int, Ratios] = {}
    for key, value in ratios.items():
        if not isinstance(key, str) or not key.isdigit() or not key.isascii():
            raise TypeError(f"{what}['ratios'] has the key {key!r}, not a block index such as '2'; {fix}")
        if not isinstance(value, str):
            raise TypeError(f"{what}['ratios'][{key!r}]={value!r} is not a ratios string 'p0.1-r0.3-t0.2'; {fix}")
        try:
            schedule[int(key)] = Ratios.parse(value)
        except ValueError as error:
            raise ValueError(f"{what}['ratios'][{key!r}]: {error}") from None
    if mode not in ("default", "reference"):
        raise ValueError(f"{what}['mode']={mode!r} is not 'default' or 'reference'; {fix}")
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise TypeError(f"{what}['options']={options!r} is not a mapping of option names to values; {fix}")
    layers = sorted(schedule)
    return {"layers": layers, **({"ratios": schedule} if schedule else {}), "mode": mode, **options}


def apply_from_config(model: nn.Module, trace: bool = False) -> nn.Module:
    """Patch a model with exactly the reduction its config names: the one ``apply`` recorded, or PuMer's.

    ``apply`` records the reduction of a transformers model (ViLT, METER, the transformers ViT
    towers) in the root's config as ``pumer_reduction`` (its block indices and ratios, mode and
    adapter options, in JSON types), so ``save_pretrained`` writes it to config.json and, after
    ``from_pretrained``, this call re-applies it exactly. A timm or open_clip model has no config:
    nothing is recorded there, and after loading its weights ``apply`` is called again.

    Without ``pumer_reduction``, PuMer's finetuned folders record the reduction they were trained
    with (``prune_r``, ``merge_r``, ``merge_text``, ``reduce_layers``; ViLT also ``sim_method`` and
    ``merge_style``), applied in reference mode: METER's ``from_pretrained`` keeps them in its config,
    and the ViLT converters carry them into the ``ViltConfig``. ``reduce_layers`` is read in the
    research numbering (METER: two per fusion block).

    A malformed field of either is refused, naming it, before anything changes.
    """
    roots = _find_roots(_unwrap(model))
    specs = []
    for adapter, root in roots:
        config = saved_config(root)
        if config is not None and RECORD_ATTR in vars(config):
            specs.append((adapter, _recorded_arguments(vars(config)[RECORD_ATTR])))
            continue
        _check_config_fields(getattr(root, "config", None))
        spec = adapter.config_reduction(root)
        if spec is not None:
            specs.append((adapter, spec))
    if not specs:
        raise ValueError(
            f"this model's config names no reduction (neither {RECORD_ATTR}, which pumer_patch.apply records, nor "
            f"prune_r / merge_r / merge_text with reduce_layers, as PuMer's checkpoint folders do); call "
            f"pumer_patch.apply with the reduction you want instead"
        )
    if any(spec != specs[0][1] for _, spec in specs):
        raise ValueError("the models inside this one name different reductions; patch each with pumer_patch.apply")
    return apply(model, trace=trace, **specs[0][1])


def patched_roots(model: nn.Module) -> list[nn.Module]:
    """The sub-modules of ``model`` (or of the model a compile / DataParallel wrapper holds) that carry a patch."""
    return [m for m in _unwrap(model).modules() if _state(m) is not None]


def is_patched(model: nn.Module) -> bool:
    return bool(patched_roots(model))


def remove(model: nn.Module) -> nn.Module:
    """Undo ``apply``: original classes back, every attribute we added gone. No-op if not patched.

    Checks every root first, so a model that another tool patched on top of ours is an error that
    changes nothing.
    """
    roots = [(get_adapter(vars(root)[STATE_ATTR].adapter), root) for root in patched_roots(model)]
    for adapter, root in roots:
        check_restorable(*(module for module, _ in adapter.swaps(root)))
    for adapter, root in roots:
        adapter.unpatch(root)
    return model


def _states(model: nn.Module) -> list[PatchState]:
    states = [vars(root)[STATE_ATTR] for root in patched_roots(model)]
    if not states:
        raise ValueError("the model is not patched; call pumer_patch.apply first")
    return states


def last_trace(model: nn.Module) -> Trace | list[Trace | None] | None:
    """The ``Trace`` of this thread's last forward of each patched root (one, or a list if several).

    Traces are recorded per call: another thread's forwards, or a forward in another asyncio task,
    never show here. None for a root this thread has not run since the patch. A head that runs a root
    twice (NLVR2's two images) keeps the second pass here; ``recording`` keeps every pass.
    """
    traces = [own_trace(state) for state in _states(model)]
    return traces[0] if len(traces) == 1 else traces


@contextmanager
def recording(model: nn.Module) -> Iterator[list[Trace]]:
    """``with pumer_patch.recording(model) as traces:``: every forward of a patched root of ``model`` in the block.

    The list gets one ``Trace`` per root forward, in call order (NLVR2's two ViLT passes are two
    entries), from this thread only.
    """
    with collecting_traces(_states(model)) as traces:
        yield traces
