"""The recipes' command lines log alike: one format, set once per process by ``configure_logging``.

A module of its own (logging only) so that the converters, which load no model, import nothing heavy.
"""

from __future__ import annotations

import logging

__all__ = ["configure_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | int = "INFO") -> None:
    """Log ``level`` and above to stderr as ``HH:MM:SS LEVEL logger: message``."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S")
