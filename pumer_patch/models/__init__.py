"""Models that no library provides (METER) and converters from research checkpoints.

Nothing here knows about token reduction: the adapters in ``pumer_patch.adapters`` patch these models
as they patch a library's.
"""
