"""SNLI-VE on the engine: finetune (optionally with PuMer) and evaluate, side by side with PuMer.

    python -m recipes.snli_ve train --preset vilt-ve --data DATA --output runs/vilt-ve
    python -m recipes.snli_ve train --preset vilt-ve-pumer --data DATA --teacher runs/vilt-ve/best --output runs/vilt-ve-pumer
    python -m recipes.snli_ve eval  --model runs/vilt-ve/best --data DATA --split test --pumer p0.1r0.3t0.2-2468

``DATA`` is what ``recipes.convert_snli_ve`` writes: ``snli_ve_{train,dev,test}.jsonl`` and
``flickr30k_images.lmdb``. The premise is the image; the model reads the hypothesis (``sentence2``)
only, padded to 40 tokens. Three classes in METER's and the research code's order (contradiction 0,
neutral 1, entailment 2); ViLT, which has no entailment class in transformers, gets a 3-label
``ViltForQuestionAnswering`` head trained with cross-entropy. The metric is accuracy; the best
checkpoint is chosen on dev.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from recipes.common import (
    ClassificationTask,
    TaskSpec,
    add_common_args,
    add_eval_args,
    add_train_args,
    evaluate,
    finish_args,
    markdown_table,
    train,
)
from recipes.data.dataset import ImageTextDataset
from recipes.data.records import SNLI_VE_LABELS, SnliVeRecord, read_jsonl
from recipes.data.store import ImageStore
from recipes.data.transforms import build_image_transform
from recipes.models import Family

__all__ = ["SPLITS", "SNLI_VE", "SnliVeData", "main", "parse_args"]

logger = logging.getLogger("recipes.snli_ve")

# split -> (annotations, image store) inside the data folder
SPLITS = {split: (f"snli_ve_{split}.jsonl", "flickr30k_images.lmdb") for split in ("train", "dev", "test")}


class SnliVeData:
    """A data folder written by ``recipes.convert_snli_ve``; the three class names are its labels."""

    labels = list(SNLI_VE_LABELS)

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def check(self, splits: Sequence[str]) -> None:
        """Fail now, before any model loads, if a split's annotations or the image store is missing."""
        for split in splits:
            for name in SPLITS[split]:
                if not (self.root / name).is_file():
                    raise FileNotFoundError(f"{self.root / name} does not exist (needed for the {split} split); "
                                            f"write the data folder with python -m recipes.convert_snli_ve")

    def dataset(self, split: str, family: Family, labels: Sequence[str], tokenizer: Any, *, image_size: int,
                text_length: int, train: bool, limit: int | None = None,
                on_bad_image: str = "error") -> ImageTextDataset[SnliVeRecord]:
        jsonl, store = SPLITS[split]
        records = read_jsonl(self.root / jsonl, SnliVeRecord.from_json)[:limit]
        unknown = set(SNLI_VE_LABELS) - set(labels)
        if unknown:
            raise ValueError(f"the model's labels {list(labels)} lack {sorted(unknown)}: it is no SNLI-VE model")
        position = {name: i for i, name in enumerate(labels)}  # a converted head keeps its own order
        return ImageTextDataset(records, ImageStore(self.root / store), image_key=lambda r: r.image_id,
                                text=lambda r: r.hypothesis,
                                target=lambda r: {"target": torch.tensor(position[r.gold_label])},
                                transform=build_image_transform(family.image, image_size, train=train),
                                tokenizer=tokenizer, max_length=text_length, image_size=image_size,
                                on_bad_image=on_bad_image)


SNLI_VE = TaskSpec(name="snli_ve", title="SNLI-VE", metric="accuracy", data=SnliVeData,
                   make_task=lambda labels, loss_scale, records: ClassificationTask(labels),
                   splits=tuple(SPLITS), train_split="train", eval_split="dev", text_length=40,
                   converter="recipes.convert_snli_ve")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.snli_ve", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="finetune with a preset (the best checkpoint on dev is kept)")
    add_common_args(t, SNLI_VE)
    add_train_args(t, SNLI_VE)
    e = sub.add_parser("eval", help="accuracy on a split, with and without --pumer")
    add_common_args(e, SNLI_VE)
    add_eval_args(e, SNLI_VE, default_split="test", output_help="folder for eval.json / eval.md")
    return finish_args(p.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    with logging_redirect_tqdm():
        if args.command == "train":
            train(SNLI_VE, args)
        else:
            print(markdown_table(evaluate(SNLI_VE, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
