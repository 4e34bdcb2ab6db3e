"""timm adapter: eager-attention parity, token arithmetic, FLOPs, pooling with sizes, refusals, precision.

The contract (parity on the fused path, remove, copies, bad input, training, checkpointing, bf16
autocast, ...) is in test_contract.py, on these configs among others.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import pumer_patch
from model_state import same, snapshot

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)

# name -> (timm model, overrides): 16 patches of 8 x 8 on 32 x 32 images
CONFIGS = {
    "vit": ("vit_tiny_patch16_224", TINY),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", TINY),  # [CLS] + distillation token
    "registers": ("vit_tiny_patch16_224", dict(TINY, reg_tokens=4, qk_norm=True, init_values=0.1)),
    "siglip_map": ("vit_base_patch16_siglip_224", TINY),  # no [CLS], latent attention pool
    "avg_no_cls": ("test_vit2", dict(TINY, init_values=0.1)),  # no [CLS], 1 register, avg pool
    "clip_pre_norm": ("vit_base_patch32_clip_224", TINY),
}


def make(config: str = "vit", seed: int = 0, fused: bool = True, **overrides) -> VisionTransformer:
    name, kwargs = CONFIGS[config]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=5, **{**kwargs, **overrides}).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def run(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def counts(model) -> list[tuple[int, int]]:
    return [(c.layer, c.image) for c in pumer_patch.last_trace(model).counts]


# ---------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("how", ["zero_ratios", "no_layers", "reduces_nothing"])
def test_zero_reduction_is_bit_identical_on_eager_attention(config, how):
    # timm's eager attention path (fused_attn=False); test_contract.py checks the fused one
    model = make(config, fused=False)
    x = images()
    expected = run(model, x)
    if how == "zero_ratios":
        pumer_patch.apply(model, layers=[1, 2], prune_ratio=0.0, merge_ratio=0.0)
    elif how == "no_layers":
        pumer_patch.apply(model, layers=[], prune_ratio=0.3)
    else:  # the reduce path runs (our copy of the block's lines) but round(0.01 * 16) = 0 tokens go
        pumer_patch.apply(model, layers=[0, 3], prune_ratio=0.01, merge_ratio=0.01)
    assert type(model).__name__.startswith("Pumer")
    assert torch.equal(run(model, x), expected)
    n = 16 + model.num_prefix_tokens
    assert counts(model) == ([(0, n), (3, n)] if how == "reduces_nothing" else [])


@pytest.mark.parametrize("config", CONFIGS)
def test_reduced_forward_agrees_across_attention_paths(config):
    x = images()
    outputs = []
    for fused in (True, False):
        model = make(config, fused=fused)
        pumer_patch.apply(model, layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3)
        outputs.append(run(model, x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# token arithmetic, merge_schedule, FLOPs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_counts_follow_the_documented_arithmetic(config):
    model = make(config)
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3)
    with torch.no_grad():
        features = model.forward_features(images())
    n, prefix, expected = 16 + model.num_prefix_tokens, model.num_prefix_tokens, []
    for layer in (1, 3):
        n, _ = pumer_patch.reduced_counts(n, 0, (0.2, 0.3, 0.0), image_protected=prefix)
        expected.append((layer, n))
    assert counts(model) == expected
    assert features.shape == (2, n, 32)
    assert torch.isfinite(model.forward_head(features)).all()


def test_merge_schedule_is_tome_r_per_block_added_to_the_ratios():
    model = make()  # 17 tokens: [CLS] + 16 patches
    pumer_patch.apply(model, merge_schedule=3)  # plain ToMe: no layers needed
    run(model, images())
    assert counts(model) == [(0, 14), (1, 11), (2, 8), (3, 5)]  # r = 3, at most half of the patches
    pumer_patch.apply(model, layers=[], merge_schedule=[0, 8, 0, 8])
    run(model, images())
    assert counts(model) == [(1, 9), (3, 5)]  # 16 -> 8 patches, then capped at half of 8
    # at layer 2: prune round(0.25 * 14) = 4 of 14, merge round(0.25 * 14) + 2 = 6 capped at 10 // 2
    pumer_patch.apply(model, layers=[2], prune_ratio=0.25, merge_ratio=0.25, merge_schedule=[2, 0, 2, 0])
    run(model, images())
    assert counts(model) == [(0, 15), (2, 6)]


def block_flops(n_in: int, n_out: int, dim: int, hidden: int) -> int:
    """One timm ``Block``: qkv + proj on ``n_in`` tokens, q k^T and attn v, then the MLP on ``n_out``."""
    return 2 * n_in * 4 * dim * dim + 4 * n_in * n_in * dim + 2 * n_out * 2 * dim * hidden


def reduce_flops(n: int, kept: int, prefix: int, dim: int, head_dim: int, cls_row: bool) -> int:
    """What a reduce step adds: relevance (one query row, or every non-prefix one) and ToMe's matching."""
    queries = 1 if cls_row else n - prefix
    mergeable = kept - prefix  # split alternately into sets A and B, compared on head-averaged keys
    return 2 * queries * n * dim + 2 * ((mergeable + 1) // 2) * (mergeable // 2) * head_dim


@pytest.mark.parametrize("config", ["vit", "avg_no_cls"])
def test_flops_drop_as_the_token_counts_predict(config):
    # eager attention: FlopCounterMode does not count the CPU SDPA kernel
    model = make(config, fused=False, img_size=64, embed_dim=64, depth=6)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def measure() -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            run(model, x)
        return counter.get_total_flops()

    dim, hidden, prefix = 64, model.blocks[0].mlp.fc1.out_features, model.num_prefix_tokens
    n0 = 64 + prefix
    base = measure()
    outside = base - sum(block_flops(n0, n0, dim, hidden) for _ in range(6))  # patch embedding, head
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.25, merge_ratio=0.3)
    reduced = measure()
    n, expected = n0, outside
    for i in range(6):
        n_out = n
        if i in (1, 3):
            n_out = pumer_patch.reduced_counts(n, 0, (0.25, 0.3, 0.0), image_protected=prefix)[0]
            kept = n - pumer_patch.prune_count(n, 0.25, prefix)
            expected += reduce_flops(n, kept, prefix, dim, dim // 2, model.has_class_token)
        expected += block_flops(n, n_out, dim, hidden)
        n = n_out
    assert counts(model)[-1][1] == n
    assert abs(reduced - expected) / expected < 0.05
    assert reduced / base < 0.6


# ---------------------------------------------------------------------------------------------
# pooling with sizes, relevance, trace
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["avg_no_cls", "siglip_map"])
def test_pooling_counts_merged_tokens_by_size(config):
    # merging only: every original token is covered, so pooling the merged tokens by size must equal
    # pooling the un-merged grid (for the latent attention pool: proportional attention, exactly)
    model = make(config)
    pumer_patch.apply(model, layers=[1, 2], merge_ratio=0.4, trace=True)
    with torch.no_grad():
        features = model.forward_features(images())
        pooled = model.pool(features)
        source = pumer_patch.last_trace(model).image.source
        full = pumer_patch.unmerge(features, source)  # (B, N0, C)
        expected = model.attn_pool(full) if config == "siglip_map" else full[:, model.num_prefix_tokens :].mean(dim=1)
    assert features.shape[1] < full.shape[1]
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


def test_relevance_option_and_received_attention_without_class_token():
    model = make("avg_no_cls")
    assert not model.has_class_token
    pumer_patch.apply(model, layers=[1], prune_ratio=0.5)
    assert model._pumer.plan.options.relevance == "received"
    run(model, images())
    assert counts(model) == [(1, 9)]  # the register kept, 8 of 16 patches pruned
    with pytest.raises(ValueError, match="relevance='cls' needs a class token"):
        pumer_patch.apply(model, layers=[1], prune_ratio=0.5, relevance="cls")
    vit = make("vit")
    pumer_patch.apply(vit, layers=[1], prune_ratio=0.5)
    assert vit._pumer.plan.options.relevance == "cls"
    cls_out = run(vit, images())
    pumer_patch.apply(vit, layers=[1], prune_ratio=0.5, relevance="received")
    assert not torch.equal(run(vit, images()), cls_out)


def test_trace_sizes_and_sources_protect_the_prefix():
    model = make("deit_distilled")
    pumer_patch.apply(model, layers=[0, 2], prune_ratio=0.2, merge_ratio=0.3, trace=True)
    run(model, images())
    image = pumer_patch.last_trace(model).image
    covered = torch.zeros_like(image.size).scatter_add_(1, image.source.clamp_min(0), (image.source >= 0).float())
    assert torch.equal(covered, image.size)
    assert (image.source[:, :2] == torch.tensor([0, 1])).all()  # [CLS] and distillation token kept, first
    assert image.x.shape[1] == image.size.shape[1] == pumer_patch.last_trace(model).counts[-1].image


def test_attn_mask_cannot_follow_a_reduction():
    model = make()
    pumer_patch.apply(model, layers=[1], merge_ratio=0.3)
    with pytest.raises(ValueError, match="attn_mask / is_causal"):
        model.forward_features(images(), attn_mask=torch.zeros(17, 17))


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


def test_attention_of_another_class_is_refused():
    # an instance-bound method is refused for every family in test_contract.py; this is a subclass
    model = make()
    model.blocks[1].attn.__class__ = type("ToMeAttention", (type(model.blocks[1].attn),), {})
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\[1\]\.attn is ToMeAttention"):
        pumer_patch.apply(model, layers=[1], prune_ratio=0.2)
    assert same(snapshot(model), before)


def test_other_timm_block_classes_are_refused_naming_what_is_supported():
    respost = timm.create_model("vit_tiny_patch16_224", pretrained=False, block_fn=ResPostBlock, **TINY)
    before = snapshot(respost)
    with pytest.raises(ValueError, match="timm's ResPostBlock, not supported: .*vision_transformer.Block"):
        pumer_patch.apply(respost, layers=[1], merge_ratio=0.2)
    assert same(snapshot(respost), before)
    # Eva and Beit have their own adapter (timm_eva); other timm ViT families are refused
    relpos = timm.create_model("vit_relpos_base_patch16_224", pretrained=False, **{**TINY, "depth": 2})
    with pytest.raises(ValueError, match="timm's VisionTransformerRelPos has its own block classes; .* supports timm"):
        pumer_patch.apply(relpos, layers=[1], merge_ratio=0.2)
    assert not pumer_patch.is_patched(relpos)


# ---------------------------------------------------------------------------------------------
# precision (bf16 autocast and float64: test_contract.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["vit", "siglip_map"])
def test_bfloat16_weights_run(config):
    model = make(config)
    pumer_patch.apply(model, layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3)
    assert torch.isfinite(run(model.to(torch.bfloat16), images().bfloat16())).all()


def test_float16_keys_too_large_for_float16_dot_products_still_merge():
    model = make()
    with torch.no_grad():  # keys whose fp16 dot products pass 65504; q shrunk to keep the attention logits sane
        for block in model.blocks:
            block.attn.qkv.weight[:32] /= 1000.0
            block.attn.qkv.weight[32:64] *= 1000.0
    model = model.half()
    pumer_patch.apply(model, layers=[0, 1, 2], merge_ratio=0.3, trace=True)
    out = run(model, images().half())
    image = pumer_patch.last_trace(model).image
    assert torch.isfinite(out).all() and torch.isfinite(image.x).all()
    assert counts(model) == [(0, 12), (1, 9), (2, 7)]


def test_an_untested_timm_version_warns_at_the_apply_call(monkeypatch):
    monkeypatch.setattr(timm, "__version__", "0.9.16")
    with pytest.warns(UserWarning, match=r"repeats .* as of timm 1\.0\.\.<2; found 0\.9\.16") as warned:
        pumer_patch.apply(make("vit"), layers=[1], merge_ratio=0.3)
    assert warned[0].filename == __file__  # reported at the caller's line


def test_backward_hooks_on_a_block_called_whole_still_run_and_refusals_follow_the_schedule():
    # only a block the loop runs in parts refuses backward hooks; blocks called whole keep torch's
    model = make()
    grads: list[torch.Size] = []
    model.blocks[0].register_full_backward_hook(lambda _m, _gi, go: grads.append(go[0].shape))
    pumer_patch.apply(model, layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3)
    model(images()).sum().backward()
    assert grads == [torch.Size([2, 17, 32])]
    # with merge_schedule every block that merges runs in parts: block 0 too
    with pytest.raises(ValueError, match=r"VisionTransformer.blocks\[0\] \(Block\) has a backward hook"):
        pumer_patch.apply(model, layers=[], merge_schedule=[2, 0, 0, 0])
    pumer_patch.apply(model, layers=[], merge_schedule=[0, 2, 2, 0])  # block 0 whole again: allowed
    model(images()).sum().backward()
    assert len(grads) == 2
