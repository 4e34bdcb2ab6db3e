"""Shared test configuration: hypothesis settings profiles.

``ci`` (loaded by default) keeps the property suites quick on small shared CPU machines: no per-example
deadline (timings on a loaded 2-core box are noise, not failures) and a modest number of examples.
``dev`` and ``thorough`` search harder; choose one with ``HYPOTHESIS_PROFILE=thorough pytest tests``.
A test that needs a different budget sets it with ``@settings(...)``; profiles stay generic.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("ci", max_examples=50, deadline=None, suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=_SLOW_OK)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
