"""The small ViLT the laptop study trains from scratch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import ViltConfig, ViltForQuestionAnswering

from recipes.laptop.config import IMAGE_SIZE, ModelConfig

__all__ = ["build_model"]

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
