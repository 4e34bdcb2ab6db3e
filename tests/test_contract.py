"""The adapter contract, checked on every tiny model of ``contract_models.ENTRIES`` (the promises README makes for apply).

Per entry: zero-ratio bit parity, apply -> remove round trip (classes, hooks, attributes, state_dict,
outputs), re-apply replaces, copies (deepcopy, pickle, torch.save, save_pretrained), the bad-input
table with the model untouched after each row, numpy indices, training gradients, gradient
checkpointing counted block by block, torch.compile, bf16 autocast, float64, and ``remove`` refusing
a model another tool patched on top of ours. Then ownership of nested roots, one test per case that
would otherwise be silently wrong, every block through the loop's ``Recorder``, and traces kept per
call. Family-specific behaviour stays in the family's own test file.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import timm
import torch
from torch import Tensor, nn

import pumer_patch
from contract_models import ENTRIES, TIMM_TINY, Entry, blocks, by_name
from model_state import same, snapshot
from pumer_patch.adapters import get_adapter
from pumer_patch.adapters._loop import watching
from pumer_patch.adapters.base import SHARED_ATTR, STATE_ATTR
from pumer_patch.adapters.open_clip import text_guidance

ids = str


def output(entry: Entry, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    with torch.no_grad():
        return entry.output(model, inputs)


def roots(entry: Entry, model: nn.Module) -> list[nn.Module]:
    return get_adapter(entry.family).roots(model)


def hooks(model: nn.Module) -> dict[str, list[int]]:
    """How many hooks of each kind every module holds."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
             "_load_state_dict_pre_hooks")
    return {name: [len(getattr(m, kind)) for kind in kinds] for name, m in model.named_modules()}


def patched_counts(model: nn.Module) -> list[int]:
    trace = pumer_patch.last_trace(model)
    return [c.layer for c in trace.counts]


# ---------------------------------------------------------------------------------------------
# parity, remove, re-apply, copies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["zero_ratios", "no_layers", "reduces_nothing"])
@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_zero_reduction_is_bit_identical(entry, how):
    model = entry.build()
    inputs = entry.inputs()
    expected = output(entry, model, inputs)
    last = len(blocks(entry, model)) - 1
    if how == "zero_ratios":
        pumer_patch.apply(model, layers=[0, last], prune_ratio=0.0, merge_ratio=0.0, text_merge_ratio=0.0)
    elif how == "no_layers":
        pumer_patch.apply(model, layers=[], prune_ratio=0.3)
    else:  # the reduce path runs (our copy of the block's lines) but round(0.001 * N) = 0 tokens go
        ratios = dict(prune_ratio=0.001, merge_ratio=0.001, text_merge_ratio=0.001)
        pumer_patch.apply(model, layers=[0, last], **ratios, **entry.exact_options)
    assert pumer_patch.is_patched(model)
    assert torch.equal(output(entry, model, inputs), expected)
    assert patched_counts(model) == ([0, last] if how == "reduces_nothing" else [])


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_apply_then_remove_leaves_nothing_behind(entry):
    model = entry.build()
    inputs = entry.inputs()
    expected = output(entry, model, inputs)
    before, before_hooks = snapshot(model), hooks(model)
    pumer_patch.apply(model, **entry.patch, trace=True)
    state = model.state_dict()
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], v) for k, v in before[1].items())
    assert not torch.equal(output(entry, model, inputs), expected)
    assert hooks(model) == before_hooks  # a forward leaves no hook behind either
    assert pumer_patch.remove(model) is model
    assert same(snapshot(model), before) and hooks(model) == before_hooks
    assert torch.equal(output(entry, model, inputs), expected)
    assert pumer_patch.remove(model) is model and same(snapshot(model), before)  # removing twice is a no-op


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_apply_twice_replaces_never_stacks(entry):
    model = entry.build()
    inputs = entry.inputs()
    pumer_patch.apply(model, layers=[0], merge_ratio=0.4)
    pumer_patch.apply(model, **entry.patch)
    adapter = get_adapter(entry.family)
    for root in roots(entry, model):
        for module, patched in adapter.swaps(root):
            assert type(module) is patched and "_pumer_patched" not in vars(patched.__bases__[-1])  # the library's
    once = pumer_patch.apply(entry.build(), **entry.patch)
    assert torch.equal(output(entry, model, inputs), output(entry, once, inputs))
    assert patched_counts(model) == entry.patch["layers"]
    pumer_patch.remove(model)
    assert same(snapshot(model), snapshot(entry.build()))


def _torch_save(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "torch_save": _torch_save,
}


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_copies_of_a_patched_model(entry, how):
    model = pumer_patch.apply(entry.build(), **entry.patch, trace=True)
    inputs = entry.inputs()
    expected = output(entry, model, inputs)
    clone = COPIES[how](model)
    assert torch.equal(output(entry, clone, inputs), expected)
    adapter = get_adapter(entry.family)
    for root, clone_root in zip(roots(entry, model), roots(entry, clone)):
        state = getattr(clone_root, STATE_ATTR)
        assert state is not getattr(root, STATE_ATTR)
        for module, _ in adapter.swaps(clone_root):  # the copy's modules share the copy's state
            assert module is clone_root or getattr(module, SHARED_ATTR) is state
    pumer_patch.remove(clone)
    assert same(snapshot(clone), snapshot(entry.build()))


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.save_pretrained], ids=ids)
def test_save_pretrained_round_trip(entry, tmp_path):
    model = pumer_patch.apply(entry.build(), **entry.patch)
    inputs = entry.inputs()
    expected = output(entry, model, inputs)
    library = type(entry.build())
    model.save_pretrained(tmp_path)
    # the saved config names the library's class, which loads without pumer_patch
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [library.__name__]
    loaded = library.from_pretrained(tmp_path).eval()
    assert not pumer_patch.is_patched(loaded)
    assert same(snapshot(loaded), snapshot(entry.build()))
    pumer_patch.apply(loaded, **entry.patch)
    # the weights are bit-equal (snapshot); safetensors maps them at addresses BLAS may align differently
    # from the built model's, which moves a (64 -> 1) Linear by 2e-9 even unpatched: compare to rounding
    torch.testing.assert_close(output(entry, loaded, inputs), expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# bad input: a clear error, and the model (patched or not) exactly as it was
# ---------------------------------------------------------------------------------------------

BadRow = tuple[str, "dict[str, Any] | Callable[[int], dict[str, Any]]", type[Exception], str]

BAD_INPUT: list[BadRow] = [
    ("out_of_range", lambda n: {"layers": [n], "prune_ratio": 0.1}, ValueError, r"out of range .* valid indices are 0\.\."),
    ("repeated", {"layers": [1, 1], "prune_ratio": 0.1}, ValueError, "repeats layer 1"),
    ("negative", {"layers": [-1], "prune_ratio": 0.1}, ValueError, "negative"),
    ("bool_layer", {"layers": [True], "prune_ratio": 0.1}, TypeError, "the bool True"),
    ("numpy_bool_layer", {"layers": [np.bool_(True)], "prune_ratio": 0.1}, TypeError, "the bool"),
    ("bool_ratio", {"layers": [1], "prune_ratio": True}, TypeError, "must be a float"),
    ("ratio_one", {"layers": [1], "prune_ratio": 1.0}, ValueError, r"prune must lie in \[0, 1\)"),
    ("ratio_negative", {"layers": [1], "merge_ratio": -0.1}, ValueError, r"merge must lie in \[0, 1\)"),
    ("ratio_nan", {"layers": [1], "prune_ratio": float("nan")}, ValueError, "prune must lie"),
    ("ratios_empty_dict", {"ratios": {}}, ValueError, "names no layer"),
    ("ratios_bool_key", {"ratios": {True: "p0.1-r0-t0"}}, TypeError, "the bool True"),
    ("ratios_string", {"layers": [1], "ratios": "p0.1-q0.2"}, ValueError, "paper's form"),
    ("paper_repeated_digit", {"layers": "p0.1-r0.3-t0.2-11"}, ValueError, r"names layer\(s\) \[1\] more than once"),
    ("paper_with_ratios", {"layers": "p0.1-r0.3-t0.2-12", "prune_ratio": 0.1}, ValueError, "do not pass ratios too"),
    ("layers_digit_string", {"layers": "3", "prune_ratio": 0.1}, TypeError, r"list of ints, e.g. layers=\[3\]"),
    ("layers_int", {"layers": 3, "prune_ratio": 0.1}, TypeError, "list of block indices"),
    ("trace_string", {"layers": [1], "prune_ratio": 0.1, "trace": "yes"}, TypeError, "trace must be True or False"),
    ("unknown_option", {"layers": [1], "prune_ratio": 0.1, "no_such_option": 1}, ValueError, "unknown option"),
    ("unknown_mode", {"layers": [1], "prune_ratio": 0.1, "mode": "fast"}, ValueError, "mode must be one of"),
    ("layers_missing", {"prune_ratio": 0.1}, ValueError, "layers is required"),
    ("nothing", {}, ValueError, "nothing to reduce"),
]


def _bad_cases() -> list[Any]:
    cases = []
    for entry in ENTRIES:
        rows = BAD_INPUT + [(f"option{i}", *row) for i, row in enumerate(entry.bad_options)]
        cases += [pytest.param(entry, *row[1:], id=f"{entry}-{row[0]}") for row in rows]
    return cases


@pytest.mark.parametrize(("entry", "kwargs", "error", "match"), _bad_cases())
def test_bad_input_is_a_clear_error_and_changes_nothing(entry, kwargs, error, match):
    model = entry.build()
    if callable(kwargs):
        kwargs = kwargs(len(blocks(entry, model)))
    before = snapshot(model)
    with pytest.raises(error, match=match):
        pumer_patch.apply(model, **kwargs)
    assert same(snapshot(model), before)
    pumer_patch.apply(model, layers=[2], merge_ratio=0.2)  # a patch in place survives a bad re-apply
    before = snapshot(model)
    with pytest.raises(error, match=match):
        pumer_patch.apply(model, **kwargs)
    assert same(snapshot(model), before)
    assert all(getattr(r, STATE_ATTR).plan.schedule.keys() == {2} for r in roots(entry, model))


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_a_block_patched_by_something_else_is_refused(entry):
    model = entry.build()
    block = blocks(entry, model)[1]
    block.forward = block.forward  # what monkey-patching libraries do: an instance-bound forward
    before = snapshot(model)
    with pytest.raises(ValueError, match="with an instance-bound forward, not .*: it looks patched by something else"):
        pumer_patch.apply(model, **entry.patch)
    assert same(snapshot(model), before)


def test_an_unsupported_model_lists_what_is_supported():
    model = nn.Sequential(nn.Linear(3, 3))
    before = snapshot(model)
    with pytest.raises(TypeError, match="does not know how to patch Sequential. Supported: .*ViltModel.*open_clip.*timm"):
        pumer_patch.apply(model, layers=[0], prune_ratio=0.1)
    assert same(snapshot(model), before)


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_numpy_indices_and_ratios_are_accepted(entry):
    inputs = entry.inputs()
    as_numpy_kwargs = {k: np.float64(v) if k.endswith("_ratio") else v for k, v in entry.patch.items()}
    as_numpy_kwargs["layers"] = [np.int64(i) for i in entry.patch["layers"]]
    plain = pumer_patch.apply(entry.build(), **entry.patch)
    as_numpy = pumer_patch.apply(entry.build(), **as_numpy_kwargs)
    assert torch.equal(output(entry, as_numpy, inputs), output(entry, plain, inputs))
    pumer_patch.apply(as_numpy, layers=[np.int32(1)], prune_ratio=np.float32(0.25))  # any numpy int and float
    pumer_patch.apply(as_numpy, ratios={np.int64(1): "p0.25-r0-t0"})
    for root in roots(entry, as_numpy):
        assert [type(i) for i in getattr(root, STATE_ATTR).plan.schedule] == [int]


# ---------------------------------------------------------------------------------------------
# training, gradient checkpointing
# ---------------------------------------------------------------------------------------------


def loss(entry: Entry, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    return entry.loss(model, inputs) if entry.loss is not None else entry.output(model, inputs).float().square().mean()


def train_step(entry: Entry, checkpointing: bool) -> tuple[list[int], dict[str, Tensor]]:
    """One backward of the patched entry in training: MLP calls per block and every gradient.

    Calls are counted when the MLP starts (a pre-hook): a recompute stops as soon as the last tensor
    backward needs is back, which can be inside the MLP, before a forward hook would fire.
    """
    model = entry.build().train()
    if checkpointing:
        entry.checkpointing(model)
    pumer_patch.apply(model, **entry.patch)
    calls = [0] * len(blocks(entry, model))
    for i, block in enumerate(blocks(entry, model)):
        entry.mlp(block).register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    loss(entry, model, entry.inputs()).backward()
    assert patched_counts(model) == entry.patch["layers"]
    return calls, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_training_gradients_reach_every_block(entry):
    model = entry.build().train()
    pumer_patch.apply(model, **entry.patch)
    loss(entry, model, entry.inputs()).backward()
    for i, block in enumerate(blocks(entry, model)):
        assert all(p.grad is not None for p in block.parameters()), f"block {i} has parameters without gradient"
        assert all(p.grad.abs().sum() > 0 for p in entry.mlp(block).parameters()), f"no gradient in block {i}"


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_checkpointing_recomputes_every_block_reduce_blocks_included(entry):
    plain_calls, plain = train_step(entry, checkpointing=False)
    calls, grads = train_step(entry, checkpointing=True)
    # once per image tower pass (NLVR2 runs its ViltModel once per image), then forward + recompute
    assert len(set(plain_calls)) == 1 and plain_calls[0] >= 1
    expected = [2 * n for n in plain_calls]
    assert calls == expected, f"MLP calls per block {calls}, expected {expected}; reduce blocks at {entry.patch['layers']}"
    assert grads.keys() == plain.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], msg=name)


# ---------------------------------------------------------------------------------------------
# torch.compile, precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.compile], ids=ids)
def test_torch_compile_matches_eager(entry):
    # backend="eager": dynamo captures the patched forward (graph breaks, guards, the per-call context
    # variables, recompiles per shape) and runs the captured graphs as they are. That is the part the
    # patch controls; aot_eager adds 2x (ViLT: 17 s -> 31 s on 2 cores) and inductor minutes of C++ code
    # generation that test the compiler, not the patch
    model = pumer_patch.apply(entry.build(), **entry.patch)
    inputs = entry.inputs()
    eager = output(entry, model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(output(entry, compiled, inputs), eager, rtol=1e-5, atol=1e-6)
    assert patched_counts(model) == entry.patch["layers"]


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_bfloat16_autocast_runs(entry):
    model = pumer_patch.apply(entry.build(), **entry.patch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(output(entry, model, entry.inputs())).all()
    assert patched_counts(model) == entry.patch["layers"]


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_float64_models_merge(entry):
    inputs = entry.inputs()
    single = pumer_patch.apply(entry.build(), **entry.patch, trace=True)
    expected = output(entry, single, inputs)
    model = pumer_patch.apply(entry.build().double(), **entry.patch, trace=True)
    doubled = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    out = output(entry, model, doubled)
    assert out.dtype == torch.float64
    trace = pumer_patch.last_trace(model)
    assert trace.image.size.max() > 1  # merged tokens stand for several
    assert trace.counts == pumer_patch.last_trace(single).counts
    torch.testing.assert_close(out.float(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_remove_refuses_a_model_another_tool_patched_on_top(entry):
    model = pumer_patch.apply(entry.build(), **entry.patch)
    inputs = entry.inputs()
    expected = output(entry, model, inputs)
    module, ours = get_adapter(entry.family).swaps(roots(entry, model)[0])[0]
    module.__class__ = type("OtherTool", (ours,), {})
    before = snapshot(model)
    with pytest.raises(ValueError, match="OtherTool was put on top of pumer_patch's patch .* remove that tool's patch first"):
        pumer_patch.remove(model)
    assert same(snapshot(model), before)
    assert torch.equal(output(entry, model, inputs), expected)  # still the patched model, working
    module.__class__ = ours  # the other tool removes its patch: then ours comes off
    pumer_patch.remove(model)
    assert same(snapshot(model), snapshot(entry.build()))


# ---------------------------------------------------------------------------------------------
# ownership of nested roots
# ---------------------------------------------------------------------------------------------


def test_models_side_by_side_are_each_patched_by_their_adapter():
    vilt, vit = by_name("vilt-ForQuestionAnswering"), by_name("timm-vit")
    wrapper = nn.ModuleDict({"vilt": vilt.build(), "vit": vit.build()})
    pumer_patch.apply(wrapper, layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3)
    assert pumer_patch.patched_roots(wrapper) == [wrapper["vilt"].vilt, wrapper["vit"]]
    assert [r._pumer.adapter for r in pumer_patch.patched_roots(wrapper)] == ["vilt", "timm"]
    for entry, model in ((vilt, wrapper["vilt"]), (vit, wrapper["vit"])):
        alone = pumer_patch.apply(entry.build(), layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3)
        assert torch.equal(output(entry, model, entry.inputs()), output(entry, alone, entry.inputs()))
    pumer_patch.remove(wrapper)
    assert not pumer_patch.is_patched(wrapper)


@pytest.mark.parametrize("outer", ["vilt-ForQuestionAnswering", "open_clip-coca_tower"])
def test_a_root_nested_inside_another_familys_root_is_left_to_its_owner(outer):
    entry = by_name(outer)
    model = entry.build()
    inner = by_name("timm-vit").build()  # 4 blocks
    root = roots(entry, model)[0]
    root.side_tower = inner  # a timm ViT held by the outer model, as METER holds its CLIP tower
    expected = pumer_patch.apply(entry.build(), layers=[3], merge_ratio=0.3)
    before = snapshot(inner)
    pumer_patch.apply(model, layers=[3], merge_ratio=0.3)
    assert pumer_patch.patched_roots(model) == [root]
    assert root._pumer.adapter == entry.family
    assert same(snapshot(inner), before)  # not patched: no class switched, no attribute
    assert torch.equal(output(entry, model, entry.inputs()), output(entry, expected, entry.inputs()))
    # layers are checked against the owner's blocks only: 5 is out of range for the inner ViT, not for ViLT
    if entry.family == "vilt":
        pumer_patch.apply(model, layers=[5], merge_ratio=0.3)
        assert pumer_patch.patched_roots(model) == [root] and same(snapshot(inner), before)


# ---------------------------------------------------------------------------------------------
# each case that would be silently wrong is right or a clear error (malformed inputs, reference
# mode on timm / open_clip, float64 and remove after another tool's patch are rows and checks above)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["timm-avg_no_cls", "timm-avgmax", "timm-siglip_map"])
def test_timm_heads_pool_each_batch_by_its_own_sizes(name):
    entry = by_name(name)
    model = pumer_patch.apply(entry.build(), layers=[1, 2], merge_ratio=0.4)
    xa, xb = entry.inputs(batch=2, seed=0)["x"], entry.inputs(batch=3, seed=1)["x"]
    with torch.no_grad():
        one_shot_a, one_shot_b = model(xa), model(xb)
        fa = model.forward_features(xa)  # (2, N', C)
        fb = model.forward_features(xb)  # (3, N', C): the later batch's sizes do not replace fa's
        pre = model.forward_head(fa, pre_logits=True)
        assert torch.equal(model.forward_head(fa), one_shot_a)
        assert torch.equal(model.head(pre), one_shot_a)
        assert torch.equal(model.forward_head(fb), one_shot_b)


@pytest.mark.parametrize("name", ["timm-avg_no_cls", "timm-avgmax", "timm-siglip_map"])
def test_features_the_model_did_not_return_are_refused(name):
    entry = by_name(name)
    model = pumer_patch.apply(entry.build(), layers=[1, 2], merge_ratio=0.4)
    with torch.no_grad():
        features = model.forward_features(entry.inputs()["x"])
        for other in (features.detach(), features[:, :], features.clone()):
            with pytest.raises(pumer_patch.TokenSizesLost, match="pooling got features whose token sizes are unknown"):
                model.forward_head(other)


def test_features_only_and_forward_intermediates_are_refused_while_reducing():
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, out_indices=(1, 3),
                            **TIMM_TINY).eval()
    vit = by_name("timm-vit").build()
    tower = by_name("open_clip-coca_tower").build()
    x = by_name("timm-vit").inputs()["x"]
    calls = {
        "features_only": lambda: net(x),
        "timm": lambda: vit.forward_intermediates(x, indices=2),
        "open_clip": lambda: tower.forward_intermediates(x, indices=2),
    }
    with torch.no_grad():
        expected = {name: call() for name, call in calls.items()}
    for model in (net, vit, tower):
        pumer_patch.apply(model, layers=[1], merge_ratio=0.3)
    for name, call in calls.items():
        with pytest.raises(ValueError, match="forward_intermediates .* full patch grid"):
            call()
    for model in (net, vit, tower):  # patched, reducing nothing: the library's own, bit for bit
        pumer_patch.apply(model, layers=[1], merge_ratio=0.0)
    with torch.no_grad():
        for name, call in calls.items():
            assert all(torch.equal(a, b) for a, b in zip(_flat(call()), _flat(expected[name]))), name


def _flat(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat(v)]
    return [t for v in value for t in _flat(v)]


@pytest.mark.parametrize(
    ("name", "where", "method"),
    [
        ("timm-vit", "", "forward_features"),
        ("timm-avg_no_cls", "", "pool"),
        ("timm-vit", "", "forward_head"),
        ("vilt-ForQuestionAnswering", "vilt.embeddings", "visual_embed"),
        ("vilt-ForQuestionAnswering", "vilt.embeddings", "forward"),
        ("open_clip-vit_b32", "visual", "_global_pool"),
        ("open_clip-vit_b32", "visual", "forward"),
    ],
)
def test_a_bound_method_the_patch_overrides_is_refused(name, where, method):
    entry = by_name(name)
    model = entry.build()
    module = model.get_submodule(where)
    setattr(module, method, getattr(module, method))  # bound on the instance, it would shadow our class
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"with an instance-bound {method}, not .*: it looks patched by something else"):
        pumer_patch.apply(model, **entry.patch)
    assert same(snapshot(model), before)


@pytest.mark.parametrize("name", ["vilt-ForQuestionAnswering", "vilt-ForImageAndTextRetrieval"])
def test_padding_content_never_changes_a_real_samples_output(name):
    # default mode: padded text and masked pixels are only counted (the token counts come from the
    # padded length); their content never decides which real tokens are pruned or merged
    entry = by_name(name)
    model = pumer_patch.apply(entry.build(), layers=[0, 1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.3)
    batch = entry.inputs(batch=3)
    text_mask = torch.ones(3, 12, dtype=torch.long)
    text_mask[1, 7:] = 0
    text_mask[2, 4:] = 0
    pixel_mask = torch.ones(3, 64, 64, dtype=torch.long)
    pixel_mask[1, :, 40:] = 0  # 64 x 40 pixels real: 8 x 5 whole patches of 8 x 8
    pixel_mask[2, 24:, :] = 0  # 24 x 64: 3 x 8 patches
    padded = {**batch, "attention_mask": text_mask, "pixel_mask": pixel_mask}
    expected = output(entry, model, padded)
    g = torch.Generator().manual_seed(7)
    other = dict(padded)
    other["input_ids"] = torch.where(text_mask.bool(), batch["input_ids"], torch.randint(1, 50, (3, 12), generator=g))
    noise = torch.randn(batch["pixel_values"].shape, generator=g) * 5
    other["pixel_values"] = torch.where(pixel_mask.bool()[:, None], batch["pixel_values"], noise)
    assert torch.equal(output(entry, model, other), expected)


def test_copies_taken_inside_text_guidance_are_not_guided():
    entry = by_name("open_clip-vit_b32")
    model = pumer_patch.apply(entry.build(), layers=[0], prune_ratio=0.5)
    images = entry.inputs()["image"]
    with torch.no_grad():
        plain = model.encode_image(images)
        query = model.encode_text(entry.inputs(seed=3)["text"])
        with text_guidance(model, query):
            guided = model.encode_image(images)
            copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
            assert not torch.equal(guided, plain)
            for clone in copies:
                assert torch.equal(clone.encode_image(images), plain)
        for clone in copies:
            assert torch.equal(clone.encode_image(images), plain)


@pytest.mark.parametrize("name", ["vilt-ForMaskedLM", "vilt-ForTokenClassification"])
def test_dense_text_heads_refuse_unmerge_text_false_with_text_merging(name):
    entry = by_name(name)
    model = entry.build()
    before = snapshot(model)
    with pytest.raises(ValueError, match="reads every text position .* unmerge_text"):
        pumer_patch.apply(model, **entry.patch, unmerge_text=False)
    assert same(snapshot(model), before)
    pumer_patch.apply(model, layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, unmerge_text=False)  # no text merge
    assert output(entry, model, entry.inputs()).shape[1] == 12


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torch_jit_script_of_a_patched_timm_model_names_the_patch():
    model = pumer_patch.apply(by_name("timm-vit").build(), **by_name("timm-vit").patch)
    with pytest.raises(TypeError, match="torch.jit.script cannot compile a pumer_patch-patched timm model"):
        torch.jit.script(model)


# ---------------------------------------------------------------------------------------------
# one loop per family, traces per call
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_every_block_runs_through_the_loops_recorder(entry):
    model = pumer_patch.apply(entry.build(), **entry.patch)
    inputs = entry.inputs()
    with watching() as seen:
        output(entry, model, inputs)
    for root in roots(entry, model):
        layers = list(get_adapter(entry.family).blocks(root))
        ran = [b for b in seen if any(b is layer for layer in layers)]
        assert ran[: len(layers)] == layers  # every block, in order, through the Recorder
    with watching() as unpatched:
        output(entry, entry.build(), inputs)
    assert unpatched == []  # the test can tell: the library's own forward runs no Recorder


@pytest.mark.parametrize("name", ["vilt-ForImagesAndTextClassification", "meter-VisualReasoning"])
def test_recording_keeps_both_nlvr2_passes(name):
    entry = by_name(name)
    model = pumer_patch.apply(entry.build(), **entry.patch, trace=True)
    with pumer_patch.recording(model) as traces:
        output(entry, model, entry.inputs())
    assert len(traces) == 2
    assert pumer_patch.last_trace(model) is traces[1]  # last_trace keeps the second pass only
    assert not torch.equal(traces[0].image.x, traces[1].image.x)  # two images, two traces
    with pumer_patch.recording(model) as none:
        pass
    assert none == []
    with pytest.raises(ValueError, match="not patched"):
        with pumer_patch.recording(entry.build()):
            pass


# ---------------------------------------------------------------------------------------------
# user hooks on the blocks: the block's own hooks run, as torch runs them, where the loop runs its parts
# ---------------------------------------------------------------------------------------------


def _hidden(value: Any) -> Tensor:
    """The hidden states in a block's output: the tensor, or a tuple's first (ViLT's layers)."""
    return value[0] if isinstance(value, tuple) else value


def _scaled(value: Any, factor: float) -> Any:
    """A block's output with its hidden states scaled, in the block's own output structure."""
    return (value[0] * factor, *value[1:]) if isinstance(value, tuple) else value * factor


def _block_hook_log(entry: Entry, model: nn.Module, inputs: dict[str, Any]) -> dict[str, list[list[Tensor]]]:
    """Per hook kind, per block, the hidden states each call of that hook saw during one forward.

    On every block: a forward pre-hook and a forward hook, each plain and with keywords, and the
    global module hooks (torch.nn.modules.module), which fire on every module.
    """
    layers = blocks(entry, model)
    index = {id(b): i for i, b in enumerate(layers)}
    log: dict[str, list[list[Tensor]]] = {k: [[] for _ in layers] for k in
                                          ("pre", "pre_kw", "out", "out_kw", "global_pre", "global_out")}

    def note(kind: str, i: int, value: Any) -> None:
        log[kind][i].append(_hidden(value))

    handles = []
    for i, block in enumerate(layers):
        handles += [
            block.register_forward_pre_hook(lambda _m, args, i=i: note("pre", i, args[0])),
            block.register_forward_pre_hook(
                lambda _m, args, kwargs, i=i: note("pre_kw", i, args[0]) if isinstance(kwargs, dict) else None,
                with_kwargs=True,
            ),
            block.register_forward_hook(lambda _m, _a, out, i=i: note("out", i, out)),
            block.register_forward_hook(
                lambda _m, _a, kwargs, out, i=i: note("out_kw", i, out) if isinstance(kwargs, dict) else None,
                with_kwargs=True,
            ),
        ]
    module_hooks = torch.nn.modules.module
    handles += [
        module_hooks.register_module_forward_pre_hook(
            lambda m, args: note("global_pre", index[id(m)], args[0]) if id(m) in index else None
        ),
        module_hooks.register_module_forward_hook(
            lambda m, _a, out: note("global_out", index[id(m)], out) if id(m) in index else None
        ),
    ]
    try:
        output(entry, model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return log


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_block_hooks_fire_with_the_hidden_states_each_block_receives_and_returns(entry):
    inputs = entry.inputs()
    unpatched = _block_hook_log(entry, entry.build(), inputs)
    model = pumer_patch.apply(entry.build(), **entry.patch)
    log = _block_hook_log(entry, model, inputs)
    calls = len(unpatched["pre"][0])  # once per pass of the root over its blocks (NLVR2: two)
    assert calls >= 1
    for kind, per_block in {**unpatched, **log}.items():
        assert [len(seen) for seen in per_block] == [calls] * len(per_block), kind
    for i in range(len(log["pre"])):
        for call in range(calls):
            received, returned = log["pre"][i][call], log["out"][i][call]
            for kind in ("pre_kw", "global_pre"):
                assert torch.equal(log[kind][i][call], received), (kind, i)
            for kind in ("out_kw", "global_out"):
                assert torch.equal(log[kind][i][call], returned), (kind, i)
            if i + 1 < len(log["pre"]):  # what a block returns is what the next one receives
                assert torch.equal(log["pre"][i + 1][call], returned), i
            if i in entry.patch["layers"]:  # a reduce block returns the reduced tokens
                assert returned.shape[1] < received.shape[1], i
            else:
                assert returned.shape == received.shape, i


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_a_hook_that_replaces_the_hidden_states_is_used(entry):
    inputs = entry.inputs()
    first = entry.patch["layers"][0]
    model = pumer_patch.apply(entry.build(), **entry.patch)
    layers = blocks(entry, model)
    plain = output(entry, model, inputs)
    for i in (first - 1, first):  # a forward hook replaces what block i returns: block i + 1 gets that
        seen: dict[str, Tensor] = {}
        handles = [
            layers[i].register_forward_hook(lambda _m, _a, out: seen.__setitem__("returned", _hidden(out))),
            layers[i].register_forward_hook(lambda _m, _a, out: _scaled(out, 1.5)),
            layers[i + 1].register_forward_pre_hook(lambda _m, args: seen.__setitem__("next", args[0])),
        ]
        assert not torch.equal(output(entry, model, inputs), plain), i
        assert torch.equal(seen["next"], seen["returned"] * 1.5), i
        for handle in handles:
            handle.remove()
    for j in (first, first + 1):  # a pre-hook replaces what block j receives (on a reduce block: the keyword form)
        for factor in (1.0, 1.5):  # a new tensor of the same values gives the same output; other values another
            given: dict[str, Tensor] = {}

            def replace_input(args: tuple[Any, ...], factor: float = factor) -> tuple[Any, ...]:
                given["new"] = args[0] * factor
                return (given["new"], *args[1:])

            if j == first:
                handle = layers[j].register_forward_pre_hook(
                    lambda _m, args, kwargs: (replace_input(args), kwargs), with_kwargs=True
                )
            else:
                handle = layers[j].register_forward_pre_hook(lambda _m, args: replace_input(args))
            seen_by = layers[j].register_forward_hook(lambda _m, args, _o: given.__setitem__("seen", args[0]))
            changed = output(entry, model, inputs)
            handle.remove()
            seen_by.remove()
            assert given["seen"] is given["new"], (j, factor)  # forward hooks get the replaced arguments, as torch's
            assert torch.equal(changed, plain) == (factor == 1.0), (j, factor)


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_a_hook_that_changes_the_token_count_is_a_clear_error(entry):
    model = pumer_patch.apply(entry.build(), **entry.patch)
    layers = blocks(entry, model)
    reduce = entry.patch["layers"][0]
    drops = {
        "forward hook on a plain block": lambda: layers[0].register_forward_hook(
            lambda _m, _a, out: (out[0][:, :-1], *out[1:]) if isinstance(out, tuple) else out[:, :-1]),
        "forward hook on a reduce block": lambda: layers[reduce].register_forward_hook(
            lambda _m, _a, out: (out[0][:, :-1], *out[1:]) if isinstance(out, tuple) else out[:, :-1]),
        "pre-hook on a reduce block": lambda: layers[reduce].register_forward_pre_hook(
            lambda _m, args: (args[0][:, :-1], *args[1:])),
    }
    for what, register in drops.items():
        handle = register()
        with pytest.raises(pumer_patch.TokenSizesLost, match=r"turned hidden states of \(B, N\) = .* carries each "
                                                             r"token's size"):
            output(entry, model, entry.inputs())
        handle.remove()
    output(entry, model, entry.inputs())  # hooks gone: it runs


_REFUSED = r"\[{}\] \(\w+\) {} .*, but pumer_patch runs this block in parts .* on one of its sub-modules"


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_apply_refuses_backward_hooks_on_a_block_run_in_parts(entry):
    model = entry.build()
    reduce = entry.patch["layers"][0]
    for register in ("register_full_backward_hook", "register_full_backward_pre_hook"):
        handle = getattr(blocks(entry, model)[reduce], register)(lambda *_: None)
        before = snapshot(model)
        with pytest.raises(ValueError, match=_REFUSED.format(reduce, "has a backward hook")):
            pumer_patch.apply(model, **entry.patch)
        assert same(snapshot(model), before)
        handle.remove()
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda *_: None)
    try:
        with pytest.raises(ValueError, match=_REFUSED.format(r"\d+", "would get the global module backward hook")):
            pumer_patch.apply(model, **entry.patch)
    finally:
        handle.remove()
    pumer_patch.apply(model, **entry.patch)


@pytest.mark.filterwarnings("ignore:For backward hooks to be called:UserWarning")  # torch's, on library modules
@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_a_backward_hook_registered_after_apply_is_refused_at_forward(entry):
    model = pumer_patch.apply(entry.build(), **entry.patch)
    inputs = entry.inputs()
    reduce = entry.patch["layers"][0]
    for register in ("register_full_backward_hook", "register_full_backward_pre_hook"):
        handle = getattr(blocks(entry, model)[reduce], register)(lambda *_: None)
        with pytest.raises(ValueError, match=_REFUSED.format(reduce, "has a backward hook")):
            output(entry, model, inputs)
        handle.remove()
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda *_: None)
    try:
        with pytest.raises(ValueError, match=_REFUSED.format(r"\d+", "would get the global module backward hook")):
            output(entry, model, inputs)
    finally:
        handle.remove()
    output(entry, model, inputs)


# ---------------------------------------------------------------------------------------------
# text guidance: a backward after the ``with`` block, with checkpointing, keeps the query's tokens
# ---------------------------------------------------------------------------------------------


def _guided_grads(entry: Entry, checkpointing: bool, guided: bool) -> dict[str, Tensor]:
    model = entry.build().train()
    if checkpointing:
        entry.checkpointing(model)
    pumer_patch.apply(model, **{**entry.patch, "prune_ratio": 0.5})  # half: the query's choice shows
    inputs = entry.inputs()
    with torch.no_grad():
        query = entry.query(model, inputs)
    torch.manual_seed(0)  # open_clip's patch dropout in training
    if guided:
        with text_guidance(model, query):
            out = entry.output(model, inputs)
    else:
        out = entry.output(model, inputs)
    # a fixed random projection: the embeddings are normalized, so their squares would sum to a constant
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out.float() * weight).sum().backward()  # after the guidance block: a recompute must prune the query's tokens
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.query is not None], ids=ids)
def test_backward_after_the_guidance_block_matches_without_checkpointing(entry):
    plain, checkpointed = _guided_grads(entry, False, True), _guided_grads(entry, True, True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, plain[name], msg=name)
    unguided = _guided_grads(entry, True, False)
    assert any(not torch.allclose(unguided[k], plain[k]) for k in plain)  # the guidance chose other tokens
