"""What ``apply`` makes of its inputs: a typo, numpy's ints, a patch that reduces nothing, wrapped models."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from contract_models import by_name

import pumer_patch
from pumer_patch.adapters.base import STATE_ATTR, Trace


def plan_of(model: torch.nn.Module):
    (root,) = pumer_patch.patched_roots(model)
    return vars(root)[STATE_ATTR].plan


@pytest.mark.parametrize("name", ["vilt-ForQuestionAnswering", "timm-vit"])
def test_a_typo_in_a_ratios_mapping_names_the_key_not_a_block_index(name):
    model = by_name(name).build()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['merg'\].*did you mean 'merge' for 'merg'") as raised:
        pumer_patch.apply(model, layers=[1], ratios={"prune": 0.1, "merg": 0.1})
    assert "block index" not in str(raised.value)
    assert not pumer_patch.is_patched(model)


def test_a_ratios_mapping_that_mixes_layers_and_names_says_which_is_which():
    model = by_name("timm-vit").build()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \[2\].*only int block indices as keys"):
        pumer_patch.apply(model, ratios={2: "p0.1-r0.3-t0", "prune": 0.1})


@pytest.mark.parametrize("schedule", [np.int64(2), [np.int64(2)] * 4, list(np.full(4, 2, dtype=np.int32))])
def test_numpy_ints_in_merge_schedule_read_as_ints(schedule):
    model = by_name("timm-vit").build()
    pumer_patch.apply(model, layers=[], merge_schedule=schedule)
    resolved = plan_of(model).options.merge_schedule
    assert resolved == (2,) * 4 and all(type(r) is int for r in resolved)


def test_numpy_ints_in_meters_encoder_merge_schedule_read_as_ints():
    model = by_name("meter-QuestionAnswering").build()
    pumer_patch.apply(model, layers=[], encoder_merge_schedule=np.int64(2))
    expected = by_name("meter-QuestionAnswering").build()
    pumer_patch.apply(expected, layers=[], encoder_merge_schedule=2)
    assert plan_of(model).options == plan_of(expected).options


def test_a_bool_or_a_float_in_merge_schedule_is_still_refused():
    model = by_name("timm-vit").build()
    for schedule in ([True] * 4, [np.float32(2.0)] * 4, [2.0] * 4):
        with pytest.raises(ValueError, match="merge_schedule entries must be non-negative ints"):
            pumer_patch.apply(model, layers=[], merge_schedule=schedule)
    assert not pumer_patch.is_patched(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[1, 2], prune_ratio=0.0, merge_ratio=0.0), r"layers=\[1, 2\] with all ratios zero reduces nothing"),
        (dict(layers=[1, 2], ratios="p0-r0-t0"), r"layers=\[1, 2\] with all ratios zero reduces nothing"),
        (dict(ratios={1: "p0-r0-t0", 3: (0, 0, 0)}), r"layers=\[1, 3\] with all ratios zero reduces nothing"),
        (dict(layers="p0-r0-t0-25"), r"layers='p0-r0-t0-25' with all ratios zero reduces nothing"),
        (dict(layers=[], prune_ratio=0.3), r"ratios p0.3-r0-t0 with layers=\[\] reduce nothing: name the blocks"),
        (dict(layers=[], ratios="p0-r0.2-t0"), r"ratios p0-r0.2-t0 with layers=\[\] reduce nothing"),
    ],
    ids=repr,
)
def test_layers_and_ratios_that_reduce_nothing_warn_at_the_apply_call(kwargs, message):
    model = by_name("vilt-ForQuestionAnswering").build()
    with pytest.warns(UserWarning, match=message) as warned:
        pumer_patch.apply(model, **kwargs)
    assert [w.filename for w in warned] == [__file__]  # stacklevel: the user's line, not ours
    assert pumer_patch.is_patched(model)  # legal: a warning, not a refusal


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("timm-vit", dict(layers=[], merge_schedule=2)),  # plain ToMe
        ("timm-vit", dict(merge_schedule=2)),
        ("timm-vit", dict(layers=[], prune_ratio=0.0)),  # zero ratios and no layers: nothing claimed
        ("vilt-ForQuestionAnswering", dict(layers=[1], merge_ratio=0.2)),
        ("vilt-ForQuestionAnswering", dict(ratios={1: "p0-r0-t0", 3: "p0.1-r0-t0"})),  # one layer reduces
    ],
    ids=repr,
)
def test_a_patch_that_reduces_or_claims_nothing_does_not_warn(name, kwargs):
    model = by_name(name).build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pumer_patch.apply(model, **kwargs)


def test_a_refused_call_does_not_warn_first():
    model = by_name("vilt-ForQuestionAnswering").build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="out of range"):
            pumer_patch.apply(model, layers=[1, 99], prune_ratio=0.0)


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(model)  # built, never run: the wrapper alone is what apply and remove meet


WRAPPERS = {"torch.compile": compiled, "DataParallel": torch.nn.DataParallel}


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS.keys())
@pytest.mark.parametrize("name", ["timm-vit", "vilt-ForQuestionAnswering", "meter-QuestionAnswering"])
@pytest.mark.parametrize("patched", ["before wrapping", "through the wrapper"])
def test_apply_remove_and_traces_through_a_wrapper_that_delegates_lookups(wrap, name, patched):
    entry = by_name(name)
    model = entry.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if patched == "before wrapping":
        pumer_patch.apply(model, **entry.patch, trace=True)
    wrapper = wrap(model)
    if patched == "through the wrapper":
        assert pumer_patch.apply(wrapper, **entry.patch, trace=True) is wrapper
    assert pumer_patch.patched_roots(wrapper) == pumer_patch.patched_roots(model)
    assert len(pumer_patch.patched_roots(wrapper)) == 1  # one root, not also the wrapper's view of it
    assert pumer_patch.is_patched(wrapper)
    with torch.no_grad():
        model(**entry.inputs())
    assert isinstance(pumer_patch.last_trace(wrapper), Trace)
    pumer_patch.apply(wrapper, **entry.patch)  # re-patching through the wrapper replaces, never stacks
    assert len(pumer_patch.patched_roots(wrapper)) == 1
    assert pumer_patch.remove(wrapper) is wrapper
    assert not pumer_patch.is_patched(wrapper) and not pumer_patch.is_patched(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="not patched"):
        pumer_patch.last_trace(wrapper)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; other tests made it without mixed precision, so start and end clean."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(reset_partial_state=True)
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("name", ["timm-vit", "hf-ViTModel"])  # their root is the prepared model itself
def test_apply_after_accelerate_prepare_says_apply_before_prepare(name, fresh_accelerator_state):
    accelerate = pytest.importorskip("accelerate")
    entry = by_name(name)
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    prepared = accelerator.prepare(entry.build())
    with pytest.raises(ValueError, match=r"wrapped by accelerate's Accelerator.prepare .* before accelerator.prepare"):
        pumer_patch.apply(prepared, **entry.patch)
    assert not pumer_patch.is_patched(prepared)
    model = entry.build()  # the order the message asks for works
    pumer_patch.apply(model, **entry.patch)
    prepared = accelerator.prepare(model)
    with torch.no_grad():
        entry.output(prepared, entry.inputs())
    assert pumer_patch.is_patched(prepared)


def test_a_peft_lora_model_is_patched_through_and_removed_exactly():
    """peft's ``PeftModel`` delegates attribute lookups to the model it wraps, as compile's wrapper does.

    peft is not a dependency: this runs where it is installed (``pip install peft``).
    """
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft): PeftModel untested here")
    entry = by_name("vilt-ForQuestionAnswering")
    model = peft.get_peft_model(entry.build(), peft.LoraConfig(target_modules=["query", "value"], r=4))
    model.eval()
    inputs = entry.inputs()

    def logits() -> torch.Tensor:
        torch.manual_seed(0)  # ViltEmbeddings draws its patch order
        with torch.no_grad():
            return model(**inputs).logits

    unpatched = logits()
    pumer_patch.apply(model, layers=entry.patch["layers"], prune_ratio=0.0, merge_ratio=0.0)
    assert len(pumer_patch.patched_roots(model)) == 1
    assert torch.equal(logits(), unpatched)
    pumer_patch.apply(model, **entry.patch)
    reduced = logits()
    config = model.get_base_model().config
    assert pumer_patch.last_trace(model).counts[0].image < (config.image_size // config.patch_size) ** 2 + 1
    assert not torch.equal(reduced, unpatched)
    model.train()
    torch.manual_seed(0)
    model(**inputs).logits.sum().backward()
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora)
    model.eval()
    assert pumer_patch.remove(model) is model and not pumer_patch.is_patched(model)
    assert torch.equal(logits(), unpatched)
