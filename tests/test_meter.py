"""METER adapter: where and how PuMer reduces inside the fusion blocks, ToMe in the CLIP tower."""

from __future__ import annotations

import pytest
import torch

import pumer_patch
from pumer_patch.models.meter import (
    MeterConfig,
    MeterForImageAndTextRetrieval,
    MeterForPreTraining,
    MeterForQuestionAnswering,
    MeterForVisualEntailment,
    MeterForVisualReasoning,
)


def config(**kw) -> MeterConfig:
    base = dict(
        image_size=32, vit_patch_size=8, hidden_size=32, num_heads=2, num_layers=2, num_top_layer=4, vocab_size=100,
        vision_width=24, vision_layers=3, vision_heads=2, text_hidden_size=16, text_intermediate_size=32,
        max_position_embeddings=42, vqa_label_size=7,
    )
    return MeterConfig(**{**base, **kw})


def make(cls=MeterForQuestionAnswering, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(config(**kw)).eval()


def batch(b: int = 2, t: int = 12, pad: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, t - pad :] = 0  # the last sample is padded
    ids = torch.randint(3, 100, (b, t), generator=g).masked_fill(mask == 0, 1)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(b, 3, 32, 32, generator=g)}


def counts(model) -> list[tuple[int, int, int]]:
    return [(c.layer, c.image, c.text) for c in pumer_patch.last_trace(model).counts]


@pytest.mark.parametrize("order", ["sequential", "parallel"])
@pytest.mark.parametrize("masking", ["pumer", "additive"])
@pytest.mark.parametrize("mode", ["default", "reference"])
def test_zero_reduction_is_bit_identical(order, masking, mode):
    model = make(fusion_order=order, fusion_masking=masking)
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        pumer_patch.apply(model, layers=[0, 2], ratios="p0-r0-t0", mode=mode)
        assert torch.equal(model(**inputs).logits, expected)
        # a schedule that runs the patched fusion loop but reduces nothing at the planned blocks
        pumer_patch.apply(model, layers=[1], ratios="p0-r0.01-t0", mode=mode)
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize(
    ("paper", "size", "text", "expected"),
    [  # docs/design.md's table, reference arithmetic (image incl. [CLS] / text)
        ("p0.2r0.2t0.2-0246", 384, 32, [(577, 32), (347, 26), (209, 21), (125, 17), (75, 14)]),
        ("p0.3r0.5t0.2-0246", 384, 40, [(577, 40), (203, 32), (72, 26), (26, 21), (10, 17)]),
        ("p0.3r0.5t0.2-246", 288, 40, [(325, 40), (114, 32), (41, 26), (15, 21)]),
    ],
)
def test_reference_counts_match_the_paper_table(paper, size, text, expected):
    model = make(image_size=size, vit_patch_size=16, vision_width=8, vision_layers=1, vision_heads=1)
    pumer_patch.apply(model, paper, mode="reference")
    inputs = {**batch(b=1, t=text, pad=0), "pixel_values": torch.randn(1, 3, size, size)}
    with torch.no_grad():
        model(**inputs)
    blocks = [int(d) // 2 for d in paper.split("-")[-1]]
    assert counts(model) == [(k, n, t) for k, (n, t) in zip(blocks, expected[1:])]


def test_default_counts_follow_the_documented_formula():
    model = make(image_size=64)  # 1 + 64 image tokens
    pumer_patch.apply(model, layers=[0, 1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.2)
    with torch.no_grad():
        model(**{**batch(t=20), "pixel_values": torch.randn(2, 3, 64, 64)})
    n, t, expected = 65, 20, []
    for k in (0, 1, 3):
        n, t = pumer_patch.reduced_counts(n, t, (0.2, 0.3, 0.2))
        expected.append((k, n, t))
    assert counts(model) == expected


def test_paper_strings_count_two_layers_per_block_and_numeric_layers_index_blocks():
    model = make()
    pumer_patch.apply(model, "p0.3r0.5t0.2-246")
    assert sorted(model.meter._pumer.plan.schedule) == [1, 2, 3]
    pumer_patch.apply(model, layers=[1, 2, 3], ratios="p0.3r0.5t0.2")
    assert sorted(model.meter._pumer.plan.schedule) == [1, 2, 3]
    with pytest.raises(ValueError, match="layer 1 is odd"):
        pumer_patch.apply(model, "p0.3r0.5t0.2-13")
    with pytest.raises(ValueError, match=r"out of range .* 0\.\.3"):
        pumer_patch.apply(model, "p0.3r0.5t0.2-8")
    assert sorted(model.meter._pumer.plan.schedule) == [1, 2, 3]  # the failed calls changed nothing


def test_reference_quirks_prune_needs_merge_and_merge_needs_prune():
    model = make()
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        # no pruning: the research code merges nothing, text included
        pumer_patch.apply(model, layers=[1], ratios="p0-r0.5-t0.3", mode="reference")
        assert torch.equal(model(**inputs).logits, expected) and counts(model) == []
        # pruning without a merge count: the image stays whole, the text still merges
        pumer_patch.apply(model, layers=[1], ratios="p0.3-r0-t0.3", mode="reference")
        model(**inputs)
        assert counts(model) == [(1, 17, 12 - round(0.3 * 12))]
        # the default mode prunes alone
        pumer_patch.apply(model, layers=[1], ratios="p0.3-r0-t0")
        model(**inputs)
        assert counts(model) == [(1, 17 - round(0.3 * 16), 12)]


def test_default_mode_keeps_the_image_cls_first_for_the_pooler():
    model = make()
    pumer_patch.apply(model, layers=[0, 1], ratios="p0.5-r0.3-t0", trace=True)
    with torch.no_grad():
        model(**batch())
    source = pumer_patch.last_trace(model).image.source  # (B, 17): output index of each input token, -1 pruned
    assert (source[:, 0] == 0).all()  # the [CLS] is never pruned or merged and stays first
    assert ((source[:, 1:] == 0).sum(dim=1) == 0).all()  # nothing merged into it


def test_default_mode_padding_content_never_changes_a_real_sample():
    model = make(fusion_masking="additive")  # PuMer's masked softmax gives every key 1e-6 / N, pads included
    pumer_patch.apply(model, layers=[0, 2], prune_ratio=0.3, merge_ratio=0.3, text_merge_ratio=0.3)
    inputs = batch(b=2, t=12, pad=5)
    other = {**inputs, "input_ids": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 7)}
    with torch.no_grad():
        a, b = model(**inputs).logits, model(**other).logits
    assert torch.equal(a, b)


def test_sequential_and_parallel_orders_reduce_alike_and_differ():
    inputs = batch()
    outs = {}
    for order in ("sequential", "parallel"):
        model = make(fusion_order=order)
        pumer_patch.apply(model, "p0.3r0.5t0.2-024")
        with torch.no_grad():
            outs[order] = model(**inputs).logits
        expected, n, t = [], 17, 12  # 1 + 16 image tokens, 12 text tokens
        for _ in range(3):
            n, t = pumer_patch.reduced_counts(n, t, "p0.3-r0.5-t0.2")
            expected.append((n, t))
        assert [c[1:] for c in counts(model)] == expected == [(7, 10), (3, 8), (2, 6)]
    assert not torch.allclose(outs["sequential"], outs["parallel"])


def test_nlvr2_passes_reduce_independently():
    model = make(MeterForVisualReasoning, token_types=3)
    pumer_patch.apply(model, "p0.3r0.5t0.2-02", trace=True)
    inputs = batch()
    pair = torch.stack([inputs["pixel_values"], torch.randn(2, 3, 32, 32)], dim=1)
    with torch.no_grad():
        both = model(inputs["input_ids"], inputs["attention_mask"], pair).logits
        pooled = []
        for images, token_type in ((pair[:, 0], 1), (pair[:, 1], 2)):
            meter = model.meter
            text = meter.encode_text(inputs["input_ids"], inputs["attention_mask"])
            pooled.append(meter.pool(*meter.fuse(text, inputs["attention_mask"], meter.encode_image(images, token_type))))
        alone = model.nlvr2_classifier(torch.cat(pooled, dim=-1))
    assert torch.equal(both, alone)


def test_encoder_merging_carries_sizes_into_fusion():
    model = make(image_size=64)
    inputs = {**batch(), "pixel_values": torch.randn(2, 3, 64, 64)}
    pumer_patch.apply(model, layers=[], encoder_merge_schedule=8)
    with torch.no_grad():
        image = model.meter.encode_image(inputs["pixel_values"])
        assert image.shape[1] == 65 - 3 * 8
        size = pumer_patch.token_sizes(image)
        assert size is not None and torch.equal(size.sum(dim=1), torch.full((2,), 65.0))
        logits = model(**inputs).logits
        assert torch.isfinite(logits).all()
        with pytest.raises(pumer_patch.TokenSizesLost, match="MeterModel.fuse got features whose token sizes are unknown"):
            text = model.meter.encode_text(inputs["input_ids"], inputs["attention_mask"])
            model.meter.fuse(text, inputs["attention_mask"], image.clone())
    with pytest.raises(ValueError, match="mode='reference'"):
        pumer_patch.apply(model, layers=[], encoder_merge_schedule=8, mode="reference")
    with pytest.raises(ValueError, match="merge_schedule has 2 entries"):
        pumer_patch.apply(model, layers=[], encoder_merge_schedule=[1, 2])


def test_encoder_merge_schedule_per_block():
    model = make(image_size=64)
    pixels = torch.randn(2, 3, 64, 64)
    pumer_patch.apply(model, layers=[], encoder_merge_schedule=[4, 0, 4])
    with torch.no_grad():
        merged = model.meter.vit_model.run_blocks(model.meter.vit_model.embed(pixels))
    assert merged.shape[1] == 65 - 8  # r = 4 at blocks 0 and 2


@pytest.mark.parametrize(
    "cls", [MeterForQuestionAnswering, MeterForVisualEntailment, MeterForImageAndTextRetrieval, MeterForPreTraining]
)
def test_every_head_runs_patched_and_trains(cls):
    model = make(cls).train()
    pumer_patch.apply(model, "p0.3r0.5t0.2-02", encoder_merge_schedule=2)
    out = model(**batch())
    loss = out.logits.float().square().mean() + (0 if out.itm_logits is None else out.itm_logits.square().mean())
    loss.backward()
    for k, layer in enumerate(model.meter.cross_modal_text_layers):
        assert layer.attention.self.query.weight.grad is not None, f"no gradient in fusion block {k}"
    assert model.meter.vit_model.transformer.resblocks[0].attn.in_proj_weight.grad is not None


@pytest.mark.parametrize("encoder_merge", [None, 2])
def test_checkpointing_recomputes_every_fusion_and_tower_block(encoder_merge):
    model = make().train()
    model.activation_checkpointing_enable()  # transformers 5's name for gradient_checkpointing_enable
    pumer_patch.apply(model, "p0.3r0.5t0.2-02", encoder_merge_schedule=encoder_merge)
    calls, tower = [], []
    hooks = [
        layer.intermediate.register_forward_hook(lambda *_a, k=k: calls.append(k))
        for k, layer in enumerate(model.meter.cross_modal_text_layers)
    ] + [
        # a pre-hook: non-reentrant recomputation stops once the last saved tensor is back, inside the MLP
        block.mlp.register_forward_pre_hook(lambda *_a, k=k: tower.append(k))
        for k, block in enumerate(model.meter.vit_model.transformer.resblocks)
    ]
    model(**batch()).logits.sum().backward()
    for hook in hooks:
        hook.remove()
    assert sorted(calls) == sorted(list(range(4)) * 2)  # forward and recompute, reduce blocks included
    blocks = len(model.meter.vit_model.transformer.resblocks)
    assert sorted(tower) == sorted(list(range(blocks)) * 2)  # the CLIP tower too, merging or not


def test_apply_from_config_patches_the_reduction_a_pumer_folder_names(tmp_path):
    model = make(prune_r=0.3, merge_r=0.5, merge_text=0.2, reduce_layers=[2, 4])
    model.save_pretrained(tmp_path)
    loaded = MeterForQuestionAnswering.from_pretrained(tmp_path).eval()
    pumer_patch.apply_from_config(loaded)
    plan = loaded.meter._pumer.plan
    assert plan.mode == "reference" and sorted(plan.schedule) == [1, 2]
    assert str(plan.schedule[1]) == "p0.3-r0.5-t0.2"
    with pytest.raises(ValueError, match="names no reduction"):
        pumer_patch.apply_from_config(make())


def test_remove_restores_everything_and_state_dict_is_unchanged():
    from model_state import same, snapshot

    model = make()
    before = snapshot(model)
    pumer_patch.apply(model, "p0.3r0.5t0.2-02", encoder_merge_schedule=2)
    assert model.state_dict().keys() == before[1].keys()
    pumer_patch.remove(model)
    assert same(before, snapshot(model))


@pytest.mark.filterwarnings("ignore:layers=.* with all ratios zero reduces nothing")
@pytest.mark.parametrize("mode", ["default", "reference"])
def test_pretraining_mlm_logits_keep_one_row_per_input_id_with_text_merging(mode):
    model = make(MeterForPreTraining)
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs)
        pumer_patch.apply(model, layers=[0, 2], ratios="p0-r0-t0", mode=mode)  # zero ratios: bit for bit
        out = model(**inputs)
        assert torch.equal(out.logits, expected.logits) and torch.equal(out.itm_logits, expected.itm_logits)
        pumer_patch.apply(model, "p0.3r0.5t0.3-02", mode=mode, trace=True)
        out = model(**inputs)
    trace = pumer_patch.last_trace(model)
    assert trace.text.count < inputs["input_ids"].shape[1]  # the text merged
    assert out.logits.shape[:2] == inputs["input_ids"].shape  # one row per input id, each its group's
    with torch.no_grad():
        merged = trace.text.x
        assert torch.equal(out.logits, model.mlm_score(pumer_patch.core.unmerge(merged, trace.text.source)))
        # the poolers read the text [CLS], never merged: ITM is what the merged text gives
        assert torch.equal(out.itm_logits, model.itm_score(model.meter.pool(merged, trace.image.x)))


def test_pretraining_refuses_merged_text_without_unmerging_and_other_heads_keep_it_merged():
    model = make(MeterForPreTraining)
    with pytest.raises(ValueError, match="MLM head reads every text position, but text merging with unmerge_text=False"):
        pumer_patch.apply(model, "p0.3r0.5t0.3-02", unmerge_text=False)
    assert not pumer_patch.is_patched(model)
    with pytest.raises(TypeError, match="unmerge_text must be True or False"):
        pumer_patch.apply(model, "p0.3r0.5t0.3-02", unmerge_text="yes")
    pumer_patch.apply(model, "p0.3r0.5t0-02", unmerge_text=False)  # no text merging: nothing to spread
    assert model(**batch()).logits.shape[1] == 12
    vqa = pumer_patch.apply(make(), "p0.3r0.5t0.3-02")
    with torch.no_grad():
        assert vqa.meter(**batch()).text_feats.shape[1] < 12  # merged, as before
        pumer_patch.apply(vqa, "p0.3r0.5t0.3-02", unmerge_text=True)
        assert vqa.meter(**batch()).text_feats.shape[1] == 12


def test_tower_and_image_fusion_layers_run_their_hooks():
    # the contract suite hooks the text layers (the blocks layers= indexes); the CLIP tower's blocks under
    # encoder_merge_schedule and the fusion image layers run in parts too
    model = make()
    pumer_patch.apply(model, "p0.3r0.5t0.2-02", encoder_merge_schedule=[2, 0, 2])
    seen: list[tuple[str, int, int, int]] = []

    def note(where: str, k: int):
        return lambda _m, args, out: seen.append((where, k, args[0].shape[1], out.shape[1]))

    for k, block in enumerate(model.meter.vit_model.transformer.resblocks):
        block.register_forward_hook(note("tower", k))
    for k, layer in enumerate(model.meter.cross_modal_image_layers):
        layer.register_forward_hook(note("image", k))
    with torch.no_grad():
        model(**batch())
    assert seen[:3] == [("tower", 0, 17, 15), ("tower", 1, 15, 15), ("tower", 2, 15, 13)]
    image = [s for s in seen if s[0] == "image"]
    assert [s[1] for s in image] == [0, 1, 2, 3] and all(s[2] == s[3] for s in image)
    assert image[0][2] < 13  # block 0 reduces the image its image layer reads
    fresh = make()
    fresh.meter.vit_model.transformer.resblocks[2].register_full_backward_hook(lambda *_: None)
    with pytest.raises(ValueError, match=r"vit_model.transformer.resblocks\[2\] \(ResidualAttentionBlock\) has a back"):
        pumer_patch.apply(fresh, "p0.3r0.5t0.2-02", encoder_merge_schedule=[2, 0, 2])
    pumer_patch.apply(fresh, "p0.3r0.5t0.2-02", encoder_merge_schedule=[2, 2, 0])  # block 2 whole: allowed
    fresh.meter.cross_modal_image_layers[3].register_full_backward_pre_hook(lambda *_: None)
    with pytest.raises(ValueError, match=r"cross_modal_image_layers\[3\] \(MeterFusionLayer\) has a backward hook"):
        fresh(**batch())
