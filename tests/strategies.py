"""Hypothesis strategies for the core tests: shapes, seeds, ratios and dtypes, in one module.

Strategies draw plain values only (sizes, a dtype, a seed, ratios); every tensor of an example is
built from ``torch.Generator().manual_seed(case.seed)``, so a failing example replays exactly from
what hypothesis prints and shrinks on the shape, not on tensor contents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from pumer_patch import Ratios

__all__ = [
    "DTYPES",
    "Case",
    "cases",
    "dtypes",
    "randn",
    "ratio_triples",
    "ratios",
    "seeds",
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from(DTYPES)


def ratios(max_value: float = 0.95) -> st.SearchStrategy[float]:
    """Ratios in [0, max_value]: exact 0, a grid of twentieths (hits the .5 ties of ``round``), any float."""
    grid = st.integers(0, int(max_value * 20)).map(lambda k: k / 20)
    return st.one_of(st.just(0.0), grid, st.floats(0.0, max_value))


def ratio_triples(max_value: float = 0.95) -> st.SearchStrategy[Ratios]:
    """``Ratios(prune, merge, text_merge)``, each drawn by ``ratios``."""
    return st.builds(Ratios, ratios(max_value), ratios(max_value), ratios(max_value))


@dataclass(frozen=True)
class Case:
    """One drawn example: image tokens (batch, tokens, channels), text tokens (batch, text, channels)."""

    batch: int
    tokens: int
    channels: int
    text: int
    dtype: torch.dtype
    seed: int

    def generator(self) -> torch.Generator:
        """A fresh generator; call once per example and draw every tensor from it in a fixed order."""
        return torch.Generator().manual_seed(self.seed)

    def image(self, g: torch.Generator) -> torch.Tensor:
        """Image features (B, N, C) in the case's dtype."""
        return randn(g, (self.batch, self.tokens, self.channels), self.dtype)

    def text_x(self, g: torch.Generator) -> torch.Tensor:
        """Text features (B, T, C) in the case's dtype."""
        return randn(g, (self.batch, self.text, self.channels), self.dtype)

    def metric(self, g: torch.Generator, n: int | None = None, dim: int = 8) -> torch.Tensor:
        """Merge similarity features (B, n, dim), float32; ``n`` defaults to the image tokens."""
        return randn(g, (self.batch, self.tokens if n is None else n, dim), torch.float32)

    def relevance(self, g: torch.Generator, levels: int | None = None) -> torch.Tensor:
        """Relevance (B, N) in float32: uniform, or drawn from ``levels`` values so that ties abound."""
        shape = (self.batch, self.tokens)
        if levels is None:
            return torch.rand(shape, generator=g)
        return torch.randint(0, levels, shape, generator=g).float()


def randn(g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Standard normal values drawn in float32 from ``g`` and cast to ``dtype``."""
    return torch.randn(shape, generator=g).to(dtype)


@st.composite
def cases(
    draw: st.DrawFn,
    min_tokens: int = 1,
    max_tokens: int = 600,
    max_batch: int = 8,
    min_text: int = 1,
    max_text: int = 40,
    max_channels: int = 16,
    dtype: st.SearchStrategy[torch.dtype] = dtypes,
) -> Case:
    """A ``Case`` with batch 1..max_batch, tokens and text in range, channels 1..max_channels."""
    return Case(
        batch=draw(st.integers(1, max_batch)),
        tokens=draw(st.integers(min_tokens, max_tokens)),
        channels=draw(st.integers(1, max_channels)),
        text=draw(st.integers(min_text, max_text)),
        dtype=draw(dtype),
        seed=draw(seeds),
    )
