"""What the study measures besides accuracy: token counts per layer and interleaved CPU throughput."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import pumer_patch
from pumer_patch.models.meter import MeterForQuestionAnswering

__all__ = ["tokens_per_layer", "measure_throughput"]

@torch.inference_mode()
def tokens_per_layer(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, list[int]]:
    """Image and text token counts leaving each encoder layer (the input counts come first).

    From the patch's trace for a patched model (counts depend only on shapes, so one batch tells);
    the unpatched model keeps the ``1 + patches`` image and ``T`` text tokens throughout. METER's
    "layers" are its fusion blocks, and its lists have one more entry: the tower's input, the tokens
    entering the fusion blocks (fewer with ToMe in the tower; the text tower keeps its ``T``), then
    after each fusion block.
    """
    model.eval()
    model(**batch)
    if isinstance(model, MeterForQuestionAnswering):
        return _meter_tokens(model, batch)
    config = model.config
    n_image = 1 + (config.image_size // config.patch_size) ** 2
    n_text = batch["input_ids"].shape[1]
    after = {}
    if pumer_patch.is_patched(model):
        after = {c.layer: (c.image, c.text) for c in pumer_patch.last_trace(model).counts}
    image, text = [n_image], [n_text]
    for i in range(config.num_hidden_layers):
        n_image, n_text = after.get(i, (n_image, n_text))
        image.append(n_image)
        text.append(n_text)
    return {"image": image, "text": text}


def _meter_tokens(model: MeterForQuestionAnswering, batch: Mapping[str, Tensor]) -> dict[str, list[int]]:
    """``tokens_per_layer`` for a METER whose last forward ran on ``batch``."""
    config = model.config
    n_text = batch["input_ids"].shape[1]
    after = {}
    if pumer_patch.is_patched(model):
        after = {c.layer: (c.image, c.text) for c in pumer_patch.last_trace(model).counts}
    n_image = model.meter.encode_image(batch["pixel_values"]).shape[1]  # (B, N', C): after the tower's merging
    image, text = [1 + (config.image_size // config.vit_patch_size) ** 2, n_image], [n_text, n_text]
    for k in range(config.num_top_layer):
        n_image, n_text = after.get(k, (n_image, n_text))
        image.append(n_image)
        text.append(n_text)
    return {"image": image, "text": text}


@torch.inference_mode()
def measure_throughput(
    models: Mapping[str, nn.Module],
    batches: Sequence[Mapping[str, Tensor]],
    *,
    rounds: int,
    warmup: int,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Seconds for one pass over ``batches``, per model and round, all under the same conditions.

    Every model runs the same batches with the same threads. After ``warmup`` batches each, the
    models take turns: in every round each makes one timed pass, in an order rotated from round to
    round, so drift in the machine's load (other processes, clocks) hits all of them alike.
    """
    names = list(models)
    for name in names:
        models[name].eval()
        for batch in batches[:warmup]:
            models[name](**batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(rounds), desc="timing", disable=not progress, unit="round", dynamic_ncols=True):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for batch in batches:
                models[name](**batch)
            times[name].append(time.perf_counter() - start)
    return times
