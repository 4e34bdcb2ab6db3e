"""Easy-VQA study: train a small ViLT and a small METER on a laptop CPU, then measure what PuMer buys.

``python -m recipes.easy_vqa`` (``--quick`` for a smoke run of the whole pipeline in under a minute):

1. trains a small ViLT from scratch on the ``easy-vqa`` training split (a tenth of its images held out
   for validation), or loads it from the cache (``--cache-dir``; ``--retrain`` forces training);
2. evaluates on the test split: unpatched; PuMer off the shelf in default and reference mode;
   prune-only; merge-only; a ToMe-style baseline (plain bipartite merging, same ratio in both
   modalities, no text guidance) whose merge ratio is searched to match PuMer's FLOPs; and PuMer after
   a short finetune with the reduction on, distilled from the unpatched model;
2b. trains (or loads) a small METER the same way (``--no-meter`` skips it) and evaluates it unpatched,
   with PuMer in its fusion blocks, with ToMe merging in its CLIP image tower, and with both, each
   off the shelf and after a short finetune with it on;
3. for each: test accuracy, CPU throughput (same batches, warm-up, interleaved rounds, median),
   GFLOPs per example (``FlopCounterMode``) and tokens after each layer;
4. writes ``results.json`` and ``results.md`` to ``--out``, prints the markdown table, and saves
   ``tradeoff.png`` (accuracy against throughput, a panel per model) and ``kept_merged.png`` (what
   PuMer kept, pruned and merged on a few test images).

The pieces live in ``recipes.laptop`` (config, data, model, train on ``recipes.engine``, measure,
variants, figures, study); this module is the command line.

Easy-VQA images are one shape on a plain background, so most image tokens are background that the
text-informed pruning can drop early; the default reduction is aggressive for that reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.contrib.logging import logging_redirect_tqdm

from recipes.laptop.config import QUICK, MeterStudyConfig, StudyConfig
from recipes.laptop.data import word_level_tokenizer
from recipes.laptop.study import markdown_table, run_study
from recipes.logs import configure_logging

__all__ = ["QUICK", "word_level_tokenizer", "markdown_table", "parse_args", "config_from_args", "main"]

logger = logging.getLogger("recipes.easy_vqa")


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 0,1; got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    default = StudyConfig()
    p = argparse.ArgumentParser(
        prog="python -m recipes.easy_vqa",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("results/easy_vqa"), help="where results and figures go")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "pumer_patch" / "easy_vqa",
                   help="trained weights, one folder per configuration hash")
    p.add_argument("--retrain", action="store_true", help="train (and finetune) again even if cached")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a tiny model on a few hundred questions, the whole pipeline in under a minute")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    g = p.add_argument_group("model and training (defaults: the full run; --quick has its own)")
    g.add_argument("--hidden", type=int, help=f"hidden size [{default.model.hidden}]")
    g.add_argument("--layers", type=int, help=f"encoder layers [{default.model.layers}]")
    g.add_argument("--heads", type=int, help=f"attention heads [{default.model.heads}]")
    g.add_argument("--intermediate", type=int, help=f"MLP size [{default.model.intermediate}]")
    g.add_argument("--epochs", type=float, help=f"training epochs [{default.train.epochs:g}]")
    g.add_argument("--batch-size", type=int, help=f"training batch size [{default.train.batch_size}]")
    g.add_argument("--lr", type=float, help=f"peak learning rate [{default.train.lr:g}]")
    g.add_argument("--train-images", type=int, help="use only the first N training images [all]")
    g.add_argument("--test-images", type=int, help="evaluate on the first N test images only [all]")
    g.add_argument("--seed", type=int, help=f"seed [{default.seed}]")

    g = p.add_argument_group("reduction and finetuning")
    g.add_argument("--reduce-layers", type=_layers, help=f"PuMer's reduce layers [{','.join(map(str, default.reduce.layers))}]")
    g.add_argument("--prune", type=float, help=f"prune ratio [{default.reduce.prune:g}]")
    g.add_argument("--merge", type=float, help=f"image merge ratio [{default.reduce.merge:g}]")
    g.add_argument("--text-merge", type=float, help=f"text merge ratio [{default.reduce.text_merge:g}]")
    g.add_argument("--finetune-epochs", type=float, help=f"finetuning epochs [{default.finetune.epochs:g}]")
    g.add_argument("--finetune-lr", type=float, help=f"finetuning learning rate [{default.finetune.lr:g}]")
    g.add_argument("--distill-weight", type=float, help=f"KL-to-teacher weight, 0 for none [{default.distill_weight:g}]")

    g = p.add_argument_group("METER")
    meter = MeterStudyConfig()
    g.add_argument("--no-meter", action="store_true", help="the ViLT alone")
    g.add_argument("--meter-epochs", type=float, help=f"METER's training epochs [{meter.train.epochs:g}]")
    g.add_argument("--meter-finetune-epochs", type=float, help=f"METER's finetuning epochs [{meter.finetune.epochs:g}]")
    g.add_argument("--meter-encoder-merge", type=int,
                   help=f"ToMe's r per block of METER's CLIP tower [{meter.encoder_merge}]")

    g = p.add_argument_group("measurement")
    g.add_argument("--eval-batch-size", type=int, help=f"batch size of evaluation and timing [{default.eval_batch_size}]")
    g.add_argument("--timing-batches", type=int, help=f"batches per timed pass [{default.timing_batches}]")
    g.add_argument("--timing-rounds", type=int, help=f"interleaved timed passes per variant [{default.timing_rounds}]")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """``StudyConfig()`` (or the quick one) with the options given on the command line."""
    cfg = QUICK if args.quick else StudyConfig()

    def pick(**options: Any) -> dict[str, Any]:
        return {k: v for k, v in options.items() if v is not None}

    model = dataclasses.replace(cfg.model, **pick(hidden=args.hidden, layers=args.layers, heads=args.heads,
                                                  intermediate=args.intermediate))
    train_cfg = dataclasses.replace(cfg.train, **pick(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr))
    reduce = dataclasses.replace(cfg.reduce, **pick(layers=args.reduce_layers, prune=args.prune, merge=args.merge,
                                                    text_merge=args.text_merge))
    finetune = dataclasses.replace(cfg.finetune, **pick(epochs=args.finetune_epochs, lr=args.finetune_lr))
    meter = None
    if cfg.meter is not None and not args.no_meter:
        meter = dataclasses.replace(
            cfg.meter,
            train=dataclasses.replace(cfg.meter.train, **pick(epochs=args.meter_epochs)),
            finetune=dataclasses.replace(cfg.meter.finetune, **pick(epochs=args.meter_finetune_epochs)),
            **pick(encoder_merge=args.meter_encoder_merge),
        )
    return dataclasses.replace(
        cfg, model=model, train=train_cfg, reduce=reduce, finetune=finetune, meter=meter,
        **pick(distill_weight=args.distill_weight, train_images=args.train_images, test_images=args.test_images,
               seed=args.seed, eval_batch_size=args.eval_batch_size, timing_batches=args.timing_batches,
               timing_rounds=args.timing_rounds),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.no_progress:  # save_pretrained's "Writing model shards" bar too
        transformers.utils.logging.disable_progress_bar()
    cfg = config_from_args(args)
    logger.info("easy-vqa study%s: %s", " (quick)" if args.quick else "", cfg)
    with logging_redirect_tqdm():
        results = run_study(cfg, args.out, args.cache_dir, retrain=args.retrain, progress=not args.no_progress)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
