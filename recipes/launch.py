"""How the job was launched: refuse an ``accelerate launch`` that started one process where several were asked for.

A module of its own, importing nothing heavy, so that ``python -m recipes`` refuses such a launch
before it imports a model library (``recipes.run.make_accelerator`` checks again for callers that
build their runs in code).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["check_launch"]


def check_launch(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse an ``accelerate launch --num_processes N`` that started one process instead of N.

    Without GPUs (or with one), accelerate's simple launcher starts a single process for any
    ``--num_processes``; what it leaves behind is its own variables (``ACCELERATE_*``) and a
    rendezvous address (``MASTER_ADDR``, set only when it was asked for several processes), with no
    ``WORLD_SIZE``, which every real multi-process launcher sets.
    """
    launched_by_accelerate = any(k.startswith("ACCELERATE_") for k in environ)
    if launched_by_accelerate and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ:
        raise RuntimeError("accelerate launch was asked for several processes but started one (its simple launcher "
                           "does that without several GPUs): on CPU launch with torchrun --nproc_per_node N -m recipes "
                           "... --cpu; on GPUs with accelerate launch --multi_gpu --num_processes N -m recipes ...")
