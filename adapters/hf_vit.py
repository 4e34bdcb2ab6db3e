"""Hugging Face ``transformers`` vision transformers: CLIP, SigLIP, DINOv2 (with registers) and ViT.

Found by ``isinstance``: ``CLIPVisionModel`` (alone, in ``CLIPVisionModelWithProjection``, or the image
tower of a ``CLIPModel``, whose text tower is left alone), ``SiglipVisionModel`` (alone or in a
``SiglipModel``), ``Dinov2Model``, ``Dinov2WithRegistersModel`` and ``ViTModel``, with the image
classification heads of all of them.

The patch switches the instance class of the module that loops over the tower's layers, to a
module-level subclass whose ``forward`` is the shared block loop (``_loop.run_blocks``): the encoder
(``CLIPEncoder``, ``SiglipEncoder``, ``Dinov2Encoder``, ``Dinov2WithRegistersEncoder``), or
``ViTModel`` itself, which loops over its layers in its own forward. The library's layers are not
switched. Around the loop the library's own code runs: embeddings (``interpolate_pos_encoding`` and
other image sizes included), the padding mask each attention implementation takes
(``create_bidirectional_mask``), ``capture_outputs`` (reapplied where the library decorates the
looping forward) and the final norms.

* A plain block is the library layer's own call, ``layer(x, mask, **kwargs)``: its hooks, its
  output recording and its gradient checkpointing run as without the patch. Its mask is the
  library's while it still fits the tokens, then the loop's key bias: ``log(size)`` (proportional
  attention) plus padding, an additive (B, 1, 1, N) mask that the eager and the SDPA attention both
  add to their logits.
* A reduce block runs the layer's two halves through its own sub-modules (norms, the attention
  module, layer scale, drop path, MLP) with the reduction between them (ToMe's and PuMer's place).
  Its hooks run as a plain layer's do (``_loop.call_as_block``): forward pre-hooks on the hidden
  states it receives, forward hooks on the reduced ones it returns (the library records
  ``output_hidden_states`` there); backward hooks on a reduce layer are refused, at apply and forward.
  In training with the library's gradient checkpointing, each half is checkpointed by the layer's own
  checkpoint function (``every_n_layers`` and the checkpointing keywords apply as to the plain layers);
  the reduction between them keeps the indices it chose, so a recompute never chooses again.

Attention implementations: ``eager`` and ``sdpa``. The merge metric is the keys averaged over heads,
read from the attention's own ``k_proj`` call. With ``eager``, pruning relevance comes from the
probabilities the layer computed (in training they are the post-dropout ones); with ``sdpa`` it is
computed from the query rows the relevance needs alone (the [CLS] row: ``2 B H N d`` FLOPs; for
``"received"``, every non-prefix row), taken from the attention's own ``q_proj`` call. Flash and flex
attention are refused: the first takes no additive bias, the second returns no probabilities we
could read and compiles per shape.

``output_hidden_states`` keeps the library's meaning: every layer's output, whose token count falls
after each reduce layer (a tuple of tensors of different lengths); ``output_attentions`` (eager) gives
each layer's probabilities over its own tokens.

Prefix tokens protected (never pruned or merged): [CLS] (CLIP, DINOv2, ViT) and DINOv2's register
tokens. Relevance ``"auto"``: the [CLS] row, except SigLIP (no [CLS], attention-pooled): the
size-weighted attention the tokens receive (see ``_loop``).

Heads that average tokens count each by its size: SigLIP's ``SiglipMultiheadAttentionPoolingHead``
gets ``log(size)`` as a key bias (proportional attention of its probe), and the DINOv2 and SigLIP
image classifiers take the size-weighted mean of the tokens they average. Within one forward the
sizes go from the loop to the head in the root's per-call scope, whatever a hook between them (on
the final norm, say) makes of the tensor, as long as it keeps the token count (else
``pumer_patch.TokenSizesLost``). ``SiglipVisionModel`` also attaches them to the
``last_hidden_state`` it returns (``pumer_patch.token_sizes``), for its head applied later; features
that lost them are ``TokenSizesLost`` there. Where every size is one (nothing merged) the heads run
the library's own lines. The pooling head's and the classifiers' forwards repeat transformers 5's,
as does ``ViTModel.forward`` (checked by the zero-reduction parity tests). [CLS]-pooled outputs
(CLIP, ViT, DINOv2's pooler) need no sizes.

Text guidance (``pumer_patch.adapters.guidance.text_guidance``) for ``CLIPModel`` and
``SiglipModel``: pruning can follow a text query; the image embedding then depends on the query.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPModel,
    CLIPVisionModel,
)
from transformers.models.dinov2.modeling_dinov2 import (
    Dinov2Attention,
    Dinov2Encoder,
    Dinov2ForImageClassification,
    Dinov2Layer,
    Dinov2Model,
)
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersAttention,
    Dinov2WithRegistersEncoder,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersModel,
)
from transformers.models.siglip.modeling_siglip import (
    SiglipAttention,
    SiglipEncoder,
    SiglipEncoderLayer,
    SiglipForImageClassification,
    SiglipModel,
    SiglipMultiheadAttentionPoolingHead,
    SiglipVisionModel,
)
from transformers.models.vit.modeling_vit import ViTAttention, ViTForMaskedImageModeling, ViTLayer, ViTModel
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, capture_outputs

from pumer_patch.core import Mode, attention_bias
from pumer_patch.ratios import Ratios
from pumer_patch.sizes import TokenSizesLost, require_token_sizes, with_token_sizes

from ._loop import Attended, CallScope, captured, reduce_blocks, refuse_backward_hooks_on, run_blocks
from ._vit import VitOptions, resolve_vit_options, weighted_mean
from .base import (
    SHARED_ATTR,
    STATE_ATTR,
    Adapter,
    PatchState,
    Plan,
    ensure_class,
    library_class,
    record_trace,
    warn_if_untested,
)
from .guidance import GuidedTower, guide_of, text_guidance
from .hf_vlm import VLM_CLASSES

__all__ = ["HfVitAdapter", "text_guidance"]  # text_guidance: guidance's, for every tower that takes a query

_TESTED = ("5.0", "6")
_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class _TowerCall:
    """What one forward of a root hands from its loop to the heads that average tokens."""

    size: Tensor | None = None  # (B, N') the sizes of the tokens the loop returned


_CALL: CallScope[_TowerCall] = CallScope("pumer_patch_hf_vit_call")


# ---------------------------------------------------------------------------------------------
# the library's layers, as the loop sees them
# ---------------------------------------------------------------------------------------------


def _checkpointed(layer: nn.Module, half: Callable[..., Any], *args: Any) -> Any:
    """``half(*args)``, checkpointed as the library checkpoints ``layer`` (its flag, its function) in training."""
    if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(half, *args)
    return half(*args)


class _LayerStep:
    """The loop's view of one library's encoder layers, for one forward (``_loop.BlockStep``).

    mask: the library's attention mask (4D, or None) for the ``n`` tokens entering the loop, which the
    layers get while the token count is ``n``; after a reduction they get the loop's key bias.
    kwargs: the encoder's keyword arguments, handed to each layer (and its attention) as the library does.
    A subclass names the layer's attention module (``attention``) and repeats the library's lines of
    its two halves as of transformers 5 (the zero-reduction parity tests check them):
    ``_attention_half(layer, x, mask) -> (x, probs or None)`` and ``_mlp_half(layer, x) -> x``.
    """

    attention: ClassVar[str]

    def __init__(self, mask: Tensor | None, n: int, kwargs: dict[str, Any]) -> None:
        self.mask = mask
        self.n = n
        self.kwargs = kwargs

    def _attention_half(self, layer: nn.Module, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _mlp_half(self, layer: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _mask_for(self, x: Tensor, bias: Tensor | None) -> Tensor | None:
        return self.mask if x.shape[1] == self.n else bias

    def plain(self, layer: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        return layer(x, self._mask_for(x, bias), **self.kwargs)

    def arguments(self, layer: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (x, self._mask_for(x, bias)), self.kwargs

    def attend(self, layer: nn.Module, x: Tensor, bias: Tensor | None, rows: slice | None) -> Attended:
        """The attention half: x (B, N, C) -> (B, N, C), with the keys and the probabilities (eager) or q rows."""
        mask = self._mask_for(x, bias)
        attn = getattr(layer, self.attention)
        with captured(attn.q_proj, attn.k_proj) as projected:
            out, probs = _checkpointed(layer, self._attention_half, layer, x, mask)
        b, n, _ = x.shape
        d = attn.head_dim
        k = projected[1].view(b, n, -1, d).transpose(1, 2)  # (B, N, H * d) -> (B, H, N, d)
        q = None
        if rows is not None and probs is None:
            q = projected[0][:, rows].reshape(b, -1, k.shape[1], d).transpose(1, 2)  # (B, Q, H * d) -> (B, H, Q, d)
        scale = attn.scale if hasattr(attn, "scale") else attn.scaling
        return Attended(out, q, k, scale, probs)

    def finish(self, layer: nn.Module, x: Tensor) -> Tensor:
        """The MLP half on the reduced tokens (B, N', C)."""
        return _checkpointed(layer, self._mlp_half, layer, x)


class _ClipStep(_LayerStep):
    """``CLIPEncoderLayer`` and ``SiglipEncoderLayer`` (the same lines)."""

    attention = "self_attn"

    def _attention_half(self, layer: nn.Module, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        out, probs = layer.self_attn(layer.layer_norm1(x), attention_mask=mask, **self.kwargs)
        return x + out, probs

    def _mlp_half(self, layer: nn.Module, x: Tensor) -> Tensor:
        return x + layer.mlp(layer.layer_norm2(x))


class _Dinov2Step(_LayerStep):
    """``Dinov2Layer`` and ``Dinov2WithRegistersLayer``: layer scale and drop path on both halves."""

    attention = "attention"

    def _attention_half(self, layer: nn.Module, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        out, probs = layer.attention(layer.norm1(x), attention_mask=mask, **self.kwargs)
        return layer.drop_path(layer.layer_scale1(out)) + x, probs

    def _mlp_half(self, layer: nn.Module, x: Tensor) -> Tensor:
        return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))) + x


class _VitStep(_LayerStep):
    """``ViTLayer``: dropout on both halves."""

    attention = "attention"

    def _attention_half(self, layer: nn.Module, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        out, probs = layer.attention(layer.layernorm_before(x), mask, **self.kwargs)
        return layer.dropout(out) + x, probs

    def _mlp_half(self, layer: nn.Module, x: Tensor) -> Tensor:
        return layer.dropout(layer.mlp(layer.layernorm_after(x))) + x


# ---------------------------------------------------------------------------------------------
# the loops
# ---------------------------------------------------------------------------------------------


def _key_padding(attention_mask: Tensor | None) -> Tensor | None:
    """(B, N) bool, True for real keys, from the library's 4D mask (additive float or bool); None without one."""
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, 0, :]  # bidirectional: the [CLS] query row carries the key padding
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def _check_implementation(config: Any, name: str) -> None:
    """Raise unless the tower's attention takes an additive key bias (checked at apply and at every forward).

    A user may switch the implementation after ``apply`` (``model.set_attn_implementation``): the
    forward then refuses with the same fix instead of failing inside the library's attention.
    """
    implementation = config._attn_implementation
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"the {name} runs attn_implementation={implementation!r}; pumer_patch adds a log(size) key bias that "
            f"only 'eager' and 'sdpa' take: model.set_attn_implementation('sdpa') (or build it with "
            f"attn_implementation='sdpa'), then pumer_patch.apply"
        )


class _ReducingLoop:
    """What the patched looping modules share: the loop over their layers, for one forward.

    ``_step``: the layers' ``_LayerStep`` class. ``_prefix``: the prefix tokens ([CLS], registers).
    """

    _step: ClassVar[type[_LayerStep]]

    def _prefix(self) -> int:
        return 1  # [CLS]

    def _run(self, layers: str, x: Tensor, attention_mask: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
        """x (B, N, C) through the layer list ``layers`` (its attribute), reducing at the planned ones -> (B, N', C).

        Hands the sizes to the heads.
        """
        state: PatchState = getattr(self, SHARED_ATTR)
        _check_implementation(self.config, type(self).__bases__[-1].__name__)
        step = self._step(attention_mask, x.shape[1], kwargs)
        tokens, trace = run_blocks(
            getattr(self, layers), x, state.plan, step, protected=self._prefix(), guide=guide_of(state),
            mask=_key_padding(attention_mask), name=f"{type(self).__bases__[-1].__name__}.{layers}",
        )
        record_trace(state, trace)
        call = _CALL.get(state)
        if call is not None:
            call.size = tokens.size
        return tokens.x


class PumerCLIPEncoder(_ReducingLoop, CLIPEncoder):
    """The image tower's ``CLIPEncoder``, reducing at the planned layers; see the module docstring."""

    _pumer_patched = True
    _step = _ClipStep

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self._run("layers", inputs_embeds, attention_mask, kwargs))


class PumerSiglipEncoder(_ReducingLoop, SiglipEncoder):
    """The image tower's ``SiglipEncoder``, as above; no [CLS]."""

    _pumer_patched = True
    _step = _ClipStep

    def _prefix(self) -> int:
        return 0

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self._run("layers", inputs_embeds, attention_mask, kwargs))


class PumerDinov2Encoder(_ReducingLoop, Dinov2Encoder):
    """``Dinov2Encoder``, as above, under the library's decorators."""

    _pumer_patched = True
    _step = _Dinov2Step

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self._run("layer", hidden_states, attention_mask, kwargs))


class PumerDinov2WithRegistersEncoder(_ReducingLoop, Dinov2WithRegistersEncoder):
    """``Dinov2WithRegistersEncoder``, as above; the registers follow [CLS] and are protected with it."""

    _pumer_patched = True
    _step = _Dinov2Step

    def _prefix(self) -> int:
        return 1 + self.config.num_register_tokens

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self._run("layer", hidden_states, attention_mask, kwargs))


class PumerViTModel(_ReducingLoop, ViTModel):
    """``ViTModel``, whose own forward loops over its layers: that forward (transformers 5) with the reducing loop."""

    _pumer_patched = True
    _step = _VitStep

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: Tensor | None = None, bool_masked_pos: Tensor | None = None,
        interpolate_pos_encoding: bool | None = None, attention_mask: Tensor | None = None, **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        embedding_output = self.embeddings(
            pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding
        )
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=embedding_output, attention_mask=attention_mask
        )
        hidden_states = self._run("layers", embedding_output, attention_mask, kwargs)
        sequence_output = self.layernorm(hidden_states)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output)


# ---------------------------------------------------------------------------------------------
# heads that average tokens
# ---------------------------------------------------------------------------------------------


def _merges(plan: Plan) -> bool:
    """Whether the plan can merge tokens (so sizes may differ from one)."""
    return any(r.merge > 0 for r in plan.schedule.values()) or plan.options.merge_schedule is not None


def _pool_sizes(module: nn.Module, features: Tensor, consumer: str) -> Tensor | None:
    """The sizes (B, N) of the tokens ``features`` (B, N, C) that ``consumer`` averages; None where all are one.

    Inside a forward of the patched root, the sizes its loop returned (whatever became of the tensor
    on its way here); called on its own, the sizes the features carry (``pumer_patch.token_sizes``).
    """
    state: PatchState = getattr(module, SHARED_ATTR)
    call = _CALL.get(state)
    if call is None:
        size = require_token_sizes(features, consumer=consumer, merged=_merges(state.plan))
    else:
        size = call.size
    # weights of one change nothing: the library's own lines then run (bit for bit); a sync only here
    if size is None or bool((size == 1).all()):
        return None
    if tuple(size.shape) != tuple(features.shape[:2]):
        raise TokenSizesLost(
            f"{consumer} got {tuple(features.shape[:2])} (B, N) tokens where the pumer_patch-reduced tower returned "
            f"{tuple(size.shape)}: something between them (a hook on the final norm?) changed the tokens, so their "
            f"sizes are unknown"
        )
    return size


class PumerSiglipVisionModel(SiglipVisionModel):
    """``SiglipVisionModel`` opening the per-call scope in which its loop hands the sizes to its pooling head."""

    _pumer_patched = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The library's forward; its ``last_hidden_state`` (the output's first field) carries the token sizes."""
        with _CALL.open(getattr(self, STATE_ATTR), _TowerCall()) as call:
            out = super().forward(*args, **kwargs)
        if call.size is not None and call.size.shape == out[0].shape[:2]:  # else a hook changed the tokens
            with_token_sizes(out[0], call.size)
        return out


class PumerSiglipMultiheadAttentionPoolingHead(SiglipMultiheadAttentionPoolingHead):
    """SigLIP's attention pooling with ``log(size)`` added to its probe's logits (proportional attention)."""

    _pumer_patched = True

    def forward(self, hidden_state: Tensor) -> Tensor:
        """hidden_state (B, N, C) -> (B, C); the library's lines with a key bias (transformers 5)."""
        size = _pool_sizes(self, hidden_state, "SigLIP's attention pooling head")
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


def _mean(tokens: Tensor, size: Tensor | None) -> Tensor:
    """The mean over tokens (B, N, C) -> (B, C), by ``size`` (B, N) where a merge made sizes differ."""
    return tokens.mean(dim=1) if size is None else weighted_mean(tokens, size)


def _dinov2_classify(
    model: nn.Module, tower: nn.Module, start: int, pixel_values: Tensor | None, labels: Tensor | None,
    attention_mask: Tensor | None, kwargs: dict[str, Any],
) -> ImageClassifierOutput:
    """``Dinov2(WithRegisters)ForImageClassification.forward`` (transformers 5) with the patch mean by size."""
    with _CALL.open(getattr(model, STATE_ATTR), _TowerCall()):
        outputs = tower(pixel_values, attention_mask=attention_mask, **kwargs)
        sequence_output = outputs.last_hidden_state
        size = _pool_sizes(model, sequence_output, f"{type(model).__name__}'s mean of the patch tokens")
    cls_token = sequence_output[:, 0]
    patches = _mean(sequence_output[:, start:], None if size is None else size[:, start:])
    logits = model.classifier(torch.cat([cls_token, patches], dim=1))
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
        with _CALL.open(getattr(self, STATE_ATTR), _TowerCall()):
            outputs = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
            tokens = outputs.last_hidden_state
            size = _pool_sizes(self, tokens, "SiglipForImageClassification's mean of the tokens")
        logits = self.classifier(_mean(tokens, size))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# ``save_pretrained`` writes the instance class's ``__name__`` into config.architectures, which must name
# the library's class; pickling resolves classes by ``__qualname__``, which stays ours (as ViLT's adapter)
for _cls in (
    PumerViTModel, PumerSiglipVisionModel, PumerDinov2ForImageClassification,
    PumerDinov2WithRegistersForImageClassification, PumerSiglipForImageClassification,
):
    _cls.__name__ = _cls.__bases__[-1].__name__


# ---------------------------------------------------------------------------------------------
# the towers
# ---------------------------------------------------------------------------------------------


class _TowerKind(NamedTuple):
    """What the adapter knows of one library's vision tower class.

    model: the tower class (a root, or a classifier's backbone). looping: the sub-module whose
    forward loops over the layers ("encoder", or "" for ViTModel, which loops in its own forward),
    switched to ``loop``; its layer list is its attribute ``layers``. layer / attention: the classes
    of the layers and of their attention (``loop._step.attention``). cls: pooled from [CLS] (else
    attention-pooled).
    """

    model: type[nn.Module]
    looping: str
    loop: type[_ReducingLoop]
    layers: str
    layer: type[nn.Module]
    attention: type[nn.Module]
    cls: bool

    def loop_of(self, tower: nn.Module) -> nn.Module:
        return tower.get_submodule(self.looping)

    def layers_of(self, tower: nn.Module) -> Sequence[nn.Module]:
        return getattr(self.loop_of(tower), self.layers)


_KINDS = (
    _TowerKind(CLIPVisionModel, "encoder", PumerCLIPEncoder, "layers", CLIPEncoderLayer, CLIPAttention, cls=True),
    _TowerKind(SiglipVisionModel, "encoder", PumerSiglipEncoder, "layers", SiglipEncoderLayer, SiglipAttention,
               cls=False),
    _TowerKind(Dinov2Model, "encoder", PumerDinov2Encoder, "layer", Dinov2Layer, Dinov2Attention, cls=True),
    _TowerKind(Dinov2WithRegistersModel, "encoder", PumerDinov2WithRegistersEncoder, "layer",
               Dinov2WithRegistersLayer, Dinov2WithRegistersAttention, cls=True),
    _TowerKind(ViTModel, "", PumerViTModel, "layers", ViTLayer, ViTAttention, cls=True),
)

# classifier -> (its patched class, the attribute holding its tower)
_HEADS: dict[type[nn.Module], tuple[type[nn.Module], str]] = {
    Dinov2ForImageClassification: (PumerDinov2ForImageClassification, "dinov2"),
    Dinov2WithRegistersForImageClassification: (
        PumerDinov2WithRegistersForImageClassification, "dinov2_with_registers"
    ),
    SiglipForImageClassification: (PumerSiglipForImageClassification, "vision_model"),
}


def _tower(root: nn.Module) -> nn.Module:
    head = _HEADS.get(library_class(root))
    return root if head is None else getattr(root, head[1])


def _kind(tower: nn.Module) -> _TowerKind:
    return next(k for k in _KINDS if isinstance(tower, k.model))


# ---------------------------------------------------------------------------------------------
# text guidance: each token through the model's own image head
# ---------------------------------------------------------------------------------------------


def _clip_embed(tower: nn.Module, projection: nn.Linear, x: Tensor) -> Tensor:
    """Each token of x (B, N, C) through CLIP's image head (``post_layernorm``, ``visual_projection``): (B, N, D)."""
    return projection(tower.post_layernorm(x))


def _siglip_embed(tower: nn.Module, x: Tensor) -> Tensor:
    """Each token of x (B, N, C) through SigLIP's head as if its probe attended to that token alone: (B, N, C).

    ``post_layernorm``, the pooling attention's value and output projections, then the head's
    residual MLP: the pooled embedding of an image made of this token.
    """
    head: SiglipMultiheadAttentionPoolingHead = tower.head
    attn = head.attention
    c = attn.embed_dim
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * c :]
    values = attn.out_proj(F.linear(tower.post_layernorm(x), attn.in_proj_weight[2 * c :], bias))  # (B, N, C)
    return values + head.mlp(head.layernorm(values))


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------

_SUPPORTED = (
    "transformers CLIPVisionModel (alone, with projection, in CLIPModel), SiglipVisionModel (alone, in SiglipModel, "
    "SiglipForImageClassification), Dinov2Model, Dinov2WithRegistersModel (and their ForImageClassification), "
    "ViTModel (and ViTForImageClassification)"
)


def _refuse_towers_feeding_a_language_model(model: nn.Module, towers: Sequence[nn.Module]) -> None:
    """Raise if a tower sits inside a vision-language model this adapter cannot serve (PaliGemma and others
    with a ``language_model``).

    Such a model reads every patch's hidden state (``vision_feature_layer``) and places one embedding
    per patch in the language model's sequence, so a tower that returns fewer tokens breaks it. The
    VLMs of ``hf_vlm.VLM_CLASSES`` own their towers (that adapter reduces inside their language
    model and leaves the tower whole); for the others refusing beats a crash in the outer forward.
    """
    tower_ids = {id(t) for t in towers}
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "language_model", None), nn.Module) or isinstance(module, VLM_CLASSES):
            continue
        inside = [sub for sub in module.modules() if id(sub) in tower_ids]
        if inside:
            raise ValueError(
                f"the {type(inside[0]).__name__} in {name or 'the model'} ({type(module).__name__}) feeds every "
                f"patch's features to a language model, which needs all of them: pumer_patch does not reduce the "
                f"vision tower of a vision-language model. Patch a tower that you run on its own, not inside it"
            )


class HfVitAdapter(Adapter):
    name = "hf_vit"
    supports = _SUPPORTED
    Options = VitOptions

    def roots(self, model: nn.Module) -> list[nn.Module]:
        heads = [m for m in model.modules() if isinstance(m, tuple(_HEADS))]
        held = {id(_tower(head)) for head in heads}  # a classifier's tower is patched as part of the classifier
        towers = [m for m in model.modules() if isinstance(m, tuple(k.model for k in _KINDS)) and id(m) not in held]
        _refuse_towers_feeding_a_language_model(model, towers)
        return heads + towers

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        tower = _tower(root)
        return _kind(tower).layers_of(tower)

    def check(self, root: nn.Module) -> None:
        tower = _tower(root)
        kind = _kind(tower)
        name = type(tower).__name__
        swaps = self.swaps(root)
        if all(module is not tower for module, _ in swaps):
            ensure_class(tower, kind.model, f"the {name}", ())
        for module, patched in swaps:
            library = patched.__bases__[-1]
            ensure_class(module, library, f"the {library.__name__}" + ("" if module is tower else f" of the {name}"))
        _check_implementation(tower.config, name)
        for i, layer in enumerate(kind.layers_of(tower)):
            where = f"{name} layer {i}"
            ensure_class(layer, kind.layer, where)
            ensure_class(getattr(layer, kind.loop._step.attention), kind.attention, f"{where}'s attention")
        warn_if_untested("transformers", transformers.__version__, _TESTED,
                         "the encoder loops, the layers' halves and the averaging heads")

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: dict[str, Any], mode: Mode, schedule: dict[int, Ratios]
    ) -> VitOptions:
        if any(isinstance(m, ViTForMaskedImageModeling) for m in model.modules()):
            raise ValueError(
                "ViTForMaskedImageModeling reconstructs the image from every patch position, which a reduced ViT "
                "does not keep; pumer_patch supports ViTModel and ViTForImageClassification"
            )
        tower = _tower(root)
        kind = _kind(tower)
        auto = "cls" if kind.cls else "received"
        resolved = resolve_vit_options(options, len(kind.layers_of(tower)), kind.cls, auto, mode)
        refuse_backward_hooks_on(kind.layers_of(tower), reduce_blocks(schedule, resolved.merge_schedule),
                                 f"{kind.loop.__bases__[-1].__name__}.{kind.layers}")
        return resolved

    def swaps(self, root: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
        """The looping module, the root where it opens the per-call scope of sizes, the SigLIP pooling head.

        A classifier opens the scope for its tower; a SigLIP tower patched on its own opens it itself.
        """
        tower = _tower(root)
        kind = _kind(tower)
        swaps: list[tuple[nn.Module, type[nn.Module]]] = [(kind.loop_of(tower), kind.loop)]
        head = _HEADS.get(library_class(root))
        if head is not None:
            swaps.append((root, head[0]))
        elif kind.model is SiglipVisionModel:
            swaps.append((root, PumerSiglipVisionModel))
        if kind.model is SiglipVisionModel and tower.use_head:
            swaps.append((tower.head, PumerSiglipMultiheadAttentionPoolingHead))
        return swaps

    def patch(self, root: nn.Module, state: PatchState) -> None:
        super().patch(root, state)
        for module, _ in self.swaps(root):
            if isinstance(module, PreTrainedModel):
                # ``capture_outputs`` looks up what to record by the model's class, registered when a model
                # is built (``post_init``); our class records what the library's does
                _CAN_RECORD_REGISTRY[module] = module._can_record_outputs

    def guided_towers(self, model: nn.Module) -> list[GuidedTower]:
        """The patched image towers of the ``CLIPModel`` s and ``SiglipModel`` s (with a pooling head) in ``model``."""
        towers = []
        for m in model.modules():
            state = getattr(m.vision_model, STATE_ATTR, None) if isinstance(m, (CLIPModel, SiglipModel)) else None
            if state is None:
                continue
            if isinstance(m, CLIPModel):
                embed = partial(_clip_embed, m.vision_model, m.visual_projection)
                towers.append(GuidedTower(state, m.visual_projection.out_features, embed))
            elif m.vision_model.use_head:
                dim = m.config.vision_config.hidden_size
                towers.append(GuidedTower(state, dim, partial(_siglip_embed, m.vision_model)))
        return towers
