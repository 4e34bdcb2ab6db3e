"""Converters from ViLT's and PuMer's ViLT checkpoints to Hugging Face ``transformers`` ViLT, per head.

Sources (DESIGN.md section 4):

* ``"original"``: a ViLT Lightning checkpoint (dandelin/ViLT, ``.ckpt``: its ``state_dict``), timm-style
  keys with no prefix: ``text_embeddings.*``, ``token_type_embeddings``, ``transformer.blocks.N.attn.qkv``,
  ``pooler``, heads ``vqa_classifier``, ``nlvr2_classifier``, ``rank_output``, ``itm_score``, ``mlm_score``.
* ``"pumer"``: a PuMer folder (``config.json`` + ``pytorch_model.bin``, transformers 4.24), the same
  names with the backbone under ``vilt.`` (``shared/reference/pumer-keys/vilt_*.txt``), plus
  ``ve_classifier`` for SNLI-VE.

Targets, per ``head``:

========== ============================================ =================================================
head       transformers class                           notes
========== ============================================ =================================================
vqa        ``ViltForQuestionAnswering``                 ``vqa_classifier`` -> ``classifier``
ve         ``ViltForQuestionAnswering`` with 3 labels   ``ve_classifier`` -> ``classifier``; transformers
                                                        has no VE class and this head's loss is BCE: train
                                                        it with cross-entropy on ``logits``, as PuMer does
nlvr2      ``ViltForImagesAndTextClassification``       ``nlvr2_classifier`` -> ``classifier``,
                                                        ``num_images=2``, 3 modality types
irtr       ``ViltForImageAndTextRetrieval``             ``rank_output``; ``itm_score`` has no slot: it is
                                                        returned in ``report.itm_head`` (an
                                                        ``nn.Linear(hidden, 2)`` state_dict)
pretrain   ``ViltForMaskedLM``                          ``mlm_score``; ``itm_score`` as for irtr
========== ============================================ =================================================

Backbone names (research -> transformers, ``vilt.`` prefix on the right):

============================================ ==========================================================
``text_embeddings.X``                        ``embeddings.text_embeddings.X``
``token_type_embeddings``                    ``embeddings.token_type_embeddings``
``transformer.cls_token``                    ``embeddings.cls_token``
``transformer.pos_embed``                    ``embeddings.position_embeddings``
``transformer.patch_embed.proj``             ``embeddings.patch_embeddings.projection``
``transformer.blocks.N.norm1`` / ``norm2``   ``encoder.layer.N.layernorm_before`` / ``layernorm_after``
``transformer.blocks.N.attn.qkv``            ``encoder.layer.N.attention.attention.{query,key,value}``
                                             (rows split in thirds, weights and biases)
``transformer.blocks.N.attn.proj``           ``encoder.layer.N.attention.output.dense``
``transformer.blocks.N.mlp.fc1`` / ``fc2``   ``encoder.layer.N.intermediate.dense`` / ``output.dense``
``transformer.norm``                         ``layernorm``
``pooler.dense``                             ``pooler.dense``
``mlm_score.transform.*``, ``.decoder``      ``mlm_score.transform.*``, ``mlm_score.decoder.weight``
``mlm_score.bias``                           ``mlm_score.decoder.bias``
============================================ ==========================================================

Derived weights, each listed in ``report.derived``:

* NLVR2 from a checkpoint with 2 modality types (the pretrained one): row 2 := row 1, as
  ``ViLTransformerSS.__init__`` (dandelin/ViLT ``vilt/modules/vilt_module.py``) and PuMer's
  ``convert_vilt_pretrain_nlvr2`` (``cli/prep/convert_ckpt.py``) do.
* Retrieval from a checkpoint without ``rank_output`` (the pretrained one): ``rank_output`` := the
  "match" row (1) of ``itm_score.fc``, as the same two functions (``convert_vilt_irtr``) do.
* A task head the source lacks while it holds pretraining heads (finetuning from the pretrained
  checkpoint): freshly initialised by transformers, listed in ``report.initialized``.

Dropped: ``text_embeddings.position_ids`` (a buffer, persistent before transformers 4.31), the
pretraining heads that the target head does not use, ``mpp_score`` (masked patch prediction has no
transformers head). Every dropped key is in ``report.ignored`` with the reason. Keys with no place
(another task's classifier, unknown names) are ``report.unexpected``; conversion then refuses to load.

Config facts (checked in the research code; where transformers cannot say it exactly, said here):

* LayerNorm eps 1e-6: timm's ``partial(nn.LayerNorm, eps=1e-6)`` in ``VisionTransformer.__init__``
  (both repositories' ``vision_transformer.py`` / ``vit_vilt.py``). transformers' ViLT has one
  ``layer_norm_eps`` for every LayerNorm of the backbone, but the research text embeddings and MLM
  transform are ``BertEmbeddings`` / ``BertPredictionHeadTransform`` with BertConfig's 1e-12. With 1e-6
  there, the normalised text embeddings shrink by about 5e-7 / var (var: the per-token variance of
  word + position + type embedding): 5.6e-4 max logit change measured on a ViLT-B/32 VQA model. So
  the converted config records ``text_layer_norm_eps = 1e-12`` and ``restore_text_layer_norm_eps``
  sets it on those two LayerNorms: the converter's model has it, and ``recipes.models.load_model``
  applies it after ``from_pretrained`` (a plain ``from_pretrained`` cannot: call the function
  yourself). The classifiers' LayerNorm keeps torch's default 1e-5 on both sides.
* Dropout: PuMer's ViLT (``ViltModel.__init__`` in ``src/pumer/model/vilt/modeling_vilt.py``) drops out
  only in ``BertEmbeddings`` (0.1); its timm transformer is built without a config, so 0 inside. The
  original ViLT passes ``drop_rate`` 0.1 into the transformer too (block projections, MLP, ``pos_drop``).
  transformers has one ``hidden_dropout_prob`` for the text embeddings, the joint embeddings and every
  block: PuMer sources get 0.0 (exact inside the transformer, no text-embedding dropout), original
  sources 0.1 (close; transformers has no dropout between ``fc1`` and ``fc2``). Attention dropout 0.
  None of this changes evaluation.
* 40 text positions, 30522 words, image 384 with patch 32, the number of layers, heads' labels: read
  from the weights' shapes. Heads: a PuMer config's ``num_heads``, else hidden / 64 (ViLT-B/32: 12).
* ``pad_token_id=0``: the research ``BertEmbeddings`` is built from a default ``BertConfig``.
* ``ViltForMaskedLM``: transformers 5 forces ``tie_word_embeddings=True``, but the research MLM decoder
  is a separate weight (``MLMHead`` is built without ``weight``). The converted model is untied
  (loading a tied one would overwrite the word embeddings with the decoder); ``from_pretrained`` of a
  written folder keeps them apart because both keys are present and differ (it warns once).
* A PuMer config's reduction (``prune_r``, ``merge_r``, ``merge_text``, ``reduce_layers``,
  ``sim_method``, ``merge_style``) is copied into the ``ViltConfig`` as extra attributes, so
  ``pumer_patch.apply_from_config`` patches the converted model with exactly that reduction.

Command line::

    python -m pumer_patch.models.convert_vilt IN OUT_DIR --head vqa|ve|nlvr2|irtr|pretrain

``IN`` is a ``.ckpt`` / ``.pt`` / ``.bin`` / ``.safetensors`` file or a PuMer folder; ``OUT_DIR`` gets
``config.json`` + ``model.safetensors`` (``from_pretrained``) and, where the source has ITM weights,
``itm_head.safetensors`` (keys ``weight``, ``bias``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import (
    PreTrainedModel,
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForImagesAndTextClassification,
    ViltForMaskedLM,
    ViltForQuestionAnswering,
)

__all__ = [
    "HEADS",
    "TEXT_LAYER_NORM_EPS",
    "restore_text_layer_norm_eps",
    "REDUCTION_FIELDS",
    "ViltConversionReport",
    "convert_vilt_state_dict",
    "vilt_config_for",
    "read_vilt_checkpoint",
    "load_vilt_checkpoint",
    "save_vilt_conversion",
    "main",
]

logger = logging.getLogger(__name__)

Head = Literal["vqa", "ve", "nlvr2", "irtr", "pretrain"]
Source = Literal["original", "pumer"]

#: the heads a checkpoint converts into
HEADS: tuple[str, ...] = ("vqa", "ve", "nlvr2", "irtr", "pretrain")
#: PuMer config fields that name the reduction a checkpoint was trained with
REDUCTION_FIELDS: tuple[str, ...] = ("prune_r", "merge_r", "merge_text", "reduce_layers", "sim_method", "merge_style")
#: file written beside the converted model when the source has ITM weights
ITM_HEAD_FILE = "itm_head.safetensors"
#: BertConfig's LayerNorm eps, which the research text embeddings and MLM transform use (the rest: 1e-6)
TEXT_LAYER_NORM_EPS = 1e-12

_TARGET_CLASS: dict[str, type[PreTrainedModel]] = {
    "vqa": ViltForQuestionAnswering,
    "ve": ViltForQuestionAnswering,
    "nlvr2": ViltForImagesAndTextClassification,
    "irtr": ViltForImageAndTextRetrieval,
    "pretrain": ViltForMaskedLM,
}
#: research name of each classification head
_CLASSIFIER = {"vqa": "vqa_classifier", "ve": "ve_classifier", "nlvr2": "nlvr2_classifier"}
#: labels where the task fixes them (VE order: DESIGN.md section 5; NLVR2: PuMer's ``infer_nlvr2``)
_LABELS = {"ve": ("contradiction", "neutral", "entailment"), "nlvr2": ("False", "True")}
#: VQAv2's answer vocabulary size, for a VQA head started from a checkpoint that has none
_VQA_LABELS = 3129
_PRETRAIN_PREFIXES = ("mlm_score.", "itm_score.", "mpp_score.")

_PLAIN_NAMES = {
    "token_type_embeddings.weight": "vilt.embeddings.token_type_embeddings.weight",
    "transformer.cls_token": "vilt.embeddings.cls_token",
    "transformer.pos_embed": "vilt.embeddings.position_embeddings",
    "transformer.patch_embed.proj.weight": "vilt.embeddings.patch_embeddings.projection.weight",
    "transformer.patch_embed.proj.bias": "vilt.embeddings.patch_embeddings.projection.bias",
    "transformer.norm.weight": "vilt.layernorm.weight",
    "transformer.norm.bias": "vilt.layernorm.bias",
    "pooler.dense.weight": "vilt.pooler.dense.weight",
    "pooler.dense.bias": "vilt.pooler.dense.bias",
}
_BLOCK_PARTS = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_BLOCK = re.compile(r"transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)")
_TEXT_BUFFERS = ("text_embeddings.position_ids", "text_embeddings.token_type_ids")
_MLM_NAMES = {
    "mlm_score.transform.dense.weight": "mlm_score.transform.dense.weight",
    "mlm_score.transform.dense.bias": "mlm_score.transform.dense.bias",
    "mlm_score.transform.LayerNorm.weight": "mlm_score.transform.LayerNorm.weight",
    "mlm_score.transform.LayerNorm.bias": "mlm_score.transform.LayerNorm.bias",
    "mlm_score.decoder.weight": "mlm_score.decoder.weight",
    # the research head adds a separate ``bias`` parameter; transformers' decoder Linear carries it
    "mlm_score.bias": "mlm_score.decoder.bias",
}
_TOKEN_TYPES = "vilt.embeddings.token_type_embeddings.weight"


@dataclass
class ViltConversionReport:
    """What a conversion did with every key. Source keys are named as the checkpoint names them.

    ``mapped``: source key -> the transformers keys it became (``attn.qkv`` becomes three).
    ``set_aside``: source key -> key in ``itm_head`` (ITM weights, which transformers has no slot for).
    ``ignored``: source key -> why it was dropped. ``derived``: transformers key -> how it was made.
    ``initialized``: transformers keys the source has no weights for, freshly initialised (a task head
    started from a pretraining checkpoint). ``missing`` (transformers keys), ``unexpected`` (source keys
    with no place, or transformers keys the target lacks), ``mismatched`` (key -> (source shape, target
    shape)) must be empty for the model to load; ``check`` says what is wrong.
    """

    head: str
    source: str
    mapped: dict[str, tuple[str, ...]] = field(default_factory=dict)
    set_aside: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    initialized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    #: ``nn.Linear(hidden, 2)`` state_dict (``weight``, ``bias``) of the ITM head, where the source has one
    itm_head: dict[str, Tensor] | None = field(default=None, repr=False)

    @property
    def renamed(self) -> int:
        """Number of source tensors placed in the transformers state_dict."""
        return len(self.mapped)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def check(self) -> None:
        """Raise ``ValueError`` naming what keeps the converted state_dict from loading strictly."""
        if self.ok:
            return
        problems = []
        if self.missing:
            problems.append(f"missing (the {self.head!r} model needs them): {self.missing}")
        if self.unexpected:
            problems.append(f"unexpected (no place in the {self.head!r} model): {self.unexpected}")
        if self.mismatched:
            problems.append(f"shape mismatches (source, target): {self.mismatched}")
        raise ValueError(
            f"cannot convert this {self.source} ViLT checkpoint to head={self.head!r}: "
            + "; ".join(problems)
            + ". Check --head (vqa, ve, nlvr2, irtr, pretrain) against the checkpoint's task heads and "
            "--source (original: no prefix; pumer: backbone under 'vilt.')."
        )

    def summary(self) -> str:
        """One paragraph for the log."""
        lines = [
            f"ViLT {self.source} -> {self.head}: {self.renamed} tensors mapped, {len(self.set_aside)} set aside "
            f"(ITM head), {len(self.ignored)} ignored, {len(self.derived)} derived, "
            f"{len(self.initialized)} initialised, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} mismatched"
        ]
        lines += [f"  ignored {k}: {why}" for k, why in self.ignored.items()]
        lines += [f"  derived {k}: {how}" for k, how in self.derived.items()]
        lines += [f"  initialised {k}" for k in self.initialized]
        lines += [f"  missing {k}" for k in self.missing]
        lines += [f"  unexpected {k}" for k in self.unexpected]
        lines += [f"  mismatched {k}: {got} vs {want}" for k, (got, want) in self.mismatched.items()]
        return "\n".join(lines)


def _check_head(head: str) -> str:
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not one of {HEADS}")
    return head


def _research_names(state_dict: Mapping[str, Tensor], source: str) -> dict[str, str]:
    """Research name (no ``vilt.`` prefix) -> the key as the checkpoint spells it; checks the layout."""
    if source not in ("original", "pumer"):
        raise ValueError(f"source={source!r} must be 'original' (ViLT .ckpt) or 'pumer' (PuMer folder)")
    prefixed = [k for k in state_dict if k.startswith("vilt.")]
    if source == "original" and prefixed:
        raise ValueError(
            f"source='original' but keys such as {prefixed[0]!r} carry PuMer's 'vilt.' prefix: pass source='pumer'"
        )
    if source == "pumer" and not prefixed:
        raise ValueError("source='pumer' but no key has PuMer's 'vilt.' prefix: pass source='original'")
    names: dict[str, str] = {}
    for key in state_dict:
        name = key.removeprefix("vilt.")
        if name in names:
            raise ValueError(f"keys {names[name]!r} and {key!r} name the same weight; the checkpoint mixes layouts")
        names[name] = key
    return names


def _detect_source(state_dict: Mapping[str, Tensor]) -> str:
    return "pumer" if any(k.startswith("vilt.") for k in state_dict) else "original"


def _backbone_target(name: str) -> tuple[str, ...] | None:
    """transformers key(s) of a research backbone name; three for ``attn.qkv``; None if not backbone."""
    if name in _PLAIN_NAMES:
        return (_PLAIN_NAMES[name],)
    if name.startswith("text_embeddings."):
        return ("vilt.embeddings." + name,)
    match = _BLOCK.fullmatch(name)
    if match is None:
        return None
    index, part, kind = match.groups()
    layer = f"vilt.encoder.layer.{index}"
    if part == "attn.qkv":
        return tuple(f"{layer}.attention.attention.{p}.{kind}" for p in ("query", "key", "value"))
    if part in _BLOCK_PARTS:
        return (f"{layer}.{_BLOCK_PARTS[part]}.{kind}",)
    return None


def _classifier_head(name: str) -> str | None:
    """The head whose research classifier ``name`` belongs to, or None."""
    for head, prefix in _CLASSIFIER.items():
        if name.startswith(prefix + "."):
            return head
    return None


def _expected_shapes(config: ViltConfig, head: str) -> dict[str, tuple[int, ...]]:
    """Every state_dict key of the target model with its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = _TARGET_CLASS[head](config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _num_layers(names: Sequence[str]) -> int:
    indices = {int(m.group(1)) for m in map(_BLOCK.fullmatch, names) if m is not None}
    if not indices or indices != set(range(max(indices) + 1)):
        raise ValueError(f"transformer blocks {sorted(indices)} are not 0..N-1: is this a ViLT checkpoint?")
    return max(indices) + 1


def vilt_config_for(
    head: str,
    state_dict: Mapping[str, Tensor],
    pumer_config: Mapping[str, Any] | None = None,
    *,
    source: str | None = None,
    num_labels: int | None = None,
    num_attention_heads: int | None = None,
) -> ViltConfig:
    """The ``ViltConfig`` of the target model, read from the checkpoint's shapes (either layout).

    ``pumer_config``: a PuMer folder's ``config.json`` (its ``num_heads``, ``vqa_label_size``,
    ``id2label`` and reduction fields are read; other fields are ignored). ``source``: ``None`` reads it
    from the keys (``vilt.`` prefix: PuMer). ``num_labels``: only for a task head the checkpoint lacks
    (default: VQAv2's 3129, VE 3, NLVR2 2); a head in the checkpoint fixes it. ``num_attention_heads``:
    the shapes do not say; default the PuMer config's ``num_heads``, else hidden / 64 (ViLT-B/32: 12).
    """
    head = _check_head(head)
    source = source or ("pumer" if pumer_config is not None else _detect_source(state_dict))
    names = _research_names(state_dict, source)
    pumer_config = dict(pumer_config or {})

    def shape(name: str) -> tuple[int, ...]:
        if name not in names:
            raise ValueError(f"the checkpoint has no {name!r} (in either layout): is this a ViLT checkpoint?")
        return tuple(state_dict[names[name]].shape)

    hidden = shape("transformer.cls_token")[-1]
    proj = shape("transformer.patch_embed.proj.weight")  # (C, channels, P, P)
    grid2 = shape("transformer.pos_embed")[1] - 1  # pos_embed: (1, 1 + grid^2, C), [CLS] row first
    grid = math.isqrt(grid2)
    if grid * grid != grid2:
        raise ValueError(f"transformer.pos_embed has {grid2} patch rows, not a square grid")
    heads = num_attention_heads or pumer_config.get("num_heads")
    if heads is None:
        if hidden % 64:
            raise ValueError(f"hidden size {hidden} is not a multiple of 64: pass num_attention_heads")
        heads = hidden // 64
    modality_types = shape("token_type_embeddings.weight")[0]
    if head == "nlvr2":
        if modality_types not in (2, 3):
            raise ValueError(f"NLVR2 needs 2 or 3 token types (3 after conversion), not {modality_types}")
        modality_types = 3

    weight_labels = _head_labels(head, names, state_dict)
    if weight_labels is not None and num_labels is not None and num_labels != weight_labels:
        raise ValueError(
            f"num_labels={num_labels} but the checkpoint's {head} head has {weight_labels}; leave num_labels unset"
        )
    default_labels = {"vqa": int(pumer_config.get("vqa_label_size", _VQA_LABELS)), "ve": 3, "nlvr2": 2}
    labels = weight_labels or num_labels or default_labels.get(head)

    kwargs: dict[str, Any] = {
        "vocab_size": shape("text_embeddings.word_embeddings.weight")[0],
        "type_vocab_size": shape("text_embeddings.token_type_embeddings.weight")[0],
        "max_position_embeddings": shape("text_embeddings.position_embeddings.weight")[0],
        "modality_type_vocab_size": modality_types,
        "hidden_size": hidden,
        "num_hidden_layers": _num_layers(list(names)),
        "num_attention_heads": int(heads),
        "intermediate_size": shape("transformer.blocks.0.mlp.fc1.weight")[0],
        "hidden_act": "gelu",  # nn.GELU(), exact, in timm's Mlp and the research heads
        "hidden_dropout_prob": 0.0 if source == "pumer" else 0.1,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-6,
        "text_layer_norm_eps": TEXT_LAYER_NORM_EPS,
        "image_size": grid * proj[-1],
        "patch_size": proj[-1],
        "num_channels": proj[1],
        "qkv_bias": "transformer.blocks.0.attn.qkv.bias" in names,
        "pad_token_id": 0,
    }
    if head == "nlvr2":
        kwargs["num_images"] = 2
    if labels is not None:
        id2label = pumer_config.get("id2label")
        if isinstance(id2label, Mapping) and len(id2label) == labels:
            kwargs["id2label"] = {int(i): str(a) for i, a in id2label.items()}
        elif head in _LABELS:
            kwargs["id2label"] = dict(enumerate(_LABELS[head]))
        else:
            kwargs["num_labels"] = labels
    kwargs.update({k: pumer_config[k] for k in REDUCTION_FIELDS if k in pumer_config})
    return ViltConfig(**kwargs)


def _head_labels(head: str, names: Mapping[str, str], state_dict: Mapping[str, Tensor]) -> int | None:
    """Number of labels of the head's classifier in the checkpoint, or None if it has none."""
    if head not in _CLASSIFIER:
        return None
    key = names.get(f"{_CLASSIFIER[head]}.3.weight")
    return None if key is None else int(state_dict[key].shape[0])


def convert_vilt_state_dict(
    state_dict: Mapping[str, Tensor],
    head: str,
    *,
    source: str,
    config: ViltConfig | None = None,
) -> tuple[dict[str, Tensor], ViltConversionReport]:
    """Rename a ViLT / PuMer ViLT state_dict to the transformers ViLT class of ``head``.

    Returns the transformers state_dict (tensors shared with the input where only renamed) and the
    report; nothing is raised for missing or unexpected keys: call ``report.check()`` (the loaders do).
    ``config``: the target's config, for the missing-key and shape checks; default ``vilt_config_for``.
    Keys in ``report.initialized`` are absent from the result: fill them from a fresh model.
    """
    head = _check_head(head)
    names = _research_names(state_dict, source)
    config = config or vilt_config_for(head, state_dict, source=source)
    report = ViltConversionReport(head=head, source=source)
    out: dict[str, Tensor] = {}
    itm: dict[str, Tensor] = {}
    has_pretrain_heads = any(n.startswith(_PRETRAIN_PREFIXES) for n in names)

    for name, key in names.items():
        tensor = state_dict[key]
        targets = _backbone_target(name)
        if name in _TEXT_BUFFERS:
            report.ignored[key] = "buffer, not a weight (persistent in transformers < 4.31; rebuilt by the model)"
        elif name.startswith("itm_score.fc."):
            if head in ("irtr", "pretrain"):
                part = name.removeprefix("itm_score.fc.")
                itm[part] = tensor
                report.set_aside[key] = part
            else:
                report.ignored[key] = f"pretraining ITM head; the {head} head does not use it"
        elif name.startswith("mlm_score."):
            if head == "pretrain" and name in _MLM_NAMES:
                out[_MLM_NAMES[name]] = tensor
                report.mapped[key] = (_MLM_NAMES[name],)
            elif head == "pretrain":
                report.unexpected.append(key)
            else:
                report.ignored[key] = f"pretraining MLM head; the {head} head does not use it"
        elif name.startswith("mpp_score."):
            report.ignored[key] = "masked-patch-prediction head; transformers has none and no task uses it"
        elif _classifier_head(name) is not None:
            if _classifier_head(name) == head:
                target = "classifier." + name.split(".", 1)[1]
                out[target] = tensor
                report.mapped[key] = (target,)
            else:
                report.unexpected.append(key)
        elif name.startswith("rank_output."):
            if head == "irtr":
                out[name] = tensor
                report.mapped[key] = (name,)
            else:
                report.unexpected.append(key)
        elif targets is None:
            report.unexpected.append(key)
        elif len(targets) == 3:
            # timm's qkv Linear stacks query, key and value rows (reshape(B, N, 3, H, D) in Attention.forward)
            for target, part in zip(targets, tensor.chunk(3, dim=0)):
                out[target] = part
            report.mapped[key] = targets
        else:
            out[targets[0]] = tensor
            report.mapped[key] = targets

    if itm:
        report.itm_head = itm
    _derive(out, itm, head, report)

    expected = _expected_shapes(config, head)
    for key in expected:
        if key in out:
            continue
        head_key = not key.startswith("vilt.")
        if head_key and has_pretrain_heads and head != "pretrain":
            report.initialized.append(key)
        else:
            report.missing.append(key)
    report.unexpected += [k for k in out if k not in expected]
    report.mismatched = {
        k: (tuple(v.shape), expected[k]) for k, v in out.items() if k in expected and tuple(v.shape) != expected[k]
    }
    return out, report


def _derive(out: dict[str, Tensor], itm: Mapping[str, Tensor], head: str, report: ViltConversionReport) -> None:
    """Weights the research code derives when a task starts from the pretrained checkpoint."""
    token_types = out.get(_TOKEN_TYPES)
    if head == "nlvr2" and token_types is not None and token_types.shape[0] == 2:
        # the second image's type starts as the first image's (ViLTransformerSS.__init__, nlvr2 branch)
        out[_TOKEN_TYPES] = torch.cat([token_types, token_types[1:2]], dim=0)
        report.derived[_TOKEN_TYPES] = "row 2 (second image) := row 1 (image), from a checkpoint with 2 token types"
    if head == "irtr" and "rank_output.weight" not in out and "rank_output.bias" not in out and itm:
        # row 1 of the ITM logits is "match" (compute_itm labels positives 1)
        out["rank_output.weight"] = itm["weight"][1:]
        out["rank_output.bias"] = itm["bias"][1:]
        report.derived["rank_output.weight"] = "itm_score.fc.weight[1:] (the ITM 'match' row)"
        report.derived["rank_output.bias"] = "itm_score.fc.bias[1:] (the ITM 'match' row)"


def read_vilt_checkpoint(
    path: str | Path, *, weights_only: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any] | None, str]:
    """Read a checkpoint: ``(state_dict, pumer_config or None, source)``.

    ``path``: a PuMer folder (``config.json`` + ``pytorch_model.bin`` or ``model.safetensors``), or a
    file: ``.safetensors``, or anything ``torch.load`` reads (a Lightning ``.ckpt``: its ``state_dict``).
    ``weights_only=False`` unpickles arbitrary objects: only for files you trust.
    """
    path = Path(path)
    config = None
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{path} is a folder without config.json; a PuMer folder has config.json + pytorch_model.bin"
            )
        config = json.loads(config_file.read_text())
        weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path} has no pytorch_model.bin or model.safetensors")
        path = weights
    if path.suffix == ".safetensors":
        state_dict = load_file(path)
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{path} holds objects that torch.load(weights_only=True) refuses ({error}). If you trust the "
                "file, pass weights_only=False (command line: --trust-pickle)"
            ) from error
        state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} is not a state_dict (or a checkpoint with a 'state_dict' entry) of tensors")
    state_dict = dict(state_dict)
    return state_dict, config, "pumer" if config is not None else _detect_source(state_dict)


def load_vilt_checkpoint(
    path: str | Path,
    head: str,
    *,
    num_labels: int | None = None,
    num_attention_heads: int | None = None,
    weights_only: bool = True,
) -> tuple[PreTrainedModel, ViltConversionReport]:
    """Convert a ViLT ``.ckpt`` / ``.pt`` file or a PuMer ViLT folder into a transformers model (eval mode).

    The layout is read from the keys. The model is loaded with ``strict=True``: nothing is dropped but
    what ``report`` lists (the ITM weights are in ``report.itm_head``). Arguments as ``vilt_config_for``
    and ``read_vilt_checkpoint``.
    """
    state_dict, pumer_config, source = read_vilt_checkpoint(path, weights_only=weights_only)
    config = vilt_config_for(
        head, state_dict, pumer_config, source=source, num_labels=num_labels, num_attention_heads=num_attention_heads
    )
    converted, report = convert_vilt_state_dict(state_dict, head, source=source, config=config)
    report.check()
    if head == "pretrain":
        # the research MLM decoder is its own weight; tied, loading would overwrite the word embeddings
        config.tie_word_embeddings = False
    model = _TARGET_CLASS[head](config)
    fresh = model.state_dict()
    converted.update({k: fresh[k] for k in report.initialized})
    model.load_state_dict(converted, strict=True)
    restore_text_layer_norm_eps(model)
    logger.info("%s\n%s", path, report.summary())
    return model.eval(), report


def restore_text_layer_norm_eps(model: PreTrainedModel) -> PreTrainedModel:
    """Give the text embeddings' (and the MLM transform's) LayerNorm the eps the config records.

    A converted config carries ``text_layer_norm_eps`` (1e-12, the research BERT modules'), which one
    ``ViltConfig.layer_norm_eps`` cannot express; ``from_pretrained`` builds those LayerNorms with
    1e-6, so loaders call this after it. A model whose config has no such field is left as it is.
    """
    eps = getattr(model.config, "text_layer_norm_eps", None)
    if eps is None:
        return model
    vilt = getattr(model, "vilt", model)
    norms = [vilt.embeddings.text_embeddings.LayerNorm]
    mlm = getattr(model, "mlm_score", None)
    if mlm is not None:
        norms.append(mlm.transform.LayerNorm)
    for norm in norms:
        norm.eps = float(eps)
    return model


def save_vilt_conversion(model: PreTrainedModel, report: ViltConversionReport, out_dir: str | Path) -> Path:
    """Write ``model`` as a ``from_pretrained`` folder, and ``itm_head.safetensors`` where ITM weights exist."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if report.itm_head is not None:
        save_file({k: v.detach().contiguous() for k, v in report.itm_head.items()}, out_dir / ITM_HEAD_FILE)
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: convert one checkpoint into a ``from_pretrained`` folder and log the report."""
    parser = argparse.ArgumentParser(
        prog="python -m pumer_patch.models.convert_vilt",
        description="Convert a ViLT .ckpt or a PuMer ViLT folder to a Hugging Face transformers ViLT folder.",
    )
    parser.add_argument("input", type=Path, help="a ViLT .ckpt/.pt/.safetensors file or a PuMer folder")
    parser.add_argument("out_dir", type=Path, help="folder to write (config.json, model.safetensors)")
    parser.add_argument("--head", required=True, choices=HEADS)
    parser.add_argument("--num-labels", type=int, default=None, help="only for a task head the checkpoint lacks")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (default: hidden / 64)")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="torch.load(weights_only=False): trusted files only"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model, report = load_vilt_checkpoint(
        args.input,
        args.head,
        num_labels=args.num_labels,
        num_attention_heads=args.num_heads,
        weights_only=not args.trust_pickle,
    )
    out = save_vilt_conversion(model, report, args.out_dir)
    logger.info("wrote %s (%s)", out, type(model).__name__)


if __name__ == "__main__":
    main()
