"""open_clip adapter: image tower only, text tower untouched, FLOPs, pooling, text guidance, refusals.

The contract (parity, remove, copies, bad input, training, checkpointing, bf16 autocast, ...) is in
test_contract.py, on these configs among others.
"""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIP
from open_clip.timm_model import TimmModel
from open_clip.transformer import Transformer, VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import pumer_patch
from model_state import same, snapshot
from pumer_patch.adapters.guidance import guide_of
from pumer_patch.adapters.open_clip import PumerTransformer, text_guidance
from pumer_patch.adapters.timm import PumerTimmVisionTransformer

TEXT = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=2)
VISION = dict(image_size=32, patch_size=8, width=32, layers=4, head_width=16)  # 16 patches + [CLS]

CONFIGS = {
    "vit_b32": dict(vision_cfg=VISION, text_cfg=TEXT),  # ViT-B-32's layout, shrunk
    "clipa_avg": dict(  # CLIPA: average pooling, final LayerNorm after pooling, no ln_pre
        vision_cfg=dict(VISION, pool_type="avg", final_ln_after_pool=True, no_ln_pre=True),
        text_cfg=dict(TEXT, pool_type="last", no_causal_mask=True),
    ),
}


def make(config: str = "vit_b32", seed: int = 0, **vision) -> CLIP:
    torch.manual_seed(seed)
    cfg = CONFIGS[config]
    return CLIP(embed_dim=24, vision_cfg={**cfg["vision_cfg"], **vision}, text_cfg=cfg["text_cfg"]).eval()


def images(batch: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def texts(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 50, (batch, 8), generator=torch.Generator().manual_seed(seed))


def encode(model: CLIP, what: str = "image") -> torch.Tensor:
    with torch.no_grad():
        if what == "image":
            return model.encode_image(images())
        if what == "text":
            return model.encode_text(texts())
        image_features, text_features = model(images(), texts())[:2]  # model(image, text): both towers
        return torch.cat([image_features, text_features])


def counts(model) -> list[tuple[int, int]]:
    return [(c.layer, c.image) for c in pumer_patch.last_trace(model).counts]


# ---------------------------------------------------------------------------------------------
# the image tower alone is patched; the text tower is never touched
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_only_the_image_tower_is_patched_and_text_stays_bit_identical(config):
    model = make(config)
    text, both, image = encode(model, "text"), encode(model, "both"), encode(model, "image")
    pumer_patch.apply(model, layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3)
    assert pumer_patch.patched_roots(model) == [model.visual]
    assert type(model.transformer) is Transformer and type(model.visual.transformer) is PumerTransformer
    assert torch.equal(encode(model, "text"), text)
    assert torch.equal(encode(model, "both")[2:], both[2:])  # model(image, text)'s text half
    assert not torch.equal(encode(model, "image"), image)
    assert counts(model) == [(1, 9), (2, 5)]


def test_attentional_pooler_tower_coca_style():
    torch.manual_seed(0)
    tower = VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=4, heads=2, mlp_ratio=4.0, output_dim=24, output_tokens=True,
        attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2,
    ).eval()
    with torch.no_grad():
        pooled, tokens = tower(images())
    pumer_patch.apply(tower, layers=[1], prune_ratio=0.0)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(tower(images()), (pooled, tokens)))
    pumer_patch.apply(tower, layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3)
    assert tower._pumer.plan.options.relevance == "received"  # the pooler does not read [CLS]
    with torch.no_grad():
        pooled2, tokens2 = tower(images())
    assert pooled2.shape == pooled.shape and tokens2.shape == tokens.shape and torch.isfinite(pooled2).all()


def test_timm_trunk_belongs_to_the_timm_adapter():
    torch.manual_seed(0)
    vision = dict(timm_model_name="test_vit", timm_pool="", timm_proj="linear", image_size=32)
    model = CLIP(embed_dim=24, vision_cfg=vision, text_cfg=TEXT).eval()
    expected = encode(model, "image")
    text = encode(model, "text")
    pumer_patch.apply(model, layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3)
    assert pumer_patch.patched_roots(model) == [model.visual.trunk]
    assert type(model.visual) is TimmModel and type(model.visual.trunk) is PumerTimmVisionTransformer
    assert model.visual.trunk._pumer.adapter == "timm"
    assert encode(model, "image").shape == expected.shape
    n = 5  # test_vit: 2 x 2 patches of 16 x 16 and [CLS]
    for layer in (1, 2):
        n, _ = pumer_patch.reduced_counts(n, 0, (0.2, 0.3, 0.0))
        assert (layer, n) in counts(model)
    assert torch.equal(encode(model, "text"), text)
    pumer_patch.remove(model)
    assert torch.equal(encode(model, "image"), expected)


# ---------------------------------------------------------------------------------------------
# token arithmetic, FLOPs, pooling with sizes
# ---------------------------------------------------------------------------------------------


def test_counts_and_merge_schedule():
    model = make()
    pumer_patch.apply(model, layers=[0, 2], prune_ratio=0.25, merge_ratio=0.25)
    encode(model)
    n, expected = 17, []
    for layer in (0, 2):
        n, _ = pumer_patch.reduced_counts(n, 0, (0.25, 0.25, 0.0))
        expected.append((layer, n))
    assert counts(model) == expected
    pumer_patch.apply(model, layers=[], merge_schedule=[4, 0, 4, 4], mode="default")
    encode(model)
    assert counts(model) == [(0, 13), (2, 9), (3, 5)]


def test_flops_drop_as_the_token_counts_predict():
    # with grad enabled MHA runs its in/out projections as counted linears; the CPU SDPA kernel is not
    # counted, so this checks the linear FLOPs and the reduce step's: recomputed keys, the [CLS] query
    # row, its attention row and ToMe's matching on the head-averaged keys
    model = make(image_size=64, width=64, head_width=32, layers=6)
    x = images(batch=1, size=64)

    def measure() -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            model.encode_image(x)
        return counter.get_total_flops()

    c, n0 = 64, 65
    base = measure()
    outside = base - 6 * 24 * n0 * c * c  # patch embedding, projection
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.25, merge_ratio=0.3)
    reduced = measure()
    n, expected = n0, outside
    for i in range(6):
        if i in (1, 3):
            n_out = pumer_patch.reduced_counts(n, 0, (0.25, 0.3, 0.0))[0]
            mergeable = n - pumer_patch.prune_count(n, 0.25, 1) - 1
            # attention linears on n, keys recomputed (2 n C^2) and the [CLS] query row, MLP on n_out
            expected += 8 * n * c * c + 2 * n * c * c + 2 * c * c + 16 * n_out * c * c
            expected += 2 * n * c + 2 * ((mergeable + 1) // 2) * (mergeable // 2) * (c // 2)
            n = n_out
        else:
            expected += 24 * n * c * c
    assert counts(model)[-1][1] == n
    assert abs(reduced - expected) / expected < 0.05
    assert reduced / base < 0.6


def test_average_pooling_counts_merged_tokens_by_size():
    model = make("clipa_avg")
    pumer_patch.apply(model, layers=[1, 2], merge_ratio=0.4, trace=True)
    visual = model.visual
    seen: dict[str, torch.Tensor] = {}
    hook = visual.transformer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("tokens", out))
    with torch.no_grad():
        embedding = visual(images())  # the tower's own forward, pooling included
        hook.remove()
        tokens = seen["tokens"]
        full = pumer_patch.unmerge(tokens, pumer_patch.last_trace(model).image.source)
        expected = visual.ln_post(full[:, 1:].mean(dim=1)) @ visual.proj  # final_ln_after_pool
    assert tokens.shape[1] < full.shape[1]
    torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# text guidance
# ---------------------------------------------------------------------------------------------


def test_text_guidance_prunes_the_tokens_closest_to_the_text():
    model = make()
    pumer_patch.apply(model, layers=[0], prune_ratio=0.5, trace=True)
    block = model.visual.transformer.resblocks[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        block.ln_1.register_forward_hook(lambda _m, i, _o: seen.__setitem__("x", i[0])),
        block.attn.register_forward_hook(lambda _m, _i, o: seen.__setitem__("attn", o[0])),
    ]
    query = encode(model, "text")
    with text_guidance(model, query):
        guided = encode(model, "image")
    for hook in hooks:
        hook.remove()
    kept = pumer_patch.last_trace(model).image.source >= 0  # (B, 17)
    with torch.no_grad():
        x = seen["x"] + seen["attn"]  # the tokens after the attention residual, where pruning happens
        tokens = torch.nn.functional.normalize(model.visual.ln_post(x) @ model.visual.proj, dim=-1)
        similarity = torch.einsum("bnd,bd->bn", tokens, torch.nn.functional.normalize(query, dim=-1))
    top = similarity[:, 1:].topk(8, dim=1).indices + 1
    expected = torch.zeros_like(kept)
    expected[:, 0] = True
    expected.scatter_(1, top, True)
    assert torch.equal(kept, expected)
    assert guide_of(model.visual._pumer) is None  # the guidance ends with the block
    assert not torch.equal(encode(model, "image"), guided)


def test_text_guidance_errors():
    model = make()
    with pytest.raises(ValueError, match="needs an open_clip image tower patched"):
        with text_guidance(model, torch.randn(2, 24)):
            pass
    pumer_patch.apply(model, layers=[1], merge_ratio=0.3)
    with pytest.raises(ValueError, match="prunes nothing"):
        with text_guidance(model, torch.randn(2, 24)):
            pass
    pumer_patch.apply(model, layers=[1], prune_ratio=0.3)
    with pytest.raises(ValueError, match=r"shape \(B, 24\)"):
        with text_guidance(model, torch.randn(2, 32)):
            pass
    with pytest.raises(ValueError, match="3 text features for a batch of 2"):
        with text_guidance(model, torch.randn(3, 24)):
            encode(model)
    assert guide_of(model.visual._pumer) is None
    with text_guidance(model, torch.randn(24)):  # one query for the whole batch
        assert torch.isfinite(encode(model)).all()


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


def test_custom_attention_blocks_are_refused():
    custom = make(qk_norm=True)  # open_clip switches to CustomResidualAttentionBlock
    before = snapshot(custom)
    with pytest.raises(ValueError, match="CustomResidualAttentionBlock .* not supported"):
        pumer_patch.apply(custom, layers=[1], merge_ratio=0.2)
    assert same(snapshot(custom), before)


# ---------------------------------------------------------------------------------------------
# precision (bf16 autocast and float64: test_contract.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_bfloat16_weights_run(config):
    model = make(config)
    pumer_patch.apply(model, layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(images().bfloat16())).all()
