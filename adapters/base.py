"""The adapter contract: what a model family tells ``pumer_patch.apply`` about itself.

An adapter answers these questions (``patch`` / ``unpatch`` are generic, driven by ``swaps``):

* ``roots(model)``: which sub-modules of ``model`` it patches (every ``ViltModel`` inside a head, the
  image tower of an open_clip model, ...). Empty when the model is not of its family.
* ``blocks(root)``: the ordered blocks that ``layers=[...]`` indexes. For a two-stream model (METER)
  these are the fusion blocks, each a text layer guiding an image layer: the index space is the
  adapter's business, the maths (``pumer_patch.core.reduce_tokens``) is the same.
* ``check(root)``: raise if this root cannot be patched (patched by something else, a subclass we do
  not know); it must not change anything.
* ``resolve_options(model, root, options, mode, schedule)``: the adapter's options (an instance of
  its ``Options`` dataclass) with their defaults, checked.
* ``swaps(root)``: the modules whose instance class the patch switches to a module-level subclass
  (never assigning to a library class); ``patch`` / ``unpatch`` switch them, attach ``state`` as
  ``root._pumer`` and write its record into a transformers root's config (``pumer_reduction``, for
  ``save_pretrained``), and undo all of it.
* optionally ``paper_layers`` (a paper config's layer numbers as block indices) and
  ``config_reduction`` (the reduction a PuMer checkpoint's config names).

The adapter owns the loop over its blocks (``_loop.run_blocks`` for a single tower, a short ``for``
on the shared pieces of ``_loop`` for two streams), threading typed ``Tokens`` through them; the
core owns the arithmetic; ``pumer_patch.patch`` owns validation, the registry and removal. Each
root's forward hands its ``Trace`` to ``record_trace``, which keeps it for the calling thread only.

Ownership: an adapter that claims a root owns its whole subtree. ``apply`` collects the candidate
roots of every loaded adapter, then leaves out any candidate nested inside another candidate: the
outer owner patches it as part of its model, or not at all (METER's CLIP image tower is METER's, not
open_clip's). Where two adapters claim the very same module, the first in ``REGISTRY`` order wins.
A wrapper holding models of several families side by side gets each patched by its own adapter.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from packaging.version import Version
from torch import nn

from pumer_patch.core import Mode, Tokens
from pumer_patch.ratios import Ratios

__all__ = [
    "RECORD_ATTR", "WrittenRecord", "saved_config", "Adapter", "Plan", "PatchState", "Trace", "LayerCount", "swap_class",
    "restore_classes", "check_restorable", "ensure_class", "library_class", "warn_if_untested", "record_trace", "own_trace", "collecting_traces",
]

STATE_ATTR = "_pumer"  # the PatchState on a patched root
SHARED_ATTR = "_pumer_state"  # the same PatchState on each sub-module whose class the patch switched
RECORD_ATTR = "pumer_reduction"  # the reduction, in the root's transformers config (what save_pretrained writes)


def saved_config(root: nn.Module) -> Any | None:
    """The transformers ``PretrainedConfig`` that ``save_pretrained`` writes for ``root``, or None (timm, open_clip).

    A ``PreTrainedModel``'s sub-modules hold the very config object of the model (a CLIP tower the
    ``vision_config`` of its ``CLIPModel``), so an attribute set on it reaches config.json.
    """
    transformers = sys.modules.get("transformers")  # without transformers imported, no module holds its config
    config = getattr(root, "config", None)
    if transformers is None or not isinstance(config, transformers.PretrainedConfig):
        return None
    return config


class WrittenRecord(dict):
    """A ``RECORD_ATTR`` value that ``Adapter.patch`` wrote (the record of a live patch), a plain ``dict`` to JSON.

    A record that ``from_pretrained`` loaded is a plain ``dict``. The type tells ``apply`` that a
    config shared with (or copied from) another patched model holds that model's record, which
    re-patching through this one would overwrite and ``remove`` would then lose.
    """


@dataclass(frozen=True)
class Plan:
    """What to do at which block: validated by ``apply`` before anything changes."""

    schedule: Mapping[int, Ratios]  # block index -> ratios, only non-zero entries
    mode: Mode = "default"
    trace: bool = False
    options: Any = None  # the adapter's ``Options`` dataclass instance


@dataclass(frozen=True)
class LayerCount:
    """Token counts leaving one reduce layer."""

    layer: int
    image: int
    text: int


@dataclass
class Trace:
    """What one forward of a patched root did (``pumer_patch.last_trace``, ``pumer_patch.recording``).

    counts: token counts after each reduce layer (always recorded; Python ints).
    image / text: final ``Tokens`` (``x`` detached, with ``size``, ``source`` and ``mask``), recorded
    only with ``apply(..., trace=True)``. patch_index: (B, N0 - 1, 2) the grid position (row, col) of
    each image patch as it entered the blocks (ViLT); grid: (H, W) the patch grid (ViLT, Eva, Beit).
    """

    counts: list[LayerCount] = field(default_factory=list)
    image: Tokens | None = None
    text: Tokens | None = None
    patch_index: torch.Tensor | None = None
    grid: tuple[int, int] | None = None


@dataclass
class PatchState:
    """Attached to every patched root as ``root._pumer``; shared by the sub-modules an adapter swaps.

    Configuration only: the plan; ``record``, the reduction as ``apply`` arguments in JSON types,
    which ``patch`` writes into the root's transformers config (``saved_config``) as
    ``RECORD_ATTR`` for ``save_pretrained``, or None; ``prior``, that attribute's value before the
    patch, as ``(value,)``, or ``()`` where it had none (``unpatch`` puts it back); ``written``, the
    ``WrittenRecord`` object ``patch`` set (``unpatch`` restores ``prior`` only while the config still
    holds that very object). Per-call state travels in ``_loop.CallScope`` and the trace of a
    forward in ``record_trace``, never here.
    """

    adapter: str
    plan: Plan
    record: dict[str, Any] | None = None
    prior: tuple[Any, ...] = ()
    written: WrittenRecord | None = None


# traces per call: id(PatchState) -> (state, its last Trace) for this thread / context only
_LAST: ContextVar[dict[int, tuple[PatchState, Trace]]] = ContextVar("pumer_patch_last_trace", default={})
# the open ``collecting_traces`` blocks of this context: (the states they watch, the list they fill)
_COLLECTING: ContextVar[tuple[tuple[frozenset[int], list[Trace]], ...]] = ContextVar(
    "pumer_patch_collecting", default=()
)


def record_trace(state: PatchState, trace: Trace) -> None:
    """Record ``trace`` as the last forward of the root ``state`` belongs to, for the calling context only.

    A new mapping each time (never one mutated in place), so threads and tasks that share a copied
    context never see each other's traces; every open ``collecting_traces`` of ``state`` gets it too.
    """
    _LAST.set({**_LAST.get(), id(state): (state, trace)})
    for watched, traces in _COLLECTING.get():
        if id(state) in watched:
            traces.append(trace)


def own_trace(state: PatchState) -> Trace | None:
    """The trace ``record_trace`` last recorded for ``state`` in this context, None before any forward."""
    entry = _LAST.get().get(id(state))
    return entry[1] if entry is not None and entry[0] is state else None


@contextmanager
def collecting_traces(states: Sequence[PatchState]) -> Iterator[list[Trace]]:
    """Inside the ``with`` block, the list gets the trace of every forward of these roots in this context, in order."""
    traces: list[Trace] = []
    token = _COLLECTING.set((*_COLLECTING.get(), (frozenset(id(s) for s in states), traces)))
    try:
        yield traces
    finally:
        _COLLECTING.reset(token)


class Adapter:
    """Base class of the model-family adapters; see the module docstring."""

    name: ClassVar[str] = ""
    #: the family's keyword options for ``apply``, as a dataclass with defaults
    Options: ClassVar[type] = type(None)
    #: what the error for unsupported models lists
    supports: ClassVar[str] = ""

    def roots(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def guided_towers(self, model: nn.Module) -> list[Any]:
        """The patched image towers in ``model`` that take a text query (``guidance.GuidedTower`` s); none by default."""
        return []

    def check(self, root: nn.Module) -> None:
        """Raise ``ValueError`` if ``root`` cannot be patched. Must not mutate."""

    def paper_layers(self, schedule: Mapping[int, Ratios]) -> dict[int, Ratios]:
        """Translate a paper config's layer numbers into block indices (the same numbers, unless overridden)."""
        return dict(schedule)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls.Options)] if cls.Options is not type(None) else []

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: dict[str, Any], mode: Mode, schedule: dict[int, Ratios]
    ) -> Any:
        """``Options`` from the keywords, defaults filled and checked (some depend on the model, ``mode`` or ``schedule``)."""
        return self.Options(**options)

    def swaps(self, root: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
        """The modules of ``root`` whose instance class the patch switches, each with its patched class."""
        raise NotImplementedError

    def config_reduction(self, root: nn.Module) -> dict[str, Any] | None:
        """The ``apply`` arguments of the reduction ``root``'s config names (a PuMer checkpoint), or None."""
        return None

    def patch(self, root: nn.Module, state: PatchState) -> None:
        """Switch the classes of ``swaps(root)``; each swapped module and the root get the shared ``state``.

        With a ``state.record``, the root's config gets it as ``RECORD_ATTR`` (its earlier value kept in ``state.prior``).
        """
        for module, patched in self.swaps(root):
            swap_class(module, patched)
            setattr(module, SHARED_ATTR, state)
        setattr(root, STATE_ATTR, state)
        config = saved_config(root)
        if config is not None and state.record is not None:
            state.prior = (vars(config)[RECORD_ATTR],) if RECORD_ATTR in vars(config) else ()
            state.written = WrittenRecord(copy.deepcopy(state.record))
            setattr(config, RECORD_ATTR, state.written)

    def unpatch(self, root: nn.Module) -> None:
        """Undo ``patch``: library classes back, every attribute we added gone, the config's record as it was."""
        state = vars(root).get(STATE_ATTR)
        modules = [module for module, _ in self.swaps(root)]
        restore_classes(*modules)
        for module in [*modules, root]:
            for attr in (SHARED_ATTR, STATE_ATTR):
                if attr in vars(module):
                    delattr(module, attr)
        config = saved_config(root)
        if config is not None and state is not None and state.written is not None:
            if vars(config).get(RECORD_ATTR) is not state.written:
                return  # the user (or another tool) set a record since: theirs stays
            if state.prior:
                setattr(config, RECORD_ATTR, state.prior[0])
            elif RECORD_ATTR in vars(config):
                delattr(config, RECORD_ATTR)


def _patched_base(patched: type[nn.Module]) -> type[nn.Module]:
    """The library class a patched class subclasses: its last base (mixins of ours come first)."""
    return patched.__bases__[-1]


def swap_class(module: nn.Module, patched: type[nn.Module]) -> None:
    """Switch one instance to ``patched`` (a module-level subclass of its class); pickling keeps working."""
    module.__class__ = patched


def check_restorable(*modules: nn.Module) -> None:
    """Raise if a module's class was swapped again on top of ours (another tool's subclass of our subclass).

    Restoring it would silently drop that tool's change, and leaving it would break the next forward.
    """
    for module in modules:
        cls = type(module)
        if getattr(cls, "_pumer_patched", False) and "_pumer_patched" not in vars(cls):
            raise ValueError(
                f"{cls.__module__}.{cls.__qualname__} was put on top of pumer_patch's patch of this "
                f"{cls.__mro__[1].__qualname__} by another tool; remove that tool's patch first, then pumer_patch.remove"
            )


def restore_classes(*modules: nn.Module) -> None:
    """Undo ``swap_class`` on every module (all checked by ``check_restorable`` before any changes)."""
    check_restorable(*modules)
    for module in modules:
        if "_pumer_patched" in vars(type(module)):
            module.__class__ = _patched_base(type(module))


def ensure_class(
    module: nn.Module, expected: type[nn.Module], where: str, overrides: Sequence[str] = ("forward",)
) -> None:
    """Raise unless ``module`` is exactly ``expected`` (or our patch of it) with none of ``overrides`` bound on it.

    A different class means someone else patched it (ToMe, a user's subclass); an instance-bound
    method among those our patch overrides (``forward``, ``forward_features``, ``pool``, ...) would
    silently shadow our patch. Stacking on either would drop their change or ours.
    """
    cls = type(module)
    ours = "_pumer_patched" in vars(cls) and _patched_base(cls) is expected
    bound = [name for name in overrides if name in vars(module)]
    if (cls is not expected and not ours) or bound:
        found = cls.__qualname__ + (f" with an instance-bound {', '.join(bound)}" if bound else "")
        raise ValueError(
            f"{where} is {found}, not {expected.__module__}.{expected.__qualname__}: it looks patched by "
            f"something else. Remove that patch first (or rebuild the model), then call pumer_patch.apply."
        )


def library_class(module: nn.Module) -> type[nn.Module]:
    """The library's class of ``module``, under our patch and under any class another tool put on top of it."""
    for cls in type(module).__mro__:
        if "_pumer_patched" in vars(cls):
            return _patched_base(cls)
    return type(module)


def warn_if_untested(library: str, version: str, tested: tuple[str, str], what: str) -> None:
    """Warn (at the ``apply`` call) when ``library``'s ``version`` lies outside ``tested`` = [low, high).

    what: the library code our patch repeats, e.g. ``"Block.forward"``: what zero-reduction parity checks.
    """
    low, high = Version(tested[0]), Version(tested[1])
    found = Version(version)
    if not low <= found < high:
        warnings.warn(
            f"pumer_patch repeats {what} as of {library} {low}..<{high}; found {found}. Check zero-reduction parity.",
            stacklevel=4,
        )
