"""What "the model is untouched" means in the adapter tests: classes, state_dict, no pumer attributes."""

from __future__ import annotations

import torch
from torch import nn

Snapshot = tuple[dict[str, type], dict[str, torch.Tensor], list[tuple[str, str]]]


def snapshot(model: nn.Module) -> Snapshot:
    return (
        {name: type(m) for name, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, attr) for name, m in model.named_modules() for attr in vars(m) if "pumer" in attr],
    )


def same(a: Snapshot, b: Snapshot) -> bool:
    (classes, state, attrs), (classes_b, state_b, attrs_b) = a, b
    return (
        classes == classes_b
        and attrs == attrs_b
        and state.keys() == state_b.keys()
        and all(torch.equal(state[k], state_b[k]) for k in state)
    )
