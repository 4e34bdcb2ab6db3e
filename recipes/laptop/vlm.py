"""The study's LLaVA-style VLM: built from transformers' classes, trained to generate the answer, its variants.

The prompt of a question is ``[CLS] <image> x 64 question [SEP]``, padded on the left to one length
P for every question (so the prompt ends at column P for all of them, and ``prompt_end(P)`` tells a
reducing forward that the answer columns after it are no relevance rows); the answer is its word
pieces and ``[SEP]``, padded on the right to A columns. Training is teacher forcing on prompt and
answer, the loss the cross-entropy of the answer columns alone; scoring is the exact match of the
greedy answer that ``generate`` (with its cache) gives from the prompt.

Variants (``vlm_variants``): ``pumer_patch.apply`` calls of the transformers VLM adapter (PuMer in
the LLM, before the LLM, FastV's rule, merging only) and a random keep before the LLM, which the
adapter has no rule for: this module's own path (``RandomKeep``), the image features computed as
LLaVA computes them, a random subset per image placed in a shorter prompt of embeddings with the
kept tokens' original positions, generated from ``inputs_embeds``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerBase

import pumer_patch
from pumer_patch.adapters.hf_vlm import prompt_end
from recipes.laptop.config import IMAGE_SIZE, VlmModelConfig, VlmStudyConfig
from recipes.laptop.data import Split

__all__ = ["VlmSplit", "VlmDataset", "VlmVariant", "VlmTask", "RandomKeep", "visual_tokens", "build_vlm", "vlm_split",
           "vlm_patches", "vlm_variants", "generate_answers", "vlm_accuracy", "vlm_tokens_per_layer"]


def visual_tokens(cfg: VlmModelConfig) -> int:
    """Visual tokens per image: the tower's patches (LLaVA drops the [CLS])."""
    return (IMAGE_SIZE // cfg.patch) ** 2


def build_vlm(cfg: VlmModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlavaForConditionalGeneration:
    """A randomly initialised ``LlavaForConditionalGeneration`` on ``tokenizer``'s vocabulary plus one image token.

    The image placeholder is the id after the tokenizer's last (its embedding row is never read:
    LLaVA puts the projected image features there). Features come from the tower's last layer
    (LLaVA's default, the second to last, would leave a 2-layer tower's last layer unused).
    Generation stops at ``[SEP]``; SDPA attention.
    """
    vision = CLIPVisionConfig(hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.heads,
                              image_size=IMAGE_SIZE, patch_size=cfg.patch)
    text = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                       vocab_size=len(tokenizer) + 1, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=len(tokenizer),
                         vision_feature_layer=-1, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.bos_token_id = tokenizer.cls_token_id
    return model


@dataclass
class VlmSplit:
    """A ``Split`` as the VLM's prompts and answers.

    prompt, prompt_mask: (Q, P) long, left-padded; answers: (13, A) long, each answer's pieces and
    ``[SEP]``, right-padded with ``[PAD]`` (answer_mask (13, A) marks the real ones). The question
    ``i`` asks about ``split.images[split.image[i]]``; its answer is ``answers[split.label[i]]``.
    """

    split: Split
    prompt: Tensor
    prompt_mask: Tensor
    answers: Tensor
    answer_mask: Tensor

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, batch_size: int) -> list[Tensor]:
        """Question indices in order, in chunks of ``batch_size``."""
        return self.split.batches(batch_size)

    @property
    def prompt_length(self) -> int:
        return self.prompt.shape[1]

    def pixels(self, idx: Tensor) -> Tensor:
        return self.split.inputs(idx)["pixel_values"]  # (K, 3, 64, 64) in [-1, 1]

    def prompt_inputs(self, idx: Tensor) -> dict[str, Tensor]:
        """``generate`` / prefill inputs of the questions ``idx`` (K,): the prompts alone."""
        return {"input_ids": self.prompt[idx], "attention_mask": self.prompt_mask[idx], "pixel_values": self.pixels(idx)}

    def training_inputs(self, idx: Tensor) -> dict[str, Tensor]:
        """Teacher-forcing inputs (K, P + A) with positions counted from the first real token, and the targets."""
        answer, answer_mask = self.answers[self.split.label[idx]], self.answer_mask[self.split.label[idx]]
        ids = torch.cat([self.prompt[idx], answer], dim=1)
        mask = torch.cat([self.prompt_mask[idx], answer_mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "pixel_values": self.pixels(idx),
                "target": answer.masked_fill(answer_mask == 0, -100)}


def vlm_split(split: Split, tokenizer: PreTrainedTokenizerBase, answers: Sequence[str], image_token: int,
              n_visual: int) -> VlmSplit:
    """The VLM's prompts for ``split``'s questions (tokenized as the other models see them) and the answers."""
    ids, mask = split.input_ids, split.attention_mask  # (Q, T): [CLS] question [SEP], right-padded
    q, t = ids.shape
    length = 1 + n_visual + t - 1  # [CLS], the image, then the question's pieces and [SEP]
    prompt = torch.full((q, length), tokenizer.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros(q, length, dtype=torch.long)
    real = mask.sum(1)
    for i in range(q):
        row = torch.cat([ids[i, :1], torch.full((n_visual,), image_token), ids[i, 1:real[i]]])
        prompt[i, length - len(row):] = row
        prompt_mask[i, length - len(row):] = 1
    pieces = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id] for a in answers]
    width = max(len(p) for p in pieces)
    table = torch.full((len(answers), width), tokenizer.pad_token_id, dtype=torch.long)
    table_mask = torch.zeros(len(answers), width, dtype=torch.long)
    for k, p in enumerate(pieces):
        table[k, : len(p)] = torch.tensor(p)
        table_mask[k, : len(p)] = 1
    return VlmSplit(split, prompt, prompt_mask, table, table_mask)


class VlmTask:
    """The engine's ``Task`` for the VLM: teacher forcing, cross-entropy on the answer columns.

    The outputs' ``logits`` are the answer columns' (B, A, V): a reducing forward shortens the
    sequence before them, never them (the text after the image is kept), so they are its last A + 1
    columns but one. The model runs under ``prompt_end(P)``: the answer is no relevance row.
    """

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length

    def model_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values")}

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Any:
        a = batch["target"].shape[1]
        with prompt_end(self.prompt_length):
            logits = model(**self.model_inputs(batch), logits_to_keep=a + 1).logits  # (B, A + 1, V)
        return SimpleNamespace(logits=logits[:, :-1])

    def loss(self, outputs: Any, batch: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(outputs.logits.flatten(0, 1).float(), batch["target"].flatten(), ignore_index=-100)

    def eval_outputs(self, outputs: Any, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        target = batch["target"]
        hit = ((outputs.logits.argmax(-1) == target) | (target == -100)).all(dim=1)
        return {"index": batch["index"], "hit": hit}

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        return {"score": outputs["hit"].float().mean().item()}  # teacher-forced exact match (validation)


class VlmDataset(torch.utils.data.Dataset[dict[str, Tensor]]):
    """A ``VlmSplit`` as the engine's examples (teacher-forcing inputs and targets, with ``index``)."""

    def __init__(self, data: VlmSplit) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        inputs = self.data.training_inputs(torch.tensor([i]))
        return {"index": torch.tensor(i), **{k: v[0] for k, v in inputs.items()}}


class RandomKeep(nn.Module):
    """A random ``keep`` of each image's visual tokens, chosen before the LLM (no text, no merging).

    Wraps a ``LlavaForConditionalGeneration``: the image features are LLaVA's own
    (``get_image_features``), placed at the image tokens of the embedded prompt; then a random subset
    of ``keep`` visual tokens per sample (from a generator seeded by ``seed``, drawn anew per call)
    stays, in order, with its original positions, and the shorter prompt goes to the model as
    ``inputs_embeds`` (``generate`` continues the positions from the last one, the prompt's length).
    """

    def __init__(self, model: LlavaForConditionalGeneration, keep: int, seed: int) -> None:
        super().__init__()
        self.model, self.keep, self.seed = model, keep, seed

    @property
    def config(self) -> Any:
        return self.model.config

    def shortened(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor) -> dict[str, Tensor]:
        """The prompt (B, P) as embeddings (B, P - n + keep, C) with its mask and positions."""
        image = input_ids == self.model.config.image_token_index  # (B, P)
        embeds = self.model.get_input_embeddings()(input_ids.masked_fill(image, 0))
        features = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.flatten(0, 1)
        embeds = embeds.masked_scatter(image[..., None], features.to(embeds.dtype))
        b, p = input_ids.shape
        n = int(image[0].sum())
        generator = torch.Generator().manual_seed(self.seed)
        drop = torch.rand(b, n, generator=generator).argsort(dim=1)[:, self.keep:]  # (B, n - keep) image slots
        image_cols = image.long().argsort(dim=1, descending=True, stable=True)[:, :n].sort(dim=1).values  # (B, n)
        keep_col = torch.ones(b, p, dtype=torch.bool)
        keep_col.scatter_(1, image_cols.gather(1, drop), False)
        cols = keep_col.nonzero()[:, 1].view(b, -1)  # (B, P - n + keep), in order
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        take = cols[..., None].expand(-1, -1, embeds.shape[-1])
        return {"inputs_embeds": embeds.gather(1, take), "attention_mask": attention_mask.gather(1, cols),
                "position_ids": positions.gather(1, cols)}

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, **kwargs: Any) -> Any:
        return self.model(**self.shortened(input_ids, attention_mask, pixel_values), **kwargs)

    def generate(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, **kwargs: Any) -> Tensor:
        """New tokens only (B, N): ``generate`` from embeddings returns no prompt."""
        return self.model.generate(**self.shortened(input_ids, attention_mask, pixel_values), **kwargs)


@dataclass(frozen=True)
class VlmVariant:
    """One VLM row: which weights, and which reduction (``patch`` for ``pumer_patch.apply``, or a random keep)."""

    name: str
    description: str
    weights: str = "vlm"
    patch: Mapping[str, Any] | None = None
    random_keep: int | None = None
    seed: int = 0
    model: str = "vlm"

    def build(self, weights: Mapping[str, nn.Module], trace: bool = False) -> nn.Module:
        model = copy.deepcopy(weights[self.weights]).eval()
        if self.random_keep is not None:
            return RandomKeep(model, self.random_keep, self.seed)
        if self.patch is not None:
            pumer_patch.apply(model, **self.patch, trace=trace)
        return model


def vlm_patches(cfg: VlmStudyConfig) -> dict[str, dict[str, Any]]:
    """The adapter's reductions by variant name (``<rule>-<budget>``), every one keeping ``64 / budget`` tokens."""
    k, n_layers = cfg.reduce_layer, cfg.model.layers
    patches: dict[str, dict[str, Any]] = {}
    for b in cfg.budgets:
        keep = 1.0 / b
        pumer = {"prune_ratio": 1.0 - 2 * keep, "merge_ratio": keep}  # prune to 2x the budget, merge half
        steps = round(math.log2(b))
        if k + steps > n_layers:
            raise ValueError(f"merging alone to 1/{b} takes {steps} layers from layer {k}: the LLM has {n_layers}")
        patches[f"pumer-llm-{b}"] = {"layers": [k], **pumer}
        patches[f"pumer-input-{b}"] = {"layers": [0], **pumer, "where": "input"}
        patches[f"fastv-{b}"] = {"layers": [k], "prune_ratio": 1.0 - keep, "text_tokens": "last"}
        patches[f"merge-only-{b}"] = {"layers": list(range(k, k + steps)), "merge_ratio": 0.5}
    return patches


def vlm_variants(cfg: VlmStudyConfig, n_visual: int, seed: int) -> list[VlmVariant]:
    """The VLM's rows: unpatched, then per budget PuMer in / before the LLM, FastV, merge-only, random; finetunes."""
    patches = vlm_patches(cfg)
    k = cfg.reduce_layer
    rows = [VlmVariant("vlm-unpatched", "the trained VLM, no reduction")]
    for b in cfg.budgets:
        keep = n_visual // b
        what = {
            f"pumer-llm-{b}": f"PuMer in the LLM after decoder layer {k}'s attention: prune to {2 * keep} by the prompt's "
                              f"attention, merge to {keep}",
            f"pumer-input-{b}": f"PuMer before the LLM: prune to {2 * keep} by the prompt's mean embedding, merge to {keep}",
            f"fastv-{b}": f"FastV's rule at layer {k}: the last prompt token's attention, prune to {keep}",
            f"merge-only-{b}": f"merging only, half per layer at layers {patches[f'merge-only-{b}']['layers']}, to {keep}",
        }
        for name, text in what.items():
            rows.append(VlmVariant(f"vlm-{name}", f"{text} of {n_visual} visual tokens, off the shelf", patch=patches[name]))
        rows.append(VlmVariant(f"vlm-random-{b}", f"a random {keep} of {n_visual} visual tokens kept before the LLM",
                               random_keep=keep, seed=seed))
    for name in cfg.finetuned:
        if name not in patches:
            raise ValueError(f"VlmStudyConfig.finetuned names {name!r}; finetunable: {sorted(patches)}")
        rows.append(VlmVariant(f"vlm-{name}-finetuned", f"{name}, finetuned with it on (on the answers alone)",
                               weights=f"vlm-finetuned-{name}", patch=patches[name]))
    return rows


@torch.inference_mode()
def generate_answers(model: nn.Module, data: VlmSplit, batch_size: int) -> Tensor:
    """Greedy answers (Q, A) through ``generate`` with its cache: the new tokens, ``[PAD]`` after ``[SEP]``."""
    model.eval()
    a = data.answers.shape[1]
    out = []
    for idx in data.batches(batch_size):
        inputs = data.prompt_inputs(idx)
        new = model.generate(**inputs, max_new_tokens=a, do_sample=False)
        if not isinstance(model, RandomKeep):
            new = new[:, data.prompt_length:]
        out.append(F.pad(new, (0, a - new.shape[1]), value=model.config.text_config.pad_token_id))
    return torch.cat(out)


def vlm_accuracy(generated: Tensor, data: VlmSplit) -> float:
    """Exact match: the generated tokens up to and with the first ``[SEP]`` are the answer's pieces and ``[SEP]``."""
    target, mask = data.answers[data.split.label], data.answer_mask[data.split.label].bool()
    return ((generated == target) | ~mask).all(dim=1).float().mean().item()


@torch.inference_mode()
def vlm_tokens_per_layer(model: nn.Module, variant: VlmVariant, data: VlmSplit, n_visual: int) -> dict[str, list[int]]:
    """Visual and text tokens entering the LLM, then after each decoder layer (one prefill of a batch tells).

    From the patch's trace (``where="input"``: its count enters the LLM); a random keep enters with
    its ``keep``. Text: the real prompt tokens of the longest prompt, never reduced.
    """
    inner = model.model if isinstance(model, RandomKeep) else model
    n_layers = inner.config.text_config.num_hidden_layers
    batch = data.prompt_inputs(torch.arange(min(len(data), 8)))
    n_text = int(batch["attention_mask"].sum(1).max()) - n_visual
    current, after = n_visual, {}
    if variant.random_keep is not None:
        current = variant.random_keep
    elif variant.patch is not None:
        model(**batch, logits_to_keep=1)
        after = {count.layer: count.image for count in pumer_patch.last_trace(model).counts}
        if variant.patch.get("where") == "input":
            current, after = after[0], {}
    image = [current]
    for layer in range(n_layers):
        current = after.get(layer, current)
        image.append(current)
    return {"image": image, "text": [n_text] * (n_layers + 1)}
