"""Token sizes of reduced features: the one channel through which they outlive a forward.

A merged token stands for several original tokens (its *size*), and whatever averages over tokens
later (a pooling head, METER's fusion, a FLOP count) must weigh it by that size. Inside one forward
of a patched model the sizes travel with the tokens. Where features leave the model and come back
in another call (timm ``forward_features`` then ``forward_head``; METER ``encode_image`` then
``fuse``; a cache of image features), they travel with the feature tensor itself:

* ``with_token_sizes(features, sizes)`` records that each token of ``features`` (B, N, C) stands for
  ``sizes`` (B, N) original tokens, and returns ``features``;
* ``token_sizes(features)`` gives them back (None for a tensor nothing was recorded for);
* ``require_token_sizes(features, consumer=..., merged=...)`` is what a consumer calls: the sizes,
  None when the model merged nothing (every size is one), and ``TokenSizesLost`` when the model
  merged and the sizes are gone.

The record is keyed by the tensor object (weakly: it goes with the tensor), so each call's features
carry their own sizes and two threads never see each other's. A new tensor made from the features
(``.clone()``, ``.cpu()``, slicing, ``torch.cat``, ``repeat_interleave``, a hook that returns a new
tensor) carries nothing: attach the sizes that go with it, e.g.
``with_token_sizes(feats.repeat_interleave(k, 0), token_sizes(feats).repeat_interleave(k, 0))``.
"""

from __future__ import annotations

from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["TokenSizesLost", "require_token_sizes", "token_sizes", "with_token_sizes"]

# features (B, N, C) -> their token sizes (B, N); weak, so a dropped batch takes its entry with it
_SIZES: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


class TokenSizesLost(ValueError):
    """Merged tokens reached a consumer that weighs tokens by size, without their sizes."""


def with_token_sizes(features: Tensor, sizes: Tensor | None) -> Tensor:
    """Record that each token of ``features`` (B, N, ...) stands for ``sizes`` (B, N) tokens; returns ``features``.

    ``sizes=None`` records nothing (the tokens were not merged).
    """
    if sizes is not None:
        if tuple(sizes.shape) != tuple(features.shape[:2]):
            raise ValueError(
                f"sizes must be (B, N) = {tuple(features.shape[:2])} for features of shape {tuple(features.shape)}, "
                f"got {tuple(sizes.shape)}"
            )
        _SIZES[features] = sizes
    return features


def token_sizes(features: Tensor) -> Tensor | None:
    """The token sizes (B, N) recorded for ``features`` by ``with_token_sizes``; None if there are none."""
    return _SIZES.get(features)


def require_token_sizes(features: Tensor, *, consumer: str, merged: bool) -> Tensor | None:
    """The sizes a size-weighing ``consumer`` needs for ``features``.

    merged: whether the patched model merges tokens (when it does not, every size is one and None is
    returned for a tensor without sizes). Raises ``TokenSizesLost`` when it merges and the sizes are gone.
    """
    sizes = token_sizes(features)
    if sizes is None and merged:
        raise TokenSizesLost(
            f"{consumer} got features whose token sizes are unknown: they are not the tensor the "
            "pumer_patch-reduced model returned (copied, moved, sliced, replaced by a hook or made elsewhere), so "
            "its merged tokens would be weighed wrongly. Pass the model's output as it is, or attach the sizes "
            "that go with the new tensor: pumer_patch.with_token_sizes(new, pumer_patch.token_sizes(original))"
        )
    return sizes
