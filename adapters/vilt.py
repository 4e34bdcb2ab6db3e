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
  zero-reduction parity tests).

Option ``attention="sdpa"`` (default ``"eager"``, ViLT's own): every layer of the loop computes its
self-attention with ``F.scaled_dot_product_attention`` from the layer's own query/key/value/output
projections, and a reduce layer computes only the text query rows of the attention probabilities
for its relevance (``2 B H T L d`` more FLOPs). On a 2-core CPU, one ViLT-B/32 attention module at
batch 8 runs 1.33x faster at 185 tokens and 1.0-1.1x at 53-120 tokens; outputs agree with eager to
about 1e-6 relative in float32 (``test_sdpa_matches_eager``). Attention dropout still applies in
training; the relevance rows are taken before dropout. ``output_attentions=True`` runs that forward
eagerly (SDPA returns no probabilities). With ``attention="sdpa"`` the loop runs even when nothing
is reduced (``layers=[]``), so SDPA alone can be had.

When the plan reduces nothing (and attention is eager), both fall through to the library's forward.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
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
from torch.utils.checkpoint import checkpoint

from pumer_patch.core import Mode, Tokens, attention_bias, init_source, reduce_tokens, take_rows, text_to_image_relevance, unmerge
from pumer_patch.ratios import Ratios

from .base import STATE_ATTR, Adapter, LayerCount, PatchState, Trace, ensure_class, restore_class, swap_class

__all__ = ["ViltAdapter", "PumerViltEmbeddings", "PumerViltEncoder", "unmerge_hidden"]

_TESTED = (Version("4.40"), Version("6"))
_SHARED = "_pumer_state"  # the root's PatchState, on the swapped sub-modules


class PumerViltEmbeddings(ViltEmbeddings):
    """``ViltEmbeddings`` that hands the text length and patch grid positions to the encoder."""

    _pumer_patched = True

    def visual_embed(self, pixel_values: Tensor, pixel_mask: Tensor, max_image_length: int = 200):
        x, x_mask, (patch_index, grid) = super().visual_embed(pixel_values, pixel_mask, max_image_length)
        state: PatchState = getattr(self, _SHARED)
        if state.plan.schedule and state.plan.options["fixed_patch_order"]:
            # raster order, padding last; the image [CLS] stays first
            key = patch_index[..., 0] * grid[1] + patch_index[..., 1]  # (B, P)
            key = key + (x_mask[:, 1:] == 0).long() * (grid[0] * grid[1])
            order = key.argsort(dim=1, stable=True)  # (B, P)
            patch_index = take_rows(patch_index, order)
            order = torch.cat([torch.zeros_like(order[:, :1]), order + 1], dim=1)  # (B, 1 + P)
            x = take_rows(x, order)
            x_mask = x_mask.gather(1, order)
        state.pending["patch_index"] = patch_index
        state.pending["grid"] = grid
        return x, x_mask, (patch_index, grid)

    def forward(self, input_ids: Tensor | None, attention_mask: Tensor, *args: Any, **kwargs: Any):
        getattr(self, _SHARED).pending["text_len"] = attention_mask.shape[1]
        return super().forward(input_ids, attention_mask, *args, **kwargs)


def _key_mask(attention_mask: Tensor | None, hidden: Tensor) -> Tensor:
    """(B, L) bool, True for real tokens, from ViLT's 4D additive mask (B, 1, L, L) or None."""
    b, length = hidden.shape[:2]
    if attention_mask is None:
        return torch.ones(b, length, dtype=torch.bool, device=hidden.device)
    # bidirectional: every query row carries the same key mask
    return attention_mask[:, 0, 0, :] > torch.finfo(attention_mask.dtype).min / 2


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
        state: PatchState = getattr(self, _SHARED)
        pending, state.pending = state.pending, {}
        plan = state.plan
        sdpa = plan.options["attention"] == "sdpa" and not output_attentions
        if not plan.schedule and not sdpa:
            state.last = Trace()
            return super().forward(hidden_states, attention_mask, output_attentions, output_hidden_states, return_dict)
        if "text_len" not in pending:
            raise RuntimeError("a patched ViltEncoder must be called through its ViltModel, which marks the text length")
        reference = plan.mode == "reference"
        track_source = plan.trace or plan.options["unmerge_text"]
        b, length, _ = hidden_states.shape
        n_text0 = pending["text_len"]
        device = hidden_states.device

        real = _key_mask(attention_mask, hidden_states)
        # reference: the research code keeps the text mask as floats (it becomes fractional on merging)
        text = Tokens(hidden_states[:, :n_text0], mask=real[:, :n_text0].float() if reference else real[:, :n_text0])
        image = Tokens(hidden_states[:, n_text0:], mask=real[:, n_text0:])
        if not reference:
            text.size = hidden_states.new_ones(b, n_text0, dtype=torch.float32)
            image.size = hidden_states.new_ones(b, length - n_text0, dtype=torch.float32)
        if track_source:
            text.source = init_source(b, n_text0, device)
            image.source = init_source(b, length - n_text0, device)

        bias = attention_mask
        all_hidden: tuple[Tensor, ...] = ()
        all_attn: tuple[Tensor, ...] = ()
        counts: list[LayerCount] = []
        h = hidden_states
        for i, layer in enumerate(self.layer):
            if output_hidden_states:
                all_hidden += (h,)
            ratios = plan.schedule.get(i)
            if ratios is None and sdpa:
                attn = None
                if self.gradient_checkpointing and self.training:
                    h = checkpoint(_sdpa_layer, layer, h, bias, use_reentrant=False)
                else:
                    h = _sdpa_layer(layer, h, bias)
            elif ratios is None:
                out = layer(h, bias, output_attentions)
                h = out[0]
                attn = out[1] if output_attentions else None
            else:
                h, attn, text, image = _reduce_layer(layer, h, bias, text, image, ratios, plan.mode, sdpa)
                bias = _sequence_bias(text, image, reference, h.dtype)
                counts.append(LayerCount(i, image.count, text.count))
            if output_attentions:
                all_attn += (attn,)

        state.last = _trace(plan.trace, counts, h, text, image, pending)
        if plan.options["unmerge_text"] and text.count != n_text0:
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


def _sdpa_attention(
    self_attn: ViltSelfAttention, x: Tensor, bias: Tensor | None, rows: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``ViltSelfAttention`` through ``F.scaled_dot_product_attention``, with the same projections.

    x: (B, L, C). Returns the context (B, L, H * d), the keys (B, L, H * d) and, for ``rows`` > 0,
    the attention probabilities of the first ``rows`` queries (B, H, rows, L), without dropout.
    """
    b, length, _ = x.shape
    heads, d = self_attn.num_attention_heads, self_attn.attention_head_size
    q = self_attn.query(x).view(b, length, heads, d).transpose(1, 2)
    keys = self_attn.key(x)
    k = keys.view(b, length, heads, d).transpose(1, 2)
    v = self_attn.value(x).view(b, length, heads, d).transpose(1, 2)
    mask = None if bias is None else bias.to(q.dtype)  # SDPA wants the query's dtype (autocast)
    p = self_attn.dropout.p if self_attn.training else 0.0
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    probs = None
    if rows:
        with torch.no_grad():  # indices only: relevance chooses which tokens to keep
            logits = q[:, :, :rows] @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, rows, L)
            if mask is not None:
                logits = logits + mask[:, :, :rows]  # (B, 1, L, L) or (B, 1, 1, L)
            probs = logits.softmax(dim=-1)
    return context.transpose(1, 2).reshape(b, length, heads * d), keys, probs


def _attention_half(
    layer: ViltLayer, h: Tensor, bias: Tensor | None, sdpa: bool, rows: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``ViltLayer.forward`` up to the first residual: h (B, L, C) -> (B, L, C).

    Also returns the keys (B, L, H * d) and the attention probabilities: all of them (B, H, L, L)
    eagerly, the first ``rows`` query rows (B, H, rows, L) with SDPA, None for SDPA with rows 0.
    """
    self_attn = layer.attention.attention
    if sdpa:
        context, keys, probs = _sdpa_attention(self_attn, layer.layernorm_before(h), bias, rows)
        return layer.attention.output(context, h) + h, keys, probs
    captured: dict[str, Tensor] = {}
    # the keys are the merge metric; a hook for this one call avoids computing them twice
    handle = self_attn.key.register_forward_hook(lambda _m, _i, out: captured.__setitem__("key", out))
    try:
        attn_out, probs = layer.attention(layer.layernorm_before(h), bias, output_attentions=True)
    finally:
        handle.remove()
    return attn_out + h, captured["key"], probs


def _mlp_half(layer: ViltLayer, h: Tensor) -> Tensor:
    """``ViltLayer.forward`` after the first residual: layernorm, MLP, second residual."""
    return layer.output(layer.intermediate(layer.layernorm_after(h)), h)


def _sdpa_layer(layer: ViltLayer, h: Tensor, bias: Tensor | None) -> Tensor:
    """A whole ``ViltLayer`` with SDPA attention: (B, L, C) -> (B, L, C)."""
    return _mlp_half(layer, _attention_half(layer, h, bias, sdpa=True, rows=0)[0])


def _reduce_layer(
    layer: ViltLayer,
    h: Tensor,
    bias: Tensor | None,
    text: Tokens,
    image: Tokens,
    ratios: Ratios,
    mode: str,
    sdpa: bool,
) -> tuple[Tensor, Tensor | None, Tokens, Tokens]:
    """``ViltLayer.forward`` with PuMer's reduction between the attention residual and the MLP.

    h: (B, T + N, C). Returns the reduced (B, T' + N', C), the attention probs (B, H, T+N, T+N)
    (None with SDPA), and the reduced text and image ``Tokens`` (their ``x`` are views of the new ``h``).
    """
    n_text = text.count
    h, keys, probs = _attention_half(layer, h, bias, sdpa, rows=n_text)
    b, length, _ = h.shape
    # (B, L, H * d) -> (B, L, d): keys averaged over heads (ToMe, PuMer)
    metric = keys.view(b, length, layer.attention.attention.num_attention_heads, -1).mean(dim=2)
    relevance = text_to_image_relevance(probs[:, :, :n_text, n_text:], text.mask, mode)
    reduced = reduce_tokens(
        relevance,
        Tokens(h[:, n_text:], image.size, image.source, image.mask),
        ratios,
        img_metric=metric[:, n_text:],
        text_tokens=Tokens(h[:, :n_text], text.size, text.source, text.mask),
        text_metric=metric[:, :n_text],
        mode=mode,  # type: ignore[arg-type]
    )
    text, image = reduced.text, reduced.image
    h = _mlp_half(layer, torch.cat([text.x, image.x], dim=1))
    return h, None if sdpa else probs, text, image


def _sequence_bias(text: Tokens, image: Tokens, reference: bool, dtype: torch.dtype) -> Tensor | None:
    """The additive attention bias (B, 1, 1, T + N) after a reduction: padding, and log(size) by default."""
    if reference:  # no sizes; the research code resets image masks to ones after reducing
        image_mask = image.mask.float() if image.mask is not None else text.mask.new_ones(image.x.shape[:2])
        return attention_bias(None, torch.cat([text.mask.float(), image_mask], dim=1), dtype)
    return attention_bias(torch.cat([text.size, image.size], dim=1), torch.cat([text.mask, image.mask], dim=1), dtype)


def _trace(full: bool, counts: list[LayerCount], h: Tensor, text: Tokens, image: Tokens, pending: dict) -> Trace:
    if not full:
        return Trace(counts=counts)
    h = h.detach()
    n_image = image.count
    return Trace(
        counts=counts,
        text=Tokens(h[:, :-n_image], text.size, text.source, text.mask),
        image=Tokens(h[:, -n_image:], image.size, image.source, image.mask),
        extra={k: pending[k] for k in ("patch_index", "grid") if k in pending},
    )


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


class ViltAdapter(Adapter):
    name = "vilt"
    supports = "transformers ViltModel and every Vilt head (VQA, NLVR2, retrieval, masked LM, token classification)"
    options: Mapping[str, Any] = {"fixed_patch_order": True, "unmerge_text": None, "attention": "eager"}

    def roots(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, ViltModel)]

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        return root.encoder.layer

    def check(self, root: nn.Module) -> None:
        ensure_class(root.embeddings, ViltEmbeddings, "ViltModel.embeddings")
        ensure_class(root.encoder, ViltEncoder, "ViltModel.encoder")
        for i, layer in enumerate(root.encoder.layer):
            ensure_class(layer, ViltLayer, f"ViltModel.encoder.layer[{i}]")
        version = Version(transformers.__version__)
        if not _TESTED[0] <= version < _TESTED[1]:
            warnings.warn(
                f"pumer_patch's ViLT reduce layer repeats ViltLayer.forward as of transformers "
                f"{_TESTED[0]}..<{_TESTED[1]}; found {version}. Check zero-reduction parity.",
                stacklevel=3,
            )

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: Mapping[str, Any], mode: Mode = "default"
    ) -> dict[str, Any]:
        resolved = {**self.options, **options}
        if resolved["unmerge_text"] is None:
            dense_text = (ViltForMaskedLM, ViltForTokenClassification)
            resolved["unmerge_text"] = any(isinstance(m, dense_text) for m in model.modules())
        for key in ("fixed_patch_order", "unmerge_text"):
            if not isinstance(resolved[key], bool):
                raise TypeError(f"{key} must be True or False, got {resolved[key]!r}")
        if resolved["attention"] not in ("eager", "sdpa"):
            raise ValueError(f"attention must be 'eager' (ViLT's own) or 'sdpa', got {resolved['attention']!r}")
        return resolved

    def patch(self, root: nn.Module, state: PatchState) -> None:
        swap_class(root.embeddings, PumerViltEmbeddings)
        swap_class(root.encoder, PumerViltEncoder)
        setattr(root.embeddings, _SHARED, state)
        setattr(root.encoder, _SHARED, state)
        setattr(root, STATE_ATTR, state)

    def unpatch(self, root: nn.Module) -> None:
        for module in (root.embeddings, root.encoder):
            restore_class(module)
            if _SHARED in vars(module):
                delattr(module, _SHARED)
        if STATE_ATTR in vars(root):
            delattr(root, STATE_ATTR)
