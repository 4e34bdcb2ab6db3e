"""Single-label classification (SNLI-VE, NLVR2): the engine's task and the data folder it reads."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes.data.dataset import ImageTextDataset, OnBadImage
from recipes.data.records import read_jsonl
from recipes.data.store import ImageStore, is_image_store
from recipes.data.transforms import build_image_transform
from recipes.models import Family
from recipes.run import TaskContext

__all__ = ["ImageTextCall", "ClassificationTask", "LabelledData", "check_split_files"]


class ImageTextCall:
    """The model call of the image-text tasks: ``model(input_ids=, attention_mask=, pixel_values=)``, outputs as given."""

    def model_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Any:
        return model(**self.model_inputs(batch))


class ClassificationTask(ImageTextCall):
    """The engine's ``Task`` for single-label classification: cross-entropy and accuracy.

    Targets are class indices in the model's label order (``batch["target"]``, (B,) long); examples
    whose image failed to decode (``valid`` False) count in neither loss nor accuracy.
    """

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)

    @classmethod
    def from_context(cls, context: TaskContext) -> ClassificationTask:
        if context.labels is None:
            raise ValueError("a classification task needs the model's labels")
        return cls(context.labels)

    def loss(self, outputs: Any, batch: Mapping[str, Tensor]) -> Tensor:
        per_example = F.cross_entropy(outputs.logits.float(), batch["target"], reduction="none")
        valid = batch["valid"].float()
        return (per_example * valid).sum() / valid.sum().clamp_min(1.0)

    def eval_outputs(self, outputs: Any, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"index": batch["index"], "prediction": outputs.logits.argmax(-1), "target": batch["target"],
                "valid": batch["valid"]}

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        keep = outputs["valid"].bool()
        correct = (outputs["prediction"][keep] == outputs["target"][keep]).float()
        return {"score": correct.mean().item() if len(correct) else 0.0, "skipped_images": float((~keep).sum())}


def check_split_files(root: Path, files: Mapping[str, Sequence[str]], splits: Sequence[str], converter: str) -> None:
    """Raise ``FileNotFoundError`` naming the first of ``files[split]`` (for each of ``splits``) missing in ``root``.

    An image store may be a single file or a folder in lmdb's layout.
    """
    for split in splits:
        for name in files[split]:
            if not is_image_store(root / name):  # a file, or an LMDB folder
                raise FileNotFoundError(f"{root / name} does not exist (needed for the {split} split); "
                                        f"write the data folder with python -m {converter}")


class LabelledData:
    """The data folder of a classification task: per split an annotation jsonl and an image store.

    splits: split -> (annotations, image store) file names in the folder; labels: the class names in
    the task's order; parse: a jsonl object -> record; image_key(record): its image stem, or a tuple
    of stems (several images per example); text(record): what the model reads; label(record): its
    class name. Targets are class indices in the MODEL's label order (a converted head keeps its own).
    dataset: these folders hold one dataset each, so only None.
    """

    def __init__(self, root: Path, dataset: str | None = None, *, splits: Mapping[str, tuple[str, str]],
                 labels: Sequence[str], parse: Callable[[Mapping[str, Any]], Any], image_key: Callable[[Any], Any],
                 text: Callable[[Any], str], label: Callable[[Any], str], converter: str) -> None:
        if dataset is not None:
            raise ValueError(f"{root} holds one dataset; --dataset is for retrieval folders, got {dataset!r}")
        self.root, self.splits, self.labels = Path(root), dict(splits), list(labels)
        self.parse, self.image_key, self.text, self.label, self.converter = parse, image_key, text, label, converter

    def check(self, splits: Sequence[str]) -> None:
        """Fail now, before any model loads, if a split's annotations or image store is missing."""
        check_split_files(self.root, self.splits, splits, self.converter)

    def dataset(self, split: str, family: Family, labels: Sequence[str], tokenizer: Any, *, image_size: int,
                text_length: int, train: bool, limit: int | None = None,
                on_bad_image: OnBadImage = "error", seed: int = 0) -> ImageTextDataset[Any]:
        """The split's examples, targets ordered by ``labels`` (the model's own label order)."""
        if sorted(labels) != sorted(self.labels):
            raise ValueError(f"the model's labels {list(labels)} are not this task's {self.labels}; "
                             f"load a checkpoint of this task, or one without a task head")
        jsonl, store = self.splits[split]
        records = read_jsonl(self.root / jsonl, self.parse)[:limit]
        position = {name: i for i, name in enumerate(labels)}
        return ImageTextDataset(records, ImageStore(self.root / store), image_key=self.image_key, text=self.text,
                                target=lambda r: {"target": torch.tensor(position[self.label(r)])},
                                transform=build_image_transform(family.image, image_size, train=train),
                                tokenizer=tokenizer, max_length=text_length, image_size=image_size,
                                on_bad_image=on_bad_image, seed=seed)
