"""Easy-VQA study: train a small ViLT, a small METER and a small LLaVA-style VLM on a laptop CPU, then measure
what PuMer buys.

``python -m recipes easy_vqa`` (``--quick`` for a smoke run of the whole pipeline in under a minute):

1. trains a small ViLT from scratch on the ``easy-vqa`` training split (a tenth of its images held out
   for validation), or loads it from the cache (``--cache-dir``; ``--retrain`` forces training); every
   model reads the questions through bert-base-uncased's WordPiece compacted to the pieces easy-vqa uses;
2. evaluates on the test split (its first 500 images by default): unpatched; PuMer off the shelf;
   prune-only; merge-only; a ToMe-style baseline (plain bipartite merging, same ratio in both
   modalities, no text guidance) whose merge ratio is searched to match PuMer's FLOPs; and PuMer after
   a short finetune with the reduction on, distilled from the unpatched model;
2b. trains (or loads) a small METER the same way (``--no-meter`` skips it) and evaluates it unpatched,
   with PuMer in its fusion blocks, with ToMe merging in its CLIP image tower, and with both, off the
   shelf and (both) after a short finetune with them on;
2c. trains (or loads) a small ``LlavaForConditionalGeneration`` (CLIP tower, projector, Llama) to
   generate the answer, and scores the exact match of its greedy answers through ``generate``:
   unpatched, and at a quarter and an eighth of the visual tokens PuMer in the LLM, PuMer before it,
   FastV's rule, merging only and a random keep; PuMer in the LLM also after a short finetune;
3. for each: test accuracy, CPU throughput (same batches, warm-up, interleaved rounds, median and the
   per-round spread; the VLM's prefill), GFLOPs per example (``FlopCounterMode``) and tokens per layer;
4. writes ``results.json`` and ``results.md`` to ``--out``, prints the markdown table, and saves
   ``tradeoff.png`` (accuracy against throughput, a panel per model) and ``kept_merged.png`` (what
   PuMer kept, pruned and merged on a few test images in the ViLT and METER).

The pieces live in ``recipes.laptop`` (config, data, model, vlm, train on ``recipes.engine``,
measure, variants, figures, study); this module runs them for ``recipes.cli``.

Easy-VQA images are one shape on a plain background, so most image tokens are background that the
text-informed pruning can drop early; the default reduction is aggressive for that reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from recipes.laptop.config import StudyConfig
from recipes.laptop.study import markdown_table, run_study

__all__ = ["StudyRun", "study", "markdown_table"]

logger = logging.getLogger("recipes.easy_vqa")


@dataclass(frozen=True)
class StudyRun:
    """One run of the study: its configuration, where results and cached weights go, and the job's settings.

    retrain: train (and finetune) again even if cached; threads: torch's CPU threads (None: its choice).
    """

    config: StudyConfig
    out: Path
    cache_dir: Path
    retrain: bool = False
    quick: bool = False
    threads: int | None = None
    progress: bool = True


def study(run: StudyRun) -> dict[str, Any]:
    """Run the study (``run_study``) under the job's thread count and progress settings; returns its results."""
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    if not run.progress:  # save_pretrained's "Writing model shards" bar too
        transformers.utils.logging.disable_progress_bar()
    logger.info("easy-vqa study%s: %s", " (quick)" if run.quick else "", run.config)
    return run_study(run.config, run.out, run.cache_dir, retrain=run.retrain, progress=run.progress)
