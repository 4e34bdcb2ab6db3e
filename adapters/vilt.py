"""ViLT (Hugging Face ``transformers``): every head, found by ``isinstance`` on ``ViltModel``.

Sequence layout: ``[text ([CLS] first) ; image [CLS] ; patches]``; the pooler reads the text [CLS].
Two instance classes are switched per patched ``ViltModel``:

* ``embeddings`` -> ``PumerViltEmbeddings``: tells the encoder where text ends, records each patch's
  grid position (``visual_embed`` shuffles patches and drops ``patch_index``) and, with
  ``fixed_patch_order``, puts the sampled patches back in raster order so that results do not depend
  on the random draw and ToMe's alternating A/B split is a regular checkerboard.
* ``encoder`` -> ``PumerViltEncoder``: the layer loop, threading text and image ``Tokens`` (sizes,
  masks, sources) through the library's own ``ViltLayer`` instances. A reduce layer runs the layer's
  own sub-modules with the reduction between the attention residual and the MLP, which repeats the
  four lines of ``ViltLayer.forward`` (checked against transformers 4.40 to 5.x by the
  zero-reduction parity tests). A layer run in parts (a reduce layer; every layer under SDPA or in
  reference mode) still runs its forward hooks and pre-hooks as its own call would, on the hidden
  states it receives and the (reduced) ones it returns (``_loop.call_as_block``); backward hooks on
  such a layer are refused.

Option ``attention="sdpa"`` (default ``"eager"``, ViLT's own): every layer of the loop computes its
self-attention with ``F.scaled_dot_product_attention`` from the layer's own query/key/value/output
projections, and a reduce layer computes only the text query rows of the attention probabilities
for its relevance (``2 B H T L d`` more FLOPs). On CPU it pays off at long sequences and about
breaks even at short ones (``benchmarks/README.md``); outputs agree with eager to float32 rounding
(``test_sdpa_matches_eager``). Attention dropout still applies in training; the relevance rows are
taken before dropout. ``output_attentions=True`` runs that forward
eagerly (SDPA returns no probabilities). With ``attention="sdpa"`` the loop runs even when nothing
is reduced (``layers=[]``), so SDPA alone can be had.

Reference mode computes every layer's attention as the research code does, a masked softmax over key
weights (``core.masked_softmax``: a padded query row attends to the real keys and itself, every key
gets an epsilon, a fractional text mask weights its keys), because the research relevance sums the
padded text rows: with HF's additive mask a padded batch came out 1e-2 off in the logits.
Option ``relevance="first_head"`` reads head 0 alone (the research code's ``sim_method="first_head"``).
Option ``merge_style`` (reference mode) picks the research code's image merge: ``"tome"`` (bipartite
soft matching on the keys, plain means) or ``"tip"`` (its ViLT configs' default: the keys scaled by
each survivor's relevance before matching, the [CLS]-position survivor never merged, ``r`` capped at
``(kept - 1) // 2``, and each merged group *summed*, not averaged, into ``[unmerged A ; B]``).
PuMer's own ViLT checkpoints state theirs in ``config.merge_style``; ``tests/test_vilt_reference.py``
checks both, with either relevance, against an independent re-implementation of the research forward.

When the plan reduces nothing (and attention is eager), both fall through to the library's forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.vilt.modeling_vilt import (
    ViltEmbeddings,
    ViltEncoder,
    ViltForMaskedLM,
    ViltForTokenClassification,
    ViltLayer,
    ViltModel,
    ViltSelfAttention,
)

from pumer_patch.core import Mode, Tokens, masked_softmax, reduce_tokens, take_rows, text_to_image_relevance, unmerge
from pumer_patch.ratios import Ratios

from ._loop import (
    CallScope,
    Policy,
    Recorder,
    call_as_block,
    captured,
    check_tokens,
    hidden_argument,
    key_bias,
    refuse_backward_hooks_on,
    start,
)
from .base import SHARED_ATTR, STATE_ATTR, Adapter, PatchState, Trace, ensure_class, record_trace, warn_if_untested

__all__ = ["ViltAdapter", "ViltOptions", "PumerViltModel", "PumerViltEmbeddings", "PumerViltEncoder", "unmerge_hidden"]

_TESTED = ("4.40", "6")


@dataclass(frozen=True)
class ViltOptions:
    """ViLT's options for ``pumer_patch.apply`` (see the module docstring).

    relevance: ``"mean_head"`` (the paper) or ``"first_head"`` (head 0 only, the research code's
    ``sim_method="first_head"``, which its ViLT VQA config used).
    merge_style: ``"tome"`` (ToMe: a merged group is the mean of its members) or, with
    ``mode="reference"`` only, ``"tip"`` (the research code's ViLT default ``merge_style``): image
    tokens are matched on their keys scaled by their relevance and a merged group is the *sum* of
    its members; the text merges ToMe's way either way.
    """

    fixed_patch_order: bool = True
    unmerge_text: bool | None = None
    attention: Literal["eager", "sdpa"] = "eager"
    relevance: Literal["mean_head", "first_head"] = "mean_head"
    merge_style: Literal["tome", "tip"] = "tome"


@dataclass
class _ViltCall:
    """What ``ViltEmbeddings`` hands the encoder during one ``ViltModel`` forward."""

    text_len: int | None = None
    patch_index: Tensor | None = None  # (B, P, 2) grid position of each patch, as they enter the encoder
    grid: tuple[int, int] | None = None


_CALL: CallScope[_ViltCall] = CallScope("pumer_patch_vilt_call")


class PumerViltModel(ViltModel):
    """``ViltModel`` whose forward opens the per-call scope its patched embeddings and encoder share."""

    _pumer_patched = True

    def forward(self, *args: Any, **kwargs: Any):
        with _CALL.open(getattr(self, STATE_ATTR), _ViltCall()):
            return super().forward(*args, **kwargs)


# ``save_pretrained`` writes the instance's class ``__name__`` into config.architectures: a saved bare
# ViltModel must name the library's class, which loads without pumer_patch. Pickling resolves the
# class by its ``__qualname__``, PumerViltModel, so copies and ``torch.save`` still find this class.
PumerViltModel.__name__ = "ViltModel"


class PumerViltEmbeddings(ViltEmbeddings):
    """``ViltEmbeddings`` that hands the text length and patch grid positions to the encoder."""

    _pumer_patched = True

    def visual_embed(self, pixel_values: Tensor, pixel_mask: Tensor, max_image_length: int = 200):
        x, x_mask, (patch_index, grid) = super().visual_embed(pixel_values, pixel_mask, max_image_length)
        state: PatchState = getattr(self, SHARED_ATTR)
        if state.plan.schedule and state.plan.options.fixed_patch_order:
            # raster order, padding last; the image [CLS] stays first
            key = patch_index[..., 0] * grid[1] + patch_index[..., 1]  # (B, P)
            key = key + (x_mask[:, 1:] == 0).long() * (grid[0] * grid[1])
            order = key.argsort(dim=1, stable=True)  # (B, P)
            patch_index = take_rows(patch_index, order)
            order = torch.cat([torch.zeros_like(order[:, :1]), order + 1], dim=1)  # (B, 1 + P)
            x = take_rows(x, order)
            x_mask = x_mask.gather(1, order)
        call = _CALL.get(state)
        if call is not None:
            call.patch_index, call.grid = patch_index, (int(grid[0]), int(grid[1]))
        return x, x_mask, (patch_index, grid)

    def forward(self, input_ids: Tensor | None, attention_mask: Tensor, *args: Any, **kwargs: Any):
        call = _CALL.get(getattr(self, SHARED_ATTR))
        if call is not None:
            call.text_len = attention_mask.shape[1]
        return super().forward(input_ids, attention_mask, *args, **kwargs)


def _key_mask(attention_mask: Tensor | None, hidden: Tensor) -> Tensor:
    """(B, L) bool, True for real tokens, from ViLT's 4D mask (B, 1, L, L) (additive or bool) or None."""
    b, length = hidden.shape[:2]
    if attention_mask is None:
        return torch.ones(b, length, dtype=torch.bool, device=hidden.device)
    row = attention_mask[:, 0, 0, :]  # bidirectional: every query row carries the same key mask
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def _checkpointing(encoder: ViltEncoder) -> bool:
    """Whether the model asked for gradient checkpointing (on the encoder before transformers 4.52, on the layers after)."""
    asked = getattr(encoder, "gradient_checkpointing", False) or any(
        getattr(layer, "gradient_checkpointing", False) for layer in encoder.layer
    )
    return bool(asked) and encoder.training and torch.is_grad_enabled()


class PumerViltEncoder(ViltEncoder):
    """``ViltEncoder`` whose loop reduces tokens at the planned layers."""

    _pumer_patched = True

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ):
        state: PatchState = getattr(self, SHARED_ATTR)
        plan, options = state.plan, state.plan.options
        sdpa = options.attention == "sdpa" and not output_attentions
        if not plan.schedule and not sdpa:  # nothing to reduce (reference mode included: the library's own attention)
            record_trace(state, Trace())
            return super().forward(hidden_states, attention_mask, output_attentions, output_hidden_states, return_dict)
        call = _CALL.get(state)
        if call is None or call.text_len is None:
            raise RuntimeError(
                "a patched ViltEncoder must be called through its ViltModel, which tells it where the text ends; "
                "call the model (or pumer_patch.remove it first to use the encoder alone)"
            )
        policy = Policy.of(plan.mode)
        loop = Recorder(plan, checkpointing=_checkpointing(self))
        n_text0 = call.text_len
        sources = plan.trace or options.unmerge_text
        real = _key_mask(attention_mask, hidden_states)
        text = start(policy, hidden_states[:, :n_text0], real[:, :n_text0], text=True, source=sources)
        image = start(policy, hidden_states[:, n_text0:], real[:, n_text0:], source=sources)
        head = 0 if options.relevance == "first_head" else None
        # the research attention (reference) is a masked softmax over key weights (B, L), else an additive bias
        kind: _Kind = "masked" if policy.reference else ("sdpa" if sdpa else "eager")
        bias = real.float() if kind == "masked" else attention_mask

        all_hidden: tuple[Tensor, ...] = ()
        all_attn: tuple[Tensor, ...] = ()
        h = hidden_states
        for i, layer in enumerate(self.layer):
            if output_hidden_states:
                all_hidden += (h,)
            ratios = plan.schedule.get(i)
            where = f"ViltModel.encoder.layer[{i}] ({type(layer).__name__})"
            if ratios is None and kind == "eager":
                # transformers >= 4.52: a ViltLayer checkpoints itself when asked
                itself = bool(getattr(layer, "gradient_checkpointing", False))
                out = loop.run(_library_layer, layer, h, bias, output_attentions, library_checkpoints=itself)
                h, attn = _layer_result(where, h, out, output_attentions, policy.sizes)
            elif ratios is None:
                h, attn = loop.run(_own_layer, layer, h, bias, kind, output_attentions, where, policy.sizes)
            else:
                h, attn, text, image = loop.run(
                    _reduce_layer, layer, h, bias, text, image, ratios, policy, kind, head, options.merge_style,
                    output_attentions, where,
                )
                if kind == "masked":  # the research code resets the image mask to ones after reducing
                    bias = torch.cat([text.mask.float(), text.mask.new_ones(h.shape[0], image.count)], dim=1)
                else:
                    bias = key_bias(policy, [text, image], h.dtype)
                loop.count(i, image, text)
            if output_attentions:
                all_attn += (attn,)

        n_image = image.count
        record_trace(state, loop.trace(
            replace(image, x=h[:, -n_image:]), replace(text, x=h[:, :-n_image]), patch_index=call.patch_index, grid=call.grid
        ))
        if options.unmerge_text and text.count != n_text0:
            # dense text outputs (masked LM, token classification) read every original text position
            h = torch.cat([unmerge(h[:, : text.count], text.source), h[:, text.count :]], dim=1)
        if output_hidden_states:
            all_hidden += (h,)

        if not return_dict:
            return tuple(v for v in (h, all_hidden or None, all_attn or None) if v is not None)
        return BaseModelOutput(
            last_hidden_state=h,
            hidden_states=all_hidden or None,
            attentions=all_attn or None,
        )


_Kind = Literal["eager", "sdpa", "masked"]


def _heads(self_attn: ViltSelfAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v (B, H, L, d) from the layer's own projections, and the keys (B, L, H * d) for the metric."""
    b, length, _ = x.shape
    heads, d = self_attn.num_attention_heads, self_attn.attention_head_size
    keys = self_attn.key(x)
    q = self_attn.query(x).view(b, length, heads, d).transpose(1, 2)
    k = keys.view(b, length, heads, d).transpose(1, 2)
    v = self_attn.value(x).view(b, length, heads, d).transpose(1, 2)
    return q, k, v, keys


def _sdpa_attention(
    self_attn: ViltSelfAttention, x: Tensor, bias: Tensor | None, rows: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``ViltSelfAttention`` through ``F.scaled_dot_product_attention``, with the same projections.

    x: (B, L, C). Returns the context (B, L, H * d), the keys (B, L, H * d) and, for ``rows`` > 0,
    the attention probabilities of the first ``rows`` queries (B, H, rows, L), without dropout.
    """
    b, length, _ = x.shape
    q, k, v, keys = _heads(self_attn, x)
    mask = None if bias is None else bias.to(q.dtype)  # SDPA wants the query's dtype (autocast)
    p = self_attn.dropout.p if self_attn.training else 0.0
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    probs = None
    if rows:
        with torch.no_grad():  # indices only: relevance chooses which tokens to keep
            logits = q[:, :, :rows] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, rows, L)
            if mask is not None:
                logits = logits + mask[:, :, :rows]  # (B, 1, L, L) or (B, 1, 1, L)
            probs = logits.softmax(dim=-1)
    return context.transpose(1, 2).reshape(b, length, -1), keys, probs


def _masked_attention(self_attn: ViltSelfAttention, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``ViltSelfAttention`` with the research code's masked softmax (``core.masked_softmax``) over key weights.

    x: (B, L, C); weight: (B, L) float key weights (fractional after text merging). Padded query rows
    attend to the real keys and themselves, as in the research code, whose relevance sums them.
    Returns the context (B, L, H * d), the keys (B, L, H * d) and the probabilities (B, H, L, L)
    after dropout (the research code's relevance reads them so in training).
    """
    b, length, _ = x.shape
    q, k, v, keys = _heads(self_attn, x)
    probs = self_attn.dropout(masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), weight))
    return (probs @ v).transpose(1, 2).reshape(b, length, -1), keys, probs


def _attention_half(
    layer: ViltLayer, h: Tensor, bias: Tensor | None, kind: _Kind, rows: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``ViltLayer.forward`` up to the first residual: h (B, L, C) -> (B, L, C).

    bias: the additive 4D mask (eager, SDPA) or the key weights (B, L) (masked). Also returns the
    keys (B, L, H * d) and the attention probabilities: all of them (B, H, L, L) eagerly and masked,
    the first ``rows`` query rows (B, H, rows, L) with SDPA, None for SDPA with rows 0.
    """
    self_attn = layer.attention.attention
    if kind != "eager":
        x = layer.layernorm_before(h)
        if kind == "sdpa":
            context, keys, probs = _sdpa_attention(self_attn, x, bias, rows)
        else:
            context, keys, probs = _masked_attention(self_attn, x, bias)
        return layer.attention.output(context, h) + h, keys, probs
    x = layer.layernorm_before(h)
    # the keys are the merge metric; read from this call's key projection, not computed twice
    with captured(self_attn.key) as out:
        attn_out, probs = layer.attention(x, bias, output_attentions=True)
    return attn_out + h, out[0], probs


def _library_layer(layer: ViltLayer, h: Tensor, bias: Tensor | None, output_attentions: bool) -> tuple[Tensor, ...]:
    """The library's own ``ViltLayer`` call (eager attention, nothing to reduce)."""
    return layer(h, bias, output_attentions)


def _mlp_half(layer: ViltLayer, h: Tensor) -> Tensor:
    """``ViltLayer.forward`` after the first residual: layernorm, MLP, second residual."""
    return layer.output(layer.intermediate(layer.layernorm_after(h)), h)


def _layer_output(h: Tensor, probs: Tensor | None, output_attentions: bool) -> tuple[Tensor, ...]:
    """What ``ViltLayer.forward`` returns (its hooks see it): ``(h,)``, or ``(h, probs)`` with ``output_attentions``."""
    return (h, probs) if output_attentions else (h,)


def _layer_result(
    where: str, expected: Tensor, out: Any, output_attentions: bool, sized: bool
) -> tuple[Tensor, Tensor | None]:
    """The hidden states and probs from a layer's output after its hooks, which must keep the token count.

    expected: the hidden states (B, L, C) the layer computed, whose (B, L) the hooks' must keep.
    """
    if not isinstance(out, tuple):
        raise TypeError(
            f"a forward hook on {where} returned {type(out).__name__}; ViltLayer returns a tuple (hidden states "
            f"first), which the encoder reads: return one too"
        )
    return check_tokens(where, "a forward hook", expected, out[0], sized), (out[1] if output_attentions else None)


def _own_layer(
    layer: ViltLayer, h: Tensor, bias: Tensor | None, kind: _Kind, output_attentions: bool, where: str, sized: bool
) -> tuple[Tensor, Tensor | None]:
    """A whole ``ViltLayer`` with SDPA or the masked softmax, its hooks around it: (B, L, C) -> (B, L, C), and the probs.

    The probs (B, H, L, L) come back with ``output_attentions`` (masked; SDPA runs without it).
    """
    given = ((h, bias, output_attentions), {})

    def forward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, ...]:
        x, _, probs = _attention_half(layer, hidden_argument(where, given, args, kwargs, sized), bias, kind, rows=0)
        return _layer_output(_mlp_half(layer, x), probs, output_attentions)

    return _layer_result(where, h, call_as_block(layer, where, *given, forward), output_attentions, sized)


def _reduce_layer(
    layer: ViltLayer,
    h: Tensor,
    bias: Tensor | None,
    text: Tokens,
    image: Tokens,
    ratios: Ratios,
    policy: Policy,
    kind: _Kind,
    head: int | None,
    merge_style: Literal["tome", "tip"],
    output_attentions: bool,
    where: str,
) -> tuple[Tensor, Tensor | None, Tokens, Tokens]:
    """``ViltLayer.forward`` with PuMer's reduction between the attention residual and the MLP, its hooks around it.

    h: (B, T + N, C). head: the one head whose attention is the relevance, None for the head mean.
    merge_style: the image merge (``core.reduce_tokens``; ``"tip"`` in reference mode only).
    Returns the reduced (B, T' + N', C) (what the layer's forward hooks made of it), the attention
    probs (B, H, T+N, T+N) with ``output_attentions`` (None with SDPA), and the reduced text and image
    ``Tokens`` (their ``x`` before the MLP half; the encoder reads their sizes, masks and sources).
    """
    given = ((h, bias, output_attentions), {})
    sized = text.size is not None
    done: dict[str, Any] = {}  # this call's reduction, handed out of ``forward`` past the hooks

    def forward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, ...]:
        n_text = text.count
        x, keys, probs = _attention_half(layer, hidden_argument(where, given, args, kwargs, sized), bias, kind,
                                         rows=n_text)
        b, length, _ = x.shape
        # (B, L, H * d) -> (B, L, d): keys averaged over heads (ToMe, PuMer)
        metric = keys.view(b, length, layer.attention.attention.num_attention_heads, -1).mean(dim=2)
        to_image = probs[:, :, :n_text, n_text:] if head is None else probs[:, head : head + 1, :n_text, n_text:]
        relevance = text_to_image_relevance(to_image, text.mask, policy.mode)
        reduced = reduce_tokens(
            relevance,
            replace(image, x=x[:, n_text:]),
            ratios,
            image_metric=metric[:, n_text:],
            text_tokens=replace(text, x=x[:, :n_text]),
            text_metric=metric[:, :n_text],
            mode=policy.mode,
            merge_style=merge_style,
        )
        done["text"], done["image"] = reduced.text, reduced.image
        done["h"] = _mlp_half(layer, torch.cat([reduced.text.x, reduced.image.x], dim=1))
        return _layer_output(done["h"], None if kind == "sdpa" else probs, output_attentions)

    out = call_as_block(layer, where, *given, forward)
    h, attn = _layer_result(where, done["h"], out, output_attentions, sized)
    return h, attn, done["text"], done["image"]


def unmerge_hidden(hidden: Tensor, trace: Trace, fill: float = 0.0) -> Tensor:
    """Spread a patched ViLT's ``last_hidden_state`` back to the full ``[text ; image]`` grid.

    hidden: (B, T' + N', C) from a model patched with ``trace=True``; returns (B, T0 + N0, C), each
    original position holding the token that covers it (``fill`` where pruned). Text that the model
    already un-merged (``unmerge_text``) passes through.
    """
    if trace.image is None or trace.text is None:
        raise ValueError("unmerge_hidden needs a trace with sources: apply the patch with trace=True")
    n_image = trace.image.count
    text_part, image_part = hidden[:, :-n_image], hidden[:, -n_image:]
    if text_part.shape[1] == trace.text.count:
        text_part = unmerge(text_part, trace.text.source, fill)
    return torch.cat([text_part, unmerge(image_part, trace.image.source, fill)], dim=1)


def _dense_text_head(model: nn.Module) -> bool:
    """Whether a head reads every text position (masked LM, token classification)."""
    return any(isinstance(m, (ViltForMaskedLM, ViltForTokenClassification)) for m in model.modules())


class ViltAdapter(Adapter):
    name = "vilt"
    supports = "transformers ViltModel and every Vilt head (VQA, NLVR2, retrieval, masked LM, token classification)"
    Options = ViltOptions

    def roots(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, ViltModel)]

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        return root.encoder.layer

    def check(self, root: nn.Module) -> None:
        ensure_class(root, ViltModel, "the ViltModel")
        ensure_class(root.embeddings, ViltEmbeddings, "ViltModel.embeddings", ("forward", "visual_embed"))
        ensure_class(root.encoder, ViltEncoder, "ViltModel.encoder")
        for i, layer in enumerate(root.encoder.layer):
            ensure_class(layer, ViltLayer, f"ViltModel.encoder.layer[{i}]")
        warn_if_untested("transformers", transformers.__version__, _TESTED, "ViltLayer.forward")

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: dict[str, Any], mode: Mode, schedule: dict[int, Ratios]
    ) -> ViltOptions:
        resolved = ViltOptions(**options)
        for key in ("fixed_patch_order", "unmerge_text"):
            value = getattr(resolved, key)
            if not isinstance(value, bool) and not (key == "unmerge_text" and value is None):
                raise TypeError(f"{key} must be True or False, got {value!r}")
        if resolved.attention not in ("eager", "sdpa"):
            raise ValueError(f"attention must be 'eager' (ViLT's own) or 'sdpa', got {resolved.attention!r}")
        if resolved.attention == "sdpa" and mode == "reference":
            raise ValueError(
                "mode='reference' computes the research code's masked softmax in every layer, which SDPA cannot; "
                "use attention='eager' (the default) with it"
            )
        if resolved.relevance not in ("mean_head", "first_head"):
            raise ValueError(f"relevance must be 'mean_head' or 'first_head' (head 0, sim_method in PuMer), got {resolved.relevance!r}")
        if resolved.merge_style not in ("tome", "tip"):
            raise ValueError(f"merge_style must be 'tome' (means) or 'tip' (sums, the research code's), got {resolved.merge_style!r}")
        if resolved.merge_style == "tip" and mode != "reference":
            raise ValueError(
                "merge_style='tip' reproduces the research code (summed merges, fit only for checkpoints trained with "
                "them): use it with mode='reference', or leave merge_style at 'tome'"
            )
        dense = _dense_text_head(model)
        if resolved.unmerge_text is None:
            resolved = replace(resolved, unmerge_text=dense)
        elif dense and not resolved.unmerge_text and any(r.text_merge > 0 for r in schedule.values()):
            raise ValueError(
                "this ViLT head reads every text position (masked LM / token classification), but text merging "
                "with unmerge_text=False would hand it image tokens as text; leave unmerge_text at its default "
                "(True for these heads) or set text_merge_ratio=0"
            )
        layers = root.encoder.layer
        # SDPA runs every layer in parts, and so does reference mode where it reduces (its masked softmax)
        every = resolved.attention == "sdpa" or (mode == "reference" and bool(schedule))
        refuse_backward_hooks_on(layers, range(len(layers)) if every else schedule, "ViltModel.encoder.layer")
        return resolved

    def swaps(self, root: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
        return [(root, PumerViltModel), (root.embeddings, PumerViltEmbeddings), (root.encoder, PumerViltEncoder)]

    def config_reduction(self, root: nn.Module) -> dict[str, Any] | None:
        """A PuMer ViLT config's ``prune_r``, ``merge_r``, ``merge_text``, ``reduce_layers`` (layer indices),
        ``sim_method`` and ``merge_style`` -> ``apply`` arguments (the converters carry them into the config)."""
        config = root.config
        layers = sorted(int(i) for i in (getattr(config, "reduce_layers", None) or []))
        ratios = Ratios(*(float(getattr(config, k, 0) or 0) for k in ("prune_r", "merge_r", "merge_text")))
        if not layers or ratios.is_zero:
            return None
        sim = getattr(config, "sim_method", "mean_head")
        relevance = {"mean_head": "mean_head", "mh": "mean_head", "first_head": "first_head", "fh": "first_head"}.get(sim)
        if relevance is None:
            raise ValueError(f"config.sim_method={sim!r} is not supported; pumer_patch reads 'mean_head' or 'first_head'")
        merge_style = getattr(config, "merge_style", "tome")
        return {"layers": layers, "ratios": ratios, "mode": "reference", "relevance": relevance, "merge_style": merge_style}
