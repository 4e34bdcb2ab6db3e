"""Original METER checkpoints (Dou et al.'s PyTorch Lightning ``.ckpt`` files) to ``pumer_patch`` METER folders.

METER's Lightning module keeps every part at the top level of its ``state_dict``; ours nests the
backbone under ``meter.`` as PuMer's checkpoints do. The rules (DESIGN.md section 4):

* ``vit_model.visual.*`` -> ``meter.vit_model.*`` (METER wraps CLIP's visual tower in a CLIP stub);
  the stub's own ``vit_model.positional_embedding`` (77 text positions) and ``vit_model.ln_final`` are
  ignored, as are RoBERTa's pooler (METER never runs it) and the ``position_ids`` / ``token_type_ids``
  buffers transformers rebuilds; other backbone keys get the ``meter.`` prefix.
* ``snli_classifier`` -> ``ve_classifier``; other heads keep their names; a head the target model
  lacks (``mlm_score`` when converting the pretrained checkpoint to VQA) is ignored and reported.
* NLVR2 from a 2-type checkpoint: ``token_type_embeddings`` grows to 3 rows, row 2 := row 1 (the
  second image starts as the first), as METER's own NLVR2 finetuning does.
* Retrieval from the pretrained checkpoint: ``rank_output`` := the "match" row (1) of ``itm_score.fc``,
  as METER's retrieval finetuning does.
* Another image size: the CLIP position embedding keeps its [CLS] row and its grid is resized
  bicubically (``F.interpolate``, ``align_corners=False``, computed in float32), as METER's
  ``adapt_position_encoding`` does.

The written config records ``fusion_order="parallel"`` and ``fusion_masking="additive"`` by default:
original METER ran both streams on the previous states with an additive mask, so that reproduces its
checkpoints. PuMer finetuned its converted folders with its own arithmetic ("sequential", "pumer"):
pass those to start from a checkpoint the way PuMer did.

Command::

    python -m pumer_patch.models.convert_meter meter_clip16_288_roberta_pretrain.ckpt out/ --head vqa --image-size 384
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from pumer_patch.models.meter import (
    FusionMasking,
    FusionOrder,
    MeterConfig,
    MeterForImageAndTextRetrieval,
    MeterForPreTraining,
    MeterForQuestionAnswering,
    MeterForVisualEntailment,
    MeterForVisualReasoning,
    MeterPreTrainedModel,
)

__all__ = [
    "HEADS",
    "ConversionReport",
    "ConvertedMeter",
    "load_original_checkpoint",
    "rename_original_key",
    "resize_position_embedding",
    "convert_original_meter",
    "save_converted",
    "convert_checkpoint",
    "main",
]

logger = logging.getLogger(__name__)

#: the ``--head`` names and the classes they convert to
HEADS: dict[str, type[MeterPreTrainedModel]] = {
    "vqa": MeterForQuestionAnswering,
    "ve": MeterForVisualEntailment,
    "nlvr2": MeterForVisualReasoning,
    "irtr": MeterForImageAndTextRetrieval,
    "pretrain": MeterForPreTraining,
}

_BACKBONE = ("text_transformer.", "cross_modal_", "token_type_embeddings.")
_HEAD_NAMES = ("vqa_classifier.", "ve_classifier.", "nlvr2_classifier.", "rank_output.", "itm_score.", "mlm_score.")
_POSITIONS = "meter.vit_model.positional_embedding"
_TOKEN_TYPES = "meter.token_type_embeddings.weight"


@dataclass
class ConversionReport:
    """What a conversion did to each key.

    missing: keys of the target model no checkpoint key fills (from_pretrained initialises them,
    e.g. a task head when converting the pretrained checkpoint). unexpected: keys in our namespace
    the target model lacks or holds with another shape (not written). ignored: original key -> why
    it was dropped. renamed: original key -> our key, for every key whose name changed. changed:
    value changes, in words (token types grown, ``rank_output`` derived, positions resized).
    """

    head: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for a log: counts, then every missing, unexpected and ignored key and every change."""
        lines = [
            f"METER -> {HEADS[self.head].__name__}: {len(self.renamed)} renamed, {len(self.ignored)} ignored, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"
        ]
        lines += [f"  changed: {c}" for c in self.changed]
        lines += [f"  missing: {k}" for k in self.missing]
        lines += [f"  unexpected: {k}" for k in self.unexpected]
        lines += [f"  ignored: {k} ({why})" for k, why in self.ignored.items()]
        return "\n".join(lines)


@dataclass
class ConvertedMeter:
    """A converted checkpoint: its config, our state_dict, the class it loads into, and the report."""

    config: MeterConfig
    state_dict: dict[str, Tensor]
    model_class: type[MeterPreTrainedModel]
    report: ConversionReport


def load_original_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read an original METER checkpoint with ``torch.load(weights_only=True)``: its ``state_dict``.

    A plain state_dict file (name -> tensor) is accepted too. Lightning checkpoints that pickle
    Python objects besides tensors (hyper-parameter classes, callbacks) cannot be read that way; the
    error says how to extract the weights from a file you trust.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds Python objects besides tensors (a Lightning checkpoint's hyper-parameters or "
            f"callbacks), which torch.load(weights_only=True) refuses to unpickle: {err}. If you trust the "
            "file, extract its weights once where pytorch_lightning is installed: python -c \"import torch; "
            f"torch.save(torch.load('{path}', map_location='cpu', weights_only=False)['state_dict'], "
            "'weights.pt')\" and convert weights.pt"
        ) from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{path} is neither a Lightning checkpoint with a 'state_dict' of tensors nor a state_dict; "
            "pass an original METER .ckpt (meter_clip16_288_roberta_*.ckpt)"
        )
    return dict(state)


def rename_original_key(key: str) -> tuple[str | None, str]:
    """Our name for an original METER key, or None with the reason it is ignored.

    Returns (new_key, "") or (None, why). Head keys come back under their (renamed) names even
    when the target model lacks that head: ``convert_original_meter`` decides that.
    """
    if re.search(r"\.(position_ids|token_type_ids)$", key):
        return None, "a buffer transformers rebuilds"
    if key.startswith("vit_model.visual."):
        return "meter.vit_model." + key[len("vit_model.visual.") :], ""
    if key.startswith("vit_model."):
        return None, "CLIP text stub (METER keeps CLIP's text positions and ln_final; only the visual tower runs)"
    if key.startswith("text_transformer.pooler."):
        return None, "RoBERTa's pooler, which METER never runs"
    if key.startswith(_BACKBONE):
        return "meter." + key, ""
    if key.startswith("snli_classifier."):
        return "ve_classifier." + key[len("snli_classifier.") :], ""
    if key.startswith(_HEAD_NAMES):
        return key, ""
    return None, "not part of METER's model (another backbone's or a training state)"


def resize_position_embedding(positions: Tensor, grid: int) -> Tensor:
    """CLIP positions (1 + g * g, C) -> (1 + grid * grid, C): [CLS] row kept, the g x g grid resized bicubically."""
    old = math.isqrt(positions.shape[0] - 1)
    if old * old + 1 != positions.shape[0]:
        raise ValueError(f"positional_embedding has {positions.shape[0]} rows, not 1 + a square grid")
    c = positions.shape[1]
    patches = positions[1:].float().reshape(1, old, old, c).permute(0, 3, 1, 2)  # (1, C, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, c).to(positions.dtype)  # (grid * grid, C)
    return torch.cat([positions[:1], patches])


def _count(keys: Sequence[str], pattern: str) -> int:
    """How many distinct indices ``pattern`` (a regex with one group) captures in ``keys``."""
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _config_from_weights(state: Mapping[str, Tensor], base: MeterConfig) -> MeterConfig:
    """``base`` with every size the weights decide (widths, depths, vocabulary, grid, token types, labels)."""
    keys = list(state)
    t = "meter.text_transformer."
    conv = state["meter.vit_model.conv1.weight"]  # (width, 3, p, p)
    sizes: dict[str, Any] = {
        "hidden_size": state["meter.cross_modal_text_transform.weight"].shape[0],
        "text_hidden_size": state["meter.cross_modal_text_transform.weight"].shape[1],
        "vision_width": conv.shape[0],
        "vit_patch_size": conv.shape[-1],
        "image_size": math.isqrt(state[_POSITIONS].shape[0] - 1) * conv.shape[-1],
        "vision_layers": _count(keys, r"meter\.vit_model\.transformer\.resblocks\.(\d+)\."),
        "num_layers": _count(keys, re.escape(t) + r"encoder\.layer\.(\d+)\."),
        "num_top_layer": _count(keys, r"meter\.cross_modal_text_layers\.(\d+)\."),
        "vocab_size": state[t + "embeddings.word_embeddings.weight"].shape[0],
        "max_position_embeddings": state[t + "embeddings.position_embeddings.weight"].shape[0],
        "text_intermediate_size": state[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        "token_types": state[_TOKEN_TYPES].shape[0],
    }
    fusion_ffn = state["meter.cross_modal_text_layers.0.intermediate.dense.weight"].shape[0]
    sizes["mlp_ratio"] = fusion_ffn // sizes["hidden_size"]
    if "vqa_classifier.3.weight" in state:
        sizes["vqa_label_size"] = state["vqa_classifier.3.weight"].shape[0]
    skip = ("model_type", "transformers_version", "architectures")
    fields = {k: v for k, v in base.to_dict().items() if k not in skip}
    return MeterConfig(**{**fields, **sizes})


def convert_original_meter(
    state_dict: Mapping[str, Tensor],
    head: str,
    image_size: int | None = None,
    config: MeterConfig | None = None,
    fusion_order: FusionOrder = "parallel",
    fusion_masking: FusionMasking = "additive",
) -> ConvertedMeter:
    """An original METER ``state_dict`` -> our keys for the ``head`` model (one of ``HEADS``).

    image_size: resize the CLIP position grid to this size (None: keep the checkpoint's).
    config: what the weights cannot tell (numbers of heads, ``max_text_len``, ...); None is
    full-size METER. Every size the weights decide is read from them. fusion_order /
    fusion_masking: recorded in the config; the defaults reproduce original METER (module docstring).
    Nothing is loaded into a model: the target's keys and shapes come from one built on the meta device.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
    model_class = HEADS[head]
    report = ConversionReport(head=head)
    state: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new, why = rename_original_key(key)
        if new is None:
            report.ignored[key] = why
            continue
        if new != key:
            report.renamed[key] = new
        state[new] = value
    for key in ("meter.vit_model.conv1.weight", _POSITIONS, _TOKEN_TYPES, "meter.cross_modal_text_transform.weight"):
        if key not in state:
            raise ValueError(f"not an original METER (CLIP + RoBERTa) checkpoint: no {key!r} after renaming")

    if head == "nlvr2" and state[_TOKEN_TYPES].shape[0] == 2:
        types = state[_TOKEN_TYPES]
        state[_TOKEN_TYPES] = torch.cat([types, types[1:2]])  # the second image starts as the first
        report.changed.append("token_type_embeddings: 2 -> 3 rows, row 2 := row 1 (NLVR2's second image)")
    if head == "irtr" and "rank_output.weight" not in state and "itm_score.fc.weight" in state:
        state["rank_output.weight"] = state["itm_score.fc.weight"][1:].clone()  # (1, 2C): the "match" row
        state["rank_output.bias"] = state["itm_score.fc.bias"][1:].clone()
        report.changed.append("rank_output := itm_score.fc row 1 (the 'match' logit), as METER's retrieval starts")
    patch = state["meter.vit_model.conv1.weight"].shape[-1]
    old_size = math.isqrt(state[_POSITIONS].shape[0] - 1) * patch
    if image_size is not None and image_size != old_size:
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of the patch size {patch}")
        state[_POSITIONS] = resize_position_embedding(state[_POSITIONS], image_size // patch)
        report.changed.append(
            f"positional_embedding: {old_size} -> {image_size} ([CLS] kept, grid resized bicubically)"
        )

    base = config if config is not None else MeterConfig()
    new_config = _config_from_weights(state, base)
    new_config.fusion_order, new_config.fusion_masking = fusion_order, fusion_masking
    new_config.architectures = [model_class.__name__]
    with torch.device("meta"):
        target = {k: v.shape for k, v in model_class(new_config).state_dict().items()}

    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in target and target[key] == value.shape:
            out[key] = value
        elif key.startswith(_HEAD_NAMES) and key not in target:
            report.ignored[_original_name(key, report.renamed)] = f"{model_class.__name__} has no such head"
        else:
            report.unexpected.append(key)
    report.missing = [k for k in target if k not in out]
    return ConvertedMeter(new_config, out, model_class, report)


def _original_name(key: str, renamed: Mapping[str, str]) -> str:
    """The checkpoint's name of our ``key`` (head keys renamed, e.g. ``snli_classifier``, or not)."""
    return next((old for old, new in renamed.items() if new == key), key)


def save_converted(converted: ConvertedMeter, out_dir: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors``: a folder ``from_pretrained`` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    converted.config.save_pretrained(out)
    # safetensors refuses views and shared storage: give each tensor its own contiguous memory
    tensors = {k: v.detach().contiguous().clone() for k, v in converted.state_dict.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def convert_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    head: str,
    image_size: int | None = None,
    config: MeterConfig | None = None,
    fusion_order: FusionOrder = "parallel",
    fusion_masking: FusionMasking = "additive",
) -> ConversionReport:
    """Read an original METER checkpoint, convert it for ``head`` and write the folder; returns the report."""
    converted = convert_original_meter(
        load_original_checkpoint(checkpoint), head, image_size, config, fusion_order, fusion_masking
    )
    save_converted(converted, out_dir)
    return converted.report


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``python -m pumer_patch.models.convert_meter IN.ckpt OUT_DIR --head ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m pumer_patch.models.convert_meter",
        description="Convert an original METER Lightning checkpoint into a from_pretrained folder.",
    )
    parser.add_argument("checkpoint", type=Path, help="original METER .ckpt (or a plain state_dict file)")
    parser.add_argument("out_dir", type=Path, help="folder to write config.json and model.safetensors into")
    parser.add_argument("--head", required=True, choices=sorted(HEADS), help="the model class to convert to")
    parser.add_argument("--image-size", type=int, default=None, help="resize the CLIP positions to this size")
    parser.add_argument("--config", type=Path, default=None,
                        help="a config.json for what the weights cannot tell (numbers of heads, max_text_len); "
                             "default: full-size METER")
    parser.add_argument("--fusion-order", choices=("parallel", "sequential"), default="parallel",
                        help="parallel: original METER (default); sequential: PuMer's finetuning")
    parser.add_argument("--fusion-masking", choices=("additive", "pumer"), default="additive",
                        help="additive: original METER (default); pumer: PuMer's masked softmax")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = None if args.config is None else MeterConfig.from_json_file(args.config)
    report = convert_checkpoint(
        args.checkpoint, args.out_dir, args.head, args.image_size, config, args.fusion_order, args.fusion_masking
    )
    logger.info("%s\nwrote %s", report.summary(), args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
