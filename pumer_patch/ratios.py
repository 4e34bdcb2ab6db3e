"""Reduction ratios and the paper's config strings (``p0.1-r0.3-t0.2-258``)."""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Union

__all__ = ["Ratios", "RatiosLike", "parse_config"]

_NAMES = ("prune", "merge", "text_merge")
_RATIOS_RE = re.compile(r"^p(?P<p>\d*\.?\d+)-?r(?P<r>\d*\.?\d+)-?t(?P<t>\d*\.?\d+)$")
_CONFIG_RE = re.compile(r"^(?P<ratios>p\d*\.?\d+-?r\d*\.?\d+-?t\d*\.?\d+)-(?P<layers>\d+)$")


@dataclass(frozen=True)
class Ratios:
    """Fractions of the current tokens removed at one reduce layer.

    prune: image tokens dropped by text relevance (of the image tokens before pruning).
    merge: image tokens merged away (of the image tokens *before* pruning, as the paper).
    text_merge: text tokens merged away.

    Each lies in [0, 1). The paper writes them ``p0.1-r0.3-t0.2`` (or ``p0.1r0.3t0.2``);
    ``Ratios.parse`` reads that, a mapping, a 3-sequence or another ``Ratios``.
    """

    prune: float = 0.0
    merge: float = 0.0
    text_merge: float = 0.0

    def __post_init__(self) -> None:
        for name in ("prune", "merge", "text_merge"):
            value = getattr(self, name)
            # any real number (numpy's too), but not a bool: True would read as 1
            is_bool = isinstance(value, bool) or type(value).__name__ in ("bool_", "bool")  # numpy 1 and 2 names
            if is_bool or not isinstance(value, numbers.Real):
                raise TypeError(f"Ratios.{name} must be a float in [0, 1), got {type(value).__name__} {value!r}")
            value = float(value)
            if math.isnan(value) or not 0.0 <= value < 1.0:
                raise ValueError(
                    f"Ratios.{name} must lie in [0, 1), got {value!r}; "
                    f"use 0 to switch it off and a value below 1 to keep at least one token"
                )
            object.__setattr__(self, name, float(value))

    @classmethod
    def parse(cls, spec: RatiosLike) -> Ratios:
        """Read ratios from a ``Ratios``, ``"p0.1-r0.3-t0.2"``, a mapping or a (prune, merge, text_merge) sequence."""
        if isinstance(spec, Ratios):
            return spec
        if isinstance(spec, str):
            match = _RATIOS_RE.match(spec.strip())
            if match is None:
                raise ValueError(
                    f"ratios string {spec!r} is not in the paper's form; write e.g. 'p0.1-r0.3-t0.2' or 'p0.1r0.3t0.2'"
                )
            return cls(float(match["p"]), float(match["r"]), float(match["t"]))
        if isinstance(spec, Mapping):
            unknown = [key for key in spec if key not in _NAMES]
            if unknown:
                close = {key: difflib.get_close_matches(str(key), _NAMES, 1) for key in unknown}
                hints = [f"{match[0]!r} for {key!r}" for key, match in close.items() if match]
                per_layer = any(not isinstance(key, str) or key.strip().isdigit() for key in unknown)
                raise ValueError(
                    f"ratios mapping has unknown key(s) {unknown}; the keys are 'prune', 'merge' and 'text_merge'"
                    + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                    + ("; a per-layer schedule has only int block indices as keys: {2: 'p0.1-r0.3-t0.2'}" if per_layer else "")
                )
            return cls(**spec)
        if isinstance(spec, Sequence) and len(spec) == 3:
            return cls(*spec)
        raise TypeError(
            f"ratios must be a Ratios, a string like 'p0.1-r0.3-t0.2', a mapping or a 3-tuple, got {spec!r}"
        )

    @property
    def is_zero(self) -> bool:
        return self.prune == 0.0 and self.merge == 0.0 and self.text_merge == 0.0

    def __str__(self) -> str:
        return f"p{_decimal(self.prune)}-r{_decimal(self.merge)}-t{_decimal(self.text_merge)}"


def _decimal(value: float) -> str:
    """The shortest decimal that reads back as ``value``, without an exponent (``parse`` takes none)."""
    return format(Decimal(repr(value)).normalize(), "f")


RatiosLike = Union[Ratios, str, Mapping[str, float], Sequence[float]]


def parse_config(config: str) -> tuple[Ratios, list[int]]:
    """Split a paper config name into ratios and layer indices.

    ``"p0.1-r0.3-t0.2-258"`` -> ``(Ratios(0.1, 0.3, 0.2), [2, 5, 8])``. Each digit of the suffix is one
    layer, as in the research code's names.
    """
    if not isinstance(config, str):
        raise TypeError(f"config must be a string like 'p0.1-r0.3-t0.2-258', got {type(config).__name__}")
    match = _CONFIG_RE.match(config.strip())
    if match is None:
        raise ValueError(
            f"config {config!r} is not a paper config name; write e.g. 'p0.1-r0.3-t0.2-258' "
            f"(ratios, a dash, then one digit per reduce layer)"
        )
    layers = [int(d) for d in match["layers"]]
    repeated = sorted({d for d in layers if layers.count(d) > 1})
    if repeated:
        raise ValueError(
            f"config {config!r} names layer(s) {repeated} more than once; each digit of the suffix is one "
            f"reduce layer, named once (e.g. '-258')"
        )
    return Ratios.parse(match["ratios"]), layers
