"""pumer_patch.flops: attention is counted in full whatever kernel runs; the FLOPs search lands and touches nothing."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from open_clip.model import CLIP

import pumer_patch
from model_state import same, snapshot
from pumer_patch.flops import gflops_per_example, match_gflops

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def vit(fused: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


def inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def test_fused_sdpa_counts_like_eager_attention_and_per_example():
    eager = gflops_per_example(vit(fused=False), inputs())
    assert gflops_per_example(vit(fused=True), inputs()) == pytest.approx(eager, rel=1e-9)
    assert gflops_per_example(vit(fused=True), inputs(batch=4)) == pytest.approx(eager, rel=1e-9)
    # ViT on 17 tokens, width 32, MLP 128: per block 2 * (4 N C^2 + 2 N^2 C + 2 N C * 128) plus patch embed and head
    n, c = 17, 32
    blocks = 4 * 2 * (4 * n * c * c + 2 * n * n * c + 2 * n * c * 4 * c)
    patch_embed, head = 2 * 16 * (3 * 8 * 8) * c, 2 * c * 5
    assert eager * 1e9 == pytest.approx(blocks + patch_embed + head, rel=1e-9)


def test_multihead_attention_fast_path_is_counted_in_full_and_restored():
    torch.manual_seed(0)
    clip = CLIP(
        embed_dim=24,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=2),
    ).eval()
    image = {"image": torch.randn(2, 3, 32, 32)}
    fast = gflops_per_example(clip, image)
    with torch.enable_grad():  # off MHA's fast path anyway: the count must not change
        slow = gflops_per_example(clip, image)
    assert fast == pytest.approx(slow, rel=1e-9)
    assert torch.backends.mha.get_fastpath_enabled()


def test_match_gflops_meets_the_target_and_leaves_the_model_alone():
    model = vit(fused=True)
    before = snapshot(model)
    pumer = gflops_per_example(pumer_patch.apply(copy.deepcopy(model), layers=[1], prune_ratio=0.5), inputs())
    ratio, got = match_gflops(model, inputs(), pumer, lambda r: {"layers": [0, 1, 2, 3], "merge_ratio": r})
    assert 0 < ratio < 1 and got == pytest.approx(pumer, rel=0.05)
    assert got == gflops_per_example(pumer_patch.apply(copy.deepcopy(model), layers=[0, 1, 2, 3], merge_ratio=ratio), inputs())
    assert not pumer_patch.is_patched(model) and same(before, snapshot(model))


def test_match_gflops_unreachable_target_warns_and_bad_target_raises(caplog):
    model = vit(fused=True)
    base = gflops_per_example(model, inputs())
    with caplog.at_level("WARNING", logger="pumer_patch.flops"):
        ratio, got = match_gflops(model, inputs(), 0.1 * base, lambda r: {"layers": [3], "merge_ratio": r})
    # merging at most halves the tokens: every ratio from 0.5 up reaches the same plateau
    assert ratio >= 0.5 and got > 0.1 * base and "closest reachable" in caplog.text
    with pytest.raises(ValueError, match="positive number of GFLOPs"):
        match_gflops(model, inputs(), 0.0, lambda r: {"layers": [3], "merge_ratio": r})
