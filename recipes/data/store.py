"""Image stores: one single-file LMDB per image collection, key = image stem (UTF-8), value = raw bytes.

A store in lmdb's own folder layout (``NAME.lmdb/data.mdb``, what ``lmdb.open`` writes by default)
is read as well; the writers write single files.

The reader opens its environment lazily, read-only and once per process, so a ``DataLoader`` worker
(forked or spawned) never shares a handle opened in its parent: LMDB handles are not fork-safe.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import lmdb

from .transforms import image_problem

__all__ = ["ImageStore", "MissingImageError", "is_image_store", "write_image_store", "write_image_folder",
           "IMAGE_SUFFIXES"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MAP_SIZE = 1 << 40  # the largest the store may grow; LMDB maps it virtually, the file holds only the data
# LMDB allows one environment per file per process, and a forked child must not use (nor reopen
# over) its parent's: every ImageStore of a file shares one per process, and all are closed before a
# fork (a DataLoader starting its workers), then reopened lazily on either side.
_ENVIRONMENTS: dict[Path, lmdb.Environment] = {}


def _environment(path: Path) -> lmdb.Environment:
    key = path.resolve()
    env = _ENVIRONMENTS.get(key)
    if env is None:
        # lock=False: read-only readers need no lock file; readahead=False: random access over a big file
        env = lmdb.open(str(path), subdir=path.is_dir(), readonly=True, lock=False, readahead=False, meminit=False,
                        max_readers=2048)
        _ENVIRONMENTS[key] = env
    return env


def _close_all() -> None:
    while _ENVIRONMENTS:
        _ENVIRONMENTS.popitem()[1].close()


os.register_at_fork(before=_close_all)


def is_image_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an LMDB store: a single file, or a folder in lmdb's layout (holding ``data.mdb``)."""
    path = Path(path)
    return path.is_file() or (path / "data.mdb").is_file()


class MissingImageError(KeyError):
    """An image key absent from its store; the message names the key and the LMDB file."""

    def __str__(self) -> str:  # KeyError quotes its argument; this one is a sentence
        return str(self.args[0])


class ImageStore:
    """Read-only access to one LMDB image store: a single file (``subdir=False``) or lmdb's folder layout.

    ``store[key]`` -> the raw JPEG/PNG bytes of the image whose file stem is ``key``.
    Picklable (it holds only the path): the environment opens on first use in each process.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir() and not is_image_store(self.path):
            raise FileNotFoundError(f"image store {self.path} is a folder without data.mdb: not an LMDB store "
                                    f"(a single-file LMDB, or a folder holding lmdb's data.mdb)")
        if not is_image_store(self.path):
            raise FileNotFoundError(
                f"image store {self.path} does not exist (expected one single-file LMDB per image collection; "
                f"write one with recipes.prepare.convert_vqav2 or recipes.data.store.write_image_folder)"
            )

    def _open(self) -> lmdb.Environment:
        return _environment(self.path)

    def __getitem__(self, key: str) -> bytes:
        with self._open().begin(buffers=False) as txn:
            value = txn.get(key.encode("utf-8"))
        if value is None:
            raise MissingImageError(f"image {key!r} is not in the image store {self.path}")
        return value

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        with self._open().begin() as txn:
            return txn.get(key.encode("utf-8")) is not None

    def keys(self) -> Iterator[str]:
        """Every key, in LMDB's (byte) order."""
        with self._open().begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                yield bytes(key).decode("utf-8")

    def __len__(self) -> int:
        return self._open().stat()["entries"]

    def __repr__(self) -> str:
        return f"ImageStore({str(self.path)!r})"


def write_image_store(path: str | os.PathLike[str], items: Iterable[tuple[str, bytes]], *, overwrite: bool = False) -> int:
    """Write ``(key, raw bytes)`` pairs into a new single-file LMDB at ``path``; returns how many.

    A key given twice is an error (two images with one stem would silently shadow each other).
    Written to ``path + ".partial"`` and renamed last, so an interrupted write leaves no half store
    (and one that fails, an error from ``items`` included, leaves nothing).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    partial = path.with_name(path.name + ".partial")
    for leftover in (partial, Path(f"{partial}-lock")):
        leftover.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(partial), subdir=False, map_size=_MAP_SIZE, lock=False, meminit=False)
    count = 0
    try:
        txn = env.begin(write=True)
        for key, value in items:
            if not txn.put(key.encode("utf-8"), value, overwrite=False):
                txn.abort()
                raise ValueError(f"image key {key!r} given twice while writing {path}")
            count += 1
            if count % 1000 == 0:  # bounded transactions: memory stays flat on 100k-image collections
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
        env.sync()
    except BaseException:
        env.close()
        partial.unlink(missing_ok=True)
        raise
    finally:
        env.close()  # a second close does nothing
    Path(f"{partial}-lock").unlink(missing_ok=True)
    if path.is_dir():  # an old store in lmdb's folder layout, being overwritten
        shutil.rmtree(path)
    partial.replace(path)
    logger.info("wrote %d images to %s (%.1f MB)", count, path, path.stat().st_size / 1e6)
    return count


def write_image_folder(path: str | os.PathLike[str], folder: str | os.PathLike[str], *,
                       keys: Iterable[str] | None = None, overwrite: bool = False) -> int:
    """Store the images of ``folder`` (``.jpg``/``.jpeg``/``.png``, keyed by stem) in an LMDB at ``path``.

    ``keys``: only these stems (each must exist in ``folder``); None takes every image file. Each
    image is decoded first, as training will: one that does not decode is a ``ValueError`` naming
    its file, and no store is left behind.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if keys is not None:
        wanted = sorted(set(keys))
        missing = [k for k in wanted if k not in files]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images missing from {folder}, e.g. {missing[:5]}")
        files = {k: files[k] for k in wanted}

    def checked() -> Iterator[tuple[str, bytes]]:
        for key, file in files.items():
            data = file.read_bytes()
            problem = image_problem(data)
            if problem is not None:
                raise ValueError(f"image {file} does not decode ({problem})")
            yield key, data

    return write_image_store(path, checked(), overwrite=overwrite)
