"""timm Eva and Beit (``adapters/timm_eva.py``): positions travel with the tokens, prefix tokens stay.

The contract suite covers parity, remove, copies, training, precision and compile on the tiny
entries of ``contract_models``; here: a pruned model equals timm's own blocks run on the survivors
with the survivors' rotary rows / relative-bias rows and columns (and not with the first rows), the
fractional rotary of a merged token equals timm's table at that coordinate, registers and [CLS]
are never pruned or merged, and the refusals.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import apply_keep_indices_nlc, create_rope_embed
from torch import Tensor, nn

import pumer_patch
from pumer_patch.adapters._positions import Positions, rope_rows, rope_slope
from pumer_patch.core import reduced_counts

TINY = dict(pretrained=False, img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def _images(batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _eva(name: str, **overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**TINY, **overrides}).eval()


def _sharpen(model: nn.Module) -> nn.Module:
    """Scale the q/k/v projections up: random tiny attention is near uniform and would ignore positions."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj")):
                module.weight.mul_(15)
    return model


def _survivors(model: nn.Module) -> Tensor:
    """(B, K) original indices of the tokens the last forward kept (prune only: each covers itself)."""
    source = pumer_patch.last_trace(model).image.source  # (B, N0): current index or -1
    return torch.stack([torch.nonzero(row >= 0).flatten() for row in source])


# ---------------------------------------------------------------------------------------------
# pruning keeps each survivor's position
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["vit_betwixt_patch16_rope_reg4_gap_256", "vit_small_patch16_dinov3", "vit_pe_core_tiny_patch16_384"]
)
def test_pruned_eva_equals_timms_blocks_on_the_survivors_with_their_rotary_rows(name):
    model = _sharpen(_eva(name, use_abs_pos_emb=False, init_values=1.0))  # positions only from RoPE
    x = _images()
    npt = model.num_prefix_tokens
    pumer_patch.apply(model, layers=[1], prune_ratio=0.5, trace=True)
    with torch.no_grad():
        patched = model.forward_features(x)
        keep = _survivors(model)  # (B, K): the prefix, then the surviving patches in order
        pumer_patch.remove(model)
        tokens, rope = model._pos_embed(model.patch_embed(x))
        tokens = model.norm_pre(tokens)
        for block in model.blocks[:2]:
            tokens = block(tokens, rope=rope)  # the MLP is per token: pruning before it = pruning after it
        tokens = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        patches = keep[:, npt:] - npt

        def rest(rows: Tensor) -> Tensor:
            out = tokens
            for block in model.blocks[2:]:
                out = block(out, rope=rows)
            return model.norm(out)

        # timm's own way of giving kept tokens their rows (its patch dropout): (B, K, 2D) -> (B, 1, K, 2D)
        expected = rest(apply_keep_indices_nlc(tokens, rope, patches).unsqueeze(1))
        first_rows = rest(rope[: patches.shape[1]])  # what forgetting the positions would give
    assert keep.shape[1] == npt + 32 and not torch.equal(patches, torch.arange(32).expand(2, -1))
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first_rows, expected, rtol=1e-3, atol=1e-4)  # the test can tell


def _beit(shared: bool) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", **TINY, use_rel_pos_bias=not shared,
                              use_shared_rel_pos_bias=shared).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name:
                param.copy_(torch.randn(param.shape, generator=g))  # the same table in every block
                g.manual_seed(1)
    return model


def test_pruned_beit_equals_timms_blocks_on_the_survivors_with_their_bias_rows_and_columns():
    model = _beit(shared=True)
    x = _images()
    pumer_patch.apply(model, layers=[1], prune_ratio=0.5, trace=True)
    with torch.no_grad():
        patched = model.forward_features(x)
        keep = _survivors(model)
        pumer_patch.remove(model)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], dim=1)
        bias = model.rel_pos_bias()  # (H, N0, N0)
        for block in model.blocks[:2]:
            tokens = block(tokens, shared_rel_pos_bias=bias)
        tokens = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))

        def rest(cells: Tensor) -> Tensor:
            rows = torch.stack([bias[:, c][:, :, c] for c in cells])  # (B, H, K, K)
            out = tokens
            for block in model.blocks[2:]:
                out = block(out, shared_rel_pos_bias=rows)
            return model.norm(out)

        expected = rest(keep)
        first = rest(torch.arange(keep.shape[1]).expand(2, -1))
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("position", ["mean", "destination"])
def test_beits_own_bias_per_block_is_gathered_like_the_shared_one(position):
    # the same table as each block's own and as the shared one: both paths must give the same model
    own, shared = _beit(shared=False), _beit(shared=True)
    state = {k: v for k, v in own.state_dict().items() if "relative_position" not in k}
    shared.load_state_dict(state, strict=False)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(own(x), shared(x), rtol=1e-5, atol=1e-6)
        for model in (own, shared):
            pumer_patch.apply(model, layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3, merge_position=position)
        torch.testing.assert_close(own(x), shared(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# a merged token's rotary at its mean coordinate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        dict(rope_type="cat", in_pixels=False),
        dict(rope_type="dinov3"),
        dict(rope_type="cat", in_pixels=False, grid_indexing="xy"),
    ],
)
def test_rotary_at_a_fractional_coordinate_is_timms_table_there(kind):
    def table(offset: float) -> Tensor:
        rope = create_rope_embed(dim=64, num_heads=2, feat_shape=[8, 8], grid_offset=offset, **kind)
        return rope.get_embed()  # (64, 2 * 32)

    base, shifted = table(0.0), table(0.5)  # shifted: every cell at (row + 0.5, col + 0.5)
    cell = torch.arange(64).expand(3, -1)
    coord = torch.stack([cell // 8, cell % 8], dim=-1).float() + 0.5
    turned = rope_rows(base, Positions(cell, coord), 8, rope_slope(base, (8, 8)))  # (3, 1, 64, 64)
    torch.testing.assert_close(turned[:, 0], shifted.expand(3, -1, -1), rtol=1e-4, atol=1e-5)
    at_cells = rope_rows(base, Positions(cell, coord - 0.5), 8, rope_slope(base, (8, 8)))
    assert torch.equal(at_cells[:, 0], base.expand(3, -1, -1))  # a token at its own cell: the table's row


def test_merge_position_changes_a_rope_models_output():
    x = _images()
    outputs = {}
    for position in ("mean", "destination"):
        model = pumer_patch.apply(_eva("eva02_tiny_patch14_224", use_abs_pos_emb=False), layers=[0, 1],
                                  merge_ratio=0.4, merge_position=position)
        with torch.no_grad():
            outputs[position] = model(x)
    assert not torch.allclose(outputs["mean"], outputs["destination"])


# ---------------------------------------------------------------------------------------------
# registers and [CLS] are protected; counts
# ---------------------------------------------------------------------------------------------


def test_cls_and_registers_are_never_pruned_or_merged():
    model = _eva("vit_small_patch16_dinov3")  # [CLS] + 4 registers
    npt = model.num_prefix_tokens
    assert npt == 5
    pumer_patch.apply(model, layers=[0, 1, 2, 3], prune_ratio=0.3, merge_ratio=0.45, trace=True)
    with torch.no_grad():
        model(_images())
    trace = pumer_patch.last_trace(model)
    assert torch.equal(trace.image.source[:, :npt], torch.arange(npt).expand(2, -1))  # each covers itself
    assert (trace.image.size[:, :npt] == 1).all() and trace.image.size[:, npt:].max() > 1
    patches = trace.image.source[:, npt:]
    assert not ((patches >= 0) & (patches < npt)).any()  # no patch went into a prefix token
    n = npt + 64
    for count in trace.counts:
        n, _ = reduced_counts(n, 0, dict(prune=0.3, merge=0.45, text_merge=0.0), image_protected=npt)
        assert count.image == n
    assert trace.grid == (8, 8)


# ---------------------------------------------------------------------------------------------
# refusals and pooling
# ---------------------------------------------------------------------------------------------


def test_patch_dropout_in_training_is_refused_while_reducing():
    model = pumer_patch.apply(_eva("eva02_tiny_patch14_224", patch_drop_rate=0.25).train(), layers=[1], merge_ratio=0.3)
    with pytest.raises(ValueError, match="patch dropout .* train with patch_drop_rate=0"):
        model(_images())
    model.eval()
    assert model(_images()).shape == (2, 5)  # inference: timm's patch dropout is off


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_forward_intermediates_refused_and_features_pooled_by_size(name):
    model = pumer_patch.apply(_eva(name), layers=[1], merge_ratio=0.4)
    x = _images()
    with pytest.raises(ValueError, match="forward_intermediates .* full patch grid"):
        model.forward_intermediates(x)
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.equal(model.forward_head(features), model(x))
        with pytest.raises(pumer_patch.TokenSizesLost, match="pooling got features whose token sizes are unknown"):
            model.forward_head(features.clone())


def test_plain_vits_stay_with_the_timm_adapter():
    model = timm.create_model("test_vit", pretrained=False)  # a plain ViT: the timm adapter's, not ours
    pumer_patch.apply(model, layers=[1], merge_ratio=0.3)
    assert model._pumer.adapter == "timm"
    assert pumer_patch.apply(_eva("eva02_tiny_patch14_224"), layers=[1], merge_ratio=0.3)._pumer.adapter == "timm_eva"
