"""NLVR2 on the engine: finetune (optionally with PuMer) and evaluate, side by side with PuMer.

    python -m recipes.nlvr2 train --preset vilt-nlvr2 --data DATA --output runs/vilt-nlvr2
    python -m recipes.nlvr2 train --preset vilt-nlvr2-pumer --data DATA --teacher runs/vilt-nlvr2/best --output runs/vilt-nlvr2-pumer
    python -m recipes.nlvr2 eval  --model runs/vilt-nlvr2/best --data DATA --split test1 --pumer p0.1r0.3t0.2-258

``DATA`` is what ``recipes.convert_nlvr2`` writes: ``nlvr2_{train,dev,test1}.jsonl`` and
``nlvr2-{train,dev,test1}.lmdb``. An example is one statement about a pair of images: the model
reads the sentence (padded to 40 tokens) and both images (``pixel_values`` (2, 3, S, S), left then
right), each through a full pass of the backbone with its own token type (1 and 2), and classifies
[pooled 1 ; pooled 2] as ``False`` (0) or ``True`` (1) with cross-entropy. PuMer reduces within
each pass on its own. A pretrained 2-token-type checkpoint gets its third type as a copy of the
second (``recipes.models.load_model``). The metric is accuracy; the best checkpoint is chosen on dev.
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
from recipes.data.records import NLVR2_LABELS, Nlvr2Record, read_jsonl
from recipes.data.store import ImageStore
from recipes.data.transforms import build_image_transform
from recipes.models import Family

__all__ = ["SPLITS", "NLVR2", "Nlvr2Data", "Nlvr2Task", "main", "parse_args"]

logger = logging.getLogger("recipes.nlvr2")

# split -> (annotations, image store) inside the data folder
SPLITS = {split: (f"nlvr2_{split}.jsonl", f"nlvr2-{split}.lmdb") for split in ("train", "dev", "test1")}

# NLVR2's task is plain two-way classification: cross-entropy, accuracy, undecodable pairs left out
Nlvr2Task = ClassificationTask


class Nlvr2Data:
    """A data folder written by ``recipes.convert_nlvr2``; ``False`` and ``True`` are its labels."""

    labels = list(NLVR2_LABELS)

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def check(self, splits: Sequence[str]) -> None:
        """Fail now, before any model loads, if a split's annotations or image store is missing."""
        for split in splits:
            for name in SPLITS[split]:
                if not (self.root / name).is_file():
                    raise FileNotFoundError(f"{self.root / name} does not exist (needed for the {split} split); "
                                            f"write the data folder with python -m recipes.convert_nlvr2")

    def dataset(self, split: str, family: Family, labels: Sequence[str], tokenizer: Any, *, image_size: int,
                text_length: int, train: bool, limit: int | None = None,
                on_bad_image: str = "error") -> ImageTextDataset[Nlvr2Record]:
        jsonl, store = SPLITS[split]
        records = read_jsonl(self.root / jsonl, Nlvr2Record.from_json)[:limit]
        if sorted(labels) != sorted(NLVR2_LABELS):
            raise ValueError(f"the model's labels {list(labels)} are not {list(NLVR2_LABELS)}: it is no NLVR2 model")
        position = {name: i for i, name in enumerate(labels)}  # a converted head keeps its own order
        return ImageTextDataset(records, ImageStore(self.root / store), image_key=lambda r: r.images,
                                text=lambda r: r.sentence,
                                target=lambda r: {"target": torch.tensor(position[r.label])},
                                transform=build_image_transform(family.image, image_size, train=train),
                                tokenizer=tokenizer, max_length=text_length, image_size=image_size,
                                on_bad_image=on_bad_image)


NLVR2 = TaskSpec(name="nlvr2", title="NLVR2", metric="accuracy", data=Nlvr2Data,
                 make_task=lambda labels, loss_scale, records: Nlvr2Task(labels),
                 splits=tuple(SPLITS), train_split="train", eval_split="dev", text_length=40,
                 converter="recipes.convert_nlvr2")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.nlvr2", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="finetune with a preset (the best checkpoint on dev is kept)")
    add_common_args(t, NLVR2)
    add_train_args(t, NLVR2)
    e = sub.add_parser("eval", help="accuracy on a split, with and without --pumer")
    add_common_args(e, NLVR2)
    add_eval_args(e, NLVR2, default_split="test1", output_help="folder for eval.json / eval.md")
    return finish_args(p.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    with logging_redirect_tqdm():
        if args.command == "train":
            train(NLVR2, args)
        else:
            print(markdown_table(evaluate(NLVR2, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
