"""What the recipe tests share besides fixtures: images, tiny pretrained-style checkpoints, ``train`` arguments.

The builders write a tiny random model with ``save_pretrained`` so that the recipes load it the way
they load a real one. The fixtures built on them are in ``recipe_fixtures``.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from transformers import BertTokenizerFast, PreTrainedModel, ViltConfig

from pumer_patch.models.meter import MeterConfig

__all__ = ["image_bytes", "save_tiny_vilt", "save_tiny_meter", "train_args"]


def image_bytes(colour: tuple[int, int, int], fmt: str = "JPEG", size: tuple[int, int] = (50, 38)) -> bytes:
    """A plain image of one colour, encoded as ``fmt``, of another size than the models' inputs."""
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def save_tiny_vilt(cls: type[PreTrainedModel], path: Path, **config: object) -> Path:
    """A tiny ViLT of class ``cls`` (32 px images, patch 8, 40 text positions) written to ``path``."""
    torch.manual_seed(0)
    fields = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8, max_position_embeddings=40)
    cls(ViltConfig(**{**fields, **config})).save_pretrained(path)
    return path


def save_tiny_meter(cls: type[PreTrainedModel], path: Path, tokenizer_dir: Path, **config: object) -> Path:
    """A tiny METER of class ``cls`` over the bundled BERT vocabulary (32 px images, patch 8) written to ``path``."""
    torch.manual_seed(0)
    fields = dict(image_size=32, vit_patch_size=8, hidden_size=32, num_heads=2, num_layers=2, num_top_layer=2,
                  vocab_size=len(BertTokenizerFast.from_pretrained(str(tokenizer_dir))), vision_width=24,
                  vision_layers=2, vision_heads=2, text_hidden_size=16, text_intermediate_size=32,
                  max_position_embeddings=42)
    cls(MeterConfig(**{**fields, **config})).save_pretrained(path)
    return path


def train_args(task: str, preset: str, data: Path, model: Path, out: Path, tokenizer: Path, *extra: str) -> list[str]:
    """``python -m recipes TASK train`` arguments: 3 optimizer steps of batch 4 at 32 px, evaluating every 2 steps."""
    return [task, "train", "--preset", preset, "--data", str(data), "--model", str(model), "--tokenizer", str(tokenizer),
            "--output", str(out), "--per-device-batch", "4", "--total-batch", "4", "--max-steps", "3",
            "--eval-every", "2", "--image-size", "32", "--workers", "0", "--no-progress", *extra]
