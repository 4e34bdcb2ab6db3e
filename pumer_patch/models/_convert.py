"""What the checkpoint converters share: the report, the weights-only reader, and the two derived weights.

``convert_vilt`` (ViLT / PuMer ViLT -> transformers ViLT) and ``convert_meter`` (original METER ->
``pumer_patch`` METER) rename keys differently but account for them the same way: every source key is
mapped, set aside or ignored with a reason; every target key is filled, derived or (a task head
started from a pretraining checkpoint) initialised. Anything else (a missing key, a key with no place,
a shape the target does not have) is an error unless the caller asks for a lenient conversion, and
then it is reported. The recipes use the two derived weights too, when they load a 2-token-type
checkpoint for NLVR2 or a pretraining checkpoint for retrieval. See docs/design.md, "Checkpoints".
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

__all__ = ["ConversionReport", "read_checkpoint", "grow_token_types", "rank_from_itm_match_row"]

#: the first bytes of a git-lfs pointer file, which stands where the weights should be
_LFS_POINTER = b"version https://git-lfs"
#: at most this many keys of one block are named one by one in an error or a summary
_KEYS_PER_GROUP = 3


@dataclass
class ConversionReport:
    """What a conversion did with every key. Source keys are named as the checkpoint names them.

    Placed or explained, which is what a good conversion consists of:

    * ``mapped``: source key -> the target keys it became (ViLT's ``attn.qkv`` becomes three);
    * ``set_aside``: source key -> its key in ``itm_head`` (ITM weights that the target has no slot for);
    * ``ignored``: source key -> why it was dropped;
    * ``derived``: target key -> how it was made (token types grown, ``rank_output`` from ITM,
      positions resized);
    * ``initialized``: target keys the source has no weights for, left to a fresh initialisation
      (a task head started from a pretraining checkpoint); absent from the converted state_dict.

    What a strict conversion refuses (``check`` raises, naming them), and a lenient one reports:

    * ``missing``: target keys nothing fills;
    * ``unexpected``: source keys with no place in the target;
    * ``mismatched``: target key -> (source shape, target shape).
    """

    #: the target's head (``vqa``, ``ve``, ``nlvr2``, ``irtr``, ``pretrain``)
    head: str
    #: what was converted, in words (``"original ViLT"``, ``"PuMer ViLT"``, ``"original METER"``)
    source: str
    mapped: dict[str, tuple[str, ...]] = field(default_factory=dict)
    set_aside: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    initialized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    #: ``nn.Linear(hidden, 2)`` state_dict (``weight``, ``bias``) of an ITM head the target has no slot for
    itm_head: dict[str, Tensor] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True when every key is placed or explained (nothing missing, unexpected or mismatched)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> list[str]:
        """What keeps the conversion from being complete, one phrase per kind, keys grouped by block."""
        found = []
        if self.missing:
            found.append(f"missing (the {self.head!r} model needs them): {_grouped(self.missing)}")
        if self.unexpected:
            found.append(f"unexpected (no place in the {self.head!r} model): {_grouped(self.unexpected)}")
        if self.mismatched:
            shapes = ", ".join(f"{k}: {list(got)} vs {list(want)}" for k, (got, want) in self.mismatched.items())
            found.append(f"shape mismatches (checkpoint vs model): {shapes}")
        return found

    def check(self, fix: str = "") -> None:
        """Raise ``ValueError`` naming every missing, unexpected and mismatched key; ``fix``: what to try."""
        if self.ok:
            return
        raise ValueError(
            f"cannot convert this {self.source} checkpoint to head={self.head!r}: " + "; ".join(self.problems())
            + ". " + (fix + " " if fix else "")
            + "To write it anyway, with these keys left out or freshly initialised, pass strict=False "
            "(command line: --no-strict)."
        )

    def summary(self) -> str:
        """A few lines for a log: the counts, then every derivation and every key not simply placed."""
        lines = [
            f"{self.source} -> {self.head}: {len(self.mapped)} mapped, {len(self.set_aside)} set aside, "
            f"{len(self.ignored)} ignored, {len(self.derived)} derived, {len(self.initialized)} initialised, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched"
        ]
        lines += [f"  derived {k}: {how}" for k, how in self.derived.items()]
        lines += [f"  set aside {k} -> itm_head[{part!r}]" for k, part in self.set_aside.items()]
        lines += [f"  ignored {k} ({why})" for k, why in self.ignored.items()]
        lines += [f"  initialised {k}" for k in self.initialized]
        lines += [f"  missing {k}" for k in self.missing]
        lines += [f"  unexpected {k}" for k in self.unexpected]
        lines += [f"  mismatched {k}: {list(got)} vs {list(want)}" for k, (got, want) in self.mismatched.items()]
        return "\n".join(lines)


def _grouped(keys: Iterable[str]) -> str:
    """Keys for a message; a block's many keys (``...layers.1.*``) as one entry with their count."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        block = re.match(r"(.*?\.\d+)\.", key)
        groups.setdefault(block.group(1) + ".*" if block else key, []).append(key)
    parts = []
    for name, members in groups.items():
        parts += members if len(members) <= _KEYS_PER_GROUP else [f"{name} ({len(members)} keys)"]
    return ", ".join(parts)


def read_checkpoint(path: str | Path, *, weights_only: bool = True) -> dict[str, Tensor]:
    """The tensors of one checkpoint file: ``.safetensors``, or what ``torch.load`` reads.

    A Lightning checkpoint gives its ``state_dict`` entry, a plain state_dict file itself. Every
    failure is a ``ValueError`` naming the file (empty, truncated, a git-lfs pointer, not a
    checkpoint). ``weights_only=False`` unpickles arbitrary objects: only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with path.open("rb") as file:
        start = file.read(len(_LFS_POINTER))
    if not start:
        raise ValueError(f"{path} is empty: a checkpoint whose download or copy did not finish?")
    if start == _LFS_POINTER:
        raise ValueError(f"{path} is a git-lfs pointer, not the weights: fetch them (git lfs pull) and convert again")
    try:
        if path.suffix == ".safetensors":
            loaded: object = load_file(path)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as error:
        if not weights_only:
            raise ValueError(f"{path} is not a checkpoint torch.load can read: {error}") from error
        # torch's own message is a page of advice; the class it refused is what names the problem
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"it pickles {refused.group(1)}" if refused else str(error).splitlines()[0]
        raise ValueError(
            f"{path} holds Python objects besides tensors (a Lightning checkpoint's hyper-parameters or "
            f"callbacks), which torch.load(weights_only=True) refuses to unpickle ({what}). Unpickling runs "
            "code from the file: if you trust it, pass weights_only=False (command line: --trust-pickle)"
        ) from error
    except Exception as error:  # torch.load and safetensors raise KeyError, EOFError, RuntimeError, ... here
        raise ValueError(
            f"{path} is not a checkpoint that {'safetensors' if path.suffix == '.safetensors' else 'torch.load'} "
            f"can read ({type(error).__name__}: {error}): a damaged or partial file?"
        ) from error
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is neither a state_dict of tensors nor a checkpoint with a 'state_dict' of tensors")
    return dict(state)


def grow_token_types(weight: Tensor, n: int) -> Tensor:
    """Token-type embeddings (T, C) -> (n, C): the new rows copy the last one, row T - 1.

    NLVR2 needs a third type for its second image; started from a 2-type checkpoint, row 2 := row 1
    (the second image starts as the first), as the research code does.
    """
    if weight.dim() != 2:
        raise ValueError(f"token-type embeddings are (types, C), got shape {tuple(weight.shape)}")
    t = weight.shape[0]
    if n < t:
        raise ValueError(f"cannot grow {t} token types to {n}: fewer rows")
    return torch.cat([weight, weight[t - 1 :].expand(n - t, -1)])  # (n, C)


def rank_from_itm_match_row(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """A retrieval score head from the ITM head: weight (2, C), bias (2,) -> (1, C), (1,).

    Row 1 of the image-text-matching logits is "match" (positive pairs are labelled 1), so the score
    starts as the match logit, as the research code starts retrieval from the pretrained checkpoint.
    The result is a copy.
    """
    if weight.dim() != 2 or weight.shape[0] != 2 or tuple(bias.shape) != (2,):
        raise ValueError(
            f"an ITM head is weight (2, C) and bias (2,), got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    return weight[1:].clone(), bias[1:].clone()
