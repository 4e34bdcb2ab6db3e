"""One model, several threads: each call gets its own right answer, patched or not.

Per-call state (captured keys, token sizes, the text length, a text query) travels with the call, so
a patched model is exactly as thread-safe as the unpatched one. Threads start together at a barrier
and call the model in turns with inputs of their own (same shapes, then different batch sizes and
text lengths); every result is compared with the same inputs' single-threaded reference.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch

import pumer_patch
from contract_models import ENTRIES, Entry

T = TypeVar("T")

THREADS = 3
CALLS = 4  # per thread


def _inputs(entry: Entry, varied: bool) -> list[dict[str, Any]]:
    """One input set per thread: the same shapes, or a batch size (and a text length) of its own."""
    if not varied:
        return [entry.inputs(batch=2, seed=t) for t in range(THREADS)]
    return [entry.inputs(batch=1 + t, seed=t, text=12 - 3 * t) for t in range(THREADS)]


def _in_threads(n: int, call: Callable[[int], T]) -> list[list[T]]:
    """n threads start together, thread t runs ``call(t)`` CALLS times without gradients; results per thread, in order."""
    results: list[list[T]] = [[] for _ in range(n)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def work(t: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(CALLS):
                    results[t].append(call(t))
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def _sorted(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sort(dim=1).values  # (B, ...) -> (B, K), each sample's values in order


@pytest.mark.parametrize("varied", [False, True], ids=["same_shapes", "varied_shapes"])
@pytest.mark.parametrize("patched", [True, False], ids=["patched", "unpatched"])
@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_concurrent_calls_each_get_their_own_result(entry, patched, varied):
    model = entry.build()
    if patched:
        pumer_patch.apply(model, **entry.patch)
    inputs = _inputs(entry, varied)
    with torch.no_grad():
        expected = [entry.output(model, x) for x in inputs]
    for t, outputs in enumerate(_in_threads(len(inputs), lambda t: entry.output(model, inputs[t]))):
        assert len(outputs) == CALLS
        for out in outputs:
            if entry.random_patch_order and not patched:
                # unpatched ViLT draws its patch order from the RNG the threads share: image tokens come in
                # another order than the reference's (compared as sorted values) and the attention sums in
                # another order (to float rounding). The patch puts patches in raster order: bit-equal.
                torch.testing.assert_close(_sorted(out), _sorted(expected[t]), rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(out, expected[t]), f"thread {t}"


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_last_trace_is_the_calling_threads_own(entry):
    model = pumer_patch.apply(entry.build(), **entry.patch, trace=True)
    inputs = [entry.inputs(batch=1 + t, seed=t) for t in range(2)]  # a batch size per thread

    def batch_of_own_trace(t: int) -> int:
        entry.output(model, inputs[t])
        return pumer_patch.last_trace(model).image.x.shape[0]

    seen = _in_threads(2, batch_of_own_trace)
    assert seen == [[1] * CALLS, [2] * CALLS]  # each thread reads the trace of its own last call
    assert pumer_patch.last_trace(model) is None  # and this thread ran nothing
