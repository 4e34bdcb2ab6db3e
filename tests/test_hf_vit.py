"""transformers ViT adapter (hf_vit): registers and [CLS] protected, counts, attention implementations,
other image sizes, padding, the SigLIP pooling head's sizes, text towers untouched, text guidance, the one
loop (every layer through it, no layer class switched), sizes through hooks and their loss.

The contract (parity, remove, copies, bad input, training, checkpointing, compile, precision, threads)
runs on the ``hf-*`` entries of contract_models.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPModel, CLIPVisionModel, Dinov2Model, SiglipModel, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead
from transformers.models.vit.modeling_vit import ViTLayer

import pumer_patch
from contract_models import ENTRIES, by_name, hf_builder, hf_image_text, hf_images
from model_state import same, snapshot
from pumer_patch.adapters._loop import watching
from pumer_patch.adapters.guidance import text_guidance


def counts(model: torch.nn.Module) -> list[tuple[int, int]]:
    return [(c.layer, c.image) for c in pumer_patch.last_trace(model).counts]


def pooled(model: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def test_registers_and_cls_are_never_merged_or_pruned():
    entry = by_name("hf-Dinov2WithRegistersForImageClassification-sdpa")  # [CLS] + 2 registers + 16 patches
    model = pumer_patch.apply(entry.build(), layers=[0, 1, 2], prune_ratio=0.3, merge_ratio=0.4, trace=True)
    pooled(model, **entry.inputs())
    image = pumer_patch.last_trace(model).image
    assert (image.source[:, :3] == torch.tensor([0, 1, 2])).all()  # each prefix token covers itself, first
    assert (image.size[:, :3] == 1).all()  # and nothing else
    assert ((image.source[:, 3:] >= 3) | (image.source[:, 3:] == -1)).all()
    covered = torch.zeros_like(image.size).scatter_add_(1, image.source.clamp_min(0), (image.source >= 0).float())
    assert torch.equal(covered, image.size)


@pytest.mark.parametrize(("name", "prefix"), [("hf-CLIPVisionModel", 1), ("hf-SiglipVisionModel", 0),
                                              ("hf-Dinov2WithRegistersForImageClassification-sdpa", 3)])
def test_counts_follow_the_documented_arithmetic(name, prefix):
    entry = by_name(name)
    model = pumer_patch.apply(entry.build(), layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3)
    with torch.no_grad():
        out = model(**entry.inputs(), output_hidden_states=True)
    n, expected = 16 + prefix, []
    for layer in (1, 3):
        n, _ = pumer_patch.reduced_counts(n, 0, (0.2, 0.3, 0.0), image_protected=prefix)
        expected.append((layer, n))
    assert counts(model) == expected
    # hidden states keep the library's meaning: the embeddings, then each layer's output at its own length
    lengths = [h.shape[1] for h in out.hidden_states]
    assert lengths == [16 + prefix, 16 + prefix, expected[0][1], expected[0][1], expected[1][1]]


def test_a_reduce_layer_looks_called_to_its_hooks_and_the_hidden_states():
    # layer 0 reduces: the hidden states still start from the embeddings, and a hook on it sees its output
    entry = by_name("hf-ViTModel")
    model = entry.build()
    with torch.no_grad():
        embeddings = model(**entry.inputs(), output_hidden_states=True).hidden_states[0]
        pumer_patch.apply(model, layers=[0, 2], merge_ratio=0.3)
        seen: list[tuple[int, int]] = []
        model.layers[0].register_forward_hook(lambda _m, args, out: seen.append((args[0].shape[1], out.shape[1])))
        out = model(**entry.inputs(), output_hidden_states=True)
    first, third = (c for _, c in counts(model))
    assert torch.equal(out.hidden_states[0], embeddings)
    assert [h.shape[1] for h in out.hidden_states] == [17, first, first, third, third]
    assert seen == [(17, first)]


def test_merge_schedule_is_tome_on_transformers_towers():
    model = pumer_patch.apply(by_name("hf-ViTModel").build(), merge_schedule=3)
    pooled(model, **hf_images())
    assert counts(model) == [(0, 14), (1, 11), (2, 8), (3, 5)]


@pytest.mark.parametrize("cls", [CLIPVisionModel, SiglipVisionModel, Dinov2Model])
def test_eager_and_sdpa_agree(cls):
    # eager: relevance from the layer's own probabilities; SDPA: from the query rows it needs alone
    inputs = hf_images()
    models = {a: pumer_patch.apply(hf_builder(cls, a)(), layers=[1, 2], prune_ratio=0.3, merge_ratio=0.3)
              for a in ("eager", "sdpa")}
    eager, sdpa = (pooled(m, **inputs) for m in models.values())
    assert counts(models["eager"]) == counts(models["sdpa"])
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        attentions = models["eager"](**inputs, output_attentions=True).attentions
    n = 17 - (cls is SiglipVisionModel)  # each layer's probabilities over its own tokens
    assert [a.shape[-1] for a in attentions] == [n, n] + [c for _, c in counts(models["eager"])]


def test_other_attention_implementations_are_refused_naming_the_fix():
    model = by_name("hf-CLIPVisionModel").build()
    model.config._attn_implementation = "flex_attention"  # the attention module reads it per call
    before = snapshot(model)
    with pytest.raises(ValueError, match="only 'eager' and 'sdpa' take: model.set_attn_implementation"):
        pumer_patch.apply(model, layers=[1], merge_ratio=0.3)
    assert same(snapshot(model), before)


def _llava() -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=100)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=99))


def _paligemma() -> torch.nn.Module:
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    text = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, vocab_size=100)
    return PaliGemmaForConditionalGeneration(PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=99))


def test_a_tower_inside_a_vision_language_model_is_refused_and_left_untouched():
    model = _paligemma()  # no adapter reduces inside PaliGemma's language model
    before = snapshot(model)
    with pytest.raises(ValueError, match="feeds every patch's features to a language model"):
        pumer_patch.apply(model, layers=[1], merge_ratio=0.3)
    assert not pumer_patch.is_patched(model)
    assert same(snapshot(model), before)


def test_a_llavas_tower_belongs_to_the_vlm_adapter_and_stays_whole():
    model = _llava()
    tower = model.model.vision_tower
    classes = {name: type(m) for name, m in tower.named_modules()}
    pumer_patch.apply(model, layers=[1], merge_ratio=0.3)
    assert pumer_patch.patched_roots(model) == [model]  # the VLM adapter's root, not the tower
    assert {name: type(m) for name, m in tower.named_modules()} == classes
    pumer_patch.remove(model)


@pytest.mark.parametrize("name", ["hf-CLIPModel-sdpa", "hf-SiglipVisionModel", "hf-Dinov2Model-sdpa",
                                  "hf-Dinov2WithRegistersForImageClassification-sdpa", "hf-ViTModel"])
def test_an_implementation_switched_after_apply_is_refused_at_the_forward_naming_the_fix(name):
    entry = by_name(name)
    model = pumer_patch.apply(entry.build(), layers=[1], merge_ratio=0.3)
    model.set_attn_implementation("flex_attention")  # no log(size) key bias: it would fail inside the library
    with pytest.raises(ValueError, match="runs attn_implementation='flex_attention'.*set_attn_implementation"):
        with torch.no_grad():
            model(**entry.inputs())
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model(**entry.inputs())  # and runs again once switched back
    assert pumer_patch.last_trace(model).counts


@pytest.mark.parametrize("name", ["hf-CLIPVisionModel", "hf-SiglipVisionModel", "hf-ViTModel"])
def test_interpolate_pos_encoding_and_other_image_sizes(name):
    entry = by_name(name)
    x = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))  # 6 x 5 patches
    model = entry.build()
    expected = pooled(model, pixel_values=x, interpolate_pos_encoding=True)
    pumer_patch.apply(model, layers=[0, 3], prune_ratio=0.001, merge_ratio=0.001)
    assert torch.equal(pooled(model, pixel_values=x, interpolate_pos_encoding=True), expected)
    pumer_patch.apply(model, layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3)
    assert torch.isfinite(pooled(model, pixel_values=x, interpolate_pos_encoding=True)).all()
    prefix = 0 if "Siglip" in name else 1
    n, _ = pumer_patch.reduced_counts(30 + prefix, 0, (0.2, 0.3, 0.0), image_protected=prefix)
    assert counts(model)[0] == (1, n)


def test_dinov2_runs_any_image_size():
    entry = by_name("hf-Dinov2ForImageClassification")
    model = pumer_patch.apply(entry.build(), layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3)
    x = torch.randn(1, 3, 56, 24, generator=torch.Generator().manual_seed(0))  # 7 x 3 patches
    assert pooled(model, pixel_values=x).shape == (1, 3)
    assert counts(model)[0][1] == pumer_patch.reduced_counts(22, 0, (0.2, 0.3, 0.0))[0]


def test_padding_content_never_changes_a_real_samples_output():
    # DINOv2 takes a token padding mask; padded tokens are only counted, never read
    entry = by_name("hf-Dinov2Model-sdpa")
    model = pumer_patch.apply(entry.build(), layers=[0, 1, 2], prune_ratio=0.2, merge_ratio=0.3)
    x = hf_images()["pixel_values"]
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, -4:] = 0  # the last patch row of the second image
    other = x.clone()
    other[1, :, 24:, :] = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(5)) * 5
    a, b = pooled(model, pixel_values=x, attention_mask=mask), pooled(model, pixel_values=other, attention_mask=mask)
    assert torch.equal(a, b)


def test_siglip_pooling_head_gets_log_sizes():
    model = pumer_patch.apply(by_name("hf-SiglipVisionModel").build(), layers=[1, 2], merge_ratio=0.4, trace=True)
    seen: dict[str, torch.Tensor] = {}
    handle = model.head.attention.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(mask=kwargs["attn_mask"]), with_kwargs=True
    )
    pooled(model, **hf_images())
    handle.remove()
    size = pumer_patch.last_trace(model).image.size  # (B, N')
    assert size.max() > 1
    heads = model.config.num_attention_heads
    expected = size.log().repeat_interleave(heads, dim=0)[:, None, :]  # (B * H, 1, N')
    assert torch.equal(seen["mask"], expected)


def test_classifier_means_count_merged_tokens_by_size():
    entry = by_name("hf-Dinov2ForImageClassification")
    model = pumer_patch.apply(entry.build(), layers=[1], merge_ratio=0.4, trace=True)
    with torch.no_grad():
        out = model(**entry.inputs(), output_hidden_states=True)
    trace = pumer_patch.last_trace(model)
    sequence = model.dinov2.layernorm(out.hidden_states[-1])  # (B, N', C)
    size = trace.image.size[:, 1:, None]
    mean = (sequence[:, 1:] * size).sum(dim=1) / size.sum(dim=1)
    torch.testing.assert_close(out.logits, model.classifier(torch.cat([sequence[:, 0], mean], dim=1)))


@pytest.mark.parametrize("cls", [CLIPModel, SiglipModel])
def test_text_tower_is_left_alone(cls):
    model = hf_builder(cls, "sdpa")()
    ids = hf_image_text()["input_ids"]
    with torch.no_grad():
        before = model.get_text_features(input_ids=ids).pooler_output
        pumer_patch.apply(model, layers=[0, 1], prune_ratio=0.3, merge_ratio=0.3)
        assert pumer_patch.patched_roots(model) == [model.vision_model]
        assert torch.equal(model.get_text_features(input_ids=ids).pooler_output, before)


@pytest.mark.parametrize("cls", [CLIPModel, SiglipModel])
def test_text_guidance_steers_pruning(cls):
    model = pumer_patch.apply(hf_builder(cls, "eager")(), layers=[0], prune_ratio=0.5)
    inputs = hf_image_text()
    with torch.no_grad():
        plain = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        query = model.get_text_features(input_ids=inputs["input_ids"]).pooler_output
        with text_guidance(model, query):
            guided = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        after = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert not torch.equal(guided, plain) and torch.equal(after, plain)
    with pytest.raises(ValueError, match="must have shape"):
        with text_guidance(model, query[:, :5]):
            pass
    pumer_patch.apply(model, layers=[0], merge_ratio=0.5)
    with pytest.raises(ValueError, match="prunes nothing"):
        with text_guidance(model, query):
            pass


def test_a_layer_called_on_its_own_is_the_librarys():
    # the patch switches the loop, not the layers: a layer called by hand is the library's own
    model = by_name("hf-ViTModel").build()
    before = copy.deepcopy(model)
    pumer_patch.apply(model, layers=[1], merge_ratio=0.3)
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model.layers[2](x), before.layers[2](x))
    assert all(type(layer) is ViTLayer for layer in model.layers)


# ---------------------------------------------------------------------------------------------
# one loop: every layer runs through ``run_blocks``, and the patch switches no layer class
# ---------------------------------------------------------------------------------------------

HF = [e for e in ENTRIES if e.family == "hf_vit"]

# the modules whose class the patch switches, by name: the module that loops over the layers, the
# root where it opens the per-call scope of sizes (classifiers, a SigLIP tower of its own), SigLIP's head
SWITCHED = {
    "hf-CLIPVisionModel": {"encoder"},
    "hf-CLIPVisionModelWithProjection-sdpa": {"vision_model.encoder"},
    "hf-CLIPModel-sdpa": {"vision_model.encoder"},
    "hf-SiglipVisionModel": {"", "encoder", "head"},
    "hf-SiglipModel-sdpa": {"vision_model", "vision_model.encoder", "vision_model.head"},
    "hf-SiglipForImageClassification": {"", "vision_model.encoder", "vision_model.head"},
    "hf-Dinov2Model-sdpa": {"encoder"},
    "hf-Dinov2ForImageClassification": {"", "dinov2.encoder"},
    "hf-Dinov2WithRegistersForImageClassification-sdpa": {"", "dinov2_with_registers.encoder"},
    "hf-ViTModel": {""},  # ViTModel loops over its layers in its own forward
    "hf-ViTForImageClassification-sdpa": {"vit"},
}


def test_every_entry_has_its_switched_modules_listed():
    assert sorted(SWITCHED) == sorted(e.name for e in HF)


@pytest.mark.parametrize("entry", HF, ids=str)
def test_every_layer_runs_through_the_one_loop(entry):
    model = pumer_patch.apply(entry.build(), **entry.patch)
    layers = list(pumer_patch.adapters.get_adapter("hf_vit").blocks(pumer_patch.patched_roots(model)[0]))
    with torch.no_grad(), watching() as seen:
        entry.output(model, entry.inputs())
    assert seen == layers  # each layer once, in order: plain and reduce layers alike


@pytest.mark.parametrize("entry", HF, ids=str)
def test_the_patch_switches_the_loop_and_the_heads_never_a_layer(entry):
    model = entry.build()
    before = {name: type(m) for name, m in model.named_modules()}
    pumer_patch.apply(model, **entry.patch)
    switched = {name for name, m in model.named_modules() if type(m) is not before[name]}
    assert switched == SWITCHED[entry.name]
    assert not any("layer." in name or "layers." in name for name in switched)


# ---------------------------------------------------------------------------------------------
# sizes from the loop to the heads: through a hook between them, and their loss
# ---------------------------------------------------------------------------------------------


def _probe_pool(head: SiglipMultiheadAttentionPoolingHead, tokens: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """SigLIP's attention pooling of tokens (B, N, C) with log(size) on its probe's logits -> (B, C)."""
    bias = size.log().repeat_interleave(head.attention.num_heads, dim=0)[:, None, :]  # (B * H, 1, N)
    pooled = head.attention(head.probe.repeat(tokens.shape[0], 1, 1), tokens, tokens, attn_mask=bias)[0]
    return (pooled + head.mlp(head.layernorm(pooled)))[:, 0]


def test_a_hook_on_the_final_norm_keeps_the_siglip_pool_size_weighted():
    model = pumer_patch.apply(by_name("hf-SiglipVisionModel").build(), layers=[1, 2], merge_ratio=0.4, trace=True)
    handle = model.post_layernorm.register_forward_hook(lambda _m, _i, out: out * 2 + 1)  # a new tensor
    with torch.no_grad():
        out = model(**hf_images())
        handle.remove()
        size = pumer_patch.last_trace(model).image.size
        tokens = out.last_hidden_state  # what the hook made of the final norm's output
        expected = _probe_pool(model.head, tokens, size)
        unweighted = SiglipMultiheadAttentionPoolingHead.forward(model.head, tokens)
    assert size.max() > 1
    torch.testing.assert_close(out.pooler_output, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.pooler_output, unweighted, rtol=1e-3, atol=1e-4)  # the test can tell


def test_the_siglip_head_applied_later_reads_the_sizes_the_features_carry():
    model = pumer_patch.apply(by_name("hf-SiglipVisionModel").build(), layers=[1, 2], merge_ratio=0.4)
    with torch.no_grad():
        out = model(**hf_images())
        assert pumer_patch.token_sizes(out.last_hidden_state) is not None
        assert torch.equal(model.head(out.last_hidden_state), out.pooler_output)
        with pytest.raises(pumer_patch.TokenSizesLost, match="SigLIP's attention pooling head got features whose"):
            model.head(out.last_hidden_state.clone())


@pytest.mark.parametrize(("name", "norm"), [
    ("hf-SiglipVisionModel", "post_layernorm"),  # the attention pooling head
    ("hf-SiglipForImageClassification", "vision_model.post_layernorm"),  # the classifier's mean (and the head)
    ("hf-Dinov2ForImageClassification", "dinov2.layernorm"),
    ("hf-Dinov2WithRegistersForImageClassification-sdpa", "dinov2_with_registers.layernorm"),
])
def test_a_hook_that_changes_the_token_count_is_a_clear_error_at_every_head(name, norm):
    entry = by_name(name)
    model = pumer_patch.apply(entry.build(), layers=[1, 2], merge_ratio=0.4)
    model.get_submodule(norm).register_forward_hook(lambda _m, _i, out: out[:, :-1])
    with pytest.raises(pumer_patch.TokenSizesLost, match="changed the tokens, so their sizes are unknown"):
        pooled(model, **entry.inputs())
    pumer_patch.apply(model, layers=[1, 2], prune_ratio=0.4)  # no merge, every size one: nothing to weigh
    assert torch.isfinite(pooled(model, **entry.inputs())).all()


def test_a_hook_on_the_final_norm_keeps_the_dinov2_mean_size_weighted():
    entry = by_name("hf-Dinov2ForImageClassification")
    model = pumer_patch.apply(entry.build(), layers=[1], merge_ratio=0.4, trace=True)
    handle = model.dinov2.layernorm.register_forward_hook(lambda _m, _i, out: out * 2 + 1)
    with torch.no_grad():
        out = model(**entry.inputs(), output_hidden_states=True)
        handle.remove()
        sequence = model.dinov2.layernorm(out.hidden_states[-1]) * 2 + 1  # (B, N', C): the hook's effect
        size = pumer_patch.last_trace(model).image.size[:, 1:, None]
        mean = (sequence[:, 1:] * size).sum(dim=1) / size.sum(dim=1)
        expected = model.classifier(torch.cat([sequence[:, 0], mean], dim=1))
        unweighted = model.classifier(torch.cat([sequence[:, 0], sequence[:, 1:].mean(dim=1)], dim=1))
    torch.testing.assert_close(out.logits, expected)
    assert not torch.allclose(out.logits, unweighted, rtol=1e-3, atol=1e-4)

