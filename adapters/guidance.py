"""Text guidance: image towers that prune by a text query (open_clip, transformers CLIP and SigLIP).

``text_guidance(model, text_features)`` is one context manager for every patched image tower that
maps its tokens into a joint image-text space. Inside its ``with`` block, the relevance of an image
token at a pruning block is the cosine of that token, carried through the tower's own image head
into the joint space, with the text query; merging is unchanged. An adapter says which of its
patched towers can do this by a ``guided_towers(model)`` method returning ``GuidedTower`` s; its
loop reads the guide with ``guide_of(state)`` and hands it to ``_loop.run_blocks``, which passes it
on as an argument (so a recompute under gradient checkpointing prunes the same tokens).

An image embedding then depends on the query: it cannot be cached across queries as plain retrieval
caches it. The guidance holds in the thread and ``with`` block that set it, for the models it was
given, not for a copy taken inside the block (the scope is keyed by each tower's ``PatchState``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import loaded_adapters
from ._loop import CallScope
from .base import PatchState

__all__ = ["GuidedTower", "guide_of", "text_guidance"]


@dataclass(frozen=True)
class GuidedTower:
    """A patched image tower that can prune by a text query.

    state: the tower's ``PatchState`` (the key its guidance is kept under). dim: the width D of the
    joint space. embed: tokens (B, N, C) at a pruning block -> (B, N, D), through the tower's own
    image head (the MaskCLIP reading of a head: applied to inner tokens it gives patch embeddings in
    the joint space, the one bridge from an inner layer to the text that needs no training).
    """

    state: PatchState
    dim: int
    embed: Callable[[Tensor], Tensor]


# relevance (B, N) from the tokens at a pruning block, per patched tower, for one ``with`` block
_GUIDES: CallScope[Callable[[Tensor], Tensor]] = CallScope("pumer_patch_text_guidance")


def guide_of(state: PatchState) -> Callable[[Tensor], Tensor] | None:
    """The text relevance ``text_guidance`` set for the tower of ``state`` in this context, None outside one."""
    return _GUIDES.get(state)


def _relevance(embed: Callable[[Tensor], Tensor], text: Tensor, x: Tensor) -> Tensor:
    """Cosine (B, N) of each token of x (B, N, C), embedded in the joint space, with the text (B or 1, D)."""
    if text.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"text_guidance has {text.shape[0]} text features for a batch of {x.shape[0]} images; "
            f"give one per image or one for all"
        )
    tokens = F.normalize(embed(x).float(), dim=-1)  # (B, N, D)
    query = F.normalize(text.float(), dim=-1).expand(x.shape[0], -1)  # (B, D)
    return torch.einsum("bnd,bd->bn", tokens, query)


def _guided_towers(model: nn.Module) -> list[GuidedTower]:
    """The guided towers in ``model``, from every loaded adapter that has some (``guided_towers``)."""
    return [tower for adapter in loaded_adapters() for tower in adapter.guided_towers(model)]


@contextmanager
def text_guidance(model: nn.Module, text_features: Tensor) -> Iterator[None]:
    """Inside this ``with`` block, the patched image towers in ``model`` that take a text query prune by it.

    text_features: (B, D) one per image, or (D,) / (1, D) for the whole batch, in the joint space
    (open_clip ``model.encode_text(tokens)``; transformers ``model.get_text_features(**text).pooler_output``),
    normalized or not. The towers: open_clip image towers with a ``proj`` and no attentional pooler
    (head: ``ln_post`` and ``proj``), and the image towers of transformers ``CLIPModel`` (head:
    ``post_layernorm`` and ``visual_projection``) and ``SiglipModel`` with its pooling head (head:
    ``post_layernorm`` and the pooling head with its probe on that token alone). Needs a patch that
    prunes (``prune_ratio > 0``). See the module docstring for what holds where.
    """
    towers = _guided_towers(model)
    if not towers:
        raise ValueError(
            "text_guidance needs an open_clip image tower patched by pumer_patch.apply (with a proj, no attentional "
            "pooler), or the patched image tower of a transformers CLIPModel or SiglipModel (with its pooling head); "
            "none found in model"
        )
    if not isinstance(text_features, Tensor) or not text_features.is_floating_point():
        raise TypeError(
            "text_features must be a floating Tensor (B, D), the model's text embedding: e.g. open_clip's "
            "model.encode_text(tokens) or transformers' model.get_text_features(**text).pooler_output"
        )
    text = (text_features.reshape(1, -1) if text_features.dim() == 1 else text_features).detach()
    for tower in towers:
        if text.dim() != 2 or text.shape[1] != tower.dim:
            raise ValueError(f"text_features must have shape (B, {tower.dim}), got {tuple(text_features.shape)}")
        if not any(r.prune > 0 for r in tower.state.plan.schedule.values()):
            raise ValueError("text guidance steers pruning, but this patch prunes nothing; apply with prune_ratio > 0")
    with ExitStack() as stack:  # nested guidance is restored on exit
        for tower in towers:
            stack.enter_context(_GUIDES.open(tower.state, partial(_relevance, tower.embed, text)))
        yield
