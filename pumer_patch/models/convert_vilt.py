"""Converters from ViLT's and PuMer's ViLT checkpoints to Hugging Face ``transformers`` ViLT, per head.

Sources (see docs/design.md, "Checkpoints"):

* ``"original"``: a ViLT Lightning checkpoint (dandelin/ViLT, ``.ckpt``: its ``state_dict``), timm-style
  keys with no prefix: ``text_embeddings.*``, ``token_type_embeddings``, ``transformer.blocks.N.attn.qkv``,
  ``pooler``, heads ``vqa_classifier``, ``nlvr2_classifier``, ``rank_output``, ``itm_score``, ``mlm_score``.
* ``"pumer"``: a PuMer folder (``config.json`` + ``pytorch_model.bin``, transformers 4.24), the same
  names with the backbone under ``vilt.`` (every key is listed in ``tests/data/pumer-keys/vilt_*.txt``), plus
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
transformers head). Every dropped key is in ``report.ignored`` with the reason; ``rename_research_key``
decides, key by key. Keys with no place (another task's classifier, unknown names), target keys
nothing fills and shapes the target does not have are an error that names them; ``strict=False``
(``--no-strict``) converts anyway, freshly initialising what is missing, and reports them. A block
missing from the middle of the checkpoint shows as that block's missing keys; a checkpoint cut after
its last complete block cannot be told from a shallower ViLT.

Config facts (checked in the research code; where transformers cannot say it exactly, said here):

* LayerNorm eps 1e-6: timm's ``partial(nn.LayerNorm, eps=1e-6)`` in ``VisionTransformer.__init__``
  (both repositories' ``vision_transformer.py`` / ``vit_vilt.py``). transformers' ViLT has one
  ``layer_norm_eps`` for every LayerNorm of the backbone, but the research text embeddings and MLM
  transform are ``BertEmbeddings`` / ``BertPredictionHeadTransform`` with BertConfig's 1e-12. With 1e-6
  there, the normalised text embeddings shrink by about 5e-7 / var (var: the per-token variance of
  word + position + type embedding), which moves a full-size model's logits measurably. So
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

    python -m pumer_patch.models.convert_vilt IN OUT_DIR --head vqa|ve|nlvr2|irtr|pretrain [--no-strict]

``IN`` is a ``.ckpt`` / ``.pt`` / ``.bin`` / ``.safetensors`` file or a PuMer folder; ``OUT_DIR`` gets
``config.json`` + ``model.safetensors`` (``from_pretrained``) and, where the source has ITM weights,
``itm_head.safetensors`` (keys ``weight``, ``bias``). The exit code is 1 when the checkpoint cannot
be read or converted (nothing is written then).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import (
    PreTrainedModel,
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForImagesAndTextClassification,
    ViltForMaskedLM,
    ViltForQuestionAnswering,
)

from pumer_patch.models._convert import ConversionReport, grow_token_types, rank_from_itm_match_row, read_checkpoint

__all__ = [
    "HEADS",
    "TEXT_LAYER_NORM_EPS",
    "restore_text_layer_norm_eps",
    "REDUCTION_FIELDS",
    "ITM_HEAD_FILE",
    "rename_research_key",
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
#: labels where the task fixes them (VE: SNLI-VE's order, as PuMer's data; NLVR2: PuMer's ``infer_nlvr2``)
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
#: target prefix of the ITM weights, which transformers' ViLT has no slot for: they go to ``report.itm_head``
_ASIDE = "itm_head."
#: what to check when a conversion is refused
_FIX = (
    "Check --head (vqa, ve, nlvr2, irtr, pretrain) against the checkpoint's task heads and "
    "--source (original: no prefix; pumer: backbone under 'vilt.')."
)


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


def _block_indices(names: Sequence[str]) -> list[int]:
    """The indices of the transformer blocks the checkpoint holds weights of, sorted."""
    indices = {int(m.group(1)) for m in map(_BLOCK.fullmatch, names) if m is not None}
    if not indices:
        raise ValueError("the checkpoint has no transformer.blocks.N.* weights: is this a ViLT checkpoint?")
    return sorted(indices)


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

    blocks = _block_indices(list(names))
    # the depth is one more than the highest index: a block missing below it shows as missing keys
    depth, first = blocks[-1] + 1, f"transformer.blocks.{blocks[0]}"
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
        "num_hidden_layers": depth,
        "num_attention_heads": int(heads),
        "intermediate_size": shape(f"{first}.mlp.fc1.weight")[0],
        "hidden_act": "gelu",  # nn.GELU(), exact, in timm's Mlp and the research heads
        "hidden_dropout_prob": 0.0 if source == "pumer" else 0.1,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-6,
        "text_layer_norm_eps": TEXT_LAYER_NORM_EPS,
        "image_size": grid * proj[-1],
        "patch_size": proj[-1],
        "num_channels": proj[1],
        "qkv_bias": f"{first}.attn.qkv.bias" in names,
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


def rename_research_key(name: str, head: str) -> tuple[tuple[str, ...] | None, str]:
    """Where a research key (``vilt.`` prefix removed) goes in the transformers model of ``head``.

    Returns ``(targets, "")`` for a key that is placed: one transformers key, three for ``attn.qkv``
    (its rows split in thirds), or ``itm_head.weight`` / ``.bias`` for ITM weights set aside.
    ``(None, why)``: dropped, for that reason. ``(None, "")``: no place in this model (unexpected).
    """
    if name in _TEXT_BUFFERS:
        return None, "buffer, not a weight (persistent in transformers < 4.31; rebuilt by the model)"
    if name.startswith("itm_score.fc."):
        if head in ("irtr", "pretrain"):
            return (_ASIDE + name.removeprefix("itm_score.fc."),), ""
        return None, f"pretraining ITM head; the {head} head does not use it"
    if name.startswith("mlm_score."):
        if head != "pretrain":
            return None, f"pretraining MLM head; the {head} head does not use it"
        return ((_MLM_NAMES[name],), "") if name in _MLM_NAMES else (None, "")
    if name.startswith("mpp_score."):
        return None, "masked-patch-prediction head; transformers has none and no task uses it"
    owner = _classifier_head(name)
    if owner is not None:
        return (("classifier." + name.split(".", 1)[1],), "") if owner == head else (None, "")
    if name.startswith("rank_output."):
        return ((name,), "") if head == "irtr" else (None, "")
    return _backbone_target(name), ""


def convert_vilt_state_dict(
    state_dict: Mapping[str, Tensor],
    head: str,
    *,
    source: str,
    config: ViltConfig | None = None,
    strict: bool = True,
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Rename a ViLT / PuMer ViLT state_dict to the transformers ViLT class of ``head``.

    Returns the transformers state_dict (tensors shared with the input where only renamed) and the
    report. ``strict``: missing, unexpected and mismatched keys raise ``ValueError`` naming them;
    ``strict=False`` returns them in the report (the result then holds what the source gave,
    unexpected and mismatched keys included). ``config``: the target's config, for the missing-key
    and shape checks; default ``vilt_config_for``. Keys in ``report.initialized`` are absent from the
    result: fill them from a fresh model.
    """
    head = _check_head(head)
    names = _research_names(state_dict, source)
    config = config or vilt_config_for(head, state_dict, source=source)
    report = ConversionReport(head=head, source=f"{'PuMer' if source == 'pumer' else 'original'} ViLT")
    out: dict[str, Tensor] = {}
    itm: dict[str, Tensor] = {}
    has_pretrain_heads = any(n.startswith(_PRETRAIN_PREFIXES) for n in names)

    for name, key in names.items():
        targets, why = rename_research_key(name, head)
        if targets is None:
            if why:
                report.ignored[key] = why
            else:
                report.unexpected.append(key)
        elif targets[0].startswith(_ASIDE):
            itm[targets[0].removeprefix(_ASIDE)] = state_dict[key]
            report.set_aside[key] = targets[0].removeprefix(_ASIDE)
        else:
            # timm's qkv Linear stacks query, key and value rows (reshape(B, N, 3, H, D) in Attention.forward)
            parts = state_dict[key].chunk(3, dim=0) if len(targets) == 3 else (state_dict[key],)
            out.update(zip(targets, parts))
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
    if strict:
        report.check(_FIX)
    return out, report


def _derive(out: dict[str, Tensor], itm: Mapping[str, Tensor], head: str, report: ConversionReport) -> None:
    """Weights the research code derives when a task starts from the pretrained checkpoint."""
    token_types = out.get(_TOKEN_TYPES)
    if head == "nlvr2" and token_types is not None and token_types.shape[0] == 2:
        # the second image's type starts as the first image's (ViLTransformerSS.__init__, nlvr2 branch)
        out[_TOKEN_TYPES] = grow_token_types(token_types, 3)
        report.derived[_TOKEN_TYPES] = "row 2 (second image) := row 1 (image), from a checkpoint with 2 token types"
    if head == "irtr" and "rank_output.weight" not in out and "rank_output.bias" not in out and itm:
        out["rank_output.weight"], out["rank_output.bias"] = rank_from_itm_match_row(itm["weight"], itm["bias"])
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
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_file} is not valid JSON ({error}): a PuMer folder's config.json is") from error
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} holds a {type(config).__name__}, not a PuMer config (a JSON object)")
        weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path} has no pytorch_model.bin or model.safetensors")
        path = weights
    state_dict = read_checkpoint(path, weights_only=weights_only)
    return state_dict, config, "pumer" if config is not None else _detect_source(state_dict)


def load_vilt_checkpoint(
    path: str | Path,
    head: str,
    *,
    num_labels: int | None = None,
    num_attention_heads: int | None = None,
    weights_only: bool = True,
    strict: bool = True,
) -> tuple[PreTrainedModel, ConversionReport]:
    """Convert a ViLT ``.ckpt`` / ``.pt`` file or a PuMer ViLT folder into a transformers model (eval mode).

    The layout is read from the keys. Nothing is dropped but what ``report`` lists (the ITM weights
    are in ``report.itm_head``); a missing, unexpected or mismatched key raises ``ValueError`` naming
    it. ``strict=False`` loads anyway: missing and mismatched keys keep the fresh model's weights,
    unexpected ones are left out, and the report (logged as a warning) lists them. Other arguments
    as ``vilt_config_for`` and ``read_vilt_checkpoint``.
    """
    state_dict, pumer_config, source = read_vilt_checkpoint(path, weights_only=weights_only)
    config = vilt_config_for(
        head, state_dict, pumer_config, source=source, num_labels=num_labels, num_attention_heads=num_attention_heads
    )
    converted, report = convert_vilt_state_dict(state_dict, head, source=source, config=config, strict=strict)
    if head == "pretrain":
        # the research MLM decoder is its own weight; tied, loading would overwrite the word embeddings
        config.tie_word_embeddings = False
    model = _TARGET_CLASS[head](config)
    fresh = model.state_dict()
    keep_fresh = {*report.initialized, *report.missing, *report.mismatched}
    model.load_state_dict({k: fresh[k] if k in keep_fresh else converted[k] for k in fresh}, strict=True)
    restore_text_layer_norm_eps(model)
    logger.log(logging.INFO if report.ok else logging.WARNING, "%s\n%s", path, report.summary())
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


def save_vilt_conversion(model: PreTrainedModel, report: ConversionReport, out_dir: str | Path) -> Path:
    """Write ``model`` as a ``from_pretrained`` folder, and ``itm_head.safetensors`` where ITM weights exist."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if report.itm_head is not None:
        save_file({k: v.detach().contiguous() for k, v in report.itm_head.items()}, out_dir / ITM_HEAD_FILE)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: convert one checkpoint into a ``from_pretrained`` folder and log the report.

    Returns 0, or 1 (the reason logged, nothing written) when the checkpoint cannot be read or converted.
    """
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
    parser.add_argument(
        "--no-strict", action="store_true",
        help="write the model although keys are missing, unexpected or of another shape (each is logged)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, report = load_vilt_checkpoint(
            args.input,
            args.head,
            num_labels=args.num_labels,
            num_attention_heads=args.num_heads,
            weights_only=not args.trust_pickle,
            strict=not args.no_strict,
        )
    except (ValueError, OSError) as error:
        logger.error("%s", error)
        return 1
    out = save_vilt_conversion(model, report, args.out_dir)
    logger.info("wrote %s (%s)", out, type(model).__name__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
