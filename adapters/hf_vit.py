"""Hugging Face ``transformers`` vision transformers: CLIP, SigLIP, DINOv2 (with registers) and ViT.

Found by ``isinstance``: ``CLIPVisionModel`` (alone, in ``CLIPVisionModelWithProjection``, or the image
tower of a ``CLIPModel``, whose text tower is left alone), ``SiglipVisionModel`` (alone or in a
``SiglipModel``), ``Dinov2Model``, ``Dinov2WithRegistersModel`` and ``ViTModel``, with the image
classification heads of all of them.

The library's own forwards run unchanged around the blocks: embeddings (``interpolate_pos_encoding``
and other image sizes included), the padding mask each attention implementation takes
(``create_bidirectional_mask``), the loop over the layers, ``capture_outputs``, the layers' own
gradient checkpointing and the final norms. Only the instance class of each layer of the tower is
switched, to a module-level subclass:

* the first layer starts a token stream (sizes, padding mask, sources);
* a plain layer calls the library's forward, with the library's attention mask while it still fits
  the tokens and with the key bias of the stream after that: ``log(size)`` (proportional attention)
  plus padding, as an additive (B, 1, 1, N) mask, which the eager and the SDPA attention both add to
  their logits;
* a reduce layer runs the attention half and the MLP half through the layer's own sub-modules
  (norms, the attention module, layer scale, drop path, MLP) with ``_vit._reduce_block`` between
  them (ToMe's and PuMer's place): relevance, merge metric and ``reduce_tokens``.

The stream travels from one layer to the next with the hidden-state tensor itself (a weak dictionary
keyed by the tensor, looked up before the layer's gradient checkpointing and handed to its forward as
an argument), so each call, thread and batch has its own, and nothing is kept on a module.

Attention implementations: ``eager`` and ``sdpa``. The merge metric is the keys averaged over heads,
read from the attention's own ``k_proj`` call. With ``eager``, pruning relevance comes from the
probabilities the layer computed (in training they are the post-dropout ones); with ``sdpa`` it is
computed from the query rows the relevance needs alone (the [CLS] row: ``2 B H N d`` FLOPs; for
``"received"``, every non-prefix row), taken from the attention's own ``q_proj`` call
(``_vit.attention_relevance``). Flash and flex attention are refused: the first takes no additive
bias, the second returns no probabilities we could read and compiles per shape.

``output_hidden_states`` keeps the library's meaning: every layer's output, whose token count falls
after each reduce layer (a tuple of tensors of different lengths); ``output_attentions`` (eager) gives
each layer's probabilities over its own tokens.

Prefix tokens protected (never pruned or merged): [CLS] (CLIP, DINOv2, ViT) and DINOv2's register
tokens. Relevance ``"auto"``: the [CLS] row, except SigLIP (no [CLS], attention-pooled): the
size-weighted attention the tokens receive (see ``_vit``).

Heads that average tokens count each by its size: SigLIP's ``SiglipMultiheadAttentionPoolingHead``
gets ``log(size)`` as a key bias (proportional attention of its probe), and the DINOv2 and SigLIP
image classifiers take the size-weighted mean of the tokens they average (``_vit.weighted_mean``). For
that the tower's final norm passes the sizes on with its output (``_vit.sizes_of``); the pooling
head's and the classifiers' forwards are repeated from transformers 5 (checked by the zero-reduction
parity tests). [CLS]-pooled outputs (CLIP, ViT, DINOv2's pooler) need nothing.

Text guidance (``text_guidance``) for ``CLIPModel`` and ``SiglipModel``: pruning can follow a text
query, as open_clip's; the image embedding then depends on the query, so it cannot be cached.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoderLayer,
    CLIPModel,
    CLIPVisionModel,
)
from transformers.models.dinov2.modeling_dinov2 import (
    Dinov2Attention,
    Dinov2ForImageClassification,
    Dinov2Layer,
    Dinov2Model,
)
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersAttention,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersModel,
)
from transformers.models.siglip.modeling_siglip import (
    SiglipAttention,
    SiglipEncoderLayer,
    SiglipForImageClassification,
    SiglipModel,
    SiglipMultiheadAttentionPoolingHead,
    SiglipVisionModel,
)
from transformers.models.vit.modeling_vit import ViTAttention, ViTForMaskedImageModeling, ViTLayer, ViTModel
from transformers.utils.generic import can_return_tuple

from pumer_patch.core import Mode, Tokens, attention_bias
from pumer_patch.ratios import Ratios

from ._loop import CallScope, Loop, Policy, key_bias, output_of, start
from ._vit import (
    Attended,
    BlockOps,
    VitOptions,
    _block_ratios,
    _reduce_block,
    reduces,
    remember_sizes,
    resolve_vit_options,
    sizes_of,
    weighted_mean,
)
from .base import SHARED_ATTR, STATE_ATTR, Adapter, LayerCount, PatchState, Trace, ensure_class

__all__ = ["HfVitAdapter", "text_guidance"]

_TESTED = (Version("5.0"), Version("6"))
_IMPLEMENTATIONS = ("eager", "sdpa")
SPOT_ATTR = "_pumer_spot"  # the _Spot of each switched layer


# ---------------------------------------------------------------------------------------------
# the token stream, from layer to layer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spot:
    """Where a switched layer sits: its block index, whether it is the last, the protected prefix."""

    index: int
    last: bool
    protected: int


@dataclass(frozen=True)
class _Stream:
    """The state of the tokens leaving a layer, for one forward; never holds the hidden states themselves.

    size / mask / source: (B, N) as in ``Tokens`` (mask: True for real tokens, None without padding).
    bias: (B, 1, 1, N) the additive key bias of these tokens (log(size) and padding), None when zero.
    own: the library's attention mask no longer fits (tokens went): plain layers get ``bias`` instead.
    merged: a merge happened, so sizes differ from one.
    counts: the counts after each reduce layer so far.
    """

    size: Tensor | None
    mask: Tensor | None
    source: Tensor | None
    bias: Tensor | None
    own: bool
    merged: bool
    counts: tuple[LayerCount, ...]

    def tokens(self, x: Tensor) -> Tokens:
        return Tokens(x, size=self.size, source=self.source, mask=self.mask)


# hidden states a switched layer returned -> their stream; weak: a dropped tensor takes its entry along
_STREAMS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
# relevance from a text query, per patched tower, set by ``text_guidance`` for its ``with`` block
_GUIDANCE: CallScope[Callable[[Tensor], Tensor]] = CallScope("pumer_patch_hf_vit_guidance")


def _key_mask(attention_mask: Tensor | None) -> Tensor | None:
    """(B, N) bool, True for real keys, from the library's 4D mask (additive float or bool), or None."""
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, 0, :]  # bidirectional: the [CLS] query row carries the key padding
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def _start(policy: Policy, x: Tensor, attention_mask: Tensor | None, source: bool) -> _Stream:
    """The stream entering the first layer: x (B, N, C), the library's mask (B, 1, N, N) or None."""
    tokens = start(policy, x, _key_mask(attention_mask), source=source)
    bias = None if tokens.mask is None else key_bias(policy, [tokens], x.dtype)
    return _Stream(tokens.size, tokens.mask, tokens.source, bias, own=False, merged=False, counts=())


# ---------------------------------------------------------------------------------------------
# the two halves of each library layer, through its own sub-modules
# ---------------------------------------------------------------------------------------------


class _Halves(NamedTuple):
    """How one library layer class splits at the reduce point.

    norm / attention: attribute names of the pre-attention norm and the attention module.
    residual(layer, x, out) -> x: the attention output ``out`` (B, N, C) into the residual stream.
    finish(layer, x) -> x: the MLP half.
    """

    norm: str
    attention: str
    residual: Callable[[nn.Module, Tensor, Tensor], Tensor]
    finish: Callable[[nn.Module, Tensor], Tensor]


# each repeats the library's lines as of transformers 5 (the zero-reduction parity tests check them)
_CLIP = _Halves(
    "layer_norm1",
    "self_attn",
    lambda layer, x, out: x + out,
    lambda layer, x: x + layer.mlp(layer.layer_norm2(x)),
)
_DINOV2 = _Halves(
    "norm1",
    "attention",
    lambda layer, x, out: layer.drop_path(layer.layer_scale1(out)) + x,
    lambda layer, x: layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))) + x,
)
_VIT = _Halves(
    "layernorm_before",
    "attention",
    lambda layer, x, out: layer.dropout(out) + x,
    lambda layer, x: layer.dropout(layer.mlp(layer.layernorm_after(x))) + x,
)


def _attend(
    halves: _Halves, mask: Tensor | None, kwargs: dict[str, Any], layer: nn.Module, x: Tensor,
    bias: Tensor | None, rows: slice | None,
) -> Attended:
    """The attention half: x (B, N, C) -> (B, N, C), with the keys and the probabilities (eager) or q rows.

    mask: what the attention gets (the library's own mask while it fits, else the stream's bias);
    ``bias`` (the stream's) is for the relevance of ``_vit._reduce_block`` only.
    """
    attn = getattr(layer, halves.attention)
    h = getattr(layer, halves.norm)(x)
    with output_of(attn.q_proj, h) as q_out, output_of(attn.k_proj, h) as k_out:
        out, probs = attn(h, attention_mask=mask, **kwargs)
    x = halves.residual(layer, x, out)
    b, n, _ = x.shape
    d = attn.head_dim
    k = k_out["out"].view(b, n, -1, d).transpose(1, 2)  # (B, N, H * d) -> (B, H, N, d)
    q = None
    if rows is not None and probs is None:
        q = q_out["out"][:, rows].reshape(b, -1, k.shape[1], d).transpose(1, 2)  # (B, Q, H * d) -> (B, H, Q, d)
    scale = attn.scale if hasattr(attn, "scale") else attn.scaling
    return Attended(x, q, k, scale, probs)


def _forward(
    layer: nn.Module, halves: _Halves, library: Callable[..., Tensor], x: Tensor,
    attention_mask: Tensor | None, stream: _Stream | None, kwargs: dict[str, Any],
) -> Tensor:
    """A switched layer's forward: x (B, N, C) -> (B, N', C); the library's own when not reducing."""
    if stream is None:
        return library(x, attention_mask, **kwargs)
    state: PatchState = getattr(layer, SHARED_ATTR)
    spot: _Spot = getattr(layer, SPOT_ATTR)
    plan = state.plan
    mask = stream.bias if stream.own else attention_mask
    ratios = _block_ratios(plan, spot.index, x.shape[1], spot.protected)
    if ratios is None:
        out = library(x, mask, **kwargs)
    else:
        ops = BlockOps(library, partial(_attend, halves, mask, kwargs), halves.finish)
        cls_row = plan.options.relevance == "cls"
        tokens, merged = _reduce_block(
            layer, stream.tokens(x), stream.bias, ratios, ops, spot.protected, cls_row, _GUIDANCE.get(state)
        )
        policy = Policy.of(plan.mode)
        bias = key_bias(policy, [tokens], x.dtype) if merged or stream.bias is not None else None
        counts = (*stream.counts, LayerCount(spot.index, tokens.count, 0))
        own = stream.own or tokens.count != x.shape[1]
        out = tokens.x
        stream = _Stream(tokens.size, tokens.mask, tokens.source, bias, own, stream.merged or merged, counts)
    _STREAMS[out] = stream
    if spot.last:
        state.last = Loop(plan, counts=list(stream.counts)).trace(stream.tokens(out))
    return out


def _call(layer: nn.Module, library: Callable[..., Tensor], x: Tensor, attention_mask: Tensor | None,
          kwargs: dict[str, Any]) -> Tensor:
    """A switched layer's ``__call__``: finds the stream of ``x`` before the layer's checkpointing, hands it on."""
    state: PatchState = getattr(layer, SHARED_ATTR)
    spot: _Spot = getattr(layer, SPOT_ATTR)
    plan = state.plan
    if not reduces(plan):
        if spot.last:
            state.last = Trace()
        return library(x, attention_mask, **kwargs)
    stream = _STREAMS.get(x)
    if stream is None:
        if spot.index != 0:
            raise RuntimeError(
                f"layer {spot.index} of a pumer_patch-reduced tower got hidden states that did not come from the "
                f"layer before it, so their token sizes are unknown; run the model's own forward, or "
                f"pumer_patch.remove(model) first to call its layers one by one"
            )
        stream = _start(Policy.of(plan.mode), x, attention_mask, plan.trace)
    return library(x, attention_mask, _pumer_stream=stream, **kwargs)


class PumerCLIPEncoderLayer(CLIPEncoderLayer):
    """``CLIPEncoderLayer`` of an image tower, reducing at the planned blocks; see the module docstring."""

    _pumer_patched = True

    def __call__(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return _call(self, super().__call__, hidden_states, attention_mask, kwargs)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                _pumer_stream: _Stream | None = None, **kwargs: Any) -> Tensor:
        return _forward(self, _CLIP, super().forward, hidden_states, attention_mask, _pumer_stream, kwargs)


class PumerSiglipEncoderLayer(SiglipEncoderLayer):
    """``SiglipEncoderLayer`` of an image tower, as above."""

    _pumer_patched = True

    def __call__(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return _call(self, super().__call__, hidden_states, attention_mask, kwargs)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                _pumer_stream: _Stream | None = None, **kwargs: Any) -> Tensor:
        return _forward(self, _CLIP, super().forward, hidden_states, attention_mask, _pumer_stream, kwargs)


class PumerDinov2Layer(Dinov2Layer):
    """``Dinov2Layer``, as above."""

    _pumer_patched = True

    def __call__(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return _call(self, super().__call__, hidden_states, attention_mask, kwargs)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                _pumer_stream: _Stream | None = None, **kwargs: Any) -> Tensor:
        return _forward(self, _DINOV2, super().forward, hidden_states, attention_mask, _pumer_stream, kwargs)


class PumerDinov2WithRegistersLayer(Dinov2WithRegistersLayer):
    """``Dinov2WithRegistersLayer``, as above."""

    _pumer_patched = True

    def __call__(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return _call(self, super().__call__, hidden_states, attention_mask, kwargs)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                _pumer_stream: _Stream | None = None, **kwargs: Any) -> Tensor:
        return _forward(self, _DINOV2, super().forward, hidden_states, attention_mask, _pumer_stream, kwargs)


class PumerViTLayer(ViTLayer):
    """``ViTLayer``, as above."""

    _pumer_patched = True

    def __call__(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return _call(self, super().__call__, hidden_states, attention_mask, kwargs)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                _pumer_stream: _Stream | None = None, **kwargs: Any) -> Tensor:
        return _forward(self, _VIT, super().forward, hidden_states, attention_mask, _pumer_stream, kwargs)


# ---------------------------------------------------------------------------------------------
# heads that average tokens
# ---------------------------------------------------------------------------------------------


class PumerLayerNorm(nn.LayerNorm):
    """A tower's final ``LayerNorm`` whose output remembers the token sizes of its input (``_vit.sizes_of``)."""

    _pumer_patched = True

    def forward(self, x: Tensor) -> Tensor:
        stream = _STREAMS.get(x)
        # sizes only once a merge made them differ from one: before that the heads run as the library's
        size = None if stream is None or not stream.merged else stream.size
        return remember_sizes(super().forward(x), size)


class PumerSiglipMultiheadAttentionPoolingHead(SiglipMultiheadAttentionPoolingHead):
    """SigLIP's attention pooling with ``log(size)`` added to its probe's logits (proportional attention)."""

    _pumer_patched = True

    def forward(self, hidden_state: Tensor) -> Tensor:
        """hidden_state (B, N, C) -> (B, C); the library's lines with a key bias (transformers 5)."""
        size = sizes_of(hidden_state)
        if size is None:
            return super().forward(hidden_state)
        b, n = size.shape
        bias = attention_bias(size, None, hidden_state.dtype)  # (B, 1, 1, N)
        # nn.MultiheadAttention takes a float (B * H, L, N) mask; one probe row: L = 1
        mask = bias.reshape(b, 1, n).repeat_interleave(self.attention.num_heads, dim=0)
        probe = self.probe.repeat(b, 1, 1)
        hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=mask)[0]
        residual = hidden_state
        hidden_state = self.layernorm(hidden_state)
        hidden_state = residual + self.mlp(hidden_state)
        return hidden_state[:, 0]


def _mean(tokens: Tensor) -> Tensor:
    """The mean over tokens (B, N, C) -> (B, C), by size where a merge made sizes differ."""
    size = sizes_of(tokens)
    return tokens.mean(dim=1) if size is None else weighted_mean(tokens, size)


def _size_slice(features: Tensor, start: int) -> Tensor:
    """``features[:, start:]`` (B, N - start, C), remembering the sizes of those tokens."""
    size = sizes_of(features)
    return remember_sizes(features[:, start:], None if size is None else size[:, start:])


def _dinov2_classify(
    model: nn.Module, tower: nn.Module, start: int, pixel_values: Tensor | None, labels: Tensor | None,
    attention_mask: Tensor | None, kwargs: dict[str, Any],
) -> ImageClassifierOutput:
    """``Dinov2(WithRegisters)ForImageClassification.forward`` (transformers 5) with the patch mean by size."""
    outputs = tower(pixel_values, attention_mask=attention_mask, **kwargs)
    sequence_output = outputs.last_hidden_state
    cls_token = sequence_output[:, 0]
    linear_input = torch.cat([cls_token, _mean(_size_slice(sequence_output, start))], dim=1)
    logits = model.classifier(linear_input)
    loss = None
    if labels is not None:
        loss = model.loss_function(labels, logits, model.config, **kwargs)
    return ImageClassifierOutput(
        loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


class PumerDinov2ForImageClassification(Dinov2ForImageClassification):
    """DINOv2's classifier, reading [CLS] and the size-weighted mean of the patch tokens."""

    _pumer_patched = True

    @can_return_tuple
    def forward(self, pixel_values: Tensor | None = None, labels: Tensor | None = None,
                attention_mask: Tensor | None = None, **kwargs: Any) -> ImageClassifierOutput:
        return _dinov2_classify(self, self.dinov2, 1, pixel_values, labels, attention_mask, kwargs)


class PumerDinov2WithRegistersForImageClassification(Dinov2WithRegistersForImageClassification):
    """DINOv2-with-registers' classifier, as above (registers left out of the mean, as the library does)."""

    _pumer_patched = True

    @can_return_tuple
    def forward(self, pixel_values: Tensor | None = None, labels: Tensor | None = None,
                attention_mask: Tensor | None = None, **kwargs: Any) -> ImageClassifierOutput:
        start = 1 + self.config.num_register_tokens
        return _dinov2_classify(self, self.dinov2_with_registers, start, pixel_values, labels, attention_mask, kwargs)


class PumerSiglipForImageClassification(SiglipForImageClassification):
    """SigLIP's classifier, on the size-weighted mean of the tokens."""

    _pumer_patched = True

    @can_return_tuple
    def forward(self, pixel_values: Tensor | None = None, labels: Tensor | None = None,
                interpolate_pos_encoding: bool = False, **kwargs: Any) -> ImageClassifierOutput:
        """``SiglipForImageClassification.forward`` (transformers 5) with the mean by size."""
        outputs = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        logits = self.classifier(_mean(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# ``save_pretrained`` writes the instance class's ``__name__`` into config.architectures, which must name
# the library's class; pickling resolves classes by ``__qualname__``, which stays ours (as ViLT's adapter)
for _cls in (
    PumerDinov2ForImageClassification, PumerDinov2WithRegistersForImageClassification, PumerSiglipForImageClassification
):
    _cls.__name__ = _cls.__mro__[1].__name__


# ---------------------------------------------------------------------------------------------
# the families
# ---------------------------------------------------------------------------------------------


class _Family(NamedTuple):
    """One library's tower: where its layers are, what they are, what the patch switches around them.

    tower: the vision model class (a root, or a classifier's backbone); layer / attention: the library's
    classes of its blocks and their attention; patched_layer: ours. layers(tower): the blocks.
    protected(tower): prefix tokens. halves: how a block splits. cls: pooled from [CLS].
    final_norm: the tower's norm before a size-aware head ("" for none).
    """

    tower: type[nn.Module]
    layer: type[nn.Module]
    attention: type[nn.Module]
    patched_layer: type[nn.Module]
    layers: Callable[[nn.Module], Sequence[nn.Module]]
    protected: Callable[[nn.Module], int]
    halves: _Halves
    cls: bool
    final_norm: str = ""


_CLIP_FAMILY = _Family(CLIPVisionModel, CLIPEncoderLayer, CLIPAttention, PumerCLIPEncoderLayer,
                       lambda t: t.encoder.layers, lambda t: 1, _CLIP, cls=True)
_SIGLIP_FAMILY = _Family(SiglipVisionModel, SiglipEncoderLayer, SiglipAttention, PumerSiglipEncoderLayer,
                         lambda t: t.encoder.layers, lambda t: 0, _CLIP, cls=False,
                         final_norm="post_layernorm")
_DINOV2_FAMILY = _Family(Dinov2Model, Dinov2Layer, Dinov2Attention, PumerDinov2Layer,
                         lambda t: t.encoder.layer, lambda t: 1, _DINOV2, cls=True, final_norm="layernorm")
_DINOV2_REG_FAMILY = _Family(Dinov2WithRegistersModel, Dinov2WithRegistersLayer, Dinov2WithRegistersAttention,
                             PumerDinov2WithRegistersLayer, lambda t: t.encoder.layer,
                             lambda t: 1 + t.config.num_register_tokens, _DINOV2, cls=True,
                             final_norm="layernorm")
_VIT_FAMILY = _Family(ViTModel, ViTLayer, ViTAttention, PumerViTLayer, lambda t: t.layers, lambda t: 1, _VIT, cls=True)

_FAMILIES = (_CLIP_FAMILY, _SIGLIP_FAMILY, _DINOV2_FAMILY, _DINOV2_REG_FAMILY, _VIT_FAMILY)

# classifier -> (its patched class, the attribute holding its tower)
_HEADS: dict[type[nn.Module], tuple[type[nn.Module], str]] = {
    Dinov2ForImageClassification: (PumerDinov2ForImageClassification, "dinov2"),
    Dinov2WithRegistersForImageClassification: (
        PumerDinov2WithRegistersForImageClassification, "dinov2_with_registers"
    ),
    SiglipForImageClassification: (PumerSiglipForImageClassification, "vision_model"),
}


def _library_class(module: nn.Module) -> type[nn.Module]:
    """The library's class of ``module``, under our patch and under any class another tool put on top of it."""
    for cls in type(module).__mro__:
        if "_pumer_patched" in vars(cls):
            return cls.__bases__[0]
    return type(module)


def _tower(root: nn.Module) -> nn.Module:
    head = _HEADS.get(_library_class(root))
    return root if head is None else getattr(root, head[1])


def _family(tower: nn.Module) -> _Family:
    return next(f for f in _FAMILIES if isinstance(tower, f.tower))


# ---------------------------------------------------------------------------------------------
# text guidance
# ---------------------------------------------------------------------------------------------


def _cosine(tokens: Tensor, text: Tensor) -> Tensor:
    """Cosine (B, N) of token embeddings (B, N, D) with text features (B or 1, D)."""
    if text.shape[0] not in (1, tokens.shape[0]):
        raise ValueError(
            f"text_guidance has {text.shape[0]} text features for a batch of {tokens.shape[0]} images; "
            f"give one per image or one for all"
        )
    query = F.normalize(text.float(), dim=-1).expand(tokens.shape[0], -1)  # (B, D)
    return torch.einsum("bnd,bd->bn", F.normalize(tokens.float(), dim=-1), query)


def _clip_relevance(tower: nn.Module, projection: nn.Linear, text: Tensor, x: Tensor) -> Tensor:
    """Each token of x (B, N, C) through CLIP's own image head (``post_layernorm``, ``visual_projection``)."""
    return _cosine(projection(tower.post_layernorm(x)), text)


def _siglip_relevance(tower: nn.Module, text: Tensor, x: Tensor) -> Tensor:
    """Each token of x (B, N, C) through SigLIP's own head as if its probe attended to that token alone.

    ``post_layernorm``, the pooling attention's value and output projections, then the head's
    residual MLP: the pooled embedding of an image made of this token (MaskCLIP's reading of a head).
    """
    head: SiglipMultiheadAttentionPoolingHead = tower.head
    attn = head.attention
    c = attn.embed_dim
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * c :]
    values = attn.out_proj(F.linear(tower.post_layernorm(x), attn.in_proj_weight[2 * c :], bias))  # (B, N, C)
    return _cosine(values + head.mlp(head.layernorm(values)), text)


@contextmanager
def text_guidance(model: nn.Module, text_features: Tensor) -> Iterator[None]:
    """Inside this ``with`` block, the patched CLIP / SigLIP image towers in ``model`` prune by a text query.

    text_features: (B, D) one per image, or (D,) / (1, D) for the whole batch, in the joint space:
    ``model.get_text_features(**text).pooler_output`` (normalized or not). Relevance of an image
    token at a pruning block is its cosine with the text after the model's own image head (CLIP:
    ``post_layernorm`` and ``visual_projection``; SigLIP: ``post_layernorm`` and the pooling head
    with its probe on that token alone); merging is unchanged. The image embedding then depends on
    the query, so it cannot be cached across queries as plain retrieval does. Needs a patch that
    prunes. Holds in this thread and ``with`` block, for the models given, not for copies taken inside.
    """
    guides: list[tuple[nn.Module, Callable[[Tensor, Tensor], Tensor], int]] = []
    for m in model.modules():
        if isinstance(m, CLIPModel):
            guides.append((m.vision_model, partial(_clip_relevance, m.vision_model, m.visual_projection),
                           m.visual_projection.out_features))
        elif isinstance(m, SiglipModel) and m.vision_model.use_head:
            dim = m.config.vision_config.hidden_size
            guides.append((m.vision_model, partial(_siglip_relevance, m.vision_model), dim))
    guides = [g for g in guides if hasattr(g[0], STATE_ATTR)]
    if not guides:
        raise ValueError(
            "text_guidance needs the image tower of a CLIPModel or a SiglipModel (with its pooling head) patched by "
            "pumer_patch.apply; none found in model"
        )
    if not isinstance(text_features, Tensor) or not text_features.is_floating_point():
        raise TypeError(
            "text_features must be a floating Tensor (B, D), e.g. model.get_text_features(**text).pooler_output"
        )
    text = (text_features.reshape(1, -1) if text_features.dim() == 1 else text_features).detach()
    for tower, _, dim in guides:
        if text.dim() != 2 or text.shape[1] != dim:
            raise ValueError(f"text_features must have shape (B, {dim}), got {tuple(text_features.shape)}")
        if not any(r.prune > 0 for r in getattr(tower, STATE_ATTR).plan.schedule.values()):
            raise ValueError("text guidance steers pruning, but this patch prunes nothing; apply with prune_ratio > 0")
    with ExitStack() as stack:  # nested guidance is restored on exit
        for tower, relevance, _ in guides:
            stack.enter_context(_GUIDANCE.open(getattr(tower, STATE_ATTR), partial(relevance, text)))
        yield


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------

_SUPPORTED = (
    "transformers CLIPVisionModel (alone, with projection, in CLIPModel), SiglipVisionModel (alone, in SiglipModel, "
    "SiglipForImageClassification), Dinov2Model, Dinov2WithRegistersModel (and their ForImageClassification), "
    "ViTModel (and ViTForImageClassification)"
)


class HfVitAdapter(Adapter):
    name = "hf_vit"
    supports = _SUPPORTED
    Options = VitOptions

    def roots(self, model: nn.Module) -> list[nn.Module]:
        heads = [m for m in model.modules() if isinstance(m, tuple(_HEADS))]
        held = {id(_tower(head)) for head in heads}  # a classifier's tower is patched as part of the classifier
        towers = [m for m in model.modules() if isinstance(m, tuple(f.tower for f in _FAMILIES)) and id(m) not in held]
        return heads + towers

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        tower = _tower(root)
        return _family(tower).layers(tower)

    def check(self, root: nn.Module) -> None:
        tower = _tower(root)
        family = _family(tower)
        name = type(tower).__name__
        head = _HEADS.get(_library_class(root))
        if head is not None:
            ensure_class(root, _library_class(root), f"the {_library_class(root).__name__}")
        ensure_class(tower, family.tower, f"the {name}", ())
        implementation = tower.config._attn_implementation
        if implementation not in _IMPLEMENTATIONS:
            raise ValueError(
                f"the {name} runs attn_implementation={implementation!r}; pumer_patch adds a log(size) key bias that "
                f"only 'eager' and 'sdpa' take: model.set_attn_implementation('sdpa') (or build it with "
                f"attn_implementation='sdpa'), then pumer_patch.apply"
            )
        for i, layer in enumerate(family.layers(tower)):
            where = f"{name} layer {i}"
            ensure_class(layer, family.layer, where)
            ensure_class(getattr(layer, family.halves.attention), family.attention, f"{where}'s attention")
        if family.final_norm:
            ensure_class(getattr(tower, family.final_norm), nn.LayerNorm, f"{name}.{family.final_norm}")
        if family is _SIGLIP_FAMILY and tower.use_head:
            ensure_class(tower.head, SiglipMultiheadAttentionPoolingHead, f"{name}.head")
        version = Version(transformers.__version__)
        if not _TESTED[0] <= version < _TESTED[1]:
            warnings.warn(
                f"pumer_patch's transformers ViT adapter repeats the layers' halves and the averaging heads as of "
                f"transformers {_TESTED[0]}..<{_TESTED[1]}; found {version}. Check zero-reduction parity.",
                stacklevel=3,
            )

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: dict[str, Any], mode: Mode, schedule: dict[int, Ratios]
    ) -> VitOptions:
        if any(isinstance(m, ViTForMaskedImageModeling) for m in model.modules()):
            raise ValueError(
                "ViTForMaskedImageModeling reconstructs the image from every patch position, which a reduced ViT "
                "does not keep; pumer_patch supports ViTModel and ViTForImageClassification"
            )
        tower = _tower(root)
        family = _family(tower)
        auto = "cls" if family.cls else "received"
        return resolve_vit_options(options, len(family.layers(tower)), family.cls, auto, mode)

    def swaps(self, root: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
        tower = _tower(root)
        family = _family(tower)
        swaps: list[tuple[nn.Module, type[nn.Module]]] = [(m, family.patched_layer) for m in family.layers(tower)]
        head = _HEADS.get(_library_class(root))
        if head is not None:
            swaps.append((root, head[0]))
        if family.final_norm:
            swaps.append((getattr(tower, family.final_norm), PumerLayerNorm))
        if family is _SIGLIP_FAMILY and tower.use_head:
            swaps.append((tower.head, PumerSiglipMultiheadAttentionPoolingHead))
        return swaps

    def patch(self, root: nn.Module, state: PatchState) -> None:
        super().patch(root, state)
        tower = _tower(root)
        family = _family(tower)
        layers = family.layers(tower)
        for i, layer in enumerate(layers):
            setattr(layer, SPOT_ATTR, _Spot(i, i == len(layers) - 1, family.protected(tower)))

    def unpatch(self, root: nn.Module) -> None:
        super().unpatch(root)
        for layer in self.blocks(root):
            if SPOT_ATTR in vars(layer):
                delattr(layer, SPOT_ATTR)

