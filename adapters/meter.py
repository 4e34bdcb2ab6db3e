"""METER (``pumer_patch.models.meter``): PuMer inside the fusion blocks, ToMe inside the CLIP image tower.

A METER fusion block is a text layer and an image layer, each self-attention, cross-attention and FFN.
PuMer reduces inside the *text* layer of a planned block, after its cross-attention and before its
FFN (``docs/design.md``, "Models"):

* relevance of image token j: the text-to-image cross-attention of that layer, mean over heads,
  summed over the text rows, divided by the real text length;
* image merge metric: the cross-attention keys of the image states (mean over heads); text metric:
  the text self-attention keys;
* the block's *input* image states are pruned and merged, so the same block's image layer already
  runs on fewer tokens; the text states are merged before the text FFN.

``layers=[...]`` index fusion blocks (0-5). A paper config string keeps the research code's
numbering, which counts two per fusion block: ``apply(meter, "p0.3r0.5t0.2-0246")`` reduces blocks
0-3 and ``"...-246"`` blocks 1-3 (an odd digit is an error). ``pumer_patch.apply_from_config`` reads
the reduction a PuMer checkpoint folder's config names.

Modes: ``reference`` reproduces the research code (sizes not carried, survivors in relevance order,
so the image pooler reads the most relevant survivor; the fractional text mask in both
cross-attentions; a block prunes only when its merge count is > 0 too, and merges text or image only
when its prune ratio is > 0: the core's ``research="meter"`` rules). One edge differs: where 0 < p
but round(p * N) == 0 (only N < 1 / (2p), tiny models) the research code still sorts the image by
relevance and merges; here the block reduces nothing, as in ViLT's research code. ``default``
carries sizes into proportional attention (``log(size)`` on the keys of self- and cross-attention),
protects the image [CLS] and keeps spatial order.

Option ``encoder_merge_schedule`` (default mode only): ToMe's r per block of the CLIP image tower
(an int for every block, or one per block). The tower is most of METER's FLOPs at 384 pixels and the
paper's configs leave it alone; merged image tokens enter the fusion blocks with their sizes, which
travel with the features ``encode_image`` returns (``pumer_patch.token_sizes``), and ``fuse`` raises
``TokenSizesLost`` for image features that lost them (a copy; attach them with ``with_token_sizes``).

Option ``unmerge_text`` (default: on exactly for ``MeterForPreTraining``, whose MLM head reads one
row per input id): the fused text leaves ``fuse`` spread back over the positions its merged tokens
stand for (as ViLT's ``unmerge_text``); the poolers read the text [CLS], which is never merged.

NLVR2's two passes each reduce on their own. The fusion order (sequential / parallel) and masking
(pumer / additive) are the model config's; the adapter calls each layer's own parts, and runs the
layer's forward hooks and pre-hooks around them as its own call would (``_loop.call_as_block``: a
text layer's hooks see the text it receives and returns; backward hooks on the fusion layers, and on
the tower blocks ``encoder_merge_schedule`` merges at, are refused).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from pumer_patch.core import Mode, Tokens, reduce_tokens, reduces_layer, text_to_image_relevance, unmerge
from pumer_patch.models.meter import (
    MeterAttention,
    MeterForPreTraining,
    MeterFusionLayer,
    MeterModel,
    MeterVisionTower,
)
from pumer_patch.ratios import Ratios
from pumer_patch.sizes import require_token_sizes, with_token_sizes

from ._loop import (
    CallScope,
    Policy,
    Recorder,
    call_as_block,
    check_tokens,
    hidden_argument,
    reduce_blocks,
    refuse_backward_hooks_on,
    run_blocks,
    start,
)
from ._vit import VitOptions, resolve_vit_options
from .base import SHARED_ATTR, STATE_ATTR, Adapter, PatchState, Plan, Trace, ensure_class, record_trace
from .open_clip import OpenClipBlockStep

__all__ = ["MeterAdapter", "MeterOptions", "PumerMeterModel", "PumerMeterVisionTower"]


@dataclass(frozen=True)
class MeterOptions:
    """METER's options (see the module docstring).

    encoder_merge_schedule: ToMe's r per CLIP tower block (an int for every block, or one per block).
    unmerge_text: spread merged text tokens back over the text positions they stand for when the
        fusion returns, so the text features have one row per input id; None (default): exactly when
        the model has a head that reads every text position (``MeterForPreTraining``'s MLM head).
    """

    encoder_merge_schedule: int | Sequence[int] | None = None
    unmerge_text: bool | None = None


@dataclass
class _ImageCall:
    size: Tensor | None = None  # (B, N') sizes of the tower's output tokens


_IMAGE_CALL: CallScope[_ImageCall] = CallScope("pumer_patch_meter_image_call")


_CLIP_STEP = OpenClipBlockStep()


class PumerMeterVisionTower(MeterVisionTower):
    """The CLIP tower with ToMe merging in its blocks (``encoder_merge_schedule``)."""

    _pumer_patched = True

    def run_blocks(self, x: Tensor) -> Tensor:
        state: PatchState = getattr(self, SHARED_ATTR)
        encoder = _encoder_plan(state.plan)
        if encoder is None:
            return super().run_blocks(x)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        tokens, _ = run_blocks(self.transformer.resblocks, x, encoder, _CLIP_STEP, protected=1,
                               checkpointing=checkpointing, name="MeterModel.vit_model.transformer.resblocks")
        call = _IMAGE_CALL.get(state)
        if call is not None:
            call.size = tokens.size
        return tokens.x


def _encoder_plan(plan: Plan) -> Plan | None:
    """The tower's own plan (ToMe's schedule, no ratios), or None when the tower merges nothing."""
    schedule = plan.options.encoder_merge_schedule
    if schedule is None:
        return None
    return Plan(schedule={}, mode="default", options=VitOptions(merge_schedule=schedule, relevance="cls"))


def _key_weight(tokens: Tokens) -> Tensor | None:
    """The key mask a METER attention takes: (B, N) float, fractional in reference mode, None if no padding."""
    return None if tokens.mask is None else tokens.mask.float()


def _log_sizes(policy: Policy, tokens: Tokens) -> Tensor | None:
    """log(size) per key (B, N), the ``key_bias`` a METER attention adds (proportional attention, default mode)."""
    if not policy.sizes or tokens.size is None:
        return None
    return tokens.size.log()


def _text_layer(
    layer: nn.Module,
    text: Tokens,
    image: Tokens,
    ratios: Ratios | None,
    policy: Policy,
    sized: bool,
    where: str,
) -> tuple[Tokens, Tokens]:
    """One fusion text layer, reducing after its cross-attention when ``ratios`` is given; its hooks around it.

    text: (B, T, C) entering the block; image: (B, N, C), the block's input image states.
    Returns the text layer's output tokens (B, T', C) (what its forward hooks made of them) and the
    image states (B, N', C) the block's image layer will read (reduced, or ``image`` unchanged).
    """
    given = ((text.x, image.x, _key_weight(text), _key_weight(image)), {})  # as MeterModel.fuse calls it
    done: dict[str, Any] = {}  # this call's streams, handed out of ``forward`` past the hooks

    def forward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        t = replace(text, x=hidden_argument(where, given, args, kwargs, text.size is not None))
        v = image
        text_bias = _log_sizes(policy, t) if sized else None
        image_bias = _log_sizes(policy, v) if sized else None
        own = layer.attention(t.x, key_weight=_key_weight(t), key_bias=text_bias)
        prunes = ratios is not None and ratios.prune > 0  # only pruning reads the probabilities (SDPA otherwise)
        cross = layer.crossattention(
            own.hidden, context=v.x, key_weight=_key_weight(v), key_bias=image_bias, output_probs=prunes
        )
        t = replace(t, x=cross.hidden)
        if ratios is not None:
            relevance = None
            if cross.probs is not None:
                with torch.no_grad():
                    relevance = text_to_image_relevance(cross.probs, t.mask, policy.mode)
            reduced = reduce_tokens(
                relevance, v, ratios, image_metric=cross.keys, text_tokens=t, text_metric=own.keys,
                mode=policy.mode, research="meter",
            )
            t, v = reduced.text, reduced.image
        done["text"], done["image"] = replace(t, x=layer.feed_forward(t.x)), v
        return done["text"].x

    out = call_as_block(layer, where, *given, forward)
    t = done["text"]
    return replace(t, x=check_tokens(where, "a forward hook", t.x, out, t.size is not None)), done["image"]


def _image_layer(layer: nn.Module, image: Tokens, text: Tokens, policy: Policy, sized: bool, where: str) -> Tokens:
    """One fusion image layer: image (B, N, C) attends to itself and to ``text`` (B, T, C); its hooks around it."""
    given = ((image.x, text.x, _key_weight(image), _key_weight(text)), {})  # as MeterModel.fuse calls it

    def forward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        x = hidden_argument(where, given, args, kwargs, image.size is not None)
        own = layer.attention(x, key_weight=_key_weight(image), key_bias=_log_sizes(policy, image) if sized else None)
        cross = layer.crossattention(
            own.hidden, context=text.x, key_weight=_key_weight(text),
            key_bias=_log_sizes(policy, text) if sized else None,
        )
        return layer.feed_forward(cross.hidden)

    out = call_as_block(layer, where, *given, forward)
    return replace(image, x=check_tokens(where, "a forward hook", image.x, out, image.size is not None))


class PumerMeterModel(MeterModel):
    """``MeterModel`` whose fusion reduces at the planned blocks and whose tower may merge (ToMe)."""

    _pumer_patched = True

    def encode_image(self, pixel_values: Tensor, image_token_type_idx: int = 1) -> Tensor:
        with _IMAGE_CALL.open(getattr(self, STATE_ATTR), _ImageCall()) as call:
            image = super().encode_image(pixel_values, image_token_type_idx)
        return with_token_sizes(image, call.size)

    def fuse(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        state: PatchState = getattr(self, STATE_ATTR)
        plan = state.plan
        size = require_token_sizes(image, consumer="MeterModel.fuse", merged=_encoder_plan(plan) is not None)
        if not plan.schedule and size is None:
            record_trace(state, Trace())
            return super().fuse(text, text_mask, image, image_mask)
        policy = Policy.of(plan.mode)
        loop = Recorder(plan, checkpointing=bool(getattr(self, "gradient_checkpointing", False)) and self.training
                        and torch.is_grad_enabled())
        unmerge_text = plan.options.unmerge_text
        t = start(policy, text, text_mask, text=True, source=plan.trace or unmerge_text)
        v = start(policy, image, image_mask, source=plan.trace)
        if size is not None:
            v = replace(v, size=size)
        sized = size is not None  # log(size) enters attention once some token stands for several
        sequential = self.config.fusion_order == "sequential"
        for k, (text_layer, image_layer) in enumerate(zip(self.cross_modal_text_layers, self.cross_modal_image_layers)):
            ratios = plan.schedule.get(k)
            if ratios is not None and not reduces_layer(ratios, plan.mode, "meter"):
                ratios = None
            names = [f"MeterModel.cross_modal_{stream}_layers[{k}] (MeterFusionLayer)" for stream in ("text", "image")]
            t_out, v = loop.run(_text_layer, text_layer, t, v, ratios, policy, sized, names[0])
            if ratios is not None:
                sized = sized or policy.sizes
                loop.count(k, v, t_out)
            v = loop.run(_image_layer, image_layer, v, t_out if sequential else t, policy, sized, names[1])
            t = t_out
        record_trace(state, loop.trace(v, t))
        if unmerge_text and t.count != text.shape[1]:
            # the MLM head reads one row per input id; the text [CLS], never merged, keeps the pooler's row
            return unmerge(t.x, t.source), v.x
        return t.x, v.x


# ``save_pretrained`` writes the instance's class ``__name__`` into config.architectures: a saved patched
# MeterModel must name the model's own class. Pickling resolves the class by ``__qualname__``.
PumerMeterModel.__name__ = "MeterModel"


def _paper_block(layer: int) -> int:
    if layer % 2:
        raise ValueError(
            f"METER paper configs count two layers per fusion block (reduce_layers [0, 2, 4, 6] = blocks 0-3); "
            f"layer {layer} is odd. Pass numeric layers=[...] to index fusion blocks directly"
        )
    return layer // 2


class MeterAdapter(Adapter):
    name = "meter"
    supports = "pumer_patch.models.meter.MeterModel and its heads (VQA, SNLI-VE, NLVR2, retrieval, pretraining)"
    Options = MeterOptions

    def roots(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, MeterModel)]

    def blocks(self, root: nn.Module) -> Sequence[nn.Module]:
        return root.cross_modal_text_layers

    def paper_layers(self, schedule: Mapping[int, Ratios]) -> dict[int, Ratios]:
        return {_paper_block(i): r for i, r in schedule.items()}

    def check(self, root: nn.Module) -> None:
        ensure_class(root, MeterModel, "the MeterModel", ("forward", "fuse", "encode_image"))
        ensure_class(root.vit_model, MeterVisionTower, "MeterModel.vit_model", ("forward", "run_blocks"))
        # the patched loop calls these parts itself: a change bound on one would be silently skipped
        for stream in ("text", "image"):
            for k, layer in enumerate(getattr(root, f"cross_modal_{stream}_layers")):
                where = f"MeterModel.cross_modal_{stream}_layers[{k}]"
                ensure_class(layer, MeterFusionLayer, where, ("forward", "feed_forward"))
                for part in ("attention", "crossattention"):
                    ensure_class(getattr(layer, part), MeterAttention, f"{where}.{part}")
        for k, block in enumerate(root.vit_model.transformer.resblocks):
            ensure_class(block, ResidualAttentionBlock, f"MeterModel.vit_model.transformer.resblocks[{k}]")

    def resolve_options(
        self, model: nn.Module, root: nn.Module, options: dict[str, Any], mode: Mode, schedule: dict[int, Ratios]
    ) -> MeterOptions:
        given = MeterOptions(**options)
        if given.unmerge_text is not None and not isinstance(given.unmerge_text, bool):
            raise TypeError(f"unmerge_text must be True or False, got {given.unmerge_text!r}")
        dense = any(isinstance(m, MeterForPreTraining) for m in model.modules())
        unmerge_text = dense if given.unmerge_text is None else given.unmerge_text
        if dense and not unmerge_text and any(r.text_merge > 0 for r in schedule.values()):
            raise ValueError(
                "MeterForPreTraining's MLM head reads every text position, but text merging with unmerge_text=False "
                "would give it fewer rows than input_ids; leave unmerge_text at its default (True for this head) or "
                "set text_merge_ratio=0"
            )
        encoder = given.encoder_merge_schedule
        if encoder is not None:
            if mode == "reference":
                raise ValueError(
                    "encoder_merge_schedule is ToMe's schedule, which the research code (mode='reference') has not; "
                    "use mode='default'"
                )
            blocks = root.vit_model.transformer.resblocks
            encoder = resolve_vit_options({"merge_schedule": encoder}, len(blocks), True, "cls", mode).merge_schedule
            refuse_backward_hooks_on(blocks, reduce_blocks({}, encoder), "MeterModel.vit_model.transformer.resblocks")
        if schedule or encoder is not None:  # the fusion then runs every layer in parts
            for stream in ("text", "image"):
                layers = getattr(root, f"cross_modal_{stream}_layers")
                refuse_backward_hooks_on(layers, range(len(layers)), f"MeterModel.cross_modal_{stream}_layers")
        return MeterOptions(encoder_merge_schedule=encoder, unmerge_text=unmerge_text)

    def swaps(self, root: nn.Module) -> list[tuple[nn.Module, type[nn.Module]]]:
        return [(root, PumerMeterModel), (root.vit_model, PumerMeterVisionTower)]

    def config_reduction(self, root: nn.Module) -> dict[str, Any] | None:
        """PuMer's ``prune_r``, ``merge_r``, ``merge_text``, ``reduce_layers`` (two per fusion block) -> ``apply`` arguments."""
        config = root.config
        layers = sorted(int(i) for i in (getattr(config, "reduce_layers", None) or []))
        ratios = Ratios(*(float(getattr(config, k, 0) or 0) for k in ("prune_r", "merge_r", "merge_text")))
        if not layers or ratios.is_zero:
            return None
        return {"layers": [_paper_block(i) for i in layers], "ratios": ratios, "mode": "reference"}
