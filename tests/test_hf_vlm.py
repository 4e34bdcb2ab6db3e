"""The transformers VLM adapter: visual tokens pruned and merged inside a LLaVA's language model."""

from __future__ import annotations

import copy
import json
import threading
import warnings

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
)

import pumer_patch
from pumer_patch.adapters.hf_vlm import prompt_end
from pumer_patch.core import reduced_counts
from pumer_patch.ratios import Ratios
from tests.model_state import same, snapshot
from tests.vlm_models import FAMILIES, IMAGE, QWEN_END, QWEN_START, VISUAL, build, family_prompt, llava, prompt

IMPLEMENTATIONS = ["sdpa", "eager"]


def _forward(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def _generate(model, inputs, steps=4, **kwargs):
    gen_inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
    options = {"do_sample": False, **kwargs}
    with torch.no_grad():
        return model.generate(**gen_inputs, max_new_tokens=steps, output_logits=True, return_dict_in_generate=True,
                              **options)


def _real_columns(model, logits, row):
    """The logits (L_real, V) of the real columns of sample ``row`` in the last forward (trace=True)."""
    mask = pumer_patch.last_trace(model).image.mask[row]
    return logits[row][mask]


# --------------------------------------------------------------------------------------------
# parity and the contract
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("ratios", [{"prune_ratio": 0.0}, {"prune_ratio": 0.01, "merge_ratio": 0.01}],
                         ids=["zero", "removes-nothing"])
def test_a_patch_that_removes_nothing_is_bit_identical_in_forward_and_generate(implementation, ratios):
    model = llava(implementation)
    inputs = prompt([(3, 1, 4), (1, 1, 6)])
    ref, ref_gen = _forward(model, inputs), _generate(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-zero ratios warn that they reduce nothing
        pumer_patch.apply(model, layers=[0, 2], **ratios)
    out, gen = _forward(model, inputs), _generate(model, inputs)
    assert torch.equal(out, ref)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref_gen.logits))


def test_remove_restores_the_model_and_the_state_dict_never_changes():
    model = llava()
    inputs = prompt([(3, 1, 4)])
    before, ref = snapshot(model), _forward(model, inputs)
    pumer_patch.apply(model, layers=[1], prune_ratio=0.3, merge_ratio=0.2)
    assert pumer_patch.is_patched(model)
    assert model.state_dict().keys() == before[1].keys()
    assert _forward(model, inputs).shape[1] < ref.shape[1]
    pumer_patch.remove(model)
    assert same(snapshot(model), before)
    assert torch.equal(_forward(model, inputs), ref)


def test_the_vision_tower_belongs_to_the_vlm_and_stays_whole():
    model = pumer_patch.apply(llava(), layers=[1], merge_ratio=0.3)
    assert pumer_patch.patched_roots(model) == [model]
    assert not any(hasattr(type(m), "_pumer_patched") for m in model.model.vision_tower.modules())


def test_apply_again_replaces_the_patch_and_torch_save_keeps_it(tmp_path):
    inputs = prompt([(3, 1, 4), (1, 1, 6)])
    once = _forward(pumer_patch.apply(llava(), layers=[1], prune_ratio=0.3), inputs)
    model = pumer_patch.apply(llava(), layers=[0, 2], merge_ratio=0.4)
    pumer_patch.apply(model, layers=[1], prune_ratio=0.3)
    # saved before a forward: the CLIP tower's output-capturing hooks, installed by the first one, do not pickle
    torch.save(model, tmp_path / "model.pt")
    assert torch.equal(_forward(model, inputs), once)
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert pumer_patch.is_patched(loaded)
    assert torch.equal(_forward(loaded, inputs), once)
    pumer_patch.remove(loaded)
    assert not any(hasattr(type(m), "_pumer_patched") for m in loaded.modules())


def test_a_deepcopy_reduces_alike_and_on_its_own():
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.3, merge_ratio=0.2)
    inputs = prompt([(3, 1, 4), (1, 1, 6)])
    twin = copy.deepcopy(model)
    assert torch.equal(_forward(twin, inputs), _forward(model, inputs))
    pumer_patch.remove(twin)
    assert pumer_patch.is_patched(model) and not pumer_patch.is_patched(twin)
    assert _forward(twin, inputs).shape[1] > _forward(model, inputs).shape[1]


# --------------------------------------------------------------------------------------------
# generate and the cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("options", [
    {"layers": [1], "prune_ratio": 0.3, "merge_ratio": 0.2},
    {"layers": [0, 1], "prune_ratio": 0.25, "merge_ratio": 0.25, "text_tokens": "last"},
    {"layers": [1], "prune_ratio": 0.2, "merge_ratio": 0.3, "merge_position": "mean"},
    {"layers": [0], "prune_ratio": 0.3, "merge_ratio": 0.2, "where": "input"},
    {"layers": [0], "merge_ratio": 0.4, "where": "input"},
], ids=["pumer", "fastv-rule-two-layers", "mean-position", "input", "input-merge-only"])
def test_cached_generation_equals_a_no_cache_recompute_of_the_same_reduced_sequence(implementation, options):
    model = pumer_patch.apply(llava(implementation), **options)
    inputs = prompt([(3, 1, 4), (1, 1, 6)])
    steps = 4
    gen = _generate(model, inputs, steps)
    sequences = gen.sequences
    length = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, steps, dtype=torch.long)], dim=1)
    for t in range(steps):
        n = length + t
        ids = sequences[:, :n]
        position_ids = (mask[:, :n].cumsum(-1) - 1).masked_fill(mask[:, :n] == 0, 0)
        with prompt_end(length), torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask[:, :n], position_ids=position_ids,
                           pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
        torch.testing.assert_close(logits, gen.logits[t], rtol=0, atol=1e-5)


def test_decode_continues_at_the_position_after_the_unreduced_prompt():
    """A manual decoding loop without position ids numbers the new token as the unpatched model does."""
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.5)
    inputs = prompt([(3, 1, 4)])
    inputs.pop("position_ids")
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
        step = model(input_ids=token, attention_mask=mask, cache=out.cache).logits[:, -1]
        n = inputs["input_ids"].shape[1]
        with prompt_end(n):
            full = model(input_ids=torch.cat([inputs["input_ids"], token], 1), attention_mask=mask,
                         pixel_values=inputs["pixel_values"]).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
    kept = n - VISUAL // 2
    assert [out.cache.get_seq_length(i) for i in range(3)] == [n + 1, n + 1, kept + 1]


def test_an_emptied_cache_forgets_the_reduced_prompt_it_held():
    model = llava()
    text_only = prompt([(5, 0, 4)])
    expected = _forward(model, text_only)
    pumer_patch.apply(model, layers=[1], prune_ratio=0.5)
    cache = DynamicCache(config=model.config.text_config)
    _forward(model, prompt([(3, 1, 4)]), cache=cache, use_cache=True)
    cache.reset()
    torch.testing.assert_close(_forward(model, text_only, cache=cache, use_cache=True), expected, rtol=0, atol=1e-6)
    other = prompt([(3, 1, 4), (1, 1, 6)])
    with pytest.raises(ValueError, match="another batch"):
        _forward(model, {"input_ids": other["input_ids"][:, :1]}, cache=_filled(model), use_cache=True)


def test_a_copied_prompt_cache_continues_as_the_original():
    """transformers' recipe for reusing a prompt's cache: a ``copy.deepcopy`` of it per continuation."""
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.3, merge_ratio=0.2)
    inputs = prompt([(3, 1, 4)])
    cache = DynamicCache(config=model.config.text_config)
    _forward(model, inputs, cache=cache, use_cache=True)
    longer = torch.cat([inputs["input_ids"], torch.tensor([[11, 12, 13]])], dim=1)
    outputs = []
    for reused in (copy.deepcopy(cache), copy.deepcopy(cache), cache):
        with torch.no_grad():
            outputs.append(model.generate(input_ids=longer, attention_mask=torch.ones_like(longer), cache=reused,
                                          max_new_tokens=3, do_sample=False))
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[2])


def test_an_image_given_on_a_filled_cache_passes_unreduced_with_a_warning():
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.5)
    cache = DynamicCache(config=model.config.text_config)
    system = prompt([(5, 0, 0)])
    _forward(model, system, cache=cache, use_cache=True)  # a text prefix, cached
    turn = prompt([(0, 1, 4)])
    mask = torch.ones(1, 5 + turn["input_ids"].shape[1], dtype=torch.long)
    with pytest.warns(UserWarning, match="image tokens given on a cache that already holds tokens pass unreduced"):
        logits = _forward(model, {"input_ids": turn["input_ids"], "attention_mask": mask,
                                  "pixel_values": turn["pixel_values"]}, cache=cache, use_cache=True)
    assert logits.shape[1] == turn["input_ids"].shape[1]


def _filled(model):
    """A cache holding a reduced prompt of one sample."""
    cache = DynamicCache(config=model.config.text_config)
    _forward(model, prompt([(3, 1, 4)]), cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("where", ["llm", "input"])
def test_a_static_cache_generates_as_the_default_cache(where, implementation):
    layers = [0] if where == "input" else [0, 1]
    model = pumer_patch.apply(llava(implementation), layers=layers, prune_ratio=0.3, merge_ratio=0.2, where=where)
    inputs = prompt([(3, 1, 4), (1, 1, 6)])
    dynamic = _generate(model, inputs, steps=3)
    static = _generate(model, inputs, steps=3, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_sample_gives_the_same_output_in_a_padded_batch_as_alone(implementation, side):
    model = pumer_patch.apply(llava(implementation), layers=[0, 1], prune_ratio=0.3, merge_ratio=0.2, trace=True)
    samples = [(3, 1, 4), (1, 1, 9), (2, 0, 5)]  # the last one has no image: nothing of it goes
    batch = prompt(samples, side)
    logits = _forward(model, batch)
    for row, sample in enumerate(samples):
        alone = prompt([sample], side)
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert torch.equal(alone["input_ids"][0], ids)  # the same tokens, the same image
        first = sum(s[1] for s in samples[:row])
        if "pixel_values" in alone:
            assert torch.equal(alone["pixel_values"], batch["pixel_values"][first : first + sample[1]])
        expected = _forward(model, alone)[0]
        got = _forward(model, batch)  # again: the trace is the last forward's
        assert torch.equal(got, logits)
        torch.testing.assert_close(_real_columns(model, got, row), expected, rtol=0, atol=1e-5)


def test_inputs_embeds_and_a_missing_mask_reduce_as_input_ids_and_a_full_mask():
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.3, merge_ratio=0.2)
    inputs = prompt([(3, 1, 4), (1, 1, 9)])
    embedded = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        embedded["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
    torch.testing.assert_close(_forward(model, embedded), _forward(model, inputs), rtol=0, atol=1e-6)
    assert torch.equal(_generate(model, embedded).sequences, _generate(model, inputs).sequences[:, -4:])
    alone = prompt([(3, 1, 4)])
    unmasked = {k: v for k, v in alone.items() if k != "attention_mask"}
    torch.testing.assert_close(_forward(model, unmasked), _forward(model, alone), rtol=0, atol=1e-6)


def test_a_prompt_without_image_is_the_library_s_own_forward():
    model = llava()
    inputs = prompt([(5, 0, 4), (2, 0, 7)])
    ref, ref_gen = _forward(model, inputs), _generate(model, inputs)
    pumer_patch.apply(model, layers=[1], prune_ratio=0.5, merge_ratio=0.2)
    assert torch.equal(_forward(model, inputs), ref)
    assert torch.equal(_generate(model, inputs).sequences, ref_gen.sequences)


# --------------------------------------------------------------------------------------------
# counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("images", [1, 2])
def test_token_counts_per_layer_follow_reduced_counts_per_image(images):
    ratios = {"prune_ratio": 0.3, "merge_ratio": 0.2}
    model = pumer_patch.apply(llava(), layers=[0, 2], **ratios)
    inputs = prompt([(3, images, 4), (1, images, 6)])
    logits = _forward(model, inputs)
    per_image = [VISUAL]
    for _ in range(2):
        per_image.append(reduced_counts(per_image[-1], 0, Ratios(prune=0.3, merge=0.2), image_protected=0)[0])
    counts = pumer_patch.last_trace(model).counts
    assert [(c.layer, c.image) for c in counts] == [(0, images * per_image[1]), (2, images * per_image[2])]
    text = 3 + 4 + 2 * images  # the longer sample's text
    assert all(c.text == text for c in counts)
    assert logits.shape[1] == text + images * per_image[2]


def test_a_prompt_without_image_has_its_own_trace_not_the_last_image_prompt_s():
    model = pumer_patch.apply(llava(), layers=[0, 2], prune_ratio=0.5, trace=True)
    _forward(model, prompt([(3, 1, 4)]))
    text_only = prompt([(5, 0, 4), (2, 0, 3)], "right")
    logits = _forward(model, text_only)
    trace = pumer_patch.last_trace(model)
    assert [(c.layer, c.image, c.text) for c in trace.counts] == [(0, 0, 9), (2, 0, 9)]
    assert torch.equal(trace.image.mask, text_only["attention_mask"].bool())
    assert trace.image.x.shape[:2] == logits.shape[:2]


def test_several_reduce_layers_compound_and_the_cache_holds_each_stage():
    model = pumer_patch.apply(llava(layers=4), layers=[0, 2], prune_ratio=0.5)
    inputs = prompt([(3, 1, 4)])
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    n = inputs["input_ids"].shape[1]
    assert [out.cache.get_seq_length(i) for i in range(4)] == [n, n - 8, n - 8, n - 12]


def test_a_reduction_in_the_last_layer_leaves_every_cache_whole():
    model = pumer_patch.apply(llava(), layers=[2], prune_ratio=0.5)
    inputs = prompt([(3, 1, 4)])
    gen = _generate(model, inputs, steps=2)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert out.logits.shape[1] == n - VISUAL // 2
    assert [out.cache.get_seq_length(i) for i in range(3)] == [n] * 3
    assert gen.sequences.shape[1] == n + 2


def test_output_hidden_states_has_every_layer_at_its_own_length():
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.5)
    inputs = prompt([(3, 1, 4)])
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    n = inputs["input_ids"].shape[1]
    assert [h.shape[1] for h in hidden] == [n, n, n - 8, n - 8]


def test_fastv_rule_ranks_by_the_last_prompt_token_alone():
    inputs = prompt([(3, 1, 6)])
    fastv = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.5, text_tokens="last", trace=True)
    _forward(fastv, inputs)
    fastv_out = pumer_patch.last_trace(fastv).image.x
    pumer = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.5, trace=True)
    _forward(pumer, inputs)
    assert fastv_out.shape == pumer_patch.last_trace(pumer).image.x.shape
    assert not torch.equal(fastv_out, pumer_patch.last_trace(pumer).image.x)  # another rule, other survivors


def test_fastv_rule_before_the_llm_queries_by_the_last_prompt_token_s_embedding():
    """``text_tokens="last"``, ``where="input"``: the image tokens most like the last token's embedding stay."""
    inputs = prompt([(3, 1, 6)])
    model = pumer_patch.apply(llava(), layers=[0], prune_ratio=0.5, where="input", text_tokens="last")
    logits = _forward(model, inputs)[0]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])[0]
        image = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output[0]
        scores = pumer_patch.query_relevance(embeds[-1:].float(), image[None].float())[0]
        columns = torch.arange(embeds.shape[0])
        placed = columns[inputs["input_ids"][0] == IMAGE]
        embeds[placed] = image
        kept = torch.cat([columns[:3], placed[scores.topk(VISUAL // 2).indices.sort().values], columns[3 + VISUAL:]])
        # the survivors at their own positions, through the library's language model
        hidden = model.model.language_model(inputs_embeds=embeds[kept][None], position_ids=kept[None]).last_hidden_state
        expected = model.lm_head(hidden)[0]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"layers": [3], "prune_ratio": 0.3}, ValueError, r"layers \[3\] out of range.*3 blocks"),
    ({"layers": [1], "prune_ratio": 1.2}, ValueError, "must lie in"),
    ({"layers": [1], "merge_ratio": -0.1}, ValueError, "must lie in"),
    ({"layers": [1], "prune_ratio": 0.3, "where": "input"}, ValueError, "pass layers=\\[0\\]"),
    ({"layers": [1], "prune_ratio": 0.3, "where": "tower"}, ValueError, "where must be one of"),
    ({"layers": [1], "prune_ratio": 0.3, "text_tokens": "first"}, ValueError, "text_tokens must be one of"),
    ({"layers": [1], "text_merge_ratio": 0.3}, ValueError, "text_merge_ratio has no effect"),
    ({"layers": [1], "prune_ratio": 0.3, "mode": "reference"}, ValueError, "take mode='default'"),
    ({"layers": [1], "prune_ratio": 0.3, "relevance": "cls"}, ValueError, "unknown option"),
])
def test_bad_input_is_refused_and_the_model_left_untouched(options, error, match):
    model = llava()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        pumer_patch.apply(model, **options)
    assert not pumer_patch.is_patched(model)
    assert same(snapshot(model), before)


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_an_attention_without_an_additive_mask_is_refused_naming_the_fix(implementation):
    model = llava()
    model.config.text_config._attn_implementation = implementation
    before = snapshot(model)
    with pytest.raises(ValueError, match="only 'eager' and 'sdpa' take: model.set_attn_implementation"):
        pumer_patch.apply(model, layers=[1], prune_ratio=0.3)
    assert same(snapshot(model), before)


def test_an_implementation_switched_after_apply_is_refused_at_the_forward():
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.3)
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="runs attn_implementation='flex_attention'"):
        _forward(model, prompt([(3, 1, 4)]))


def test_a_prepared_4d_mask_is_refused_while_the_patch_reduces():
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.3)
    inputs = prompt([(3, 1, 4)])
    n = inputs["input_ids"].shape[1]
    inputs["attention_mask"] = torch.ones(1, 1, n, n).tril()
    with pytest.raises(ValueError, match="a 2-D attention_mask .* got a 4-D mask"):
        _forward(model, inputs)


def test_labels_are_refused_while_the_patch_reduces():
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.3)
    inputs = prompt([(3, 1, 4)])
    with pytest.raises(ValueError, match="labels cannot follow a reduced sequence"):
        model(**inputs, labels=inputs["input_ids"])


def test_prompt_end_takes_a_length():
    with pytest.raises(ValueError, match="prompt's length"):
        with prompt_end(0):
            pass


# --------------------------------------------------------------------------------------------
# threads, saving, sampling
# --------------------------------------------------------------------------------------------


def test_threads_each_get_their_own_reduction_and_generation():
    model = pumer_patch.apply(llava(), layers=[0, 1], prune_ratio=0.3, merge_ratio=0.2)
    prompts = [prompt([(3, 1, 4)], seed=t) if t != 2 else prompt([(2, 0, 5), (1, 1, 9)], seed=t) for t in range(3)]
    expected = [(_forward(model, p), _generate(model, p).sequences) for p in prompts]
    results: list[list] = [[] for _ in prompts]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def work(t: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[t].append((_forward(model, prompts[t]), _generate(model, prompts[t]).sequences))
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    for (logits, sequences), got in zip(expected, results):
        assert len(got) == 3
        for got_logits, got_sequences in got:
            torch.testing.assert_close(got_logits, logits, rtol=0, atol=1e-6)
            assert torch.equal(got_sequences, sequences)


def test_save_pretrained_writes_the_library_class_and_the_same_weights(tmp_path):
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.3, merge_ratio=0.2)
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlavaForConditionalGeneration
    assert loaded.config.architectures == ["LlavaForConditionalGeneration"]
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_sampled_generation_equals_a_no_cache_recompute():
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.3, merge_ratio=0.2)
    inputs = prompt([(3, 1, 4), (1, 1, 6)])
    torch.manual_seed(3)
    gen = _generate(model, inputs, steps=3, do_sample=True, top_k=0, suppress_tokens=[IMAGE])  # no new image token
    length = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    for t in range(3):
        n = length + t
        position_ids = (mask[:, :n].cumsum(-1) - 1).masked_fill(mask[:, :n] == 0, 0)
        with prompt_end(length), torch.no_grad():
            logits = model(input_ids=gen.sequences[:, :n], attention_mask=mask[:, :n], position_ids=position_ids,
                           pixel_values=inputs["pixel_values"]).logits[:, -1]
        torch.testing.assert_close(logits, gen.logits[t], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# every family: LLaVA-NeXT / OneVision (visual tokens per image vary with its size), Idefics3, SmolVLM
# --------------------------------------------------------------------------------------------

OTHERS = [f for f in FAMILIES if f != "llava"]
SAMPLES = [(3, [(32, 64)], 4), (1, [(32, 32), (64, 32)], 6), (2, [], 5)]


def _continued(inputs, sequences, mask, n):
    """The prompt ``inputs`` with the first ``n`` tokens of ``sequences`` (prompt and generated), no cache."""
    out = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
    out.update(input_ids=sequences[:, :n], attention_mask=mask[:, :n])
    if "mm_token_type_ids" in inputs:  # Qwen: the model numbers its 3-D positions
        out["mm_token_type_ids"] = (sequences[:, :n] == IMAGE).int()
    else:
        out["position_ids"] = (mask[:, :n].cumsum(-1) - 1).masked_fill(mask[:, :n] == 0, 0)
    return out


@pytest.mark.parametrize("family", OTHERS)
def test_every_family_is_bit_identical_when_nothing_is_removed(family):
    model = build(family)
    inputs = family_prompt(model, family, SAMPLES[:2])
    ref, ref_gen = _forward(model, inputs), _generate(model, inputs, steps=2)
    pumer_patch.apply(model, layers=[1], prune_ratio=0.005, merge_ratio=0.005)  # round(0.005 * n) == 0 here
    assert pumer_patch.patched_roots(model) == [model]
    out, gen = _forward(model, inputs), _generate(model, inputs, steps=2)
    assert torch.equal(out, ref)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref_gen.logits))
    pumer_patch.remove(model)
    assert not pumer_patch.is_patched(model)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", OTHERS)
def test_every_family_generates_as_its_no_cache_recompute_and_a_sample_as_alone(family, implementation):
    layers = [1, 2] if family == "qwen3_vl" else [0, 1]  # Qwen3-VL: after DeepStack's layer 0
    model = pumer_patch.apply(build(family, implementation), layers=layers, prune_ratio=0.3, merge_ratio=0.2,
                              trace=True)
    inputs = family_prompt(model, family, SAMPLES)
    steps = 2
    gen = _generate(model, inputs, steps)
    length = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(len(SAMPLES), steps, dtype=torch.long)], dim=1)
    for t in range(steps):
        with prompt_end(length), torch.no_grad():
            logits = model(**_continued(inputs, gen.sequences, mask, length + t), use_cache=False).logits[:, -1]
        torch.testing.assert_close(logits, gen.logits[t], rtol=0, atol=1e-5)
    for row, sample in enumerate(SAMPLES):
        expected = _forward(model, family_prompt(model, family, [sample]))[0]
        got = _forward(model, inputs)
        torch.testing.assert_close(_real_columns(model, got, row), expected, rtol=0, atol=1e-5)


def test_images_of_different_sizes_are_reduced_each_by_its_own_count():
    family = "llava_next"
    model = pumer_patch.apply(build(family), layers=[1], prune_ratio=0.5, trace=True)
    sizes = [(32, 64), (32, 32)]
    counts = [family_prompt(model, family, [(0, [size], 0)])["input_ids"].shape[1] - 2 for size in sizes]
    assert counts[0] != counts[1]
    inputs = family_prompt(model, family, [(3, sizes, 4)])
    _forward(model, inputs)
    kept = sum(reduced_counts(c, 0, Ratios(prune=0.5), image_protected=0)[0] for c in counts)
    assert pumer_patch.last_trace(model).counts[0].image == kept


def test_where_input_is_refused_for_m_rope_models_whose_decode_positions_read_the_cache():
    model = build("qwen2_5_vl")
    before = snapshot(model)
    with pytest.raises(ValueError, match="where='input' would reduce every layer's cache"):
        pumer_patch.apply(model, layers=[0], merge_ratio=0.3, where="input")
    assert same(snapshot(model), before)


def test_qwen_merged_tokens_stand_at_the_mean_of_their_m_rope_rows():
    """Each of the three M-RoPE rows is averaged by size for a merged token; the no-cache recompute agrees."""
    model = pumer_patch.apply(build("qwen2_vl"), layers=[1], merge_ratio=0.4, merge_position="mean")
    inputs = family_prompt(model, "qwen2_vl", [(3, [(0, 0)], 4), (1, [(0, 0)], 6)])
    gen = _generate(model, inputs, steps=2)
    length = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 2, dtype=torch.long)], dim=1)
    with prompt_end(length), torch.no_grad():
        logits = model(**_continued(inputs, gen.sequences, mask, length + 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(logits, gen.logits[1], rtol=0, atol=1e-5)


def test_a_video_passes_whole_and_its_tokens_are_no_text():
    """A video's placeholders are neither reduced nor relevance rows: only the prompt's text ranks an image."""
    family, video = "qwen2_vl", 98
    unpatched = build(family)
    model = pumer_patch.apply(build(family), layers=[1], prune_ratio=0.5, trace=True)
    g = torch.Generator().manual_seed(0)
    clip = [QWEN_START, *[video] * VISUAL, QWEN_END]
    for ids, images in (([5, 6, *clip, 7, 8, 9], 0), ([5, QWEN_START, *[IMAGE] * VISUAL, QWEN_END, 3, *clip, 7, 8], 1)):
        input_ids = torch.tensor([ids])
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                  "mm_token_type_ids": torch.where(input_ids == IMAGE, 1, torch.where(input_ids == video, 2, 0)).int(),
                  "pixel_values_videos": torch.randn(64, 96, generator=g), "video_grid_thw": torch.tensor([[1, 8, 8]])}
        if images:
            inputs.update(pixel_values=torch.randn(64, 96, generator=g), image_grid_thw=torch.tensor([[1, 8, 8]]))
            _forward(model, inputs)
            text = len(ids) - 2 * VISUAL
            assert [(c.image, c.text) for c in pumer_patch.last_trace(model).counts] == [(VISUAL // 2, text)]
        else:
            assert torch.equal(_forward(model, inputs), _forward(unpatched, inputs))


def test_a_reduce_layer_before_deepstack_s_last_layer_is_refused():
    model = build("qwen3_vl")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layers \[0\] come before DeepStack's last layer \(0\).*layers >= 1"):
        pumer_patch.apply(model, layers=[0, 2], prune_ratio=0.3)
    assert same(snapshot(model), before)


def test_the_vlm_benchmark_runs_and_its_analytic_flops_match_the_counted_ones(tmp_path):
    from benchmarks import vlm

    vlm.main(["--tiny", "--batch-sizes", "1", "--repeats", "1", "--decode", "1", "--out", str(tmp_path)])
    rows = {r["config"]: r for r in json.loads((tmp_path / "vlm.json").read_text())["rows"]}
    assert rows["unpatched"]["visual_kept"] == 16 and rows["PuMer in the LLM, 288 kept"]["visual_kept"] == 8
    for row in rows.values():  # the reduction's own relevance and matching add a little to the counted figure
        assert row["gflops_analytic"] <= row["gflops"] <= 1.03 * row["gflops_analytic"], row
        assert row["decode_tokens_per_s"] > 0 and row["kv_cache_mib"] > 0
    assert rows["FastV rule, 144 kept"]["gflops"] < rows["FastV rule, 288 kept"]["gflops"] < rows["unpatched"]["gflops"]
    assert rows["PuMer before the LLM, 288 kept"]["kv_cache_mib"] < rows["PuMer in the LLM, 288 kept"]["kv_cache_mib"]
    # --dtype bf16 (what benchmarks/gpu.sh passes with --device cuda): under autocast the values cache in bfloat16
    vlm.main(["--tiny", "--batch-sizes", "1", "--repeats", "1", "--decode", "1", "--dtype", "bf16",
              "--out", str(tmp_path / "bf16")])
    bf16 = json.loads((tmp_path / "bf16" / "vlm.json").read_text())
    assert bf16["machine"]["dtype"] == "bf16 autocast"
    for row in bf16["rows"]:
        assert row["kv_cache_mib"] < rows[row["config"]]["kv_cache_mib"], row
        assert row["visual_kept"] == rows[row["config"]]["visual_kept"]


def _llava_with(text) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE))


@pytest.mark.parametrize(("text", "match"), [
    (MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=100), "language model is a MistralModel; .* LlamaModel or"),
    (Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100, use_sliding_window=True, sliding_window=8,
                 max_window_layers=0), "sliding-window layers.*use_sliding_window=False"),
], ids=["mistral", "qwen2-sliding"])
def test_a_language_model_the_patch_does_not_know_is_refused_and_left_untouched(text, match):
    model = _llava_with(text)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        pumer_patch.apply(model, layers=[1], prune_ratio=0.3)
    assert same(snapshot(model), before)


@pytest.mark.parametrize("beams", [1, 2])
def test_cached_generation_equals_uncached_generation_of_the_same_reduction(beams):
    """Beam search reorders the cache: each beam keeps its sample's reduced columns."""
    model = pumer_patch.apply(llava(), layers=[0, 1], prune_ratio=0.3, merge_ratio=0.2)
    inputs = prompt([(3, 1, 4), (1, 1, 6)])
    cached = _generate(model, inputs, steps=3, num_beams=beams)
    with prompt_end(inputs["input_ids"].shape[1]):
        uncached = _generate(model, inputs, steps=3, num_beams=beams, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)


def test_training_through_a_reduce_layer_gives_gradients_with_and_without_checkpointing():
    for checkpointing in (False, True):
        model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.3, merge_ratio=0.2)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        inputs = prompt([(3, 1, 4), (1, 1, 6)])
        model(**inputs, use_cache=False).logits.float().pow(2).mean().backward()
        layer = model.model.language_model.layers[1]
        assert layer.mlp.down_proj.weight.grad is not None and layer.self_attn.q_proj.weight.grad is not None
        assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", OTHERS)
def test_every_family_generates_with_a_static_cache_as_with_the_default_one(family):
    layers = [1, 2] if family == "qwen3_vl" else [0, 1]
    model = pumer_patch.apply(build(family), layers=layers, prune_ratio=0.3, merge_ratio=0.2)
    inputs = family_prompt(model, family, SAMPLES[:2])
    dynamic = _generate(model, inputs, steps=2)
    static = _generate(model, inputs, steps=2, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# what a demanding user tries
# --------------------------------------------------------------------------------------------


def _generate_on(model, inputs, cache, sequences, steps=2):
    """``generate`` handed back its own output and cache: it feeds the tokens it counts as uncached."""
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(sequences[:, inputs["input_ids"].shape[1]:])], dim=1)
    with torch.no_grad():
        return model.generate(input_ids=sequences, attention_mask=mask, cache=cache, max_new_tokens=steps,
                              do_sample=False, return_dict_in_generate=True)


def test_generation_continued_on_its_cache_equals_one_longer_generation_or_is_refused():
    inputs = prompt([(3, 1, 4), (1, 1, 6)])
    model = pumer_patch.apply(llava(), layers=[1], prune_ratio=0.3, merge_ratio=0.2)
    first = _generate(model, inputs, steps=2)
    again = _generate_on(model, inputs, first.cache, first.sequences)
    assert torch.equal(again.sequences, _generate(model, inputs, steps=4).sequences)
    # before the LLM, layer 0's cache is reduced too: generate would count it short and give cached tokens again
    model = pumer_patch.apply(llava(), layers=[0], prune_ratio=0.3, merge_ratio=0.2, where="input")
    for inputs in (prompt([(3, 1, 4), (1, 1, 6)]), prompt([(3, 1, 4), (1, 1, 9)])):  # no padding: no mask
        first = _generate(model, inputs, steps=2)
        with pytest.raises(ValueError, match="where='input', cannot be handed back to generate"):
            _generate_on(model, inputs, first.cache, first.sequences)
