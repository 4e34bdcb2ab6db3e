"""What every adapter's block loop shares: the mode policy, the token streams, the bias, checkpointing.

An adapter's loop is a short ``for`` over its model's blocks that names the model's own steps. It
hands the parts that are the same everywhere to this module:

* ``Policy``: where reference mode (the research code's arithmetic) differs from the default, in one
  place. The core (``pumer_patch.core.reduce_tokens``) owns the differences inside one reduce step.
* ``start``: a token stream (``Tokens``) with its initial sizes, mask and sources for the mode.
* ``key_bias``: the additive attention bias of one or more streams: padding, and ``log(size)``
  (proportional attention) in default mode.
* ``Loop``: runs a plain block or a reduce block, checkpointing both kinds in training when the
  model asks for gradient checkpointing, and records the counts and the ``Trace``.
* ``output_of``: what a sub-module returned for this call's input (the keys a block computes anyway),
  read by a hook that ignores every other caller of the module (another thread's forward).
* ``CallScope``: the per-call hand-over between the patched sub-modules of one root (ViLT's
  embeddings tell its encoder where text ends; open_clip's transformer tells its pooling the token
  sizes). It lives in a context variable for exactly one forward of the root, so one model served by
  several threads gives each call its own state, and nothing leaks from one batch to the next. Per-call
  state never lives on a module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pumer_patch.core import Mode, Tokens, attention_bias, init_source

from .base import LayerCount, Plan, Trace

__all__ = ["Policy", "start", "key_bias", "Loop", "CallScope", "output_of"]

T = TypeVar("T")


@dataclass(frozen=True)
class Policy:
    """How a mode threads tokens through a loop (the parts of DESIGN.md's reference list outside the core).

    sizes: carry token sizes; later attention adds ``log(size)`` (proportional attention).
    float_text_mask: the text mask is a float that text merging makes fractional (a real token merged
        with a pad weighs 0.5) and that then weights attention; else a bool mask.
    reset_image_mask: after a reduction the image mask is all ones (the research code), else carried.
    protect_prefix: leading prefix tokens ([CLS], distillation, registers) are never pruned or merged.
    coupled_prune_merge: METER's research code prunes only when the merge ratio is > 0 too, and merges
        (text or image) only when the prune ratio is > 0.

    Inside one reduce step the core decides the rest by ``mode``: ratios of all image tokens against
    the unprotected ones, relevance order against spatial order, ToMe's ``[unmerged A ; B]`` layout,
    plain means, pad text rows in the relevance, "a layer that prunes nothing reduces nothing".
    """

    mode: Mode
    sizes: bool
    float_text_mask: bool
    reset_image_mask: bool
    protect_prefix: bool
    coupled_prune_merge: bool

    @staticmethod
    def of(mode: Mode) -> Policy:
        return _POLICIES[mode]

    @property
    def reference(self) -> bool:
        return self.mode == "reference"


_POLICIES: dict[str, Policy] = {
    "default": Policy("default", sizes=True, float_text_mask=False, reset_image_mask=False, protect_prefix=True,
                      coupled_prune_merge=False),
    "reference": Policy("reference", sizes=False, float_text_mask=True, reset_image_mask=True, protect_prefix=False,
                        coupled_prune_merge=True),
}


def start(policy: Policy, x: Tensor, mask: Tensor | None = None, *, text: bool = False, source: bool = False) -> Tokens:
    """A token stream entering the loop: x (B, N, C), mask (B, N) real/pad or None.

    Sizes are ones in default mode (None in reference mode: no sizes); the text mask is float in
    reference mode; sources (B, N) identity when ``source``.
    """
    b, n = x.shape[:2]
    if mask is not None:
        mask = mask.float() if text and policy.float_text_mask else mask.bool()
    size = torch.ones(b, n, dtype=torch.float32, device=x.device) if policy.sizes else None
    return Tokens(x, size=size, source=init_source(b, n, x.device) if source else None, mask=mask)


def key_bias(policy: Policy, streams: Sequence[Tokens], dtype: torch.dtype) -> Tensor | None:
    """The additive key bias (B, 1, 1, N) of the concatenated ``streams``: padding, and log(size) by default.

    A stream without a mask counts as all real (after a reference-mode reduction the image mask is
    all ones); None when there is nothing to add.
    """
    masks = [s.mask for s in streams]
    mask = None
    if any(m is not None for m in masks):
        mask = torch.cat([m.float() if m is not None else s.x.new_ones(s.x.shape[:2]).float()
                          for s, m in zip(streams, masks)], dim=1)
    size = torch.cat([s.size for s in streams], dim=1) if policy.sizes and all(s.size is not None for s in streams) else None
    return attention_bias(size, mask, dtype)


@dataclass
class Loop:
    """One forward's pass over the blocks: which to reduce, checkpointing, counts, trace.

    plan: the validated plan; checkpointing: recompute every block, reduce blocks included, in
    backward (the model's gradient checkpointing, in training with gradients on).
    """

    plan: Plan
    checkpointing: bool = False
    counts: list[LayerCount] = field(default_factory=list)

    @property
    def policy(self) -> Policy:
        return Policy.of(self.plan.mode)

    @property
    def source(self) -> bool:
        return self.plan.trace

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, under non-reentrant checkpointing when asked; ``fn`` gets all it needs as arguments.

        A reduce step recomputed in backward makes the same choices (its indices come from the same
        inputs, and checkpoint restores the dropout RNG), so its outputs have the same shapes.
        """
        if self.checkpointing:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def count(self, layer: int, image: Tokens, text: Tokens | None = None) -> None:
        self.counts.append(LayerCount(layer, image.count, 0 if text is None else text.count))

    def trace(self, image: Tokens, text: Tokens | None = None, **fields: Any) -> Trace:
        """The ``Trace`` of this forward: counts always; final tokens (detached) with ``trace=True``."""
        if not self.plan.trace:
            return Trace(counts=self.counts)

        def detached(t: Tokens | None) -> Tokens | None:
            return None if t is None else Tokens(t.x.detach(), t.size, t.source, t.mask)

        return Trace(counts=self.counts, image=detached(image), text=detached(text), **fields)


class CallScope(Generic[T]):
    """A per-call hand-over between the patched sub-modules of one root, alive for one root forward.

    The root's patched forward runs inside ``open(key, value)``; its sub-modules read ``get(key)``.
    ``key`` is the root's ``PatchState`` (shared by its patched sub-modules, unique per patch and per
    copy of the model). Backed by a ``ContextVar``: each thread has its own, nested roots each see
    theirs, and the value is gone when the root's forward returns or raises.
    """

    def __init__(self, name: str) -> None:
        self._var: ContextVar[dict[int, Any]] = ContextVar(name, default={})

    @contextmanager
    def open(self, key: object, value: T) -> Iterator[T]:
        token = self._var.set({**self._var.get(), id(key): value})
        try:
            yield value
        finally:
            self._var.reset(token)

    def get(self, key: object) -> T | None:
        return self._var.get().get(id(key))


@contextmanager
def output_of(module: nn.Module, given: Tensor) -> Iterator[dict[str, Tensor]]:
    """Inside the ``with`` block, ``captured["out"]`` is what ``module`` returned when called on ``given`` itself.

    While registered, a forward hook sees every caller of the module, another thread's forward of the
    same model included; keeping only the call whose first input *is* ``given`` (by identity) reads
    this call's output and never a concurrent one's.
    """
    captured: dict[str, Tensor] = {}

    def hook(_module: nn.Module, inputs: tuple[Any, ...], out: Tensor) -> None:
        if inputs and inputs[0] is given:
            captured["out"] = out

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
