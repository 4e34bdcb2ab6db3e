"""NLVR2 on the engine: finetune (optionally with PuMer) and evaluate, side by side with PuMer.

    python -m recipes nlvr2 train --preset vilt-nlvr2 --data DATA --output runs/vilt-nlvr2
    python -m recipes nlvr2 train --preset vilt-nlvr2-pumer --data DATA --teacher runs/vilt-nlvr2/best --output runs/vilt-nlvr2-pumer
    python -m recipes nlvr2 eval  --model runs/vilt-nlvr2/best --data DATA --split test1 --pumer p0.1r0.3t0.2-258

``DATA`` is what ``recipes.prepare.convert_nlvr2`` writes: ``nlvr2_{train,dev,test1}.jsonl`` and
``nlvr2-{train,dev,test1}.lmdb``. An example is one statement about a pair of images: the model
reads the sentence (padded to 40 tokens) and both images (``pixel_values`` (2, 3, S, S), left then
right), each through a full pass of the backbone with its own token type (1 and 2), and classifies
[pooled 1 ; pooled 2] as ``False`` (0) or ``True`` (1) with cross-entropy. PuMer reduces within
each pass on its own. A pretrained 2-token-type checkpoint gets its third type as a copy of the
second (``recipes.models.load_model``). The metric is accuracy; the best checkpoint is chosen on dev.
"""

from __future__ import annotations

from functools import partial

from recipes.data.records import NLVR2_LABELS, Nlvr2Record
from recipes.run import TaskSpec
from recipes.tasks.classification import ClassificationTask, LabelledData

__all__ = ["SPLITS", "NLVR2", "Nlvr2Data"]

# split -> (annotations, image store) inside the data folder
SPLITS = {split: (f"nlvr2_{split}.jsonl", f"nlvr2-{split}.lmdb") for split in ("train", "dev", "test1")}


# a data folder written by recipes.prepare.convert_nlvr2: each record names its two images, left then right
Nlvr2Data = partial(LabelledData, splits=SPLITS, labels=NLVR2_LABELS, parse=Nlvr2Record.from_json,
                    image_key=lambda r: r.images, text=lambda r: r.sentence, label=lambda r: r.label,
                    converter="recipes.prepare.convert_nlvr2")

NLVR2 = TaskSpec(name="nlvr2", title="NLVR2", metric="accuracy", data=Nlvr2Data,
                 make_task=ClassificationTask.from_context,
                 splits=tuple(SPLITS), train_split="train", eval_split="dev", text_length=40,
                 converter="recipes.prepare.convert_nlvr2")

