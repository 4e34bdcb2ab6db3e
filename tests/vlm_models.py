"""Tiny random vision-language LLMs and their prompts, for ``test_hf_vlm.py``.

``llava(implementation)``: a ``LlavaForConditionalGeneration`` (CLIP tower 32x32 at patch 8: 16 visual
tokens per image; a 3-layer Llama with grouped-query attention, 4 query heads over 2 key heads), eval
mode, seeded. ``prompt(...)``: input ids with image runs per sample where asked, padded left or
right, with the attention mask, the position ids ``generate`` would use and the pixel values.
``build(family)`` / ``family_prompt(...)``: the same for every supported family.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

__all__ = ["FAMILIES", "IMAGE", "PAD", "VISUAL", "build", "family_prompt", "llava", "prompt"]

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


# --------------------------------------------------------------------------------------------
# the other families: LLaVA-NeXT and LLaVA-OneVision (any-res: visual tokens per image vary), Idefics3, SmolVLM
# --------------------------------------------------------------------------------------------

FAMILIES = ["llava", "llava_next", "llava_onevision", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
QWEN_START, QWEN_END = 97, 96  # Qwen's vision start / end tokens (98: its video token)
WORDS = 95  # text tokens are drawn from 1..WORDS - 1, clear of every special token
PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def _text(qwen: bool, layers: int) -> LlamaConfig | Qwen2Config:
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100, pad_token_id=PAD)
    return Qwen2Config(**sizes, use_sliding_window=False) if qwen else LlamaConfig(**sizes)


def build(family: str, implementation: str = "sdpa", layers: int = 3, seed: int = 0) -> nn.Module:
    """A tiny random model of ``family`` (one of ``FAMILIES``), eval mode, seeded."""
    if family == "llava":
        return llava(implementation, layers, seed)
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
    if family == "llava_next":
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(**tower, image_size=32), text_config=_text(False, layers),
                                 image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS)
        model = LlavaNextForConditionalGeneration
    elif family == "llava_onevision":
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**tower, image_size=32),
                                      text_config=_text(True, layers), image_token_index=IMAGE, video_token_index=98,
                                      image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1)
        model = LlavaOnevisionForConditionalGeneration
    elif family == "idefics3":
        config = Idefics3Config(vision_config=Idefics3VisionConfig(**tower, image_size=64),
                                text_config=_text(False, layers), scale_factor=2, image_token_id=IMAGE)
        model = Idefics3ForConditionalGeneration
    elif family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=100, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
                    rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
        ids = dict(image_token_id=IMAGE, video_token_id=98, vision_start_token_id=QWEN_START,
                   vision_end_token_id=QWEN_END)
        if family == "qwen3_vl":  # DeepStack: features of vision block 0 added after LLM layer 0
            text["head_dim"] = 8
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64,
                          deepstack_visual_indexes=[0])
            config, model = Qwen3VLConfig(vision_config=vision, text_config=text, **ids), Qwen3VLForConditionalGeneration
        elif family == "qwen2_5_vl":
            vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, window_size=16,
                          fullatt_block_indexes=[0])
            config, model = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids), Qwen2_5_VLForConditionalGeneration
        else:
            vision = dict(depth=1, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2)
            config, model = Qwen2VLConfig(vision_config=vision, text_config=text, **ids), Qwen2VLForConditionalGeneration
    elif family == "smolvlm":
        config = SmolVLMConfig(vision_config=SmolVLMVisionConfig(**tower, image_size=64),
                               text_config=_text(False, layers), scale_factor=2, image_token_id=IMAGE)
        model = SmolVLMForConditionalGeneration
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    config._attn_implementation = implementation
    for sub in (config.vision_config, config.text_config):
        sub._attn_implementation = implementation
    return model(config).eval()


def _any_res_tokens(model: nn.Module, size: tuple[int, int], pixels: Tensor) -> int:
    """Visual tokens LLaVA-NeXT / OneVision place for one image of ``size`` (its tiles ``pixels``)."""
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels[None], image_sizes=torch.tensor([size]),
                                             return_dict=True)
    return out.pooler_output[0].shape[0]


def family_prompt(
    model: nn.Module, family: str, samples: list[tuple[int, list[tuple[int, int]], int]], side: str = "left",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Inputs for samples (text before, image sizes (H, W), text after), padded on ``side``.

    LLaVA ignores the sizes (16 visual tokens per image), Idefics3 and SmolVLM too (one 64x64 tile, 16
    tokens), Qwen2-VL and Qwen2.5-VL too (an 8 x 8 patch grid, 16 tokens between vision start and end, their
    positions numbered by the model); LLaVA-NeXT and OneVision tile each image by its size and place as many
    tokens as they make.
    A sample's tokens and pixels depend only on the sample and ``seed``.
    """
    if family == "llava":
        return prompt([(b, len(sizes), a) for b, sizes, a in samples], side, seed)
    any_res = family in ("llava_next", "llava_onevision")
    qwen = family.startswith("qwen")
    rows, pixels, image_sizes = [], [], []
    for before, sizes, after in samples:
        g = torch.Generator().manual_seed(seed * 1_000_003 + before * 10_007 + len(sizes) * 101 + after
                                          + sum(h * 7 + w for h, w in sizes))
        ids = torch.randint(1, WORDS, (before,), generator=g).tolist()
        images = []
        for size in sizes:
            if qwen:  # an 8 x 8 grid of 4 x 4 patches, 2 frames deep, merged 2 x 2: 16 tokens
                image, count = torch.randn(64, 3 * 2 * 4 * 4, generator=g), VISUAL
            elif any_res:
                tiles = image_size_to_num_patches(size, PINPOINTS, 32)
                image = torch.randn(tiles, 3, 32, 32, generator=g)
                count = _any_res_tokens(model, size, image)
            else:
                image, count = torch.randn(3, 64, 64, generator=g), VISUAL
            images.append(image)
            run = [QWEN_START, *[IMAGE] * count, QWEN_END] if qwen else [IMAGE] * count
            ids += run + torch.randint(1, WORDS, (2,), generator=g).tolist()
        ids += torch.randint(1, WORDS, (after,), generator=g).tolist()
        rows.append(ids)
        pixels.append(images)
        image_sizes += sizes
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        where = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        input_ids[i, where] = torch.tensor(r)
        mask[i, where] = 1
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
    if qwen:  # the model numbers its M-RoPE positions itself, from the token types and the grids
        del inputs["position_ids"]
        inputs["mm_token_type_ids"] = (input_ids == IMAGE).int()
        if image_sizes:
            inputs["pixel_values"] = torch.cat([image for images in pixels for image in images])
            inputs["image_grid_thw"] = torch.tensor([[1, 8, 8]] * len(image_sizes))
    elif any_res and image_sizes:
        flat = [image for images in pixels for image in images]
        tiles = max(image.shape[0] for image in flat)
        inputs["pixel_values"] = torch.stack([torch.cat([im, im.new_zeros(tiles - im.shape[0], *im.shape[1:])])
                                              for im in flat])
        inputs["image_sizes"] = torch.tensor(image_sizes)
    elif image_sizes:  # Idefics3 / SmolVLM: (B, images, 3, H, W); all-zero images are padding
        most = max(len(images) for images in pixels)
        inputs["pixel_values"] = torch.stack([
            torch.stack(images + [torch.zeros(3, 64, 64)] * (most - len(images))) for images in pixels
        ])
    return inputs
