"""The small ViLT and the small METER the laptop study trains from scratch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, ViltConfig, ViltForQuestionAnswering

from pumer_patch.models.meter import MeterConfig, MeterForQuestionAnswering
from recipes.laptop.config import IMAGE_SIZE, MeterModelConfig, ModelConfig

__all__ = ["build_model", "build_meter"]

def build_model(cfg: ModelConfig, vocab_size: int, answers: Sequence[str], seed: int) -> ViltForQuestionAnswering:
    """A randomly initialised ``ViltForQuestionAnswering`` for 64 x 64 images and ``answers``."""
    config = ViltConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        image_size=IMAGE_SIZE,
        patch_size=cfg.patch,
        num_labels=len(answers),
        id2label=dict(enumerate(answers)),
        label2id={a: i for i, a in enumerate(answers)},
    )
    torch.manual_seed(seed)
    model = ViltForQuestionAnswering(config)
    # transformers leaves these at zero (its ViLT is meant to be loaded, not trained from scratch);
    # ViLT's own code starts them as timm's ViT does. At zero every background patch is identical.
    embeddings = model.vilt.embeddings
    nn.init.trunc_normal_(embeddings.position_embeddings, std=config.initializer_range)
    nn.init.trunc_normal_(embeddings.cls_token, std=config.initializer_range)
    return model


def build_meter(
    cfg: MeterModelConfig, tokenizer: PreTrainedTokenizerBase, text_length: int, answers: Sequence[str], seed: int
) -> MeterForQuestionAnswering:
    """A randomly initialised ``MeterForQuestionAnswering`` for 64 x 64 images, ``answers`` and ``tokenizer``.

    The text encoder takes the tokenizer's vocabulary and special ids: with BERT's WordPiece, [PAD]
    is 0 (RoBERTa's is 1), which RoBERTa's embeddings use as the padding row of the word and
    position tables and to number positions (real tokens 1..T, padding 0); so positions need
    ``text_length + 1`` rows. Fusion masking ``"additive"`` (original METER: SDPA outside PuMer's
    layers), fusion order ``"sequential"`` (PuMer's METER). No dropout in the fusion blocks (as the
    ViLT: from scratch, short); the text encoder keeps RoBERTa's 0.1, which ``MeterConfig`` does not
    expose. Pixels come as the ViLT's, scaled to [-1, 1] (no CLIP statistics: nothing pretrained).
    """
    config = MeterConfig(
        image_size=IMAGE_SIZE,
        vit_patch_size=cfg.patch,
        hidden_size=cfg.hidden,
        num_heads=cfg.heads,
        num_layers=cfg.text_layers,
        num_top_layer=cfg.fusion_blocks,
        mlp_ratio=4,
        drop_rate=0.0,
        max_text_len=text_length,
        vocab_size=len(tokenizer),
        tokenizer=tokenizer.name_or_path,
        vqa_label_size=len(answers),
        vision_width=cfg.hidden,
        vision_layers=cfg.vision_layers,
        vision_heads=cfg.heads,
        text_hidden_size=cfg.hidden,
        text_intermediate_size=4 * cfg.hidden,
        max_position_embeddings=text_length + tokenizer.pad_token_id + 1,
        fusion_order="sequential",
        fusion_masking="additive",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        id2label=dict(enumerate(answers)),
        label2id={a: i for i, a in enumerate(answers)},
    )
    torch.manual_seed(seed)
    return MeterForQuestionAnswering(config)
