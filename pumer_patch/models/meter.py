"""METER (Dou et al., CVPR 2022) as PuMer's research code builds it, in the transformers idiom.

No library provides METER; PuMer's users hold its checkpoints (``config.json`` + ``pytorch_model.bin``
saved by transformers 4.24; every key is listed in ``tests/data/pumer-keys/meter_*.txt``). This
module loads them with nothing missing or unexpected and knows nothing of token reduction: the
adapter ``pumer_patch.adapters.meter`` calls the parts below.

Architecture (see docs/design.md, "Models"):

* ``vit_model``: the CLIP ViT-B/16 visual tower with 11 residual blocks (CLIP's last is dropped),
  open_clip's own ``ResidualAttentionBlock`` with QuickGELU and float32 LayerNorm, ``conv1`` without
  bias, ``class_embedding``, ``positional_embedding`` ((S / 16)^2 + 1 rows, no run-time
  interpolation), ``ln_pre``, ``ln_post`` on every token; no projection, no pooling: (B, N, C).
* ``text_transformer``: RoBERTa-base (``transformers.RobertaModel`` without pooler) from a config
  written here (nothing fetched): embeddings and encoder layers with their additive mask.
* ``cross_modal_{text,image}_transform`` (Linear), ``token_type_embeddings`` (text 0, image 1,
  NLVR2's second image 2).
* Fusion: 6 blocks, each a text layer and an image layer (self-attention, cross-attention, FFN; BERT
  names, post-LN, LayerNorm eps 1e-12, exact GELU). ``fusion_order``: ``"sequential"`` (PuMer's
  checkpoints: block k's image layer reads the text block k's text layer just produced) or
  ``"parallel"`` (original METER: both read the previous states). ``fusion_masking``: ``"pumer"``
  (the research masked softmax, ``pumer_patch.core.masked_softmax``: a masked key is still seen on
  the diagonal, every key gets 1e-6 / N, fractional weights multiply exp(score); needed to reproduce
  PuMer's checkpoints even without reduction) or ``"additive"`` (original METER: log-weight bias,
  F.scaled_dot_product_attention when the probabilities are not asked for).
* Poolers ``tanh(dense(h[:, 0]))`` per stream, pooled = [text ; image] (2C), and the task heads.

The forward is split into steps a caller can run apart (retrieval caches unimodal features):
``encode_text`` -> ``encode_image`` -> ``fuse`` -> ``pool``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, Transformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig, PreTrainedModel, RobertaConfig, RobertaModel
from transformers.utils import ModelOutput

from pumer_patch.core import masked_softmax

__all__ = [
    "MeterConfig",
    "MeterAttentionOutput",
    "MeterAttention",
    "MeterFusionLayer",
    "MeterVisionTower",
    "MeterModel",
    "MeterModelOutput",
    "MeterOutput",
    "MeterPreTrainedModel",
    "MeterForQuestionAnswering",
    "MeterForVisualEntailment",
    "MeterForVisualReasoning",
    "MeterForImageAndTextRetrieval",
    "MeterForPreTraining",
    "CLIP_MEAN",
    "CLIP_STD",
    "FusionOrder",
    "FusionMasking",
]

logger = logging.getLogger(__name__)

#: CLIP's image normalisation (METER's transforms: bicubic square resize, then these)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FusionOrder = Literal["sequential", "parallel"]
FusionMasking = Literal["pumer", "additive"]


class MeterConfig(PretrainedConfig):
    """METER's configuration: the fields PuMer's config.json carries, unknown ones accepted and ignored.

    Full size by default (CLIP ViT-B/16 at 384 with 11 blocks, RoBERTa-base, 6 fusion blocks of 768).
    ``vision_*`` and ``text_*`` shrink the towers for tests and laptop studies; ``num_layers`` (PuMer's
    field, 12) counts the RoBERTa layers and ``text_heads`` (None: ``num_heads``) its heads.
    ``fusion_order`` and ``fusion_masking`` name how the fusion blocks compute (see the module
    docstring); the defaults are the arithmetic PuMer's checkpoints were trained with, original
    METER checkpoints need ``"parallel"`` and ``"additive"`` (``convert_meter`` writes those).

    The reduction a PuMer folder was trained with, data for ``pumer_patch.apply_from_config``, which
    patches the model with it; the model itself never reads them:

    * ``prune_r``, ``merge_r``: the image tokens' prune and merge ratios at each reducing block;
    * ``merge_text``: the text tokens' merge ratio there;
    * ``reduce_layers``: the reducing blocks in the research code's numbering, two per fusion block
      (``[0, 2, 4, 6]`` are blocks 0-3).
    """

    model_type = "meter"

    def __init__(
        self,
        image_size: int = 384,
        vit_patch_size: int = 16,
        hidden_size: int = 768,
        num_heads: int = 12,
        num_layers: int = 12,
        num_top_layer: int = 6,
        mlp_ratio: int = 4,
        drop_rate: float = 0.1,
        max_text_len: int = 40,
        vocab_size: int = 50265,
        tokenizer: str = "roberta-base",
        token_types: int = 2,
        vqa_label_size: int = 3129,
        vision_width: int = 768,
        vision_layers: int = 11,
        vision_heads: int = 12,
        text_hidden_size: int = 768,
        text_intermediate_size: int = 3072,
        text_heads: int | None = None,
        max_position_embeddings: int = 514,
        fusion_order: FusionOrder = "sequential",
        fusion_masking: FusionMasking = "pumer",
        prune_r: float = 0.0,
        merge_r: float = 0.0,
        merge_text: float = 0.0,
        reduce_layers: list[int] | None = None,
        initializer_range: float = 0.02,
        pad_token_id: int = 1,
        bos_token_id: int = 0,
        eos_token_id: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        if fusion_order not in ("sequential", "parallel"):
            raise ValueError(
                f"fusion_order must be 'sequential' (PuMer's checkpoints) or 'parallel' (original METER), got {fusion_order!r}"
            )
        if fusion_masking not in ("pumer", "additive"):
            raise ValueError(
                f"fusion_masking must be 'pumer' (the research masked softmax) or 'additive' (original METER), "
                f"got {fusion_masking!r}"
            )
        heads = text_heads or num_heads
        for name, width, n in (("hidden_size", hidden_size, num_heads), ("text_hidden_size", text_hidden_size, heads),
                               ("vision_width", vision_width, vision_heads)):
            if width % n:
                raise ValueError(f"{name}={width} must be a multiple of its number of heads ({n})")
        if image_size % vit_patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of vit_patch_size {vit_patch_size}")
        self.image_size = image_size
        self.vit_patch_size = vit_patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_top_layer = num_top_layer
        self.mlp_ratio = mlp_ratio
        self.drop_rate = drop_rate
        self.max_text_len = max_text_len
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.token_types = token_types
        self.vqa_label_size = vqa_label_size
        self.vision_width = vision_width
        self.vision_layers = vision_layers
        self.vision_heads = vision_heads
        self.text_hidden_size = text_hidden_size
        self.text_intermediate_size = text_intermediate_size
        self.text_heads = text_heads
        self.max_position_embeddings = max_position_embeddings
        self.fusion_order = fusion_order
        self.fusion_masking = fusion_masking
        self.prune_r = prune_r
        self.merge_r = merge_r
        self.merge_text = merge_text
        self.reduce_layers = list(reduce_layers or [])
        self.initializer_range = initializer_range

    def text_config(self) -> RobertaConfig:
        """RoBERTa-base as METER uses it (eps 1e-5, 514 positions, one token type), sized by this config."""
        return RobertaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.text_heads or self.num_heads,
            intermediate_size=self.text_intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )


# ---------------------------------------------------------------------------------------------
# The CLIP visual tower
# ---------------------------------------------------------------------------------------------


class ClipLayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: computed in float32 at least (fp16 / bf16 inputs), float64 kept; eps 1e-5.

    Not open_clip's ``LayerNormFp32``: it casts the input to float32 but not its float64 weights, so a
    float64 METER fails in ``F.layer_norm``. Same keys, same float32 arithmetic otherwise.
    """

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps).to(x.dtype)



class MeterVisionTower(nn.Module):
    """CLIP's visual tower as METER uses it: (B, 3, S, S) -> (B, 1 + (S / p)^2, width), ``ln_post`` on every token."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        width, patch = config.vision_width, config.vit_patch_size
        self.image_size = config.image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((config.image_size // patch) ** 2 + 1, width))
        self.ln_pre = ClipLayerNorm(width)
        self.transformer = Transformer(
            width, config.vision_layers, config.vision_heads, act_layer=QuickGELU, norm_layer=ClipLayerNorm
        )
        self.ln_post = ClipLayerNorm(width)
        # transformers' gradient_checkpointing_enable switches modules with this attribute; open_clip's
        # Transformer has its own ``grad_checkpointing``, which that call never reaches
        self.gradient_checkpointing = False

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Patches, [CLS] first, positions, ``ln_pre``: (B, 3, S, S) -> (B, N, width)."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"METER's positional embedding has {self.positional_embedding.shape[0]} rows for "
                f"{self.image_size}x{self.image_size} images (no run-time interpolation); got "
                f"{tuple(pixel_values.shape[-2:])}. Resize the images, or convert the checkpoint to this size"
            )
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # (B, C, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N - 1, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def run_blocks(self, x: Tensor) -> Tensor:
        """The residual blocks: (B, N, C) -> (B, N, C), each recomputed in backward when checkpointing."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            for block in self.transformer.resblocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.transformer(x)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.ln_post(self.run_blocks(self.embed(pixel_values)))


# ---------------------------------------------------------------------------------------------
# Fusion layers
# ---------------------------------------------------------------------------------------------


@dataclass
class MeterAttentionOutput:
    """hidden: (B, Nq, C) after the output projection, residual and LayerNorm. keys: (B, Nk, d) the
    attention keys averaged over heads (the merge metric). probs: (B, H, Nq, Nk) after dropout, or None."""

    hidden: Tensor
    keys: Tensor
    probs: Tensor | None = None


class MeterSelfAttention(nn.Module):
    """The query / key / value projections (BERT's ``attention.self``)."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = c // config.num_heads
        self.query = nn.Linear(c, c)
        self.key = nn.Linear(c, c)
        self.value = nn.Linear(c, c)
        self.dropout = nn.Dropout(config.drop_rate)

    def heads(self, x: Tensor, proj: nn.Linear) -> Tensor:
        b, n, _ = x.shape
        return proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, N, C) -> (B, H, N, d)


class MeterSelfOutput(nn.Module):
    """Output projection, dropout, residual and post-LayerNorm (BERT's ``attention.output``)."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class MeterAttention(nn.Module):
    """Self- or cross-attention with METER's masking (``config.fusion_masking``)."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        self.self = MeterSelfAttention(config)
        self.output = MeterSelfOutput(config)
        self.masking: FusionMasking = config.fusion_masking

    def forward(
        self,
        hidden: Tensor,
        context: Tensor | None = None,
        key_weight: Tensor | None = None,
        key_bias: Tensor | None = None,
        output_probs: bool = False,
    ) -> MeterAttentionOutput:
        """hidden: (B, Nq, C) queries; context: (B, Nk, C) keys and values (None: self-attention).

        key_weight: (B, Nk) key mask, 1 real, 0 padding, fractional where text merging averaged a token
        with a pad; None is all ones. In the ``"pumer"`` masking it multiplies exp(score) (with the
        diagonal exception and the epsilon, ``masked_softmax``); in the ``"additive"`` one log(weight)
        is added to the logits, the same factor for a fractional weight and -inf-like for a zero one.
        key_bias: (B, Nk) added to every query's logits for that key in both maskings and on the SDPA
        path (e.g. log(token size), proportional attention: a bias of log 2 counts a key twice); None
        adds nothing. output_probs: also return the probabilities (B, H, Nq, Nk); in the ``"additive"``
        masking they are computed beside SDPA, before dropout, and the output is the same as without them.
        """
        attn = self.self
        source = hidden if context is None else context
        q, k, v = attn.heads(hidden, attn.query), attn.heads(source, attn.key), attn.heads(source, attn.value)
        b, nk = k.shape[0], k.shape[2]
        if self.masking == "pumer":
            weight = key_weight if key_weight is not None else k.new_ones(b, nk)
            scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)  # (B, H, Nq, Nk)
            if key_bias is not None:
                scores = scores + key_bias[:, None, None, :].to(scores.dtype)
            probs = attn.dropout(masked_softmax(scores, weight))
            context_layer = probs @ v
        else:
            bias = _additive_bias(key_weight, key_bias, q.dtype)
            p = attn.dropout.p if self.training else 0.0
            # the output never depends on output_probs: an eager softmax differs from SDPA in the last bits
            context_layer = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
            probs = None
            if output_probs:
                scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
                probs = (scores if bias is None else scores + bias).softmax(dim=-1)
        context_layer = context_layer.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)  # (B, Nq, C)
        return MeterAttentionOutput(
            self.output(context_layer, hidden), k.mean(dim=1), probs if output_probs else None
        )


def _additive_bias(key_weight: Tensor | None, key_bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, 1, 1, Nk) additive logit bias: log(weight) (-inf-like on padding) plus ``key_bias``."""
    if key_weight is None and key_bias is None:
        return None
    ref = key_weight if key_weight is not None else key_bias
    bias = torch.zeros(ref.shape, dtype=torch.float32, device=ref.device)
    if key_weight is not None:
        bias = bias + key_weight.float().log()
    if key_bias is not None:
        bias = bias + key_bias.float()
    return bias.clamp_min(max(torch.finfo(dtype).min, torch.finfo(torch.float32).min)).to(dtype)[:, None, None, :]


class MeterIntermediate(nn.Module):
    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size * config.mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class MeterFFNOutput(nn.Module):
    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size * config.mlp_ratio, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class MeterFusionLayer(nn.Module):
    """One stream's layer of a fusion block: self-attention, cross-attention to the other stream, FFN."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        self.attention = MeterAttention(config)
        self.crossattention = MeterAttention(config)
        self.intermediate = MeterIntermediate(config)
        self.output = MeterFFNOutput(config)

    def feed_forward(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, C): intermediate, output projection, residual, LayerNorm."""
        return self.output(self.intermediate(x), x)

    def forward(
        self, hidden: Tensor, context: Tensor, hidden_weight: Tensor | None = None, context_weight: Tensor | None = None
    ) -> Tensor:
        """hidden: (B, N, C) this stream; context: (B, M, C) the other; weights: (B, N) / (B, M) key masks."""
        own = self.attention(hidden, key_weight=hidden_weight)
        cross = self.crossattention(own.hidden, context=context, key_weight=context_weight)
        return self.feed_forward(cross.hidden)


class MeterPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: a stream's first token, (B, N, C) -> (B, C)."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, N, C) -> (B, C)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass
class MeterModelOutput(ModelOutput):
    """text_feats: (B, T', C) and image_feats: (B, N', C) after fusion; pooled_output: (B, 2C) [text ; image]."""

    text_feats: Tensor | None = None
    image_feats: Tensor | None = None
    pooled_output: Tensor | None = None


@dataclass
class MeterOutput(ModelOutput):
    """A head's output: ``logits`` (and ``loss`` with labels); retrieval adds ``itm_logits``."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    itm_logits: Tensor | None = None
    pooled_output: Tensor | None = None


class MeterPreTrainedModel(PreTrainedModel):
    config_class = MeterConfig
    base_model_prefix = "meter"
    supports_gradient_checkpointing = True
    # persistent in the checkpoints of transformers < 4.31 (PuMer's 4.24), a buffer RoBERTa rebuilds
    _keys_to_ignore_on_load_unexpected = [r"embeddings\.position_ids$"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained`` that reports the ``position_ids`` buffers it dropped (PuMer folders)."""
        asked = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        _report_dropped_buffers(source)
        return (model, info) if asked else model


def _report_dropped_buffers(source: Any) -> None:
    """Log the ``position_ids`` buffers a PuMer ``pytorch_model.bin`` carries and the load dropped."""
    path = Path(str(source)) / "pytorch_model.bin"
    if not path.is_file():
        return
    # mmap + meta: only the key names are read, not the 1.3 GB of weights
    state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    keys = [k for k in state if k.endswith("embeddings.position_ids")]
    if keys:
        logger.info("dropped %d buffer(s) that transformers >= 4.31 rebuilds: %s", len(keys), ", ".join(keys))


class MeterModel(MeterPreTrainedModel):
    """The METER backbone: ``encode_text``, ``encode_image``, ``fuse``, ``pool``; ``forward`` runs all four."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__(config)
        c = config.hidden_size
        self.vit_model = MeterVisionTower(config)
        self.text_transformer = RobertaModel(config.text_config(), add_pooling_layer=False)
        self.cross_modal_text_transform = nn.Linear(config.text_hidden_size, c)
        self.cross_modal_image_transform = nn.Linear(config.vision_width, c)
        self.token_type_embeddings = nn.Embedding(config.token_types, c)
        self.cross_modal_image_layers = nn.ModuleList(MeterFusionLayer(config) for _ in range(config.num_top_layer))
        self.cross_modal_text_layers = nn.ModuleList(MeterFusionLayer(config) for _ in range(config.num_top_layer))
        self.cross_modal_image_pooler = MeterPooler(config)
        self.cross_modal_text_pooler = MeterPooler(config)
        self.gradient_checkpointing = False
        self.post_init()

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """RoBERTa, the cross-modal transform and token type 0: (B, T) ids -> (B, T, C)."""
        text = self.text_transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text = self.cross_modal_text_transform(text)
        return text + self.token_type_embeddings(torch.zeros_like(input_ids))

    def encode_image(self, pixel_values: Tensor, image_token_type_idx: int = 1) -> Tensor:
        """The CLIP tower, the cross-modal transform and the image token type: (B, 3, S, S) -> (B, N, C)."""
        image = self.cross_modal_image_transform(self.vit_model(pixel_values))
        types = torch.full(image.shape[:2], image_token_type_idx, dtype=torch.long, device=image.device)
        return image + self.token_type_embeddings(types)

    def fuse(
        self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The fusion blocks: text (B, T, C) with its mask (B, T), image (B, N, C) -> both streams after fusion.

        ``image_mask`` None is all real (METER's images are never padded).
        """
        text_weight = text_mask.float()
        image_weight = None if image_mask is None else image_mask.float()
        sequential = self.config.fusion_order == "sequential"
        for text_layer, image_layer in zip(self.cross_modal_text_layers, self.cross_modal_image_layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                new_text = checkpoint(text_layer, text, image, text_weight, image_weight, use_reentrant=False)
                image = checkpoint(
                    image_layer, image, new_text if sequential else text, image_weight, text_weight, use_reentrant=False
                )
            else:
                new_text = text_layer(text, image, text_weight, image_weight)
                image = image_layer(image, new_text if sequential else text, image_weight, text_weight)
            text = new_text
        return text, image

    def pool(self, text: Tensor, image: Tensor) -> Tensor:
        """[text pooler ; image pooler] on each stream's first token: (B, 2C)."""
        return torch.cat([self.cross_modal_text_pooler(text), self.cross_modal_image_pooler(image)], dim=-1)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_token_type_idx: int = 1,
        return_dict: bool | None = None,
    ) -> MeterModelOutput | tuple[Tensor, ...]:
        """input_ids / attention_mask: (B, T); pixel_values: (B, 3, S, S)."""
        if pixel_values is None:
            raise ValueError("METER needs pixel_values (B, 3, S, S)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = self.encode_text(input_ids, attention_mask)
        image = self.encode_image(pixel_values, image_token_type_idx)
        text, image = self.fuse(text, attention_mask, image)
        pooled = self.pool(text, image)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return text, image, pooled
        return MeterModelOutput(text_feats=text, image_feats=image, pooled_output=pooled)


def _classifier(c_in: int, c_hidden: int, n_out: int) -> nn.Sequential:
    """METER's task head: Linear, LayerNorm, GELU, Linear (keys .0 .1 .3)."""
    return nn.Sequential(nn.Linear(c_in, c_hidden), nn.LayerNorm(c_hidden), nn.GELU(), nn.Linear(c_hidden, n_out))


class MeterForQuestionAnswering(MeterPreTrainedModel):
    """VQAv2: ``vqa_classifier`` over the pooled (B, 2C) features -> (B, vqa_label_size) logits.

    Loss with ``labels`` (B, L) soft scores: the mean binary cross-entropy over all labels, PuMer's
    scale. (ViLT and HF multiply it by the label count; with distillation the weight of the KL term
    relative to this loss depends on that choice.)
    """

    def __init__(self, config: MeterConfig) -> None:
        super().__init__(config)
        self.meter = MeterModel(config)
        c = config.hidden_size
        self.vqa_classifier = _classifier(2 * c, 2 * c, config.vqa_label_size)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                labels: Tensor | None = None, **kwargs: Any) -> MeterOutput:
        pooled = self.meter(input_ids, attention_mask, pixel_values, **kwargs).pooled_output
        logits = self.vqa_classifier(pooled)
        loss = None if labels is None else F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return MeterOutput(loss=loss, logits=logits, pooled_output=pooled)


class MeterForVisualEntailment(MeterPreTrainedModel):
    """SNLI-VE: ``ve_classifier`` -> (B, 3) logits (contradiction 0, neutral 1, entailment 2); cross-entropy."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__(config)
        self.meter = MeterModel(config)
        c = config.hidden_size
        self.ve_classifier = _classifier(2 * c, 2 * c, 3)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                labels: Tensor | None = None, **kwargs: Any) -> MeterOutput:
        pooled = self.meter(input_ids, attention_mask, pixel_values, **kwargs).pooled_output
        logits = self.ve_classifier(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return MeterOutput(loss=loss, logits=logits, pooled_output=pooled)


class MeterForVisualReasoning(MeterPreTrainedModel):
    """NLVR2: two full passes (same text; image 1 token type 1, image 2 token type 2), ``nlvr2_classifier``
    over [pooled 1 ; pooled 2] (B, 4C) -> (B, 2) logits; cross-entropy. Needs ``token_types=3``."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__(config)
        if config.token_types < 3:
            raise ValueError("NLVR2 needs token_types=3 (text, image 1, image 2); convert a 2-type checkpoint first")
        self.meter = MeterModel(config)
        c = config.hidden_size
        self.nlvr2_classifier = _classifier(4 * c, 2 * c, 2)
        self.post_init()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        pixel_values_2: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> MeterOutput:
        """pixel_values: (B, 2, 3, S, S), or (B, 3, S, S) with ``pixel_values_2`` the second images."""
        if pixel_values_2 is None:
            if pixel_values is None or pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
                raise ValueError("NLVR2 needs two images: pixel_values (B, 2, 3, S, S), or pixel_values and pixel_values_2")
            pixel_values, pixel_values_2 = pixel_values[:, 0], pixel_values[:, 1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        meter = self.meter
        pooled = []
        for images, token_type in ((pixel_values, 1), (pixel_values_2, 2)):
            # each pass runs whole, as the research code does (and a reduction acts on each on its own)
            text = meter.encode_text(input_ids, attention_mask)
            fused = meter.fuse(text, attention_mask, meter.encode_image(images, token_type))
            pooled.append(meter.pool(*fused))
        both = torch.cat(pooled, dim=-1)  # (B, 4C)
        logits = self.nlvr2_classifier(both)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return MeterOutput(loss=loss, logits=logits, pooled_output=both)


class MeterITMHead(nn.Module):
    """``itm_score``: image-text matching logits (B, 2C) -> (B, 2), column 1 = "match"."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class MeterForImageAndTextRetrieval(MeterPreTrainedModel):
    """Retrieval: ``rank_output`` (B, 1) score of each image-text pair and ``itm_score`` (B, 2) match logits."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__(config)
        self.meter = MeterModel(config)
        c = config.hidden_size
        self.rank_output = nn.Linear(2 * c, 1)
        self.itm_score = MeterITMHead(2 * c)
        self.post_init()

    def score(self, pooled: Tensor) -> Tensor:
        """The ranking score (B,) of pooled pair features (B, 2C)."""
        return self.rank_output(pooled)[:, 0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                labels: Tensor | None = None, **kwargs: Any) -> MeterOutput:
        """labels: (B,) ITM targets (1 matched, 0 not), for the ITM cross-entropy."""
        pooled = self.meter(input_ids, attention_mask, pixel_values, **kwargs).pooled_output
        itm = self.itm_score(pooled)
        loss = None if labels is None else F.cross_entropy(itm, labels)
        return MeterOutput(loss=loss, logits=self.rank_output(pooled), itm_logits=itm, pooled_output=pooled)


class MeterMLMHead(nn.Module):
    """``mlm_score``: transform (dense, GELU, LayerNorm), decoder, bias: (B, T, C) -> (B, T, vocab)."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertConfig, BertPredictionHeadTransform

        self.transform = BertPredictionHeadTransform(
            BertConfig(hidden_size=config.hidden_size, hidden_act="gelu", layer_norm_eps=1e-12)
        )
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x)) + self.bias


class MeterForPreTraining(MeterPreTrainedModel):
    """The pretraining heads (``mlm_score``, ``itm_score``), to load the checkpoints finetuning starts from.

    Returns ``logits`` (B, T, vocab) over the fused text, one row per input id, and ``itm_logits`` (B, 2).
    """

    def __init__(self, config: MeterConfig) -> None:
        super().__init__(config)
        self.meter = MeterModel(config)
        self.mlm_score = MeterMLMHead(config)
        self.itm_score = MeterITMHead(2 * config.hidden_size)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                **kwargs: Any) -> MeterOutput:
        out = self.meter(input_ids, attention_mask, pixel_values, **kwargs)
        return MeterOutput(
            logits=self.mlm_score(out.text_feats), itm_logits=self.itm_score(out.pooled_output), pooled_output=out.pooled_output
        )
