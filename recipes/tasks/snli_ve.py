"""SNLI-VE on the engine: finetune (optionally with PuMer) and evaluate, side by side with PuMer.

    python -m recipes snli_ve train --preset vilt-ve --data DATA --output runs/vilt-ve
    python -m recipes snli_ve train --preset vilt-ve-pumer --data DATA --teacher runs/vilt-ve/best --output runs/vilt-ve-pumer
    python -m recipes snli_ve eval  --model runs/vilt-ve/best --data DATA --split test --pumer p0.1r0.3t0.2-2468

``DATA`` is what ``recipes.prepare.convert_snli_ve`` writes: ``snli_ve_{train,dev,test}.jsonl`` and
``flickr30k_images.lmdb``. The premise is the image; the model reads the hypothesis (``sentence2``)
only, padded to 40 tokens. Three classes in METER's and the research code's order (contradiction 0,
neutral 1, entailment 2); ViLT, which has no entailment class in transformers, gets a 3-label
``ViltForQuestionAnswering`` head trained with cross-entropy. The metric is accuracy; the best
checkpoint is chosen on dev.
"""

from __future__ import annotations

from functools import partial

from recipes.data.records import SNLI_VE_LABELS, SnliVeRecord
from recipes.run import TaskSpec
from recipes.tasks.classification import ClassificationTask, LabelledData

__all__ = ["SPLITS", "SNLI_VE", "SnliVeData"]

# split -> (annotations, image store) inside the data folder
SPLITS = {split: (f"snli_ve_{split}.jsonl", "flickr30k_images.lmdb") for split in ("train", "dev", "test")}

# a data folder written by recipes.prepare.convert_snli_ve: the premise image and the hypothesis
SnliVeData = partial(LabelledData, splits=SPLITS, labels=SNLI_VE_LABELS, parse=SnliVeRecord.from_json,
                     image_key=lambda r: r.image_id, text=lambda r: r.hypothesis, label=lambda r: r.gold_label,
                     converter="recipes.prepare.convert_snli_ve")

SNLI_VE = TaskSpec(name="snli_ve", title="SNLI-VE", metric="accuracy", data=SnliVeData,
                   make_task=ClassificationTask.from_context,
                   splits=tuple(SPLITS), train_split="train", eval_split="dev", text_length=40,
                   converter="recipes.prepare.convert_snli_ve")

