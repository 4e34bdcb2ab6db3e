"""torch.compile on each family's patched model: where dynamo breaks the graph, and compiled equals eager.

Every family's tiny model (``contract_models``) is compiled with backend "eager": dynamo captures
the patched forward (graph breaks, guards, the per-call context, recompiles) and runs the captured
graphs as they are, which is the part the patch controls. ``BREAKS`` names, per family, the graph
breaks that remain and why. A family with none compiles with ``fullgraph=True`` and must equal
eager; a family with some must break only for the named reasons, still equal eager without
``fullgraph``, and must still fail ``fullgraph=True`` (when a fix removes its last break, that test
says so: empty its entry and the full-graph check takes over). One test compiles with inductor.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.exc import Unsupported
from torch._dynamo.utils import counters

import pumer_patch
from contract_models import Entry, by_name

# dynamo's one-line reasons, and where they come from
# captured(): a forward hook registered per call bumps RemovableHandle.next_id; captured is a @contextmanager,
# so dynamo meets its generator frame after that break too
HOOK = ("setattr() on unsupported type", "Attempt to trace generator")
CONTEXT = "ContextVar mutation not supported"  # per-call state: record_trace, CallScope.open, captured's own
SIZES = "Attempted to inline function marked as skipped"  # with_token_sizes / token_sizes: a WeakTensorKeyDictionary
AFTER = "C-implemented special method without VariableTracker model"  # in library code resumed after a break
BRANCH = "Data-dependent branching"  # a Python `if` on a tensor's value (and a device sync on CUDA)
# transformers' own ViltEmbeddings.visual_embed: patch counts read from pixel_mask, nonzero / unique, multinomial
# (the unpatched ViLT breaks there too)
VILT_UPSTREAM = ("Data dependent operator", "Dynamic shape operator", BRANCH)

#: family -> (its contract entry, the graph-break reasons left)
BREAKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "timm": ("timm-vit", (*HOOK, CONTEXT, SIZES)),
    # BRANCH: _positions._turns checks the rotary table's closed form on every forward (`if residual > pi / 4`)
    "timm_eva-eva": ("timm_eva-eva02", (*HOOK, CONTEXT, SIZES, BRANCH)),
    "timm_eva-beit": ("timm_eva-beit", (CONTEXT, SIZES)),
    "open_clip": ("open_clip-vit_b32", (CONTEXT,)),
    "hf_vit-clip": ("hf-CLIPVisionModel", (*HOOK, CONTEXT, AFTER)),
    "hf_vit-vit": ("hf-ViTModel", (*HOOK, CONTEXT, AFTER)),
    "hf_vit-dinov2": ("hf-Dinov2Model-sdpa", (*HOOK, CONTEXT, AFTER)),
    "vilt": ("vilt-ForQuestionAnswering", (*HOOK, CONTEXT, AFTER, *VILT_UPSTREAM)),
    "meter": ("meter-QuestionAnswering", (CONTEXT, SIZES)),
}
FAMILIES = list(BREAKS)


def _patched(family: str) -> tuple[Entry, torch.nn.Module, dict]:
    entry = by_name(BREAKS[family][0])
    return entry, pumer_patch.apply(entry.build(), **entry.patch), entry.inputs()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_equals_eager_and_breaks_only_where_named(family: str) -> None:
    entry, model, inputs = _patched(family)
    with torch.no_grad():
        eager = entry.output(model, inputs)
        torch._dynamo.reset()
        counters.clear()
        compiled = entry.output(torch.compile(model, backend="eager"), inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    # "graph_break": breaks dynamo resumed after; "unimplemented": those that made it skip a frame (a jump on data)
    reasons = {str(reason).splitlines()[0] for kind in ("graph_break", "unimplemented") for reason in counters[kind]}
    unnamed = sorted(r for r in reasons if not r.startswith(BREAKS[family][1]))
    assert not unnamed, f"{family}: graph breaks not named in BREAKS: {unnamed}"
    assert pumer_patch.last_trace(model).counts  # the compiled call ran the patched forward


@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph(family: str) -> None:
    entry, model, inputs = _patched(family)
    named = BREAKS[family][1]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        try:
            out = entry.output(compiled, inputs)
        except Unsupported as err:
            assert named, f"{family} is named full-graph but breaks: {err}"
            assert any(reason in str(err) for reason in named), f"{family}: a graph break not named in BREAKS: {err}"
            return
        assert not named, f"{family} compiles with fullgraph=True now: empty its BREAKS entry"
        torch.testing.assert_close(out, entry.output(model, inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiled_timm_vit_equals_eager() -> None:
    # inductor generates and builds C++ for each graph: about 30 s for this model on 2 cores
    entry, model, inputs = _patched("timm")
    with torch.no_grad():
        eager = entry.output(model, inputs)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        torch.testing.assert_close(entry.output(compiled, inputs), eager, rtol=1e-4, atol=1e-5)
        second = entry.inputs(seed=1)  # a second input of the same shape runs the compiled graphs, no recompile
        torch.testing.assert_close(entry.output(compiled, second), entry.output(model, second), rtol=1e-4, atol=1e-5)
