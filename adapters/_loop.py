"""What every adapter's block loop shares, and the one loop of the single-tower ViTs.

An adapter's loop is a short ``for`` over its model's blocks that names the model's own steps. The
single-tower ViTs (timm ``VisionTransformer``, ``Eva`` and ``Beit``, open_clip, METER's CLIP tower,
the transformers towers) all run ``run_blocks``; the two-stream models (ViLT, METER's fusion) keep
their own short loop on the same pieces:

* ``Policy``: how a mode threads tokens through a loop (sizes, the text mask's type). The core
  (``pumer_patch.core.reduce_tokens``) owns every difference inside one reduce step.
* ``start``: a token stream (``Tokens``) with its initial sizes, mask and sources for the mode.
* ``key_bias``: the additive attention bias of one or more streams: padding, and ``log(size)``
  (proportional attention) in default mode.
* ``Recorder``: one forward's pass over the blocks: runs each block under checkpointing when the
  model asks for it, and records the counts and the ``Trace``.
* ``captured``: what sub-modules returned in this call (the keys a block computes anyway), read by
  hooks that ignore every other caller of the modules (another thread's forward).
* ``CallScope``: the per-call hand-over between the patched sub-modules of one root (ViLT's
  embeddings tell its encoder where text ends). It lives in a context variable for exactly one
  forward of the root, so one model served by several threads gives each call its own state, and
  nothing leaks from one batch to the next. Per-call state never lives on a module.
* ``BlockStep`` / ``PlacedStep``: what one library's block looks like to ``run_blocks``.
* ``call_as_block``: a block the loop runs in parts (a reduce block; every ViLT layer under SDPA or
  reference mode; METER's fusion layers) still runs its own hooks, as ``nn.Module.__call__`` runs
  them around ``forward``: the global and the block's forward pre-hooks on the hidden states the
  block receives (a returned replacement is used), the forward hooks on what it returns (the reduced
  tokens at a reduce block; a replacement is used). A hook may replace the hidden states, not the
  masks and biases the loop computes, nor change the token count: the loop carries each token's
  size, mask and source with it, so that is a clear error (``pumer_patch.TokenSizesLost`` where
  tokens carry sizes), at plain blocks too. Backward hooks need the block's own call to wrap its
  inputs and outputs: on a block run in parts (or registered globally) they are refused, at
  ``apply`` and at each forward, naming the block and the fix.

``run_blocks``: pre-norm blocks ``x + attn(norm1(x)); x + mlp(norm2(x))`` over image tokens whose
first ``protected`` are prefix tokens ([CLS], distillation, registers). A reduce block runs its
attention half, reduces the tokens with ``reduce_tokens`` and runs its MLP half on the survivors
(ToMe's and PuMer's place). Relevance without text (pruning):

* ``"cls"``: the [CLS] row of the attention, mean over heads (EViT), for towers pooled from [CLS].
* ``"received"``: the attention each token receives from the non-prefix queries, mean over heads,
  each query weighted by its size. For towers that pool over their tokens (``avg``, ``map``) it
  plays the [CLS] row's part: the mean of the attention outputs over the pooled queries is
  ``sum_j received_j v_j``, so ``received_j`` is token j's share of what the pooled feature reads
  at this layer (Learned Token Pruning, Kim et al. 2022, scores tokens this way; for ``map`` it is
  a proxy, the latent query being learned). It costs one extra ``q k^T`` (2 B H N^2 d FLOPs) at
  each pruning block; the [CLS] row costs 2 B H N d.

Merge metric: the attention keys averaged over heads (ToMe). Both are computed without gradient:
they only choose indices.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module
from torch.utils.checkpoint import checkpoint

from pumer_patch.core import Mode, Tokens, attention_bias, init_source, merge_count, reduce_tokens
from pumer_patch.ratios import Ratios
from pumer_patch.sizes import TokenSizesLost

from .base import LayerCount, Plan, Trace

__all__ = [
    "Attended",
    "BlockStep",
    "CallScope",
    "PlacedStep",
    "Policy",
    "Recorder",
    "attention_relevance",
    "call_as_block",
    "captured",
    "check_tokens",
    "hidden_argument",
    "key_bias",
    "probability_relevance",
    "reduce_blocks",
    "refuse_backward_hooks",
    "refuse_backward_hooks_on",
    "run_blocks",
    "start",
    "watching",
]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Policy:
    """How a mode threads tokens through a loop (inside one reduce step the core decides the rest by ``mode``).

    sizes: carry token sizes; later attention adds ``log(size)`` (proportional attention).
    float_text_mask: the text mask is a float that text merging makes fractional (a real token merged
        with a pad weighs 0.5) and that then weights attention; else a bool mask.
    """

    mode: Mode
    sizes: bool
    float_text_mask: bool

    @staticmethod
    def of(mode: Mode) -> Policy:
        return _POLICIES[mode]

    @property
    def reference(self) -> bool:
        return self.mode == "reference"


_POLICIES: dict[str, Policy] = {
    "default": Policy("default", sizes=True, float_text_mask=False),
    "reference": Policy("reference", sizes=False, float_text_mask=True),
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


# the blocks the recorders of this context ran, while a ``watching`` block is open
_WATCH: ContextVar[list[nn.Module] | None] = ContextVar("pumer_patch_watch", default=None)


@contextmanager
def watching() -> Iterator[list[nn.Module]]:
    """Inside the ``with`` block, the list holds every block a ``Recorder`` of this thread ran, in order.

    For tests and tools that check which loop a forward went through; nothing reads it otherwise.
    """
    seen: list[nn.Module] = []
    token = _WATCH.set(seen)
    try:
        yield seen
    finally:
        _WATCH.reset(token)


@dataclass
class Recorder:
    """One forward's pass over the blocks: checkpointing, counts, trace.

    plan: the validated plan; checkpointing: recompute every block, reduce blocks included, in
    backward (the model's gradient checkpointing, in training with gradients on).
    """

    plan: Plan
    checkpointing: bool = False
    counts: list[LayerCount] = field(default_factory=list)

    def run(self, fn: Callable[..., T], block: nn.Module, *args: Any, library_checkpoints: bool = False) -> T:
        """``fn(block, *args)``, under non-reentrant checkpointing when asked; ``fn`` gets all it needs as arguments.

        A reduce step recomputed in backward makes the same choices (its indices come from the same
        inputs, and checkpoint restores the dropout RNG), so its outputs have the same shapes.
        library_checkpoints: the block checkpoints itself (a transformers layer asked to), so not again here.
        """
        seen = _WATCH.get()
        if seen is not None:
            seen.append(block)
        if self.checkpointing and not library_checkpoints:
            return checkpoint(fn, block, *args, use_reentrant=False)
        return fn(block, *args)

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


_CAPTURE: ContextVar[dict[int, Tensor] | None] = ContextVar("pumer_patch_capture", default=None)


@contextmanager
def captured(*modules: nn.Module) -> Iterator[dict[int, Tensor]]:
    """Inside the ``with`` block, ``out[i]`` is what ``modules[i]`` returned in this call (its last call).

    While registered, a forward hook sees every caller of the module, another thread's forward of the
    same model included; the hooks write only where this context opened the dict, so a concurrent
    call (which has no dict, or its own) is never read.
    """
    out: dict[int, Tensor] = {}

    def hook(i: int) -> Callable[..., None]:
        def write(_module: nn.Module, _inputs: tuple[Any, ...], value: Tensor) -> None:
            if _CAPTURE.get() is out:
                out[i] = value

        return write

    handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(modules)]
    token = _CAPTURE.set(out)
    try:
        yield out
    finally:
        _CAPTURE.reset(token)
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# the hooks of a block run in parts
# ---------------------------------------------------------------------------------------------


def _backward_hooked(block: nn.Module) -> str | None:
    """Which backward hooks would fire on ``block``'s own call (its own, or global ones); None if none."""
    if block._backward_hooks or block._backward_pre_hooks:
        return "has a backward hook (register_full_backward_hook / register_full_backward_pre_hook)"
    if torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks:
        return "would get the global module backward hook (register_module_full_backward_hook / _pre_hook)"
    return None


def refuse_backward_hooks(block: nn.Module, where: str) -> None:
    """Raise if ``block``, which the loop runs in parts, would have backward hooks (checked at apply and forward).

    torch runs a module's backward hooks by wrapping the inputs and outputs of its own call; a block
    whose attention, reduction and MLP the loop calls one by one has no such call to wrap.
    """
    found = _backward_hooked(block)
    if found is not None:
        raise ValueError(
            f"{where} {found}, but pumer_patch runs this block in parts (its attention, the token reduction, its "
            f"MLP), so torch cannot run a backward hook on it. Register the hook on one of its sub-modules (its "
            f"attention or MLP) or on the model itself, or pumer_patch.remove(model) first"
        )


def refuse_backward_hooks_on(blocks: Sequence[nn.Module], indices: Iterable[int], name: str) -> None:
    """``refuse_backward_hooks`` on ``blocks[i]`` for each i in ``indices``: at apply, the blocks the plan runs in parts.

    name: how the errors name the block list, as ``run_blocks`` does.
    """
    for i in sorted(indices):
        refuse_backward_hooks(blocks[i], f"{name}[{i}] ({type(blocks[i]).__name__})")


def reduce_blocks(schedule: Mapping[int, Ratios], merge_schedule: Sequence[int] | None) -> set[int]:
    """The blocks ``run_blocks`` may run in parts: those with ratios, and those ``merge_schedule`` merges at."""
    return set(schedule) | {i for i, r in enumerate(merge_schedule or ()) if r}


def _forward_hooked(block: nn.Module) -> bool:
    return bool(
        block._forward_hooks or block._forward_pre_hooks
        or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
    )


def call_as_block(
    block: nn.Module,
    where: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    forward: Callable[[tuple[Any, ...], dict[str, Any]], R],
) -> R:
    """``forward(args, kwargs)``, run in place of ``block(*args, **kwargs)`` with the block's hooks as torch runs them.

    args / kwargs: what the library's call of the block passes, hidden states first (what the hooks
    see). forward: the loop's parts of the block, given the arguments after the pre-hooks; what it
    returns (shaped as the block's own output) goes through the forward hooks, and their result is
    returned. The order is ``nn.Module.__call__``'s: global forward pre-hooks, the block's; then the
    global forward hooks, the block's (``with_kwargs`` ones get the keywords; ``always_call`` ones also
    run when the forward raises). Backward hooks are refused (``refuse_backward_hooks``).
    where: the block's name in the errors.
    """
    refuse_backward_hooks(block, where)
    if not _forward_hooked(block):
        return forward(args, kwargs)
    kwargs = dict(kwargs)  # the hooks' own, as a call's ``**kwargs`` is: changing it in place changes no caller's
    hooks = (*torch_module._global_forward_hooks.items(), *block._forward_hooks.items())
    # the global hooks' keyword and always-call flags are absent in older torch releases
    with_kwargs = {*block._forward_hooks_with_kwargs, *getattr(torch_module, "_global_forward_hooks_with_kwargs", {})}
    always = {*block._forward_hooks_always_called, *getattr(torch_module, "_global_forward_hooks_always_called", {})}
    called: set[int] = set()
    result: Any = None
    try:
        for key, hook in (*torch_module._global_forward_pre_hooks.items(), *block._forward_pre_hooks.items()):
            if key in block._forward_pre_hooks_with_kwargs:
                replaced = hook(block, args, kwargs)
                if replaced is not None:
                    if not (isinstance(replaced, tuple) and len(replaced) == 2):
                        raise RuntimeError(
                            f"forward pre-hook must return None or a tuple of (new_args, new_kwargs), but got {replaced}."
                        )
                    args, kwargs = replaced
            else:
                replaced = hook(block, args)
                if replaced is not None:
                    args = replaced if isinstance(replaced, tuple) else (replaced,)
        result = forward(args, kwargs)
        for key, hook in hooks:
            called.add(key)
            out = hook(block, args, kwargs, result) if key in with_kwargs else hook(block, args, result)
            result = result if out is None else out
        return result
    except Exception:
        for key, hook in hooks:  # torch's order: the global ones, then the block's
            if key in always and key not in called:
                try:
                    own = key in block._forward_hooks_with_kwargs
                    out = hook(block, args, kwargs, result) if own else hook(block, args, result)
                    result = result if out is None else out
                except Exception as error:
                    warnings.warn(
                        "module forward hook with ``always_call=True`` raised an exception that was silenced as "
                        f"another error was raised in forward: {error}", stacklevel=2,
                    )
        raise


def hidden_argument(where: str, given: tuple[tuple[Any, ...], dict[str, Any]], args: tuple[Any, ...],
                    kwargs: dict[str, Any], sized: bool) -> Tensor:
    """The hidden states (B, N, C) among the block's arguments after its pre-hooks (``args[0]``).

    given: the arguments before them. A pre-hook may replace the hidden states with others of the
    same (B, N); the other arguments are the loop's masks and biases, which it computes for these
    tokens, so replacing one is an error, as is another token count (``check_tokens``).
    """
    given_args, given_kwargs = given
    same = (
        len(args) == len(given_args) and all(a is b for a, b in zip(args[1:], given_args[1:]))
        and kwargs.keys() == given_kwargs.keys() and all(kwargs[k] is given_kwargs[k] for k in kwargs)
    )
    if not same:
        raise ValueError(
            f"a forward pre-hook on {where} replaced arguments other than the hidden states; pumer_patch runs this "
            f"block in parts and computes its masks and biases for the tokens it carries, so a pre-hook may replace "
            f"only the hidden states (the first argument). Or pumer_patch.remove(model) first"
        )
    return check_tokens(where, "a forward pre-hook", given_args[0], args[0], sized)


def check_tokens(where: str, what: str, expected: Tensor, got: Any, sized: bool) -> Tensor:
    """``got``, the hidden states a hook made of ``expected`` (B, N, ...), if it keeps their (B, N); else the clear error.

    sized: the tokens carry sizes (``TokenSizesLost``); else a ``ValueError`` (their masks and sources).
    """
    if not isinstance(got, Tensor):
        raise TypeError(f"{what} on {where} returned {type(got).__name__} where the block's hidden states (a Tensor) go")
    if got.shape[:2] != expected.shape[:2]:
        error = TokenSizesLost if sized else ValueError
        raise error(
            f"{what} on {where} turned hidden states of (B, N) = {tuple(expected.shape[:2])} into "
            f"{tuple(got.shape[:2])}; pumer_patch carries each token's size, mask and source with it through the "
            f"blocks, so it cannot go on with other tokens. Return hidden states of the same (B, N), or "
            f"pumer_patch.remove(model) first"
        )
    return got


# ---------------------------------------------------------------------------------------------
# the single-tower loop
# ---------------------------------------------------------------------------------------------


class Attended(NamedTuple):
    """What the attention half of a block hands back.

    x: (B, N, C) after the attention residual. q: (B, H, Q, d) the query rows asked for (after any
    q norm), or None. k: (B, H, N, d) the keys (after any k norm). scale: the logit scale.
    probs: (B, H, N, N) the attention probabilities the block computed anyway (eager attention), or
    None; when given, relevance reads its rows instead of recomputing them from ``q``.
    logit_bias: what the attention added to the logits of the query rows, (B or 1, H or 1, Q or 1, N)
    (BEiT's position bias with the key bias); None: the key bias alone.
    """

    x: Tensor
    q: Tensor | None
    k: Tensor
    scale: float
    probs: Tensor | None = None
    logit_bias: Tensor | None = None


class BlockStep(Protocol):
    """One library's block as ``run_blocks`` sees it; ``bias`` is the key bias (B, 1, 1, N) or None.

    plain: the library's own forward of the whole block. attend: the attention half, with ``q`` for
    the query ``rows`` (a slice) or None. finish: the MLP half. A step may also say what ``plain``
    passes the block, ``arguments(block, x, bias) -> (args, kwargs)`` with x first: the block's hooks
    see them at a reduce block (``call_as_block``); without it they see ``(x,)`` alone.
    """

    def plain(self, block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor: ...

    def attend(self, block: nn.Module, x: Tensor, bias: Tensor | None, rows: slice | None) -> Attended: ...

    def finish(self, block: nn.Module, x: Tensor) -> Tensor: ...


class PlacedStep(Protocol):
    """A family whose blocks read where each token stands (EVA's rotary rows, BEiT's relative bias).

    ``at(i, carry)`` is block i's ``BlockStep`` for tokens at ``carry`` (the per-token values handed
    to ``run_blocks``, moved through every reduction), or at their own places while ``carry`` is None.
    """

    def at(self, i: int, carry: tuple[Tensor, ...] | None) -> BlockStep: ...


def attention_relevance(q: Tensor, k: Tensor, scale: float, bias: Tensor | None, query_size: Tensor | None) -> Tensor:
    """Relevance (B, N): attention paid to each key, mean over heads and over the query rows.

    q: (B, H, Q, d) query rows; k: (B, H, N, d); bias: key bias as in the forward, broadcast to
    (B, H, Q, N); query_size: (B, Q) weights of the query rows (their sizes), None for a plain mean.
    float32.
    """
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Q, N)
    if bias is not None:
        logits = logits + bias.float()
    return probability_relevance(logits.softmax(dim=-1), query_size)


def probability_relevance(probs: Tensor, query_size: Tensor | None) -> Tensor:
    """Relevance (B, N) from attention probabilities (B, H, Q, N): mean over heads, then over the query rows.

    query_size: (B, Q) weights of the query rows (their sizes), None for a plain mean. float32.
    """
    probs = probs.float().mean(dim=1)  # (B, Q, N)
    if query_size is None:
        return probs.mean(dim=1)
    weight = query_size.float()
    return (probs * weight.unsqueeze(-1)).sum(dim=1) / weight.sum(dim=1, keepdim=True)


def _block_ratios(plan: Plan, i: int, n: int, protected: int) -> tuple[Ratios, int] | None:
    """Block ``i``'s ratios and ToMe's r from ``merge_schedule`` (0 without); None to run it plainly.

    A block without ratios reduces only where its r merges something on these ``n`` tokens.
    """
    ratios = plan.schedule.get(i)
    schedule = plan.options.merge_schedule
    extra = 0 if schedule is None else schedule[i]
    if ratios is None and merge_count(n, extra, protected) == 0:
        return None
    return ratios or Ratios(), extra


def _arguments(step: BlockStep, block: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """What ``step.plain`` would pass ``block`` (its hooks see them at a reduce block): the step's, or ``(x,)``."""
    arguments = getattr(step, "arguments", None)
    return ((x,), {}) if arguments is None else arguments(block, x, bias)


def _reduce_block(
    block: nn.Module,
    tokens: Tokens,
    bias: Tensor | None,
    ratios: Ratios,
    extra_merges: int,
    step: BlockStep,
    protected: int,
    cls_row: bool,
    guide: Callable[[Tensor], Tensor] | None,
    carry: tuple[Tensor, ...],
    where: str,
) -> tuple[Tokens, tuple[Tensor, ...], bool]:
    """One reduce block: attention half, relevance and metric, ``reduce_tokens``, MLP half; the block's hooks around them.

    Returns the reduced ``Tokens``, the carry moved with them, and whether a merge happened (from
    then on sizes differ from one).
    """
    given = _arguments(step, block, tokens.x, bias)
    done: dict[str, Any] = {}  # this call's reduction, handed out of ``forward`` past the hooks

    def forward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        x = hidden_argument(where, given, args, kwargs, tokens.size is not None)
        prune = ratios.prune > 0
        rows = None if not prune or guide is not None else (slice(0, 1) if cls_row else slice(protected, None))
        att = step.attend(block, x, bias, rows)
        relevance = None
        with torch.no_grad():  # indices only
            if prune and guide is not None:
                relevance = guide(att.x)
            elif prune:
                weights = None if cls_row or tokens.size is None else tokens.size[:, protected:]
                if att.probs is not None:
                    relevance = probability_relevance(att.probs[:, :, rows], weights)
                else:
                    logit_bias = bias if att.logit_bias is None else att.logit_bias
                    relevance = attention_relevance(att.q, att.k, att.scale, logit_bias, weights)
            metric = att.k.mean(dim=1)  # (B, H, N, d) -> (B, N, d): keys averaged over heads
        reduced = reduce_tokens(
            relevance, replace(tokens, x=att.x), ratios, image_metric=metric, image_protected=protected,
            extra_merges=extra_merges, carry=carry,
        )
        done["reduced"] = reduced
        return step.finish(block, reduced.image.x)

    out = call_as_block(block, where, *given, forward)
    reduced = done["reduced"]
    image = reduced.image
    x = check_tokens(where, "a forward hook", image.x, out, image.size is not None)
    return replace(image, x=x), reduced.carry, reduced.image_plan is not None


def run_blocks(
    blocks: Sequence[nn.Module],
    x: Tensor,
    plan: Plan,
    step: BlockStep | PlacedStep,
    *,
    protected: int,
    guide: Callable[[Tensor], Tensor] | None = None,
    checkpointing: bool = False,
    carry: tuple[Tensor, ...] | None = None,
    mask: Tensor | None = None,
    name: str = "blocks",
) -> tuple[Tokens, Trace]:
    """Run ``blocks`` on x (B, N, C), reducing at the planned blocks (default mode).

    step: the library's ``BlockStep``. protected: leading prefix tokens never pruned or merged.
    guide: relevance (B, N) from the post-attention tokens (text guidance); None uses
    ``plan.options.relevance``. checkpointing: recompute every block, reduce blocks included, in
    backward. carry: per-token values (B, N) or (B, N, K) the blocks read (where each token stands),
    moved through pruning and merging as the tokens are; ``step`` is then a ``PlacedStep``, asked for
    each block's ``BlockStep`` (at None while no token has moved, so the library's own positions run).
    mask: (B, N) real (True) against padding of the entering tokens; it travels with them (padding is
    pruned first and never merges with real tokens) and enters the key bias after the first reduction.
    name: how errors name the block list (``"VisionTransformer.blocks"``: block 2 is ``...blocks[2]``).
    Returns the final ``Tokens`` (with sizes, and sources with ``plan.trace``) and the ``Trace``.
    """
    policy = Policy.of(plan.mode)
    recorder = Recorder(plan, checkpointing)
    tokens = start(policy, x, mask, source=plan.trace)
    cls_row = plan.options.relevance == "cls"
    moved: tuple[Tensor, ...] | None = None  # the carry once a reduction moved a token
    bias: Tensor | None = None  # no key bias until a merge makes sizes differ from one
    for i, block in enumerate(blocks):
        here: BlockStep = step if carry is None else step.at(i, moved)
        ratios = _block_ratios(plan, i, tokens.count, protected)
        where = f"{name}[{i}] ({type(block).__name__})"
        if ratios is None:  # the block's own call: torch runs its hooks, which must keep the tokens
            out = recorder.run(here.plain, block, tokens.x, bias)
            tokens = replace(tokens, x=check_tokens(where, "a forward hook", tokens.x, out, tokens.size is not None))
            continue
        before = tokens.count
        tokens, moving, merged = recorder.run(
            _reduce_block, block, tokens, bias, *ratios, here, protected, cls_row, guide,
            (moved if moved is not None else carry) or (), where,
        )
        if carry is not None and tokens.count < before:
            moved = moving
        if merged or bias is not None or tokens.mask is not None:
            bias = key_bias(policy, [tokens], x.dtype)
        recorder.count(i, tokens)
    return tokens, recorder.trace(tokens)

