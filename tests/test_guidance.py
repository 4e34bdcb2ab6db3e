"""Text guidance (adapters/guidance.py): one ``text_guidance`` for the towers of every library that takes
a text query, and a query that holds through a gradient-checkpointing recompute.

Each library's own guidance tests (which tokens the query keeps, the errors) live in test_open_clip.py
and test_hf_vit.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import CLIPModel

import pumer_patch
from contract_models import by_name, hf_builder, hf_checkpointing, hf_image_text, hf_images
from pumer_patch.adapters import guidance, hf_vit, open_clip
from pumer_patch.adapters.guidance import text_guidance


def test_one_text_guidance_for_every_library():
    assert open_clip.text_guidance is guidance.text_guidance is hf_vit.text_guidance


def test_one_with_block_steers_the_towers_of_both_libraries():
    both = nn.ModuleDict({"hf": hf_builder(CLIPModel, "sdpa")(), "oc": by_name("open_clip-vit_b32").build()})
    pumer_patch.apply(both, layers=[0], prune_ratio=0.5)
    assert len(pumer_patch.patched_roots(both)) == 2
    hf_pixels, oc_images = hf_images()["pixel_values"], by_name("open_clip-vit_b32").inputs()["image"]

    def embed() -> tuple[torch.Tensor, torch.Tensor]:
        return both["hf"].get_image_features(pixel_values=hf_pixels).pooler_output, both["oc"].encode_image(oc_images)

    query = torch.randn(2, 24, generator=torch.Generator().manual_seed(4))  # both joint spaces are 24 wide
    with torch.no_grad():
        plain = embed()
        with text_guidance(both, query):
            guided = embed()
        with text_guidance(both["hf"], query):
            hf_only = embed()
    assert not torch.equal(guided[0], plain[0]) and not torch.equal(guided[1], plain[1])
    assert torch.equal(hf_only[0], guided[0]) and torch.equal(hf_only[1], plain[1])  # each model guides its own


def _hf_clip() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], Callable[[nn.Module], torch.Tensor]]:
    inputs = hf_image_text()
    model = hf_builder(CLIPModel, "eager")()
    return (model, lambda m: m.get_text_features(input_ids=inputs["input_ids"]).pooler_output,
            lambda m: m.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)


def _open_clip() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], Callable[[nn.Module], torch.Tensor]]:
    entry = by_name("open_clip-vit_b32")  # training drops 4 of 16 patches before the blocks: seeded below
    inputs = entry.inputs()
    return entry.build(), lambda m: m.encode_text(inputs["text"]), lambda m: m.encode_image(inputs["image"])


MODELS = {"hf_clip": (_hf_clip, hf_checkpointing), "open_clip": (_open_clip, lambda m: m.set_grad_checkpointing())}


def _grads(name: str, checkpointing: bool, guided: bool) -> dict[str, torch.Tensor]:
    make, enable = MODELS[name]
    model, text, image = make()
    model.train()
    if checkpointing:
        enable(model)
    pumer_patch.apply(model, layers=[1], prune_ratio=0.5)
    with torch.no_grad():
        query = text(model)
    torch.manual_seed(0)
    if guided:
        with text_guidance(model, query):
            loss = image(model).square().sum()
    else:
        loss = image(model).square().sum()
    loss.backward()  # outside the guidance: a recompute must still prune the tokens the query chose
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", MODELS)
def test_text_guidance_holds_through_a_checkpointing_recompute(name):
    plain, checkpointed = _grads(name, False, True), _grads(name, True, True)
    assert plain.keys() == checkpointed.keys()
    for key, grad in checkpointed.items():
        torch.testing.assert_close(grad, plain[key], msg=key)
    unguided = _grads(name, True, False)
    assert any(not torch.allclose(unguided[k], plain[k]) for k in plain)  # the guidance chose other tokens
