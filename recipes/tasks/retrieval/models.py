"""Retrieval heads for both families: a ranking score and image-text matching (ITM) logits per pair.

* ``ViltForRetrieval``: transformers' ``ViltForImageAndTextRetrieval`` (``rank_output``,
  Linear(hidden, 1) on the pooler) plus ``itm_score``, Linear(hidden, 2) on the same pooler output,
  which transformers has no slot for. A folder written by ``pumer_patch.models.convert_vilt --head
  irtr`` keeps the research checkpoint's ITM weights aside in ``itm_head.safetensors``
  (``weight``, ``bias``): they are loaded into ``itm_score`` when the folder's own weights lack it.
* ``MeterForRetrieval``: ``MeterForImageAndTextRetrieval`` (``rank_output`` and ``itm_score.fc`` on
  the pooled [text ; image] features), loaded the same way.

Both start retrieval from a pretraining checkpoint as ViLT and METER do (``docs/design.md``,
"Checkpoints"): when ``rank_output`` is missing but ITM weights exist, ``rank_output`` := the ITM
"match" row (1). Both return ``RetrievalOutput``: ``logits`` (B, 1) ranking scores and
``itm_logits`` (B, 2).

``CandidateScorer`` wraps either for training: one image against K captions, ``logits`` (B, K) and
``itm_logits`` (B, K, 2).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import ViltConfig, ViltForImageAndTextRetrieval
from transformers.utils import ModelOutput

from pumer_patch import token_sizes, with_token_sizes
from pumer_patch.models.convert import rank_from_itm_match_row
from pumer_patch.models.convert_vilt import ITM_HEAD_FILE
from pumer_patch.models.meter import MeterForImageAndTextRetrieval

__all__ = ["RetrievalOutput", "ViltForRetrieval", "MeterForRetrieval", "CandidateScorer"]

logger = logging.getLogger(__name__)


@dataclass
class RetrievalOutput(ModelOutput):
    """logits: (B, 1) ranking score of each pair; itm_logits: (B, 2) ITM logits, column 1 = "match"."""

    logits: Tensor | None = None
    itm_logits: Tensor | None = None
    pooled_output: Tensor | None = None


def _copy_match_row(rank: nn.Linear, itm: nn.Linear) -> None:
    weight, bias = rank_from_itm_match_row(itm.weight.detach(), itm.bias.detach())  # (1, C), (1,)
    with torch.no_grad():
        rank.weight.copy_(weight)
        rank.bias.copy_(bias)


def _complete_heads(rank: nn.Linear, itm: nn.Linear, itm_prefix: str, missing: set[str],
                    source: str | os.PathLike[str]) -> None:
    """Fill what the checkpoint lacked: ITM from ``itm_head.safetensors``, ``rank_output`` from ITM."""
    itm_missing = any(k.startswith(itm_prefix) for k in missing)
    aside = Path(source) / ITM_HEAD_FILE
    if itm_missing and aside.is_file():
        state = load_file(str(aside))
        itm.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
        itm_missing = False
        logger.info("ITM head loaded from %s", aside)
    rank_missing = any(k.startswith("rank_output.") for k in missing)
    if rank_missing and not itm_missing:
        _copy_match_row(rank, itm)
        logger.info("rank_output := the ITM head's 'match' row (a pretraining checkpoint, as ViLT and METER start)")
    elif rank_missing or itm_missing:
        logger.warning("%s has no %s: new random weights", source,
                       " and no ".join(n for n, m in (("rank_output", rank_missing), ("ITM head", itm_missing)) if m))


class ViltForRetrieval(ViltForImageAndTextRetrieval):
    """ViLT retrieval: ``rank_output`` (B, 1) and ``itm_score`` (B, 2), both on the pooler output (B, C)."""

    def __init__(self, config: ViltConfig) -> None:
        super().__init__(config)
        self.itm_score = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *args: Any,
                        **kwargs: Any) -> Any:
        """``from_pretrained``, then the ITM head from ``itm_head.safetensors`` and ``rank_output`` from ITM
        where the folder's weights lack them."""
        asked = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        _complete_heads(model.rank_output, model.itm_score, "itm_score.", set(info["missing_keys"]),
                        pretrained_model_name_or_path)
        return (model, info) if asked else model

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, **kwargs: Any) -> RetrievalOutput:
        pooled = self.vilt(input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **kwargs).pooler_output
        return RetrievalOutput(logits=self.rank_output(pooled), itm_logits=self.itm_score(pooled), pooled_output=pooled)


class MeterForRetrieval(MeterForImageAndTextRetrieval):
    """METER retrieval, loadable from a pretraining checkpoint (``rank_output`` := the ITM "match" row)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *args: Any,
                        **kwargs: Any) -> Any:
        asked = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        _complete_heads(model.rank_output, model.itm_score.fc, "itm_score.", set(info["missing_keys"]),
                        pretrained_model_name_or_path)
        return (model, info) if asked else model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                **kwargs: Any) -> RetrievalOutput:
        out = super().forward(input_ids, attention_mask, pixel_values, **kwargs)
        return RetrievalOutput(logits=out.logits, itm_logits=out.itm_logits, pooled_output=out.pooled_output)


class CandidateScorer(nn.Module):
    """One image against K captions: (B, 3, S, S) x (B, K, T) -> ``logits`` (B, K), ``itm_logits`` (B, K, 2).

    ViLT runs every pair through the whole model; METER encodes each image once and fuses it with
    each of its K captions (the image tower is most of its cost). ``save_pretrained`` saves the
    wrapped model, so checkpoints load as plain retrieval models.
    """

    def __init__(self, model: ViltForRetrieval | MeterForRetrieval) -> None:
        super().__init__()
        if not isinstance(model, (ViltForRetrieval, MeterForRetrieval)):
            raise TypeError(f"CandidateScorer scores a ViltForRetrieval or MeterForRetrieval, got {type(model).__name__}")
        self.model = model

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        self.model.save_pretrained(*args, **kwargs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor) -> RetrievalOutput:
        b, k, t = input_ids.shape
        ids, mask = input_ids.reshape(b * k, t), attention_mask.reshape(b * k, t)  # (B, K, T) -> (B K, T)
        if isinstance(self.model, MeterForRetrieval):
            meter = self.model.meter
            image = meter.encode_image(pixel_values)  # (B, N, C), once per image
            sizes = token_sizes(image)  # tokens the CLIP tower merged (ToMe) keep their sizes
            image = image.repeat_interleave(k, dim=0)  # (B K, N, C): pair b*K + j is image b, caption j
            with_token_sizes(image, None if sizes is None else sizes.repeat_interleave(k, dim=0))
            pooled = meter.pool(*meter.fuse(meter.encode_text(ids, mask), mask, image))
            rank, itm = self.model.rank_output(pooled), self.model.itm_score(pooled)
        else:
            pixels = pixel_values.repeat_interleave(k, dim=0)  # (B K, 3, S, S)
            out = self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            rank, itm = out.logits, out.itm_logits
        return RetrievalOutput(logits=rank.reshape(b, k), itm_logits=itm.reshape(b, k, 2))
