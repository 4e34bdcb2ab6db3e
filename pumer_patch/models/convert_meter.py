"""Original METER checkpoints (Dou et al.'s PyTorch Lightning ``.ckpt`` files) to ``pumer_patch`` METER folders.

METER's Lightning module keeps every part at the top level of its ``state_dict``; ours nests the
backbone under ``meter.`` as PuMer's checkpoints do. The rules (see docs/design.md, "Checkpoints"):

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

Every size the weights decide is read from them (depths: one more than the highest block index).
The conversion is strict: a target key nothing fills (a block missing from the middle of the
checkpoint, a head the target needs), a key in our namespace the target lacks, and a shape the
target does not have are an error that names them, and nothing is written. Only a task head started
from the pretraining checkpoint is left to a fresh initialisation (``report.initialized``).
``strict=False`` (``--no-strict``) writes the rest anyway and reports them. A checkpoint cut after
its last complete fusion block cannot be told from a shallower METER.

The written config records ``fusion_order="parallel"`` and ``fusion_masking="additive"`` by default:
original METER ran both streams on the previous states with an additive mask, so that reproduces its
checkpoints. PuMer finetuned its converted folders with its own arithmetic ("sequential", "pumer"):
pass those to start from a checkpoint the way PuMer did.

Command (exit code 1, the reason logged and nothing written, when the checkpoint cannot be read or
converted)::

    python -m pumer_patch.models.convert_meter meter_clip16_288_roberta_pretrain.ckpt out/ --head vqa --image-size 384
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from pumer_patch.models._convert import ConversionReport, grow_token_types, rank_from_itm_match_row, read_checkpoint
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
    "ConvertedMeter",
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
_PRETRAIN_HEADS = ("itm_score.", "mlm_score.")
_POSITIONS = "meter.vit_model.positional_embedding"
_TOKEN_TYPES = "meter.token_type_embeddings.weight"
#: what to check when a conversion is refused
_FIX = (
    "Check --head (vqa, ve, nlvr2, irtr, pretrain) against the checkpoint's task heads; a checkpoint of "
    "another size needs --config for what the weights cannot tell (the numbers of heads)."
)


@dataclass
class ConvertedMeter:
    """A converted checkpoint: its config, our state_dict, the class it loads into, and the report."""

    config: MeterConfig
    state_dict: dict[str, Tensor]
    model_class: type[MeterPreTrainedModel]
    report: ConversionReport


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


def _block_indices(keys: Sequence[str], prefix: str) -> list[int]:
    """The block indices N of the keys ``prefix`` + ``N.*``, sorted."""
    return sorted({int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def _depth(keys: Sequence[str], prefix: str) -> int:
    """One more than the highest block index under ``prefix`` (0 when there is none).

    Not the number of indices: a block missing from the middle must show as that block's missing
    keys, not as a shallower model whose last block is unexpected.
    """
    indices = _block_indices(keys, prefix)
    return indices[-1] + 1 if indices else 0


def _lowest_block(state: Mapping[str, Tensor], prefix: str, rest: str) -> Tensor:
    """The tensor ``rest`` of the lowest-numbered block under ``prefix`` (the sizes every block shares)."""
    indices = _block_indices(list(state), prefix)
    key = f"{prefix}{indices[0] if indices else 0}.{rest}"
    if key not in state:
        raise ValueError(f"not an original METER (CLIP + RoBERTa) checkpoint: no {key!r} after renaming")
    return state[key]


def _config_from_weights(state: Mapping[str, Tensor], base: MeterConfig) -> MeterConfig:
    """``base`` with every size the weights decide (widths, depths, vocabulary, grid, token types, labels)."""
    keys = list(state)
    t = "meter.text_transformer."
    text_layers, fusion_layers = t + "encoder.layer.", "meter.cross_modal_text_layers."
    conv = state["meter.vit_model.conv1.weight"]  # (width, 3, p, p)
    sizes: dict[str, Any] = {
        "hidden_size": state["meter.cross_modal_text_transform.weight"].shape[0],
        "text_hidden_size": state["meter.cross_modal_text_transform.weight"].shape[1],
        "vision_width": conv.shape[0],
        "vit_patch_size": conv.shape[-1],
        "image_size": math.isqrt(state[_POSITIONS].shape[0] - 1) * conv.shape[-1],
        "vision_layers": _depth(keys, "meter.vit_model.transformer.resblocks."),
        "num_layers": _depth(keys, text_layers),
        "num_top_layer": _depth(keys, fusion_layers),
        "vocab_size": state[t + "embeddings.word_embeddings.weight"].shape[0],
        "max_position_embeddings": state[t + "embeddings.position_embeddings.weight"].shape[0],
        "text_intermediate_size": _lowest_block(state, text_layers, "intermediate.dense.weight").shape[0],
        "token_types": state[_TOKEN_TYPES].shape[0],
    }
    fusion_ffn = _lowest_block(state, fusion_layers, "intermediate.dense.weight").shape[0]
    sizes["mlp_ratio"] = fusion_ffn // sizes["hidden_size"]
    if "vqa_classifier.3.weight" in state:
        sizes["vqa_label_size"] = state["vqa_classifier.3.weight"].shape[0]
    skip = ("model_type", "transformers_version", "architectures")
    fields = {k: v for k, v in base.to_dict().items() if k not in skip}
    try:
        return MeterConfig(**{**fields, **sizes})
    except ValueError as error:
        raise ValueError(
            f"the checkpoint's sizes do not fit the config ({error}): the weights cannot tell the numbers of "
            "attention heads (num_heads, text_heads, vision_heads); pass a config.json that names them "
            "(command line: --config)"
        ) from error


def convert_original_meter(
    state_dict: Mapping[str, Tensor],
    head: str,
    image_size: int | None = None,
    config: MeterConfig | None = None,
    fusion_order: FusionOrder = "parallel",
    fusion_masking: FusionMasking = "additive",
    *,
    strict: bool = True,
) -> ConvertedMeter:
    """An original METER ``state_dict`` -> our keys for the ``head`` model (one of ``HEADS``).

    image_size: resize the CLIP position grid to this size (None: keep the checkpoint's).
    config: what the weights cannot tell (numbers of heads, ``max_text_len``, ...); None is
    full-size METER. Every size the weights decide is read from them. fusion_order /
    fusion_masking: recorded in the config; the defaults reproduce original METER (module docstring).
    strict: missing, unexpected and mismatched keys raise ``ValueError`` naming them; with
    ``strict=False`` they are left out of the state_dict and listed in the report. Nothing is loaded
    into a model: the target's keys and shapes come from one built on the meta device.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
    model_class = HEADS[head]
    report = ConversionReport(head=head, source="original METER")
    state, origin = _renamed(state_dict, report)
    _derive(state, head, image_size, report)

    base = config if config is not None else MeterConfig()
    new_config = _config_from_weights(state, base)
    new_config.fusion_order, new_config.fusion_masking = fusion_order, fusion_masking
    new_config.architectures = [model_class.__name__]
    with torch.device("meta"):
        target = {k: tuple(v.shape) for k, v in model_class(new_config).state_dict().items()}
    out = _placed(state, origin, target, model_class.__name__, report)
    if strict:
        report.check(_FIX)
    return ConvertedMeter(new_config, out, model_class, report)


def _renamed(state_dict: Mapping[str, Tensor], report: ConversionReport) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The checkpoint under our names, and our name -> the checkpoint's; ignored keys go to ``report``."""
    state: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new, why = rename_original_key(key)
        if new is None:
            report.ignored[key] = why
            continue
        state[new], origin[new] = value, key
    for key in ("meter.vit_model.conv1.weight", _POSITIONS, _TOKEN_TYPES, "meter.cross_modal_text_transform.weight"):
        if key not in state:
            raise ValueError(f"not an original METER (CLIP + RoBERTa) checkpoint: no {key!r} after renaming")
    return state, origin


def _derive(state: dict[str, Tensor], head: str, image_size: int | None, report: ConversionReport) -> None:
    """The weights METER's finetuning derives, in place: NLVR2's third token type, retrieval's score, positions."""
    if head == "nlvr2" and state[_TOKEN_TYPES].shape[0] == 2:
        state[_TOKEN_TYPES] = grow_token_types(state[_TOKEN_TYPES], 3)
        report.derived[_TOKEN_TYPES] = "2 -> 3 rows, row 2 := row 1 (NLVR2's second image starts as the first)"
    if head == "irtr" and "rank_output.weight" not in state and "itm_score.fc.weight" in state:
        rank = rank_from_itm_match_row(state["itm_score.fc.weight"], state["itm_score.fc.bias"])
        for part, value in zip(("weight", "bias"), rank):
            state[f"rank_output.{part}"] = value
            report.derived[f"rank_output.{part}"] = f"itm_score.fc.{part}[1:] (the ITM 'match' row), as METER starts"
    patch = state["meter.vit_model.conv1.weight"].shape[-1]
    old_size = math.isqrt(state[_POSITIONS].shape[0] - 1) * patch
    if image_size is not None and image_size != old_size:
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of the patch size {patch}")
        state[_POSITIONS] = resize_position_embedding(state[_POSITIONS], image_size // patch)
        report.derived[_POSITIONS] = f"{old_size} -> {image_size} pixels ([CLS] kept, grid resized bicubically)"


def _placed(
    state: Mapping[str, Tensor],
    origin: Mapping[str, str],
    target: Mapping[str, tuple[int, ...]],
    model_name: str,
    report: ConversionReport,
) -> dict[str, Tensor]:
    """The tensors the target model holds with their shapes; every other key, either way, goes to ``report``."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if target.get(key) == tuple(value.shape):
            out[key] = value
            if key in origin:
                report.mapped[origin[key]] = (key,)
        elif key in target:
            report.mismatched[key] = (tuple(value.shape), target[key])
        elif key.startswith(_HEAD_NAMES):
            report.ignored[origin.get(key, key)] = f"{model_name} has no such head"
        else:
            report.unexpected.append(key)
    # a task head started from a checkpoint with pretraining heads (ITM, MLM) starts fresh, as METER's
    # finetuning does; anything else the target needs is missing
    from_pretraining = report.head != "pretrain" and any(k.startswith(_PRETRAIN_HEADS) for k in state)
    for key in target:
        if key in out or key in report.mismatched:
            continue
        if from_pretraining and not key.startswith("meter."):
            report.initialized.append(key)
        else:
            report.missing.append(key)
    return out


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
    *,
    strict: bool = True,
    weights_only: bool = True,
) -> ConversionReport:
    """Read an original METER checkpoint, convert it for ``head`` and write the folder; returns the report.

    Arguments as ``convert_original_meter``; ``weights_only=False`` unpickles what the file holds
    besides tensors (only for files you trust). When the conversion is refused nothing is written.
    """
    state_dict = read_checkpoint(checkpoint, weights_only=weights_only)
    converted = convert_original_meter(
        state_dict, head, image_size, config, fusion_order, fusion_masking, strict=strict
    )
    save_converted(converted, out_dir)
    return converted.report


def _read_config(path: Path) -> MeterConfig:
    """``--config``: a METER config.json, or a ``ValueError`` that names the file."""
    try:
        return MeterConfig.from_json_file(path)
    except (ValueError, TypeError) as error:  # malformed JSON, or fields MeterConfig refuses
        raise ValueError(f"--config {path} is not a METER config.json: {error}") from error


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``python -m pumer_patch.models.convert_meter IN.ckpt OUT_DIR --head ...``.

    Returns 0, or 1 (the reason logged, nothing written) when the checkpoint cannot be read or converted.
    """
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
    parser.add_argument("--trust-pickle", action="store_true",
                        help="torch.load(weights_only=False): trusted files only")
    parser.add_argument("--no-strict", action="store_true",
                        help="write the folder although keys are missing, unexpected or of another shape "
                             "(each is logged; from_pretrained initialises the missing ones)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = None if args.config is None else _read_config(args.config)
        report = convert_checkpoint(
            args.checkpoint, args.out_dir, args.head, args.image_size, config, args.fusion_order,
            args.fusion_masking, strict=not args.no_strict, weights_only=not args.trust_pickle,
        )
    except (ValueError, OSError) as error:
        logger.error("%s", error)
        return 1
    logger.log(logging.INFO if report.ok else logging.WARNING, "%s\nwrote %s", report.summary(), args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
