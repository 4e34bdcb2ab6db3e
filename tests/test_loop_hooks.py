"""``_loop.call_as_block`` against ``nn.Module.__call__``: a block the loop runs in parts meets its hooks as torch's call would.

The same hooks on two modules built alike, one called by torch and one through ``call_as_block``
with the module's own forward as the parts: the same calls, arguments, replacements and results,
``with_kwargs`` and ``always_call`` hooks and the global module hooks included. The families' blocks
are checked in the contract suite (``test_contract.py``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from pumer_patch.adapters._loop import call_as_block


class Scale(nn.Module):
    """y = x * w + shift, a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: Tensor, shift: float = 0.0) -> Tensor:
        if shift < 0:
            raise ValueError("negative shift")
        return x * self.w + shift


def _hooked(log: list[tuple[Any, ...]]) -> nn.Module:
    """A ``Scale`` whose hooks log what they see and replace its input, its keywords and its output."""
    module = Scale()
    module.register_forward_pre_hook(lambda _m, args: log.append(("pre", args[0].tolist())))
    module.register_forward_pre_hook(lambda _m, args: (args[0] + 1,))
    module.register_forward_pre_hook(
        lambda _m, args, kwargs: (args, {**kwargs, "shift": kwargs.get("shift", 0.0) + 0.5}), with_kwargs=True
    )
    module.register_forward_hook(lambda _m, args, out: log.append(("out", args[0].tolist(), out.tolist())))
    module.register_forward_hook(lambda _m, _a, kwargs, out: out * 3 + kwargs["shift"], with_kwargs=True)
    module.register_forward_hook(
        lambda _m, _a, out: log.append(("always", None if out is None else out.tolist())), always_call=True
    )
    return module


@pytest.mark.parametrize("shift", [0.25, -1.0])  # -1: the forward raises, always_call hooks still run
def test_call_as_block_runs_the_hooks_as_torch_calls_them(shift):
    x = torch.arange(4.0)
    logs: dict[str, list[tuple[Any, ...]]] = {"torch": [], "loop": []}
    modules = {name: _hooked(log) for name, log in logs.items()}
    which = {id(m): name for name, m in modules.items()}
    handles = [
        torch_module.register_module_forward_pre_hook(
            lambda m, args: logs[which[id(m)]].append(("global_pre", args[0].tolist())) if id(m) in which else None
        ),
        torch_module.register_module_forward_hook(
            lambda m, _a, out: logs[which[id(m)]].append(("global_out", out.tolist())) if id(m) in which else None
        ),
    ]
    results: dict[str, Any] = {}
    try:
        for name, module in modules.items():
            try:
                if name == "torch":
                    results[name] = module(x, shift=shift)
                else:
                    results[name] = call_as_block(
                        module, "m", (x,), {"shift": shift}, lambda args, kwargs: module.forward(*args, **kwargs)
                    )
            except ValueError as error:
                results[name] = str(error)
    finally:
        for handle in handles:
            handle.remove()
    if shift < 0:
        assert results["loop"] == results["torch"] == "negative shift"
        assert [entry[0] for entry in logs["loop"]] == ["global_pre", "pre", "always"]
        assert logs["loop"][-1][1] is None  # the always_call hook ran with no output, as torch's does
    else:
        assert torch.equal(results["loop"], results["torch"])
        assert [entry[0] for entry in logs["loop"]] == ["global_pre", "pre", "global_out", "out", "always"]
    assert logs["loop"] == logs["torch"]  # the same hooks saw the same arguments and outputs
