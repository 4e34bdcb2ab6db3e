"""Tiny random vision-language LLMs and their prompts, for ``test_hf_vlm.py`` and ``benchmarks.vlm``.

``llava(implementation)``: a ``LlavaForConditionalGeneration`` (CLIP tower 32x32 at patch 8: 16 visual
tokens per image; a 3-layer Llama with grouped-query attention, 4 query heads over 2 key heads), eval
mode, seeded. ``prompt(...)``: input ids with one image run per sample where asked, padded left or
right, with the attention mask, the position ids ``generate`` would use and the pixel values.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

__all__ = ["IMAGE", "PAD", "VISUAL", "llava", "prompt"]

IMAGE = 99  # the image-placeholder token
PAD = 0
VISUAL = 16  # visual tokens per image: (32 / 8) ** 2


def llava(implementation: str = "sdpa", layers: int = 3, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, pad_token_id=PAD)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                         attn_implementation=implementation)
    return LlavaForConditionalGeneration(config).eval()


def prompt(
    samples: list[tuple[int, int, int]], side: str = "left", seed: int = 0
) -> dict[str, Tensor]:
    """Inputs for samples given as (text before the images, images, text after them), padded on ``side``.

    Each image is a run of ``VISUAL`` placeholders followed by 2 text tokens; pixel values come one per
    image, in order. A sample's tokens and pixels depend only on the sample and ``seed``, so the same
    sample alone and in a batch is the same prompt.
    """
    rows, pixels = [], []
    for before, n_images, after in samples:
        g = torch.Generator().manual_seed(seed * 1_000_003 + before * 10_007 + n_images * 101 + after)
        ids = torch.randint(1, IMAGE - 1, (before,), generator=g).tolist()
        for _ in range(n_images):
            ids += [IMAGE] * VISUAL + torch.randint(1, IMAGE - 1, (2,), generator=g).tolist()
        ids += torch.randint(1, IMAGE - 1, (after,), generator=g).tolist()
        rows.append(ids)
        pixels += [torch.randn(3, 32, 32, generator=g) for _ in range(n_images)]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        where = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        input_ids[i, where] = torch.tensor(r)
        mask[i, where] = 1
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
    if pixels:
        inputs["pixel_values"] = torch.stack(pixels)
    return inputs
