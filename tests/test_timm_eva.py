"""timm Eva and Beit (``adapters/timm_eva.py``): positions travel with the tokens, prefix tokens stay.

The contract suite covers parity, remove, copies, training, precision and compile on the tiny
entries of ``contract_models``; here: a pruned model equals timm's own blocks run on the survivors
with the survivors' rotary rows / relative-bias rows and columns (and not with the first rows), the
rotary of a merged token equals timm's at its coordinate for every rope family on every grid from
2 x 2 (training augmentation included), registers and [CLS] are never pruned or merged, and the
refusals.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import (
    RotaryEmbedding,
    RotaryEmbeddingCat,
    RotaryEmbeddingMixed,
    RotaryEmbeddingMRope,
    _apply_coord_augs,
    _build_grid,
    apply_keep_indices_nlc,
    get_mixed_freqs,
    get_mixed_grid,
)
from timm.models.eva import Eva
from torch import Tensor, nn

import pumer_patch
from pumer_patch.adapters._positions import Positions, RopeUnresolved, rope_rows, rope_slope
from pumer_patch.adapters.timm_eva import rope_steps
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


# every rope family of timm's Eva, as timm builds it: (name or builder, rope kind)
ROPE_FAMILIES = {
    "eva02": "eva02_tiny_patch14_224",  # cat, cells scaled to a 16 x 16 reference grid
    "pe": "vit_pe_core_tiny_patch16_384",  # cat, 24 x 24 reference, grid offset 1, xy
    "dinov3": "vit_small_patch16_dinov3",  # dinov3: [-1, 1]-centred cells, dynamic size
    "rope_vit": "vit_betwixt_patch16_rope_reg4_gap_256",  # cat, plain cell indices
    "mixed": "vit_small_patch16_rope_mixed_224",  # mixed: learned frequencies per block and head
    "mrope": None,  # mrope: no registered model, built as Eva(rope_type="mrope")
}


def _grid(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def _rope_model(family: str, size: int | tuple[int, int], **overrides: object) -> nn.Module:
    """A tiny Eva of ``family`` with a ``size`` x ``size`` (or (H, W)) patch grid (8-pixel patches)."""
    name = ROPE_FAMILIES[family]
    image = tuple(8 * n for n in _grid(size))
    if name is None:
        torch.manual_seed(0)
        args = {k: v for k, v in TINY.items() if k != "pretrained"}
        return Eva(**{**args, "img_size": image, "use_rot_pos_emb": True, "rope_type": "mrope", **overrides}).eval()
    return _eva(name, img_size=image, **overrides)


def _table(model: nn.Module, size: int | tuple[int, int]) -> Tensor:
    """The rotary table timm's forward reads: (N0, 2D), or (depth, heads, N0, 2D) for mixed RoPE."""
    return model._pos_embed(model.patch_embed(torch.zeros(1, 3, *(8 * n for n in _grid(size)))))[1]


def _table_moved(model: nn.Module, size: int | tuple[int, int], delta: float) -> Tensor:
    """timm's rotary with every cell moved by ``delta`` cells along both axes, like ``_table``.

    cat / dinov3: the same rope with ``grid_offset`` + delta (offsets count cells, and in training
    the same augmentation draws follow); mixed and mrope have no offset, so their own frequencies
    at the moved coordinates (``get_mixed_freqs`` after the same draws; mrope's ``get_embed`` lines).
    """
    rope = copy.deepcopy(model.rope)
    grid = list(_grid(size))
    if isinstance(rope, RotaryEmbeddingMixed):
        coords = torch.stack(get_mixed_grid(grid, grid_indexing=rope.grid_indexing), dim=-1) + delta
        if rope.training and rope.aug_active:  # the draws its get_embed makes
            coords = _apply_coord_augs(coords, rope.shift_coords, rope.jitter_coords, rope.rescale_coords)
        return get_mixed_freqs(rope.freqs, coords[:, 0], coords[:, 1]).detach()
    if isinstance(rope, RotaryEmbeddingMRope):
        coords = _build_grid(grid, grid_indexing=rope.grid_indexing, ndim=2).reshape(-1, 2) + delta
        pos = torch.cat([torch.zeros_like(coords[:, :1]), coords], dim=-1).index_select(-1, rope.axis)
        angles = pos * rope.inv_freq
        return torch.cat([angles.sin(), angles.sin(), angles.cos(), angles.cos()], dim=-1)
    rope.grid_offset += delta
    rope.reset_parameters()  # rebuilds a cached table at the new offset
    return rope.get_embed(shape=grid) if model.dynamic_img_size else rope.get_embed()


def _per_block(model: nn.Module, table: Tensor) -> list[tuple[Tensor, Tensor | None]]:
    """(table, block) pairs: one per block for mixed RoPE, else the one table."""
    if model.rope_mixed:
        return [(table[i], i) for i in range(table.shape[0])]
    return [(table, None)]


@pytest.mark.parametrize("size", range(2, 9))
@pytest.mark.parametrize("family", list(ROPE_FAMILIES))
def test_a_merged_tokens_rotary_is_timms_at_its_coordinate_on_every_grid(family, size):
    """On small grids the rotary's per-step angle exceeds pi (EVA02 / DINOv3 up to 4 x 4, PE up to 6 x 6):
    a slope read off the table alone turned merged tokens by its alias, up to 2.0 off."""
    model = _rope_model(family, size)
    if family == "mixed":
        with torch.no_grad():
            model.rope.freqs.mul_(4)  # learned frequencies may grow past pi per step
    grid = (size, size)
    table = _table(model, size)
    nominal, spread = rope_steps(model.rope, grid)
    cell = torch.arange(size * size).expand(2, -1)
    coord = torch.stack([cell // size, cell % size], dim=-1).float()  # (2, M, 2) every cell's (row, col)
    destination = cell.flip(-1)  # a merged token keeps its destination's cell, not its coordinate's
    moved = {delta: _table_moved(model, size, delta) for delta in (0.5, 0.25, -0.375)}
    for rows, block in _per_block(model, table):
        slope = rope_slope(rows, grid, nominal if block is None else nominal[block], spread)
        at_cells = rope_rows(rows, Positions(destination, coord), size, slope)  # (2, 1 or heads, M, 2D)
        assert torch.equal(at_cells, rows.expand_as(at_cells))  # a coordinate on a cell: that cell's row, bit for bit
        for delta, expected in moved.items():
            turned = rope_rows(rows, Positions(destination, coord + delta), size, slope)
            want = expected if block is None else expected[block]
            torch.testing.assert_close(turned, want.expand_as(turned), rtol=0, atol=2e-5)


def _slopes(model: nn.Module, grid: tuple[int, int]) -> list[Tensor]:
    nominal, spread = rope_steps(model.rope, grid)
    return [rope_slope(rows, grid, nominal if block is None else nominal[block], spread)
            for rows, block in _per_block(model, _table(model, grid))]


@pytest.mark.parametrize("grid", [(2, 5), (5, 3), (1, 6), (5, 1)])
@pytest.mark.parametrize("family", list(ROPE_FAMILIES))
def test_a_merged_tokens_rotary_is_timms_on_grids_that_are_not_square_one_row_or_one_column_included(family, grid):
    """A one-row (or one-column) grid crashed reading a step along its axis of one cell; it has slope 0 there
    and, along the other axis, the step of a two-row grid of the same width (each axis is scaled alone)."""
    model = _rope_model(family, grid)
    if 1 not in grid:  # every token a quarter step along both axes: timm's rotary there
        expected = _table_moved(model, grid, 0.25)
        cell = torch.arange(grid[0] * grid[1])[None]
        coord = torch.stack([cell // grid[1], cell % grid[1]], dim=-1).float() + 0.25
        for (rows, block), slope in zip(_per_block(model, _table(model, grid)), _slopes(model, grid)):
            turned = rope_rows(rows, Positions(cell, coord), grid[1], slope)
            want = expected if block is None else expected[block]
            torch.testing.assert_close(turned, want.expand_as(turned), rtol=0, atol=2e-5)
    else:
        short = grid.index(1)
        wider = tuple(2 if n == 1 else n for n in grid)
        for slope, other in zip(_slopes(model, grid), _slopes(_rope_model(family, wider), wider)):
            assert torch.equal(slope[..., short], torch.zeros_like(slope[..., short]))
            torch.testing.assert_close(slope[..., 1 - short], other[..., 1 - short], rtol=0, atol=1e-5)
    merged = pumer_patch.apply(model, layers=[0, 1], merge_ratio=0.5)
    with torch.no_grad():
        out = merged(torch.randn(2, 3, 8 * grid[0], 8 * grid[1], generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("family", ["eva02", "dinov3", "mixed"])
def test_the_rotary_follows_timms_coordinate_augmentation_in_training(family, size):
    """Shift, per-axis jitter and rescale change every step by a random factor that the table alone holds."""
    model = _rope_model(family, size, rope_shift_coords=0.5, rope_jitter_coords=1.5, rope_rescale_coords=2.0).train()
    grid = (size, size)
    nominal, spread = rope_steps(model.rope, grid)
    assert spread == 3.0
    cell = torch.arange(size * size)[None]
    coord = torch.stack([cell // size, cell % size], dim=-1).float() + 0.5
    for seed in range(3):  # the same draws for the table and for timm's moved table
        torch.manual_seed(seed)
        table = _table(model, size)
        torch.manual_seed(seed)
        expected = _table_moved(model, size, 0.5)
        for rows, block in _per_block(model, table):
            slope = rope_slope(rows, grid, nominal if block is None else nominal[block], spread)
            turned = rope_rows(rows, Positions(cell, coord), size, slope)
            want = expected if block is None else expected[block]
            torch.testing.assert_close(turned, want.expand_as(turned), rtol=0, atol=2e-5)


def test_an_unresolvable_or_foreign_rotary_is_refused_with_the_reason():
    # pixel-band RoPE on a 4 x 4 grid under x2 rescale: even its lowest frequency may alias
    rope = RotaryEmbeddingCat(16, in_pixels=True, feat_shape=[4, 4], rescale_coords=2.0).train()
    nominal, spread = rope_steps(rope, (4, 4))
    with pytest.raises(RopeUnresolved, match="cannot be told apart from its aliases .* merge_position='destination'"):
        rope_slope(rope.get_embed(), (4, 4), nominal, spread)
    rope.eval()  # unaugmented, the closed form names every branch
    rope_slope(rope.get_embed(), (4, 4), nominal, 1.0)
    # a closed form that is not the table's (here: another grid's) is refused, not trusted
    other, _ = rope_steps(RotaryEmbeddingCat(16, in_pixels=True, feat_shape=[7, 7]), (7, 7))
    with pytest.raises(RopeUnresolved, match="differ from the closed form"):
        rope_slope(rope.get_embed(), (4, 4), other, 1.0)
    # a rope module whose closed form pumer_patch does not know: "mean" refused at apply, "destination" fine
    model = _eva("eva02_tiny_patch14_224")
    model.rope = RotaryEmbedding(16, in_pixels=False, feat_shape=[8, 8])
    with pytest.raises(ValueError, match="merge_position='mean' .* RotaryEmbedding: use merge_position='destination'"):
        pumer_patch.apply(model, layers=[1], merge_ratio=0.3)
    assert not pumer_patch.is_patched(model)
    pumer_patch.apply(model, layers=[1], merge_ratio=0.3, merge_position="destination")


@pytest.mark.parametrize("family", list(ROPE_FAMILIES))
def test_mean_merging_runs_on_every_small_grid(family):
    for size in (2, 3, 4):
        model = pumer_patch.apply(_rope_model(family, size), layers=[0, 1], merge_ratio=0.5)
        with torch.no_grad():
            out = model(torch.randn(2, 3, 8 * size, 8 * size, generator=torch.Generator().manual_seed(size)))
        assert out.shape == (2, 5) and torch.isfinite(out).all()


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
