"""The registry of tiny models that the contract suite (``test_contract.py``) and ``test_threads.py`` run.

One ``Entry`` per model: how to build it (tiny, random, seeded, in eval mode), its inputs, how to call
it and read one comparable tensor, the patch that reduces it, and what it can do (save_pretrained,
text, a training loss of its own, gradient checkpointing). A new family joins by adding entries here;
every contract check then runs on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import open_clip
import timm
import torch
from open_clip.model import CLIP
from torch import Tensor, nn
from transformers import (
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForImagesAndTextClassification,
    ViltForMaskedLM,
    ViltForQuestionAnswering,
    ViltForTokenClassification,
    ViltModel,
)
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from pumer_patch.adapters import get_adapter
from pumer_patch.models.meter import (
    MeterConfig,
    MeterForImageAndTextRetrieval,
    MeterForQuestionAnswering,
    MeterForVisualReasoning,
)

__all__ = ["ENTRIES", "Entry", "blocks", "by_name"]


@dataclass(frozen=True)
class Entry:
    """One tiny model of a family and what the contract suite needs to know about it.

    build(): the model, eval mode, weights from a fixed seed. inputs(batch, seed, text): keyword
    inputs; ``text`` is the text length, used by families with text. output(model, inputs): one tensor
    to compare (the caller picks grad / no_grad). mlp(block): a sub-module every block runs once per
    forward, plain and reduce blocks alike (checkpointing is counted on it). checkpointing(model):
    switch the model's own gradient checkpointing on. patch: ``apply`` keywords that prune and merge.
    exact_options: options without which a reducing patch cannot be bit-equal to the library even when
    it removes no token (ViLT's raster patch order changes the summation order). loss(model, inputs):
    the head's own training loss, None to train on ``output``. random_patch_order: the unpatched model
    draws its patch order from the global RNG (ViLT), so two threads get orders that differ and
    outputs that agree only to float rounding. bad_options: family-specific rows of the bad-input
    table, (apply keywords, error, match). compile: the entry of its family that torch.compile checks.
    query(model, inputs): a text query for ``text_guidance`` (its joint-space text features), None
    where the model has no tower that takes one.
    """

    name: str
    family: str
    build: Callable[[], nn.Module]
    inputs: Callable[..., dict[str, Any]]
    output: Callable[[nn.Module, dict[str, Any]], Tensor]
    mlp: Callable[[nn.Module], nn.Module]
    checkpointing: Callable[[nn.Module], None]
    patch: dict[str, Any]
    text: bool = False
    save_pretrained: bool = False
    exact_options: dict[str, Any] = field(default_factory=dict)
    loss: Callable[[nn.Module, dict[str, Any]], Tensor] | None = None
    random_patch_order: bool = False
    bad_options: tuple[tuple[dict[str, Any], type[Exception], str], ...] = ()
    compile: bool = False
    query: Callable[[nn.Module, dict[str, Any]], Tensor] | None = None

    def __str__(self) -> str:
        return self.name


def blocks(entry: Entry, model: nn.Module) -> list[nn.Module]:
    """The blocks ``layers=[...]`` indexes, as the family's adapter lists them (first root)."""
    adapter = get_adapter(entry.family)
    return list(adapter.blocks(adapter.roots(model)[0]))


# ---------------------------------------------------------------------------------------------
# ViLT: every head; 6 layers, 12 text tokens, 64 patches of 8 x 8 + image [CLS]
# ---------------------------------------------------------------------------------------------

VILT_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=64,
    patch_size=8,
    max_position_embeddings=24,
    vocab_size=50,
    num_labels=3,
    num_images=2,
    modality_type_vocab_size=3,  # NLVR2 marks its second image with token type 2
    hidden_dropout_prob=0.1,  # in training only: checkpointing must replay the same dropout
    attention_probs_dropout_prob=0.1,
)


def _vilt_builder(cls: type[nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(ViltConfig(**VILT_CONFIG)).eval()

    return build


def _vilt_inputs(images: int) -> Callable[..., dict[str, Any]]:
    def inputs(batch: int = 2, seed: int = 0, text: int = 12) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 50, (batch, text), generator=g)
        shape = (batch, 3, 64, 64) if images == 1 else (batch, images, 3, 64, 64)
        return {"input_ids": ids, "pixel_values": torch.randn(*shape, generator=g)}

    return inputs


def _vilt_output(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    torch.manual_seed(123)  # ViLT samples its patch order with torch.multinomial
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _vilt_lm_loss(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    labels = torch.full(inputs["input_ids"].shape, -100)
    labels[:, 3] = 7  # a masked-LM target at one text position
    torch.manual_seed(123)
    return model(**inputs, labels=labels).loss


def _vilt_vqa_loss(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    torch.manual_seed(123)
    return model(**inputs, labels=torch.linspace(0, 1, 3).expand(inputs["input_ids"].shape[0], -1)).loss


def hf_checkpointing(model: nn.Module) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (deprecated, same switch)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


_VILT_BAD = (
    ({"layers": [1], "prune_ratio": 0.1, "fixed_patch_order": "yes"}, TypeError, "fixed_patch_order"),
    ({"layers": [1], "prune_ratio": 0.1, "attention": "flash"}, ValueError, "attention must be 'eager'"),
    ({"layers": [1], "prune_ratio": 0.1, "merge_schedule": 4}, ValueError, "unknown option"),
)


def _vilt(cls: type[nn.Module], suffix: str = "", options: dict[str, Any] | None = None, **kwargs: Any) -> Entry:
    nlvr2 = cls is ViltForImagesAndTextClassification
    return Entry(
        name=f"vilt-{cls.__name__.removeprefix('Vilt')}{suffix}",
        family="vilt",
        build=_vilt_builder(cls),
        inputs=_vilt_inputs(2 if nlvr2 else 1),
        output=_vilt_output,
        mlp=lambda layer: layer.intermediate,
        checkpointing=hf_checkpointing,
        patch=dict(layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.2, **(options or {})),
        text=True,
        save_pretrained=True,
        exact_options={"fixed_patch_order": False},
        random_patch_order=True,
        bad_options=_VILT_BAD,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# timm: 4 blocks, 16 patches of 8 x 8 on 32 x 32 images, every prefix and pooling kind
# ---------------------------------------------------------------------------------------------

TIMM_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def _timm_builder(name: str, **overrides: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=5, **{**TIMM_TINY, **overrides}).eval()

    return build


def _images(batch: int = 2, seed: int = 0, text: int = 0) -> dict[str, Any]:
    return {"x": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


_VIT_BAD = (
    ({"layers": [], "merge_schedule": [1, 2]}, ValueError, "merge_schedule has 2 entries .* 4 blocks"),
    ({"layers": [], "merge_schedule": -1}, ValueError, "non-negative ints"),
    ({"layers": [], "merge_schedule": "8"}, TypeError, "merge_schedule must be an int"),
    ({"merge_schedule": 2, "mode": "reference"}, ValueError, "mode='reference' reproduces .* use mode='default'"),
    ({"layers": [1], "prune_ratio": 0.1, "mode": "reference"}, ValueError, r"moves the \[CLS\]"),
    ({"layers": [1], "prune_ratio": 0.1, "relevance": "text"}, ValueError, "relevance must be"),
    ({"layers": [1], "prune_ratio": 0.1, "fixed_patch_order": True}, ValueError, "unknown option"),
)


def _timm(name: str, model: str, compile: bool = False, **overrides: Any) -> Entry:
    return Entry(
        name=f"timm-{name}",
        family="timm",
        build=_timm_builder(model, **overrides),
        inputs=_images,
        output=lambda m, inputs: m(inputs["x"]),
        mlp=lambda block: block.mlp,
        checkpointing=lambda m: m.set_grad_checkpointing(),
        patch=dict(layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3),
        bad_options=_VIT_BAD,
        compile=compile,
    )


def _timm_eva_builder(name: str, **overrides: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = _timm_builder(name, **overrides)()
        with torch.no_grad():  # BEiT starts its relative bias tables at zero: make the positions count
            for param_name, param in model.named_parameters():
                if "relative_position_bias_table" in param_name:
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        return model

    return build


def _timm_eva(name: str, model: str, compile: bool = False, **overrides: Any) -> Entry:
    """timm's Eva and Beit (family ``timm_eva``): RoPE or relative bias, registers, SwiGLU, post-norm."""
    bad = (({"layers": [1], "merge_ratio": 0.1, "merge_position": "centre"}, ValueError, "merge_position must be"),)
    return Entry(
        name=f"timm_eva-{name}",
        family="timm_eva",
        build=_timm_eva_builder(model, **overrides),
        inputs=_images,
        output=lambda m, inputs: m(inputs["x"]),
        mlp=lambda block: block.mlp,
        checkpointing=lambda m: m.set_grad_checkpointing(),
        patch=dict(layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3),
        bad_options=_VIT_BAD + bad,
        compile=compile,
    )


# ---------------------------------------------------------------------------------------------
# open_clip: the image tower of a CLIP (4 blocks, 16 patches + [CLS]) and a CoCa-style tower alone
# ---------------------------------------------------------------------------------------------

CLIP_TEXT = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=2)
CLIP_VISION = dict(image_size=32, patch_size=8, width=32, layers=4, head_width=16)


def _clip_builder(vision: dict[str, Any], text: dict[str, Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return CLIP(embed_dim=24, vision_cfg={**CLIP_VISION, **vision}, text_cfg={**CLIP_TEXT, **text}).eval()

    return build


def _clip_inputs(batch: int = 2, seed: int = 0, text: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch, 3, 32, 32, generator=g), "text": torch.randint(1, 50, (batch, 8), generator=g)}


def _clip_output(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    image_features, text_features = model(inputs["image"], inputs["text"])[:2]  # (B, 24) each
    return torch.cat([image_features, text_features])


def _coca_tower() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=4, heads=2, mlp_ratio=4.0, output_dim=24, output_tokens=True,
        attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2,
    ).eval()


def _open_clip_query(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    return model.encode_text(inputs["text"])


def _open_clip(name: str, build: Callable[[], nn.Module], inputs: Callable[..., dict[str, Any]],
               output: Callable[[nn.Module, dict[str, Any]], Tensor], compile: bool = False,
               query: Callable[[nn.Module, dict[str, Any]], Tensor] | None = None) -> Entry:
    return Entry(
        name=f"open_clip-{name}",
        family="open_clip",
        build=build,
        inputs=inputs,
        output=output,
        mlp=lambda block: block.mlp,
        checkpointing=lambda m: m.set_grad_checkpointing(),
        patch=dict(layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3),
        bad_options=_VIT_BAD,
        compile=compile,
        query=query,
    )


# ---------------------------------------------------------------------------------------------
# transformers ViTs (hf_vit): 4 layers, 16 patches of 8 x 8 on 32 x 32 images, eager and SDPA
# ---------------------------------------------------------------------------------------------

HF_VISION = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8)
HF_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50,
               max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _hf_config(cls: type[nn.Module]) -> Any:
    """A tiny config of ``cls``'s family; dropouts (training only) where the family has them."""
    if cls in (CLIPVisionModel, CLIPVisionModelWithProjection):
        return CLIPVisionConfig(**HF_VISION, intermediate_size=64, projection_dim=24, attention_dropout=0.1)
    if cls is CLIPModel:
        vision = CLIPVisionConfig(**HF_VISION, intermediate_size=64)
        return CLIPConfig(vision_config=vision.to_dict(), text_config=HF_TEXT, projection_dim=24)
    if cls is SiglipVisionModel:
        return SiglipVisionConfig(**HF_VISION, intermediate_size=64)
    if cls in (SiglipModel, SiglipForImageClassification):
        vision = SiglipVisionConfig(**HF_VISION, intermediate_size=64)
        return SiglipConfig(vision_config=vision.to_dict(), text_config=HF_TEXT, num_labels=3)
    if cls in (Dinov2Model, Dinov2ForImageClassification):
        return Dinov2Config(**HF_VISION, mlp_ratio=2, num_labels=3, layerscale_value=0.5, drop_path_rate=0.1)
    if cls is Dinov2WithRegistersForImageClassification:
        return Dinov2WithRegistersConfig(**HF_VISION, mlp_ratio=2, num_labels=3, num_register_tokens=2)
    return ViTConfig(**HF_VISION, intermediate_size=64, num_labels=3, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1)


def hf_builder(cls: type[nn.Module], attention: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls._from_config(_hf_config(cls), attn_implementation=attention).eval()

    return build


def hf_images(batch: int = 2, seed: int = 0, text: int = 0) -> dict[str, Any]:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def hf_image_text(batch: int = 2, seed: int = 0, text: int = 8) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (batch, text), generator=g)
    ids[:, -1] = 2  # CLIP pools its text at the end-of-text token
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "input_ids": ids}


def _hf_output(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    out = model(**inputs)
    if hasattr(out, "logits_per_image"):  # CLIPModel / SiglipModel: both embeddings
        return torch.cat([out.image_embeds, out.text_embeds])
    for name in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out.last_hidden_state


def _hf_query(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    return model.get_text_features(input_ids=inputs["input_ids"]).pooler_output


def _hf_vit(cls: type[nn.Module], attention: str = "eager", **kwargs: Any) -> Entry:
    text = cls in (CLIPModel, SiglipModel)
    return Entry(
        name=f"hf-{cls.__name__}" + ("" if attention == "eager" else f"-{attention}"),
        family="hf_vit",
        build=hf_builder(cls, attention),
        inputs=hf_image_text if text else hf_images,
        output=_hf_output,
        mlp=lambda layer: layer.mlp,
        checkpointing=hf_checkpointing,
        patch=dict(layers=[1, 2], prune_ratio=0.2, merge_ratio=0.3),
        bad_options=_VIT_BAD,
        query=_hf_query if text else None,
        **{"save_pretrained": True, **kwargs},
    )


# ---------------------------------------------------------------------------------------------
# METER: 4 fusion blocks over a 3-block CLIP tower (16 patches + [CLS]) and a 2-layer RoBERTa
# ---------------------------------------------------------------------------------------------

METER_CONFIG = dict(
    image_size=32, vit_patch_size=8, hidden_size=32, num_heads=2, num_layers=2, num_top_layer=4, vocab_size=50,
    vision_width=24, vision_layers=3, vision_heads=2, text_hidden_size=16, text_intermediate_size=32,
    max_position_embeddings=42, vqa_label_size=5, token_types=3,  # drop_rate 0.1: dropout in training
)


def _meter_builder(cls: type[nn.Module], **overrides: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(MeterConfig(**{**METER_CONFIG, **overrides})).eval()

    return build


def _meter_inputs(images: int) -> Callable[..., dict[str, Any]]:
    def inputs(batch: int = 2, seed: int = 0, text: int = 12) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 50, (batch, text), generator=g)
        mask = torch.ones(batch, text, dtype=torch.long)
        mask[-1, text // 2 :] = 0  # the last sample is padded
        shape = (batch, 3, 32, 32) if images == 1 else (batch, images, 3, 32, 32)
        return {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask, "pixel_values": torch.randn(*shape, generator=g)}

    return inputs


_METER_BAD = (
    ({"layers": [], "encoder_merge_schedule": 2, "mode": "reference"}, ValueError, "encoder_merge_schedule is ToMe's"),
    ({"layers": [], "encoder_merge_schedule": [1, 2]}, ValueError, "merge_schedule has 2 entries"),
    ({"layers": "p0.3r0.5t0.2-13"}, ValueError, "layer 1 is odd"),
    ({"layers": [1], "prune_ratio": 0.1, "merge_schedule": 4}, ValueError, "unknown option"),
)


def _meter(cls: type[nn.Module], suffix: str = "", options: dict[str, Any] | None = None, **kwargs: Any) -> Entry:
    return Entry(
        name=f"meter-{cls.__name__.removeprefix('MeterFor')}{suffix}",
        family="meter",
        build=_meter_builder(cls, **kwargs.pop("config", {})),
        inputs=_meter_inputs(2 if cls is MeterForVisualReasoning else 1),
        output=lambda m, inputs: m(**inputs).logits,
        mlp=lambda layer: layer.intermediate,
        checkpointing=hf_checkpointing,
        patch=dict(layers=[1, 3], prune_ratio=0.2, merge_ratio=0.3, text_merge_ratio=0.2, **(options or {})),
        text=True,
        save_pretrained=True,
        bad_options=_METER_BAD,
        **kwargs,
    )


ENTRIES: list[Entry] = [
    _vilt(ViltModel),
    _vilt(ViltForQuestionAnswering, loss=_vilt_vqa_loss, compile=True),
    _vilt(ViltForQuestionAnswering, "-sdpa", {"attention": "sdpa"}, loss=_vilt_vqa_loss),
    _vilt(ViltForImagesAndTextClassification),
    _vilt(ViltForImageAndTextRetrieval),
    _vilt(ViltForMaskedLM, loss=_vilt_lm_loss),
    _vilt(ViltForTokenClassification),
    _timm("vit", "vit_tiny_patch16_224", compile=True),
    _timm("deit_distilled", "deit_tiny_distilled_patch16_224"),  # [CLS] + distillation token
    _timm("registers", "vit_tiny_patch16_224", reg_tokens=4, qk_norm=True, init_values=0.1,
          drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1),  # dropouts: training only
    _timm("siglip_map", "vit_base_patch16_siglip_224"),  # no [CLS], latent attention pool
    _timm("avg_no_cls", "test_vit2", init_values=0.1),  # no [CLS], 1 register, avg pool
    _timm("avgmax", "vit_tiny_patch16_224", global_pool="avgmax"),
    _timm("clip_pre_norm", "vit_base_patch32_clip_224"),
    # timm_eva: RoPE + 4 registers + SwiGLU + qk norm + layer scale, dropouts in training only
    _timm_eva("rope_reg_swiglu", "vit_betwixt_patch16_rope_reg4_gap_256", swiglu_mlp=True, qk_norm=True,
              init_values=0.1, drop_path_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1),
    _timm_eva("eva02", "eva02_tiny_patch14_224", compile=True),  # [CLS], abs + rope, SwiGLU with norm
    _timm_eva("dinov3", "vit_small_patch16_dinov3"),  # [CLS] + 4 registers, rope 'dinov3', layer scale
    _timm_eva("pe", "vit_pe_core_tiny_patch16_384"),  # AttentionRope, latent attention pool
    _timm_eva("rope_mixed", "vit_small_patch16_rope_mixed_224"),  # learned per-block, per-head frequencies
    _timm_eva("eva02_post_norm", "eva02_enormous_patch14_clip_224"),  # EvaBlockPostNorm, [CLS] pooled
    _timm_eva("beit", "beit_base_patch16_224"),  # relative bias in every block, layer scale, avg pool
    _timm_eva("beit_shared", "beit_base_patch16_224", use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
              global_pool="token"),
    # ViT-B-32's layout, shrunk; training drops 4 of 16 patches before the blocks
    _open_clip("vit_b32", _clip_builder(dict(patch_dropout=0.25), {}), _clip_inputs, _clip_output, compile=True,
               query=_open_clip_query),
    _open_clip(  # CLIPA: average pooling, final LayerNorm after pooling, no ln_pre
        "clipa_avg",
        _clip_builder(dict(pool_type="avg", final_ln_after_pool=True, no_ln_pre=True),
                      dict(pool_type="last", no_causal_mask=True)),
        _clip_inputs,
        _clip_output,
        query=_open_clip_query,
    ),
    _open_clip("coca_tower", _coca_tower, _images, lambda m, inputs: m(inputs["x"])[0]),  # attentional pooler
    _hf_vit(CLIPVisionModel, compile=True),
    _hf_vit(CLIPVisionModelWithProjection, "sdpa"),
    _hf_vit(CLIPModel, "sdpa"),  # the image tower reduces, the text tower is left alone
    # no [CLS], attention-pooling head; a save_pretrained round trip moves it by 3e-7 even unpatched (the tolerance is 1e-7)
    _hf_vit(SiglipVisionModel, save_pretrained=False),
    _hf_vit(SiglipModel, "sdpa"),
    _hf_vit(SiglipForImageClassification),
    _hf_vit(Dinov2Model, "sdpa"),
    _hf_vit(Dinov2ForImageClassification),  # [CLS] + mean of the patch tokens, layer scale, drop path
    _hf_vit(Dinov2WithRegistersForImageClassification, "sdpa"),  # 2 registers
    _hf_vit(ViTModel),
    _hf_vit(ViTForImageClassification, "sdpa"),
    _meter(MeterForQuestionAnswering, compile=True),
    _meter(MeterForQuestionAnswering, "-additive-parallel", config={"fusion_masking": "additive", "fusion_order": "parallel"}),
    _meter(MeterForQuestionAnswering, "-encoder_tome", {"encoder_merge_schedule": 2}),
    _meter(MeterForVisualReasoning),
    _meter(MeterForImageAndTextRetrieval),
]


def by_name(name: str) -> Entry:
    return next(e for e in ENTRIES if e.name == name)
