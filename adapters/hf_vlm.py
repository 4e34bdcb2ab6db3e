"""Hugging Face ``transformers`` vision-language LLMs: visual tokens pruned and merged inside the language model.

Found by ``isinstance``: ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``, ``Idefics3ForConditionalGeneration``,
``SmolVLMForConditionalGeneration`` (whose language model is a ``LlamaModel`` or a ``Qwen2Model``
without sliding-window layers), ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration`` and their bare ``...Model`` s. The patch switches the instance
classes of the bare model (it tells its language model, for one forward, where the image tokens are),
of the generation head (it refuses ``labels``) and of the language model. The VLM owns its vision
tower, which is left whole (it is this adapter's, not the ViT adapters': ``VLM_CLASSES``).

Where (``where``):

* ``"llm"`` (PuMer's placement): ``layers=[K, ...]`` index the language model's decoder layers. At a
  reduce layer, after its attention and its residual and before its MLP, each image's visual tokens
  are pruned by the relevance the prompt's text gives them, then the survivors are merged ToMe-style
  within the image by the layer's keys (before rotary, averaged over the key heads), sizes carried.
  From then on the hidden states, the attention mask, the positions and the KV cache of every later
  layer hold the reduced sequence; the reduce layer and the layers before it keep the full one.
  Several layers compound (ratios are fractions of each image's current tokens).
* ``"input"``: the same prune and merge applied to the visual embeddings after they are placed in the
  sequence, before the first decoder layer (``layers=[0]``); every layer and its cache hold the
  reduced sequence. Relevance: the softmax attention of the mean embedding of the text after the image
  (``text_tokens="last"``: of the last prompt token's) over the image's embeddings
  (``pumer_patch.query_relevance``); merging compares the embeddings.

Relevance in the LLM (``text_tokens``): an image is ranked by the text after it (in a causal LLM only
later tokens attend to it): ``"all"``, PuMer's rule, the attention of the real prompt tokens after the
image to each of its tokens, mean over heads, summed over those rows and divided by their number;
``"last"``, FastV's rule, the last prompt token's row alone. The rows are recomputed from the layer's
own ``q_proj`` / ``k_proj`` outputs (q / k norms where the layer has them, the rotary embedding at the
tokens' positions, grouped-query keys shared by their query heads), as a softmax over every key the
row attends to: a (text rows x sequence) slice, never the full attention. The same code serves
``eager`` and ``sdpa``; ``flash`` takes no additive bias and ``flex`` no float mask: both refused.
An image with no prompt text after it gets no relevance: its tokens are then pruned by position
(the later ones go first).

Images: the image placeholders are found as the library finds them, by their id in ``input_ids`` or,
given ``inputs_embeds``, by the placeholder's embedding (before the image features are placed:
embeddings with the features already in them show no image and pass unreduced). A run of
image-placeholder tokens in a sample is one image; each image is reduced on its own
by the ratios of its own token count, so a sample's counts do not depend on its neighbours in the
batch. Samples whose reduced lengths differ are aligned by keeping some removed columns as masked
fillers (never attended to), so a sample gives the same output in a batch as alone (to float
rounding), with left or right padding. A prompt without image tokens passes untouched (its trace
counts no visual tokens at each reduce layer). A video's placeholders (Qwen-VL's, LLaVA-OneVision's)
pass whole: neither reduced nor relevance rows (nor counted as text).

Positions: surviving tokens keep their position ids (1-D, or each of Qwen's M-RoPE rows); a merged
token takes its destination's (``merge_position="destination"``, the default) or the size-weighted
mean of its members' (``"mean"``, row by row: the rotary angles are computed at that fractional
position). Decoding continues at the position after the unreduced prompt, as the unpatched model's
would: ``generate`` numbers 1-D positions from its 2-D mask, Qwen's from its ``rope_deltas`` and the
cache's length, which is layer 0's, never reduced inside the LLM; without position ids the patch
counts the prompt's full length. ``where="input"`` reduces layer 0's cache too, so it is refused for
the M-RoPE models. Qwen3-VL's DeepStack adds visual features to the image positions after its first
layers: a reduce layer before DeepStack's last layer is refused.

Attention after a reduction: an additive float mask (B, 1, Q, K) the patch builds for the reduced
columns (causal by original order, padding and fillers masked, ``log(size)`` on merged keys:
proportional attention), which eager and SDPA both add to their logits.

KV cache: the cache a reducing forward fills (``DynamicCache``, the default, made by the model or
passed in, or a ``StaticCache``) records, on the cache object itself (never on a module; so a
``copy.deepcopy`` of the cache, transformers' recipe for reusing a prompt's cache, carries it), which
prompt columns each later layer kept and their sizes; every later call on that cache
(each ``generate`` step) gives the layers after a reduce layer their own mask over their shorter
cache. The images of a prompt are reduced in the call that fills an empty cache (or in a call
without one); image tokens given on a cache that holds tokens already (after a cached text prefix, in
a later turn) pass unreduced, with a warning. ``generate`` can be handed its own output and cache to go on (it feeds the tokens after
layer 0's cache) where the patch reduces in the LLM; a cache reduced before it (``where="input"``) holds
fewer columns in layer 0 than tokens it stands for, so a call that gives cached tokens again is refused.
A ``StaticCache`` (``generate(..., cache_implementation="static")``) works alike: its
layers count their own lengths, and the masks are widened to its size (the 4-D mask ``generate``
prepares for it is read back as the padding mask it was made from). ``prompt_end(n)``: inside the
``with`` block, tokens at position ``n`` and after are not relevance rows, so a no-cache recompute of
a generated sequence reduces exactly as its prompt's prefill did.

Outputs of a reducing forward cover the reduced sequence: ``logits`` / ``last_hidden_state`` are
(B, L', ...), the last column being the prompt's last token; ``pumer_patch.last_trace(model)`` counts,
per reduce layer, the visual tokens (``image``) and the real text tokens (``text``) of the sample that
keeps the most; with ``trace=True`` its ``image`` is the whole final sequence (B, L', C) with each
column's size and, as ``mask``, its real columns (not padding, not fillers). ``labels`` are refused
while the patch reduces (their columns would no longer match).

The text model's forward and the decoder layer's two halves repeat the library's (``LlamaModel``,
``Qwen2Model``, Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's text models, as of transformers 5; checked by
the zero-reduction parity tests); a forward that reduces nothing is the library's own.
``mode="reference"`` (the research code's arithmetic of ViLT and METER) is refused.
"""

from __future__ import annotations

import inspect
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, ClassVar, Literal

import torch
import transformers
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaModel
from transformers.models.idefics3.modeling_idefics3 import Idefics3ForConditionalGeneration, Idefics3Model
from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration, LlavaModel
from transformers.models.llava_next.modeling_llava_next import LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2Model
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLAttention,
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLTextModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VLAttention,
    Qwen2VLDecoderLayer,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen2VLTextModel,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLTextAttention,
    Qwen3VLTextDecoderLayer,
    Qwen3VLTextModel,
)
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMForConditionalGeneration, SmolVLMModel
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, capture_outputs

from pumer_patch.core import Mode, Tokens, query_relevance, reduce_tokens, take_rows
from pumer_patch.ratios import Ratios

from ._loop import CallScope, Recorder, captured
from .base import (
    SHARED_ATTR,
    Adapter,
    LayerCount,
    PatchState,
    ensure_class,
    library_class,
    record_trace,
    warn_if_untested,
)

__all__ = ["VLM_CLASSES", "HfVlmAdapter", "VlmOptions", "prompt_end"]

_TESTED = ("5.0", "6")
_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class VlmOptions:
    """The options of ``apply`` for vision-language LLMs (see the module docstring).

    where: ``"llm"`` (at decoder layers ``layers``) or ``"input"`` (before the first layer, ``layers=[0]``).
    text_tokens: the relevance rows, ``"all"`` (PuMer) or ``"last"`` (FastV); before the LLM, the query's tokens.
    merge_position: a merged token's position, its destination's or the size-weighted ``"mean"``.
    """

    where: Literal["llm", "input"] = "llm"
    text_tokens: Literal["all", "last"] = "all"
    merge_position: Literal["destination", "mean"] = "destination"


@dataclass
class _VlmCall:
    """What the VLM root hands its language model for one forward: where the image tokens are."""

    image: Tensor | None  # (B, L) bool, True at image-placeholder tokens; None: no image tokens
    video: Tensor | None = None  # (B, L) bool, True at video-placeholder tokens (kept whole, no relevance rows)


_CALL: CallScope[_VlmCall] = CallScope("pumer_patch_hf_vlm_call")
# the position from which tokens stop being relevance rows (``prompt_end``), None: the sequence's end
_PROMPT_END: ContextVar[int | None] = ContextVar("pumer_patch_hf_vlm_prompt_end", default=None)
_NO_END = 1 << 62  # a position past any sequence


@contextmanager
def prompt_end(length: int) -> Iterator[None]:
    """Inside the ``with`` block, tokens at original position ``length`` or after are no relevance rows.

    A no-cache forward over a prompt and what was generated after it (``length`` = the prompt's padded
    length) then ranks the visual tokens by the prompt alone, as the prefill that started the
    generation did: the same reduced sequence, recomputed without the cache.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"prompt_end takes the prompt's length in tokens (an int >= 1), got {length!r}")
    token = _PROMPT_END.set(length)
    try:
        yield
    finally:
        _PROMPT_END.reset(token)


# ---------------------------------------------------------------------------------------------
# the reduced sequence
# ---------------------------------------------------------------------------------------------


@dataclass
class _Stage:
    """The prompt columns the cache of layers ``first..`` holds: (B, L_s) real keys and their log sizes."""

    first: int
    real: Tensor
    log_size: Tensor


@dataclass
class _CacheRecord:
    """What a reducing prefill left in its cache: the prompt's length and each stage of reduced layers."""

    prompt: int
    stages: list[_Stage] = field(default_factory=list)

    def seen(self, cache: Cache) -> int:
        """Tokens the unpatched model's cache would hold: the prompt and every token given since."""
        first = self.stages[0]
        return self.prompt + cache.get_seq_length(first.first) - first.real.shape[1]

    def stage_of(self, layer: int) -> _Stage | None:
        found = None
        for stage in self.stages:
            if layer >= stage.first:
                found = stage
        return found


# the attribute of a cache holding its record: the record lives and is copied with the cache
_RECORD_ATTR = "_pumer_patch_record"


def _record_of(cache: Cache) -> _CacheRecord | None:
    return getattr(cache, _RECORD_ATTR, None)


@dataclass
class _Seq:
    """The sequence one prefill threads through the layers, column by column (B, L_cur each).

    orig: original position of each column. image: image index within its sample, -1 for text, padding and
    fillers. real: a real key (not padding, not a filler). size: original tokens each column stands for.
    filler: a removed image column kept only so that every sample has the batch's length. text: a real text
    column (not an image's or a video's, not padding, not a filler): where relevance rows come from.
    pos: rotary position ids (R, B, L_cur), R = 1 (1-D) or 3 (M-RoPE rows); ``pos_float`` the size-weighted
    mean where merges move positions. layer_pos: the position ids the layers get (B, L_cur), or None.
    """

    orig: Tensor
    image: Tensor
    real: Tensor
    size: Tensor
    pos: Tensor
    pos_float: Tensor
    layer_pos: Tensor | None
    filler: Tensor  # a removed image column kept only to align the batch
    ends: Tensor  # (B, M) the last original position of each image, -1 where a sample has fewer images
    text: Tensor

    @property
    def length(self) -> int:
        return self.orig.shape[1]


def _start(
    image: Tensor, video: Tensor | None, attention_mask: Tensor | None, rope_positions: Tensor,
    layer_positions: Tensor | None,
) -> _Seq:
    """The full prompt as a ``_Seq``: image and video (B, L) bool placeholders (video None: none), the 2-D mask,
    rotary positions (B or 1, L) or (3, B, L), the layers' positions (B or 1, L) or None."""
    b, n = image.shape
    device = image.device
    orig = torch.arange(n, device=device).expand(b, n)
    real = torch.ones(b, n, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    image = image & real
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    ids = torch.where(image, starts.long().cumsum(dim=1) - 1, torch.full_like(orig, -1))
    m = max(int(ids.max()) + 1, 1)
    ends = torch.full((b, m), -1, dtype=torch.long, device=device)
    ends.scatter_reduce_(1, ids.clamp_min(0), torch.where(image, orig, -1), reduce="amax")
    pos = (rope_positions if rope_positions.dim() == 3 else rope_positions[None]).expand(-1, b, n)
    layer_pos = None if layer_positions is None else layer_positions.expand(b, n)
    size = torch.ones(b, n, dtype=torch.float32, device=device)
    text = real & ~image if video is None else real & ~image & ~video
    return _Seq(orig, ids, real, size, pos, pos.float(), layer_pos, torch.zeros_like(real), ends, text)


def _rows(seq: _Seq, text_tokens: str, end: int) -> tuple[Tensor, Tensor]:
    """The relevance rows: (B, T) column indices and (B, T, M) which image each row ranks (float 0/1).

    A row is a real text column of the prompt (original position < ``end``) after an image; it ranks
    every image that ends before it. ``"last"``: the sample's last such row alone.
    """
    col = torch.arange(seq.length, device=seq.orig.device).expand_as(seq.orig)
    first_end = torch.where(seq.ends >= 0, seq.ends, torch.full_like(seq.ends, _NO_END)).amin(dim=1, keepdim=True)
    text = seq.text & (seq.orig > first_end) & (seq.orig < end)
    if text_tokens == "last":
        last = torch.where(text, col, -1).amax(dim=1, keepdim=True)
        text = text & (col == last)
    t = max(int(text.sum(dim=1).max()), 1)
    order = torch.where(text, col, col + seq.length).argsort(dim=1)[:, :t]  # rows first, in order
    valid = text.gather(1, order)
    row_orig = seq.orig.gather(1, order)
    ranks = valid[:, :, None] & (row_orig[:, :, None] > seq.ends[:, None, :]) & (seq.ends[:, None, :] >= 0)
    return order, ranks.float()


def _heads(x: Tensor, attn: nn.Module, norm: str) -> Tensor:
    """A projection's output (B, N, H * d) as heads (B, H, N, d), through the attention's q / k norm if it has one."""
    b, n, _ = x.shape
    x = x.view(b, n, -1, attn.head_dim)
    norm_module = getattr(attn, norm, None)
    if norm_module is not None:
        x = norm_module(x)
    return x.transpose(1, 2)


def _relevance(
    attn: nn.Module, q_out: Tensor, k_out: Tensor, cos_sin: tuple[Tensor, Tensor], seq: _Seq, text_tokens: str
) -> Tensor:
    """Relevance (B, M, L_cur) of every column to each image: the rows' attention, mean over heads and rows.

    q_out / k_out: the layer's q_proj / k_proj outputs (B, L_cur, H * d). The rows' logits are recomputed
    with the rotary embedding at their positions against every key, with the keys' padding, causality
    and ``log(size)``: (B, H, T, L_cur), softmax in float32.
    """
    end = _PROMPT_END.get()
    rows, ranks = _rows(seq, text_tokens, _NO_END if end is None else end)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    cos, sin = cos_sin
    q = _heads(take_rows(q_out, rows), attn, "q_norm")  # (B, H, T, d)
    k = _heads(k_out, attn, "k_norm")  # (B, Hk, L, d)
    q, _ = rope(q, q, take_rows(cos, rows), take_rows(sin, rows))
    _, k = rope(k, k, cos, sin)
    b, hk, n, d = k.shape
    q = q.reshape(b, hk, -1, q.shape[2], d)  # query heads grouped by the key head they share
    logits = torch.einsum("bkgtd,bknd->bkgtn", q.float(), k.float()) * attn.scaling
    col = torch.arange(n, device=k.device)
    allowed = seq.real[:, None, :] & (col[None, None, :] <= rows[:, :, None])  # (B, T, L)
    bias = torch.where(allowed, seq.size.log()[:, None, :], -math.inf)
    probs = (logits + bias[:, None, None]).softmax(dim=-1).nan_to_num(0.0).mean(dim=(1, 2))  # (B, T, L)
    summed = torch.einsum("btn,btm->bmn", probs, ranks)
    return summed / ranks.sum(dim=1).clamp_min(1.0)[:, :, None]


def _images(seq: _Seq) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """Each image's columns, grouped by token count: n -> (samples (R,), image index (R,), columns (R, n))."""
    b, n = seq.image.shape
    m = seq.ends.shape[1]
    col = torch.arange(n, device=seq.image.device).expand(b, n)
    order = torch.where(seq.image >= 0, seq.image * n + col, m * n + col).argsort(dim=1)
    counts = torch.zeros(b, m, dtype=torch.long, device=col.device)
    counts.scatter_add_(1, seq.image.clamp_min(0), (seq.image >= 0).long())
    starts = counts.cumsum(dim=1) - counts
    groups: dict[int, list[tuple[int, int]]] = {}
    per_image = counts.tolist()
    for i, j in (counts > 0).nonzero().tolist():
        groups.setdefault(per_image[i][j], []).append((i, j))
    out = {}
    for c, pairs in groups.items():
        samples = torch.tensor([p[0] for p in pairs], device=col.device)
        images = torch.tensor([p[1] for p in pairs], device=col.device)
        columns = order[samples[:, None], starts[samples, images][:, None] + torch.arange(c, device=col.device)]
        out[c] = (samples, images, columns)
    return out


def _reduce(
    seq: _Seq, x: Tensor, ratios: Ratios, relevance: Tensor | None, metric: Tensor, mean_position: bool
) -> tuple[_Seq, Tensor, Tensor]:
    """Prune and merge every image of x (B, L, C); the new ``_Seq``, x (B, L', C) and the kept columns (B, L').

    relevance: (B, M, L) from ``_relevance``, None when nothing is pruned. metric: (B, L, D) merge keys.
    Columns keep their original order; samples shorter than L' keep removed columns as masked fillers.
    """
    x = x.clone()
    size = seq.size.clone()
    pos_float = seq.pos_float.clone()
    keep = (seq.image < 0) & ~seq.filler  # text and the prompt's padding stay; image columns only as survivors
    for samples, images, columns in _images(seq).values():
        tokens = Tokens(x[samples[:, None], columns], size=size[samples[:, None], columns])
        rel = None if relevance is None else relevance[samples[:, None], images[:, None], columns]
        out = reduce_tokens(
            rel, tokens, ratios, image_metric=metric[samples[:, None], columns], image_protected=0,
            carry=(columns, pos_float[:, samples[:, None], columns].permute(1, 2, 0)),  # (R_img, n, R)
        )
        dest, mean = out.carry
        x[samples[:, None], dest] = out.image.x
        size[samples[:, None], dest] = out.image.size
        if mean_position:
            pos_float[:, samples[:, None], dest] = mean.permute(2, 0, 1)
        keep[samples[:, None], dest] = True
    n = int(keep.sum(dim=1).max())
    kept = (~keep).long().argsort(dim=1, stable=True)[:, :n].sort(dim=1).values  # (B, L')
    filler = ~keep.gather(1, kept)
    image = seq.image.gather(1, kept).masked_fill(filler, -1)
    rows = kept.expand(pos_float.shape[0], -1, -1)
    pos_float = pos_float.gather(2, rows)
    pos = pos_float.round().long() if mean_position else seq.pos.gather(2, rows)
    layer_pos = None if seq.layer_pos is None else seq.layer_pos.gather(1, kept)  # the rotary reads pos, not these
    new = _Seq(
        seq.orig.gather(1, kept), image, seq.real.gather(1, kept) & ~filler, size.gather(1, kept), pos, pos_float,
        layer_pos, filler, seq.ends, seq.text.gather(1, kept),  # fillers are image columns, never text
    )
    return new, take_rows(x, kept), kept


def _mask(real: Tensor, log_size: Tensor, queries: int, dtype: torch.dtype) -> Tensor:
    """The additive mask (B, 1, Q, K) of the last ``queries`` columns over keys (B, K): causal, real keys, log(size).

    A query row with no real key before it (padding, a filler) sees itself, so no row is empty.
    """
    k = real.shape[1]
    q_col = torch.arange(k - queries, k, device=real.device)[:, None]
    k_col = torch.arange(k, device=real.device)[None, :]
    allowed = real[:, None, :] & (k_col <= q_col)[None]
    allowed = allowed | (k_col == q_col)[None]
    mask = torch.where(allowed, log_size[:, None, :].to(dtype), torch.finfo(dtype).min)
    return mask[:, None]


def _padding_of(mask: Tensor, cache: Cache, record: _CacheRecord | None, queries: int) -> Tensor:
    """The 2-D padding mask (B, L) of the 4-D causal mask (B, 1, Q, K) ``generate`` prepares for a static cache.

    Its last query row sees every real key up to itself (a padded row too: padding masks keys only), in
    layer 0's columns. Where layer 0 holds a reduced cache (``where="input"``) its positions are not the
    prompt's; there every layer reads the record's own prompt columns, and the tokens since are real.
    """
    if record is not None and record.stages[0].first == 0:
        return torch.ones(mask.shape[0], record.seen(cache) + queries, dtype=torch.long, device=mask.device)
    seen = cache.get_seq_length() if record is None else record.seen(cache)
    row = mask[:, 0, -1, : seen + queries]
    return (row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2).long()


def _padded(mask: Tensor, cache: Cache | None) -> Tensor:
    """``mask`` (B, 1, Q, K) widened to a static cache's length with masked columns (its layers return them all)."""
    if not isinstance(cache, StaticCache):
        return mask
    width = cache.layers[0].max_cache_len - mask.shape[-1]
    return torch.nn.functional.pad(mask, (0, width), value=torch.finfo(mask.dtype).min)


# ---------------------------------------------------------------------------------------------
# the patched modules
# ---------------------------------------------------------------------------------------------


def _check_implementation(config: Any, name: str) -> None:
    """Raise unless the language model's attention takes an additive float mask (at apply and every forward)."""
    implementation = config._attn_implementation
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"the {name} runs attn_implementation={implementation!r}; pumer_patch gives the layers after a reduction "
            f"an additive float mask (log(size), dropped columns) that only 'eager' and 'sdpa' take: "
            f"model.set_attn_implementation('sdpa') (or build it with attn_implementation='sdpa'), then pumer_patch.apply"
        )


class _ReducingTextModel:
    """A VLM's language model whose layers after a reduce layer run on the reduced sequence.

    Mixed into a module-level subclass of each supported text model (``LlamaModel``, ``Qwen2Model``),
    whose ``forward`` lines it repeats (they differ only in what they return as the cache).
    """

    _returns_cache_without_use_cache: ClassVar[bool] = True

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None, inputs_embeds: Tensor | None = None,
                use_cache: bool | None = None, **kwargs: Any) -> BaseModelOutputWithPast:
        """The library's forward, unless this call reduces its prompt's images or continues a reduced cache."""
        state: PatchState = getattr(self, SHARED_ATTR)
        args = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                    inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        fresh = cache is None or cache.get_seq_length() == 0
        if fresh and cache is not None:  # an emptied cache starts afresh: an earlier prompt's record goes
            cache.__dict__.pop(_RECORD_ATTR, None)
        record = None if fresh else _record_of(cache)
        call = _CALL.get(state)
        reduces = bool(state.plan.schedule) and call is not None and call.image is not None and fresh
        late = bool(state.plan.schedule) and call is not None and call.image is not None and not fresh
        if record is None and not reduces:
            out = super().forward(**args)
            if fresh and call is not None and state.plan.schedule:  # a prompt without images: its own trace
                self._untouched_trace(state, out[0], attention_mask, call)
            _warn_if_late(late)
            return out
        _check_implementation(self.config, type(self).__name__)
        if isinstance(attention_mask, dict) and set(attention_mask) == {"full_attention"}:
            attention_mask = attention_mask["full_attention"]  # what generate prepares per layer type (Qwen)
        if isinstance(attention_mask, Tensor) and attention_mask.dim() == 4 and isinstance(cache, StaticCache):
            attention_mask = _padding_of(attention_mask, cache, record,
                                         (input_ids if input_ids is not None else inputs_embeds).shape[1])
        if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
            found = f"a {attention_mask.dim()}-D mask" if isinstance(attention_mask, Tensor) else "prepared masks"
            raise ValueError(f"pumer_patch reduces a prompt given a 2-D attention_mask (B, L) or none; got {found}: "
                             "pass the padding mask, the causal mask is built inside")
        if reduces and cache is not None and not isinstance(cache, (DynamicCache, StaticCache)):
            raise ValueError(f"pumer_patch reduces the prompt's cache in place of some layers: a {type(cache).__name__} "
                             "cannot hold layers of different lengths; use the default DynamicCache or a StaticCache")
        out = self._pumer_forward(
            call.image if reduces else None, call.video if reduces else None, record, input_ids=input_ids,
            attention_mask=attention_mask, position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
            use_cache=use_cache, **kwargs,
        )
        _warn_if_late(late)
        return out

    @merge_with_config_defaults
    @capture_outputs
    def _pumer_forward(self, image: Tensor | None, video: Tensor | None, record: _CacheRecord | None,
                       input_ids: Tensor | None = None,
                       attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                       cache: Cache | None = None, inputs_embeds: Tensor | None = None,
                       use_cache: bool | None = None, **kwargs: Any) -> BaseModelOutputWithPast:
        """The text model's forward (transformers 5) with the reduction at the planned layers, or a reduced cache's masks."""
        extra = self._extra_inputs(kwargs)
        inputs_embeds, cache, rope_positions, position_ids, causal_mask = self._prelude(
            input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, record
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, rope_positions)
        layers = self.layers[: self.config.num_hidden_layers]
        if image is None:
            return self._continue(layers, record, hidden_states, causal_mask, attention_mask, position_ids,
                                  position_embeddings, cache, use_cache, kwargs, extra)
        state: PatchState = getattr(self, SHARED_ATTR)
        options: VlmOptions = state.plan.options
        recorder = Recorder(state.plan)
        seq = _start(image, video, attention_mask, rope_positions, position_ids)
        new_record = _CacheRecord(prompt=seq.length)
        mask = causal_mask
        if options.where == "input":
            ratios = state.plan.schedule[0]
            relevance = None
            if ratios.prune > 0:
                relevance = _embedding_relevance(hidden_states, seq, options.text_tokens)
            seq, hidden_states, position_embeddings, mask = self._after_reduce(
                seq, hidden_states, ratios, relevance, hidden_states, position_embeddings, options, new_record, 0,
                recorder, mask, cache,
            )
        for i, layer in enumerate(layers):
            ratios = state.plan.schedule.get(i) if options.where == "llm" else None
            common = dict(position_ids=seq.layer_pos, cache=cache, use_cache=use_cache,
                          position_embeddings=position_embeddings, **kwargs)
            if ratios is None:
                hidden_states = self._after_layer(i, layer(hidden_states, attention_mask=mask, **common), extra)
                continue
            attn = layer.self_attn
            entering = (hidden_states,)
            with captured(attn.q_proj, attn.k_proj) as projected:
                hidden_states = _checkpointed(layer, _attention_half, layer, hidden_states, mask, common)
            q_out, k_out = projected[0], projected[1]
            relevance = None
            with torch.no_grad():  # indices only
                if ratios.prune > 0:
                    relevance = _relevance(attn, q_out, k_out, position_embeddings, seq, options.text_tokens)
                metric = _heads(k_out, attn, "k_norm").mean(dim=1)  # (B, L, d): keys before rotary, mean over heads
            seq, hidden_states, position_embeddings, mask = self._after_reduce(
                seq, hidden_states, ratios, relevance, metric, position_embeddings, options, new_record, i + 1,
                recorder, mask, cache,
            )
            hidden_states = _checkpointed(layer, _mlp_half, layer, hidden_states)
            if layer._forward_hooks:
                hidden_states = _forward_hooks(layer, entering, {"attention_mask": mask, **common}, hidden_states)
            hidden_states = self._after_layer(i, hidden_states, extra)
        hidden_states = self.norm(hidden_states)
        if cache is not None and new_record.stages:
            setattr(cache, _RECORD_ATTR, new_record)
        record_trace(state, recorder.trace(Tokens(hidden_states, size=seq.size, mask=seq.real)))
        return self._output(hidden_states, cache, use_cache)

    def _untouched_trace(self, state: PatchState, hidden_states: Tensor, attention_mask: Any, call: _VlmCall) -> None:
        """Record the trace of a prompt that kept every token (no image): no visual tokens at any reduce layer."""
        b, n = hidden_states.shape[:2]
        real = torch.ones(b, n, dtype=torch.bool, device=hidden_states.device)
        if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2:
            real = attention_mask.bool()
        text = real if call.video is None else real & ~call.video
        recorder = Recorder(state.plan)
        recorder.counts = [LayerCount(i, 0, int(text.sum(dim=1).max())) for i in sorted(state.plan.schedule)]
        size = torch.ones(b, n, dtype=torch.float32, device=hidden_states.device)
        record_trace(state, recorder.trace(Tokens(hidden_states, size=size, mask=real)))

    def _output(self, hidden_states: Tensor, cache: Cache | None, use_cache: bool | None) -> BaseModelOutputWithPast:
        returned = cache if use_cache or self._returns_cache_without_use_cache else None
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=returned)

    def _extra_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The model's own inputs that are not for its layers, taken out of ``kwargs`` (none here)."""
        return {}

    def _after_layer(self, i: int, hidden_states: Tensor, extra: dict[str, Any]) -> Tensor:
        """What the model does after layer ``i``'s output (nothing here)."""
        return hidden_states

    def _prelude(
        self, input_ids: Tensor | None, attention_mask: Tensor | None, position_ids: Tensor | None,
        cache: Cache | None, inputs_embeds: Tensor | None, use_cache: bool | None, record: _CacheRecord | None,
    ) -> tuple[Tensor, Cache | None, Tensor, Tensor | None, Tensor | None]:
        """``LlamaModel.forward``'s lines before its layers: embeddings, cache, positions, causal mask.

        Returns the embeddings, the cache, the rotary positions, the layers' position ids and the mask (None
        where every layer holds a reduced cache, whose masks the patch builds).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            # after the unreduced prompt, as without the patch (a reduced cache's layers hold fewer columns)
            past_seen_tokens = 0 if cache is None else cache.get_seq_length() if record is None else record.seen(cache)
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        causal_mask = None
        if record is None or record.stages[0].first > 0:  # some layers hold the full sequence
            causal_mask = create_causal_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                position_ids=position_ids,
            )
        return inputs_embeds, cache, position_ids, position_ids, causal_mask

    def _after_reduce(
        self, seq: _Seq, x: Tensor, ratios: Ratios, relevance: Tensor | None, metric: Tensor,
        position_embeddings: tuple[Tensor, Tensor], options: VlmOptions, record: _CacheRecord, first: int,
        recorder: Recorder, mask: Tensor | None, cache: Cache | None,
    ) -> tuple[_Seq, Tensor, tuple[Tensor, Tensor], Tensor | None]:
        """Reduce x (B, L, C) and everything that goes with its columns; layers from ``first`` cache the result."""
        mean = options.merge_position == "mean"
        new, x_new, kept = _reduce(seq, x, ratios, relevance, metric, mean)
        recorder.counts.append(LayerCount(
            max(first - 1, 0), int((new.image >= 0).sum(dim=1).max()), int(new.text.sum(dim=1).max())
        ))
        if new.length == seq.length and bool((new.size == seq.size).all()):
            return seq, x, position_embeddings, mask  # nothing removed or merged: the mask in use still fits
        if mean:
            position_embeddings = self.rotary_emb(x_new, new.pos_float[0] if new.pos_float.shape[0] == 1 else new.pos_float)
        else:
            position_embeddings = tuple(take_rows(t, kept) for t in position_embeddings)
        log_size = new.size.log()
        if first < len(self.layers[: self.config.num_hidden_layers]):  # after the last layer, no cache holds it
            record.stages.append(_Stage(first, new.real, log_size))
        return new, x_new, position_embeddings, _padded(_mask(new.real, log_size, new.length, x.dtype), cache)

    def _continue(
        self, layers: Sequence[nn.Module], record: _CacheRecord, hidden_states: Tensor, causal_mask: Tensor | None,
        attention_mask: Tensor | None, position_ids: Tensor, position_embeddings: tuple[Tensor, Tensor],
        cache: Cache, use_cache: bool | None, kwargs: dict[str, Any], extra: dict[str, Any],
    ) -> BaseModelOutputWithPast:
        """A call on a reduced cache: the layers of each stage get a mask over their shorter cache and the new tokens."""
        b, q = hidden_states.shape[:2]
        first = record.stages[0]
        if cache.get_seq_length(first.first) < first.real.shape[1] or first.real.shape[0] != b:
            raise ValueError("this cache holds a pumer_patch-reduced prompt of another batch, or was cropped into it; "
                             "continue it with the batch that filled it, or start from an empty cache")
        seen = record.seen(cache)
        # generate(..., cache=...) counts the cached tokens by layer 0's length, which where="input" reduced:
        # it would give again tokens the cache holds (a mask too wide, or, without one, positions too low)
        refed = attention_mask.shape[1] != seen + q if attention_mask is not None else (
            first.first == 0 and position_ids is not None and position_ids.dim() == 2
            and bool((position_ids[:, 0] < seen).any())
        )
        if refed:
            raise ValueError(
                f"this cache holds a pumer_patch-reduced prompt standing for {seen} tokens, but this call gives "
                f"{q} tokens that do not follow them: pass only the tokens after those {seen} (with a mask of the "
                f"{seen} and them, or positions from {seen}) (a cache reduced before the LLM, "
                f"where='input', cannot be handed back to generate: continue it step by step, or reduce in the "
                f"LLM, layers=[K])"
            )
        if attention_mask is not None:  # the prompt's columns, then every token given since
            later = attention_mask[:, record.prompt:].bool()
        else:
            later = torch.ones(b, seen + q - record.prompt, dtype=torch.bool, device=hidden_states.device)
        masks: dict[int, Tensor] = {}
        for stage in record.stages:
            real = torch.cat([stage.real, later], dim=1)
            log_size = torch.cat([stage.log_size, later.new_zeros(later.shape, dtype=stage.log_size.dtype)], dim=1)
            masks[stage.first] = _padded(_mask(real, log_size, q, hidden_states.dtype), cache)
        for i, layer in enumerate(layers):
            stage = record.stage_of(i)
            hidden_states = layer(
                hidden_states, attention_mask=causal_mask if stage is None else masks[stage.first],
                position_embeddings=position_embeddings, position_ids=position_ids, cache=cache,
                use_cache=use_cache, **kwargs,
            )
            hidden_states = self._after_layer(i, hidden_states, extra)
        hidden_states = self.norm(hidden_states)
        return self._output(hidden_states, cache, use_cache)


def _warn_if_late(late: bool) -> None:
    """Warn that a call's image tokens, given on a cache that held tokens already, went through unreduced."""
    if late:
        warnings.warn(
            "image tokens given on a cache that already holds tokens pass unreduced (pumer_patch reduces the "
            "images of the call that fills an empty cache): give the image in the first call, or prefill "
            "without a cache", stacklevel=3,
        )


def _checkpointed(layer: nn.Module, half: Any, *args: Any) -> Any:
    """``half(*args)``, checkpointed as the library checkpoints ``layer`` (its flag, its function) in training."""
    if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(half, *args)
    return half(*args)


def _forward_hooks(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> Tensor:
    """``out`` after the layer's forward hooks (``output_hidden_states`` records there), as ``nn.Module`` runs them."""
    for key, hook in layer._forward_hooks.items():
        result = hook(layer, args, kwargs, out) if key in layer._forward_hooks_with_kwargs else hook(layer, args, out)
        out = out if result is None else result
    return out


def _attention_half(layer: nn.Module, x: Tensor, mask: Tensor | None, common: dict[str, Any]) -> Tensor:
    """The decoder layer's attention and residual (``LlamaDecoderLayer.forward``, ``Qwen2DecoderLayer``'s alike)."""
    out, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=mask, **common)
    return x + out


def _mlp_half(layer: nn.Module, x: Tensor) -> Tensor:
    """The decoder layer's MLP and residual (transformers 5)."""
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _embedding_relevance(x: Tensor, seq: _Seq, text_tokens: str) -> Tensor:
    """Relevance (B, M, L) before the LLM: per image, the mean embedding of the prompt text after it as a query
    (``text_tokens="last"``: the last prompt token's embedding)."""
    end = _PROMPT_END.get()
    rows, ranks = _rows(seq, text_tokens, _NO_END if end is None else end)
    text = take_rows(x, rows).float()  # (B, T, C)
    query = torch.einsum("btc,btm->bmc", text, ranks) / ranks.sum(dim=1).clamp_min(1.0)[:, :, None]
    b, m, c = query.shape
    keys = x.float().repeat_interleave(m, dim=0)
    return query_relevance(query.reshape(b * m, c), keys).view(b, m, -1)


def _argument(function: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The value ``name`` takes in a call ``function(self, *args, **kwargs)`` (None when not given)."""
    if name in kwargs:
        return kwargs[name]
    names = list(inspect.signature(function).parameters)[1:]
    return args[names.index(name)] if name in names and names.index(name) < len(args) else None


def _placeholders(model: nn.Module, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> _VlmCall:
    """Where the image and the video placeholders are, as the library's ``get_placeholder_mask`` finds them."""
    video = getattr(model.config, "video_token_id", None)
    return _VlmCall(_placeholder_mask(model, model.config.image_token_id, input_ids, inputs_embeds),
                    None if video is None else _placeholder_mask(model, video, input_ids, inputs_embeds))


def _placeholder_mask(
    model: nn.Module, token: int, input_ids: Tensor | None, inputs_embeds: Tensor | None
) -> Tensor | None:
    """(B, L) True at the placeholder tokens ``token``; None if none."""
    if input_ids is not None:
        mask = input_ids == token
    elif inputs_embeds is not None:
        embedding = model.get_input_embeddings()(torch.tensor(token, device=inputs_embeds.device))
        mask = (inputs_embeds == embedding).all(dim=-1)
    else:
        return None
    return mask if bool(mask.any()) else None


class PumerLlamaModel(_ReducingTextModel, LlamaModel):
    """A VLM's ``LlamaModel``, reducing (see ``_ReducingTextModel``)."""

    _pumer_patched = True


class PumerQwen2Model(_ReducingTextModel, Qwen2Model):
    """A VLM's ``Qwen2Model``, reducing (see ``_ReducingTextModel``)."""

    _pumer_patched = True
    _returns_cache_without_use_cache = False


class _MropeTextModel(_ReducingTextModel):
    """Qwen2-VL's and Qwen2.5-VL's text models: M-RoPE positions (3, B, L), the text row apart for the mask."""

    _returns_cache_without_use_cache = True
    _rows: ClassVar[int] = 3  # position rows made when none are given (Qwen3-VL: 4, the text row first)

    def _prelude(
        self, input_ids: Tensor | None, attention_mask: Tensor | None, position_ids: Tensor | None,
        cache: Cache | None, inputs_embeds: Tensor | None, use_cache: bool | None, record: _CacheRecord | None,
    ) -> tuple[Tensor, Cache | None, Tensor, Tensor | None, Tensor | None]:
        """``Qwen2_5_VLTextModel.forward``'s lines before its layers (``Qwen2VLTextModel``'s are the same)."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = 0 if cache is None else cache.get_seq_length() if record is None else record.seen(cache)
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.view(1, 1, -1).expand(self._rows, inputs_embeds.shape[0], -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None, ...].expand(self._rows, position_ids.shape[0], -1)
        text_position_ids = None
        if position_ids.ndim == 3 and position_ids.shape[0] == 4:
            text_position_ids, position_ids = position_ids[0], position_ids[1:]
        causal_mask = None
        if record is None or record.stages[0].first > 0:
            causal_mask = create_causal_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                position_ids=text_position_ids,
            )
        return inputs_embeds, cache, position_ids, text_position_ids, causal_mask


class PumerQwen2VLTextModel(_MropeTextModel, Qwen2VLTextModel):
    """Qwen2-VL's text model, reducing (see ``_ReducingTextModel``)."""

    _pumer_patched = True


class PumerQwen2_5_VLTextModel(_MropeTextModel, Qwen2_5_VLTextModel):  # noqa: N801 (the library's name)
    """Qwen2.5-VL's text model, reducing (see ``_ReducingTextModel``)."""

    _pumer_patched = True


class PumerQwen3VLTextModel(_MropeTextModel, Qwen3VLTextModel):
    """Qwen3-VL's text model, reducing; DeepStack's additions run after their layers, all before any reduction.

    ``apply`` refuses a reduce layer before DeepStack's last layer: its visual features are added to
    the full sequence's image positions.
    """

    _pumer_patched = True
    _rows = 4

    def _extra_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {name: kwargs.pop(name, None) for name in ("visual_pos_masks", "deepstack_visual_embeds")}

    def _after_layer(self, i: int, hidden_states: Tensor, extra: dict[str, Any]) -> Tensor:
        """``Qwen3VLTextModel.forward``'s DeepStack step: the visual features of layer ``i`` added after it."""
        embeds = extra.get("deepstack_visual_embeds")
        if embeds is not None and i in range(len(embeds)):
            hidden_states = self._deepstack_process(hidden_states, extra["visual_pos_masks"], embeds[i])
        return hidden_states


# text model -> (its decoder layer, its attention, our class)
_TEXT: dict[type[nn.Module], tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    LlamaModel: (LlamaDecoderLayer, LlamaAttention, PumerLlamaModel),
    Qwen2Model: (Qwen2DecoderLayer, Qwen2Attention, PumerQwen2Model),
    Qwen2VLTextModel: (Qwen2VLDecoderLayer, Qwen2VLAttention, PumerQwen2VLTextModel),
    Qwen2_5_VLTextModel: (Qwen2_5_VLDecoderLayer, Qwen2_5_VLAttention, PumerQwen2_5_VLTextModel),
    Qwen3VLTextModel: (Qwen3VLTextDecoderLayer, Qwen3VLTextAttention, PumerQwen3VLTextModel),
}
_MROPE = (Qwen2VLTextModel, Qwen2_5_VLTextModel, Qwen3VLTextModel)


def _bare_forward(library: type[nn.Module]) -> Any:
    """The patched bare model's forward: the library's, told where the image tokens are."""

    @wraps(library.forward)  # its signature: generate reads which inputs the model takes
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: PatchState = getattr(self, SHARED_ATTR)
        input_ids = _argument(library.forward, "input_ids", args, kwargs)
        inputs_embeds = _argument(library.forward, "inputs_embeds", args, kwargs)
        with _CALL.open(state, _placeholders(self, input_ids, inputs_embeds)):
            return library.forward(self, *args, **kwargs)

    return forward


def _head_forward(library: type[nn.Module]) -> Any:
    """The patched generation head's forward: the library's, refusing ``labels`` while the patch reduces."""

    @wraps(library.forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: PatchState = getattr(self, SHARED_ATTR)
        if _argument(library.forward, "labels", args, kwargs) is not None and state.plan.schedule:
            raise ValueError("labels cannot follow a reduced sequence (the logits cover the kept columns only): "
                             "compute the loss unpatched (pumer_patch.remove) or from the kept columns' logits")
        return library.forward(self, *args, **kwargs)

    return forward


def _patched(library: type[nn.Module], forward: Any, doc: str) -> type[nn.Module]:
    """A module-level subclass of ``library`` with ``forward``; named as the library's class for save_pretrained.

    ``save_pretrained`` writes the instance class's ``__name__`` into ``config.architectures``; pickling
    resolves the class by its ``__qualname__``, which is ours and a global of this module.
    """
    qualname = f"Pumer{library.__name__}"
    cls = type(library.__name__, (library,), {"_pumer_patched": True, "forward": forward, "__doc__": doc,
                                              "__module__": __name__, "__qualname__": qualname})
    globals()[qualname] = cls
    return cls


@dataclass(frozen=True)
class _Family:
    """One VLM: the bare model (patched), its language model's attribute, its generation head (patched)."""

    root: type[nn.Module]
    language: str
    head: type[nn.Module]
    inner: str = "model"  # the head's attribute holding the bare model

    @property
    def patched(self) -> type[nn.Module]:
        return _PATCHED[self.root]

    @property
    def head_patched(self) -> type[nn.Module]:
        return _PATCHED[self.head]


_FAMILIES = (
    _Family(LlavaModel, "language_model", LlavaForConditionalGeneration),
    _Family(LlavaNextModel, "language_model", LlavaNextForConditionalGeneration),
    _Family(LlavaOnevisionModel, "language_model", LlavaOnevisionForConditionalGeneration),
    _Family(Idefics3Model, "text_model", Idefics3ForConditionalGeneration),
    _Family(SmolVLMModel, "text_model", SmolVLMForConditionalGeneration),
    _Family(Qwen2VLModel, "language_model", Qwen2VLForConditionalGeneration),
    _Family(Qwen2_5_VLModel, "language_model", Qwen2_5_VLForConditionalGeneration),
    _Family(Qwen3VLModel, "language_model", Qwen3VLForConditionalGeneration),
)
_PATCHED: dict[type[nn.Module], type[nn.Module]] = {}
for _f in _FAMILIES:
    _PATCHED[_f.root] = _patched(_f.root, _bare_forward(_f.root),
                                 f"``{_f.root.__name__}`` telling its language model where the image tokens are.")
    _PATCHED[_f.head] = _patched(_f.head, _head_forward(_f.head),
                                 f"``{_f.head.__name__}`` refusing labels while the patch reduces.")
for _cls in (PumerLlamaModel, PumerQwen2Model, PumerQwen2VLTextModel, PumerQwen2_5_VLTextModel, PumerQwen3VLTextModel):
    _cls.__name__ = _cls.__bases__[-1].__name__

#: the vision-language models this adapter patches (their vision towers are theirs, never the ViT adapters')
VLM_CLASSES: tuple[type[nn.Module], ...] = tuple(c for f in _FAMILIES for c in (f.root, f.head))

_SUPPORTED = (
    "transformers LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
    "LlavaOnevisionForConditionalGeneration, Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration "
    "(with a Llama or Qwen2 language model), Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, "
    "Qwen3VLForConditionalGeneration and their bare ...Model"
)


def _vlm_config(root: nn.Module) -> Any:
    """The VLM's own config (of the bare model; a head shares it)."""
    return _bare(root).config


def _family(root: nn.Module) -> _Family:
    return next(f for f in _FAMILIES if isinstance(root, (f.root, f.head)))


def _bare(root: nn.Module) -> nn.Module:
    """The bare ``...Model`` of a root (itself, or the one its generation head holds)."""
    family = _family(root)
    return getattr(root, family.inner) if isinstance(root, family.head) else root


class HfVlmAdapter(Adapter):
    name = "hf_vlm"
    supports = _SUPPORTED
    Options = VlmOptions

    def roots(self, model: nn.Module) -> list[nn.Module]:
        """Generation heads, and bare models that no head holds (a head's model is patched as part of it)."""
        heads = [m for m in model.modules() if isinstance(m, tuple(f.head for f in _FAMILIES))]
        held = {id(_bare(h)) for h in heads}
        bare = [m for m in model.modules() if isinstance(m, tuple(f.root for f in _FAMILIES)) and id(m) not in held]
        return heads + bare

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        language = getattr(_bare(root), _family(root).language)
        return language.layers[: language.config.num_hidden_layers]

    def check(self, root: nn.Module) -> None:
        family = _family(root)
        if isinstance(root, family.head):
            ensure_class(root, family.head, f"the {type(root).__name__}")
        root = _bare(root)
        name = type(root).__name__
        language = getattr(root, family.language)
        text = library_class(language)
        if text not in _TEXT:
            raise ValueError(
                f"the {name}'s language model is a {text.__name__}; pumer_patch reduces visual tokens in a "
                f"{' or '.join(t.__name__ for t in _TEXT)} there"
            )
        layer_class, attention_class, _ = _TEXT[text]
        ensure_class(root, family.root, f"the {name}", ())
        ensure_class(language, text, f"the {name}'s language model")
        _check_implementation(language.config, text.__name__)
        if "sliding_attention" in (getattr(language.config, "layer_types", None) or ()):
            raise ValueError(f"the {name}'s {text.__name__} has sliding-window layers, whose masks pumer_patch does not "
                             f"rebuild for a reduced sequence; build it with use_sliding_window=False")
        for i, layer in enumerate(self.blocks(root)):
            ensure_class(layer, layer_class, f"{name} language layer {i}")
            ensure_class(layer.self_attn, attention_class, f"{name} language layer {i}'s attention")
        warn_if_untested("transformers", transformers.__version__, _TESTED,
                         f"{text.__name__}.forward and its decoder layer's forward")

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: dict[str, Any], mode: Mode, schedule: dict[int, Ratios]
    ) -> VlmOptions:
        if mode != "default":
            raise ValueError("mode='reference' is the research code's arithmetic for ViLT and METER; "
                             "vision-language LLMs take mode='default'")
        resolved = VlmOptions(**options)
        choices = {"where": ("llm", "input"), "text_tokens": ("all", "last"),
                   "merge_position": ("destination", "mean")}
        for name, valid in choices.items():
            if getattr(resolved, name) not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {getattr(resolved, name)!r}")
        language = getattr(_bare(root), _family(root).language)
        if resolved.where == "input" and isinstance(language, _MROPE):
            raise ValueError(
                f"where='input' would reduce every layer's cache of this {type(language).__name__}, whose decode "
                f"positions come from the cache's length (M-RoPE deltas): reduce inside the LLM, layers=[K] with K >= 0"
            )
        if isinstance(language, Qwen3VLTextModel):
            deepstack = len(_vlm_config(root).vision_config.deepstack_visual_indexes)
            early = sorted(i for i in schedule if i < deepstack)
            if early:
                raise ValueError(
                    f"layers {early} come before DeepStack's last layer ({deepstack - 1}): Qwen3-VL adds visual "
                    f"features to the image positions after layers 0..{deepstack - 1}, which must stay whole until "
                    f"then; reduce at layers >= {deepstack}"
                )
        if resolved.where == "input" and set(schedule) - {0}:
            raise ValueError(f"where='input' reduces once, before the first decoder layer: pass layers=[0], "
                             f"got layers={sorted(schedule)}")
        if any(r.text_merge > 0 for r in schedule.values()):
            raise ValueError("text_merge_ratio has no effect in a vision-language LLM (the prompt's text is kept "
                             "whole); pass prune_ratio and merge_ratio only")
        return resolved

    def swaps(self, root: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
        family = _family(root)
        bare = _bare(root)
        language = getattr(bare, family.language)
        swaps = [(bare, family.patched), (language, _TEXT[library_class(language)][2])]
        return [(root, family.head_patched), *swaps] if root is not bare else swaps

    def patch(self, root: nn.Module, state: PatchState) -> None:
        super().patch(root, state)
        for module, _ in self.swaps(root):
            # ``capture_outputs`` looks up what to record by the model's class; ours records what the library's does
            _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
