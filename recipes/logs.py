"""The recipes' command lines log alike: one format, set once per process by ``configure_logging``.

A module of its own (logging only) so that the converters, which load no model, import nothing heavy.
``log_file`` keeps a run's story in its own folder (``OUTPUT/train.log``, ``OUTPUT/eval.log``):
everything at INFO and above, whatever the console's level, appended across resumed jobs, each
job's records under the command line that started it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOG_FORMAT", "configure_logging", "log_file"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | int = "INFO") -> None:
    """Log ``level`` and above to stderr as ``HH:MM:SS LEVEL logger: message``."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S")


class _RunLog(logging.FileHandler):
    """A file handler that creates its file (and folder) at its first record, headed by the command line:
    a command refused before it logged anything leaves nothing behind."""

    def __init__(self, path: Path, command: str) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.command = command

    def _open(self):  # type: ignore[no-untyped-def]  # logging's own signature
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        stream = super()._open()
        stream.write(f"# {self.command}\n")
        return stream


@contextmanager
def log_file(path: Path, command: str) -> Iterator[None]:
    """Append every record at INFO and above to ``path`` for the duration of the block (main process only).

    The console keeps its own level: the root logger is opened to INFO and each console handler set
    to the level it had, so ``--log-level WARNING`` quiets the terminal, not the file. Under several
    processes only the main one (``RANK`` 0) writes, as only it writes the run's other files.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    root = logging.getLogger()
    handler = _RunLog(path, command)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    level = root.level
    consoles = [(h, h.level) for h in root.handlers]
    for h, _ in consoles:
        h.setLevel(max(h.level, level))
    root.setLevel(min(level, logging.INFO))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(level)
        for h, old in consoles:
            h.setLevel(old)
