"""The adapter contract: what a model family tells ``pumer_patch.apply`` about itself.

An adapter answers five questions and nothing else:

* ``roots(model)``: which sub-modules of ``model`` it patches (every ``ViltModel`` inside a head, the
  image tower of an open_clip model, ...). Empty when the model is not of its family.
* ``blocks(root)``: the ordered blocks that ``layers=[...]`` indexes. For a two-stream model (METER)
  these are the fusion blocks, each a text layer guiding an image layer: the index space is the
  adapter's business, the maths (``pumer_patch.core.reduce_tokens``) is the same.
* ``check(root)``: raise if this root cannot be patched (patched by something else, a subclass we do
  not know); it must not change anything.
* ``resolve_options(model, root, options, mode)``: the adapter's options (an instance of its
  ``Options`` dataclass) with their defaults, checked.
* ``patch(root, state)`` / ``unpatch(root)``: switch instance classes to module-level subclasses
  (never assign to a library class), attach ``state`` as ``root._pumer``; undo all of it.

The adapter owns the loop over its blocks (a short ``for`` on the shared pieces of ``_loop``),
threading typed ``Tokens`` through them; the core owns the arithmetic; ``pumer_patch.patch`` owns
validation, the registry and removal.

Ownership: an adapter that claims a root owns its whole subtree. ``apply`` collects the candidate
roots of every loaded adapter, then leaves out any candidate nested inside another candidate: the
outer owner patches it as part of its model, or not at all (METER's CLIP image tower is METER's, not
open_clip's). Where two adapters claim the very same module, the first in ``REGISTRY`` order wins.
A wrapper holding models of several families side by side gets each patched by its own adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from torch import nn

from pumer_patch.core import Mode, Tokens
from pumer_patch.ratios import Ratios

__all__ = ["Adapter", "Plan", "PatchState", "Trace", "LayerCount", "swap_class", "restore_classes", "check_restorable", "ensure_class"]

STATE_ATTR = "_pumer"  # the PatchState on a patched root
SHARED_ATTR = "_pumer_state"  # the same PatchState on each sub-module whose class the patch switched


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
    """What the last forward of a patched root did.

    counts: token counts after each reduce layer (always recorded; Python ints).
    image / text: final ``Tokens`` (``x`` detached, with ``size``, ``source`` and ``mask``), recorded
    only with ``apply(..., trace=True)``. patch_index: (B, N0 - 1, 2) the grid position (row, col) of
    each image patch as it entered the blocks, and grid: (H, W), where the model knows them (ViLT).
    """

    counts: list[LayerCount] = field(default_factory=list)
    image: Tokens | None = None
    text: Tokens | None = None
    patch_index: torch.Tensor | None = None
    grid: tuple[int, int] | None = None


@dataclass
class PatchState:
    """Attached to every patched root as ``root._pumer``; shared by the sub-modules an adapter swaps.

    Configuration only (the plan) and the trace of the last forward, a record for inspection that
    no computation reads. Per-call hand-over travels in ``_loop.CallScope``, never here.
    """

    adapter: str
    plan: Plan
    last: Trace | None = None


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
        """Switch the classes of ``swaps(root)``; each swapped module and the root get the shared ``state``."""
        for module, patched in self.swaps(root):
            swap_class(module, patched)
            setattr(module, SHARED_ATTR, state)
        setattr(root, STATE_ATTR, state)

    def unpatch(self, root: nn.Module) -> None:
        """Undo ``patch``: library classes back, every attribute we added gone."""
        modules = [module for module, _ in self.swaps(root)]
        restore_classes(*modules)
        for module in [*modules, root]:
            for attr in (SHARED_ATTR, STATE_ATTR):
                if attr in vars(module):
                    delattr(module, attr)


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
            module.__class__ = type(module).__bases__[0]


def ensure_class(
    module: nn.Module, expected: type[nn.Module], where: str, overrides: Sequence[str] = ("forward",)
) -> None:
    """Raise unless ``module`` is exactly ``expected`` (or our patch of it) with none of ``overrides`` bound on it.

    A different class means someone else patched it (ToMe, a user's subclass); an instance-bound
    method among those our patch overrides (``forward``, ``forward_features``, ``pool``, ...) would
    silently shadow our patch. Stacking on either would drop their change or ours.
    """
    cls = type(module)
    ours = "_pumer_patched" in vars(cls) and cls.__bases__[0] is expected
    bound = [name for name in overrides if name in vars(module)]
    if (cls is not expected and not ours) or bound:
        found = cls.__qualname__ + (f" with an instance-bound {', '.join(bound)}" if bound else "")
        raise ValueError(
            f"{where} is {found}, not {expected.__module__}.{expected.__qualname__}: it looks patched by "
            f"something else. Remove that patch first (or rebuild the model), then call pumer_patch.apply."
        )
