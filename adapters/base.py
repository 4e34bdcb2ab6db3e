"""The adapter contract: what a model family tells ``pumer_patch.apply`` about itself.

An adapter answers five questions and nothing else:

* ``roots(model)``: which sub-modules of ``model`` it patches (every ``ViltModel`` inside a head, the
  image tower of an open_clip model, ...). Empty when the model is not of its family.
* ``blocks(root)``: the ordered blocks that ``layers=[...]`` indexes. For a two-stream model (METER)
  these are the fusion blocks, each a text layer guiding an image layer: the index space is the
  adapter's business, the maths (``pumer_patch.core.reduce_tokens``) is the same.
* ``check(root)``: raise if this root cannot be patched (patched by something else, a subclass we do
  not know); it must not change anything.
* ``resolve_options(model, root, options, mode)``: the adapter's options with their defaults, checked.
* ``patch(root, state)`` / ``unpatch(root)``: switch instance classes to module-level subclasses
  (never assign to a library class), attach ``state`` as ``root._pumer``; undo all of it.

The adapter owns the loop over its blocks, threading a typed ``Tokens`` state through them; the
core owns the arithmetic; ``pumer_patch.patch`` owns validation, the registry and removal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from pumer_patch.core import Mode, Tokens
from pumer_patch.ratios import Ratios

__all__ = ["Adapter", "Plan", "PatchState", "Trace", "LayerCount", "swap_class", "restore_class", "ensure_class"]

STATE_ATTR = "_pumer"


@dataclass(frozen=True)
class Plan:
    """What to do at which block: validated by ``apply`` before anything changes."""

    schedule: Mapping[int, Ratios]  # block index -> ratios, only non-zero entries
    mode: Mode = "default"
    trace: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


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
    only with ``apply(..., trace=True)``. extra: adapter specifics (ViLT: ``patch_index`` (B, N0-1, 2),
    the grid position of each image patch, and ``grid`` (H, W)).
    """

    counts: list[LayerCount] = field(default_factory=list)
    image: Tokens | None = None
    text: Tokens | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PatchState:
    """Attached to every patched root as ``root._pumer``; shared by the sub-modules an adapter swaps."""

    adapter: str
    plan: Plan
    last: Trace | None = None
    # per-forward hand-over between patched sub-modules of one root (e.g. ViLT embeddings -> encoder)
    pending: dict[str, Any] = field(default_factory=dict)


class Adapter:
    """Base class of the model-family adapters; see the module docstring."""

    name: ClassVar[str] = ""
    #: extra keyword options ``apply`` accepts for this family, with their defaults
    options: ClassVar[Mapping[str, Any]] = {}
    #: what the error for unsupported models lists
    supports: ClassVar[str] = ""

    def roots(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def check(self, root: nn.Module) -> None:
        """Raise ``ValueError`` if ``root`` cannot be patched. Must not mutate."""

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: Mapping[str, Any], mode: Mode = "default"
    ) -> dict[str, Any]:
        """Fill the defaults of ``options`` and check them (some depend on the whole model or the ``mode``)."""
        return {**self.options, **options}

    def patch(self, root: nn.Module, state: PatchState) -> None:
        raise NotImplementedError

    def unpatch(self, root: nn.Module) -> None:
        raise NotImplementedError


def swap_class(module: nn.Module, patched: type[nn.Module]) -> None:
    """Switch one instance to ``patched`` (a module-level subclass of its class); pickling keeps working."""
    module.__class__ = patched


def restore_class(module: nn.Module) -> None:
    """Undo ``swap_class``: back to the library class the patched subclass derives from."""
    cls = type(module)
    if getattr(cls, "_pumer_patched", False):
        module.__class__ = cls.__bases__[0]


def ensure_class(module: nn.Module, expected: type[nn.Module], where: str) -> None:
    """Raise unless ``module`` is exactly ``expected`` (or our patch of it) with no forward bound on it.

    A different class or an instance-bound ``forward`` means someone else patched it (ToMe, a user's
    subclass): stacking on that would silently drop their change or ours.
    """
    cls = type(module)
    ours = getattr(cls, "_pumer_patched", False) and cls.__bases__[0] is expected
    if (cls is not expected and not ours) or "forward" in vars(module):
        found = cls.__qualname__ + (" with an instance-bound forward" if "forward" in vars(module) else "")
        raise ValueError(
            f"{where} is {found}, not {expected.__module__}.{expected.__qualname__}: it looks patched by "
            f"something else. Remove that patch first (or rebuild the model), then call pumer_patch.apply."
        )
