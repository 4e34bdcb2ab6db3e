"""Runnable studies and task recipes built on ``pumer_patch`` (``python -m recipes.<name>``)."""
