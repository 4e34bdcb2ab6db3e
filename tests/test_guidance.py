"""Text guidance (adapters/guidance.py): one ``text_guidance`` for the towers of every library that takes
a text query.

Each library's own guidance tests (which tokens the query keeps, the errors) live in test_open_clip.py
and test_hf_vit.py; a query that holds through a gradient-checkpointing recompute is a contract row
(``test_contract.py``), on every registry entry that takes a query.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPModel

import pumer_patch
from contract_models import by_name, hf_builder, hf_images
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
