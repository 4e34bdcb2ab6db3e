"""pumer-patch: prune and merge tokens in vision-language and vision transformers (PuMer, ACL 2023).

``pumer_patch.apply(model, layers=[2, 5, 8], prune_ratio=0.1, merge_ratio=0.3, text_merge_ratio=0.2)``
patches a model in place, per instance; ``pumer_patch.remove(model)`` undoes it. The families:

* vision-language: transformers ViLT (every head), METER (``pumer_patch.models.meter``);
* timm ``VisionTransformer`` (ViT, DeiT, DINO, CLIP and SigLIP trunks), timm ``Eva`` (EVA, EVA02,
  DINOv3, Perception Encoder) and ``Beit``;
* open_clip's own image towers (CLIP, CLIPA, CoCa);
* transformers CLIP, SigLIP, DINOv2 (with registers too) and ViT towers.

``last_trace`` and ``recording`` say what a forward did; ``token_sizes`` / ``with_token_sizes`` carry
merged tokens' sizes from a forward to a later head. The maths lives in ``pumer_patch.core`` and
knows no model.
"""

from .core import (
    MergePlan,
    Mode,
    Reduced,
    Tokens,
    apply_merge,
    attention_bias,
    gather_tokens,
    init_source,
    masked_softmax,
    merge_count,
    merge_plan,
    merge_tokens,
    prune_count,
    prune_indices,
    prune_tokens,
    query_relevance,
    reduce_tokens,
    reduced_counts,
    text_merge_count,
    text_to_image_relevance,
    unmerge,
)
from .patch import apply, apply_from_config, is_patched, last_trace, patched_roots, recording, remove
from .ratios import Ratios, RatiosLike, parse_config
from .sizes import TokenSizesLost, require_token_sizes, token_sizes, with_token_sizes

__version__ = "0.1.0"

__all__ = [
    "MergePlan",
    "Mode",
    "Ratios",
    "RatiosLike",
    "Reduced",
    "TokenSizesLost",
    "Tokens",
    "apply",
    "apply_from_config",
    "apply_merge",
    "attention_bias",
    "gather_tokens",
    "init_source",
    "is_patched",
    "last_trace",
    "masked_softmax",
    "merge_count",
    "merge_plan",
    "merge_tokens",
    "parse_config",
    "patched_roots",
    "prune_count",
    "prune_indices",
    "prune_tokens",
    "query_relevance",
    "recording",
    "reduce_tokens",
    "reduced_counts",
    "require_token_sizes",
    "remove",
    "text_merge_count",
    "text_to_image_relevance",
    "token_sizes",
    "unmerge",
    "with_token_sizes",
]
