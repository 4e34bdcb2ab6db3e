"""Models that no library provides (METER) and converters from research checkpoints.

``meter``: METER in the transformers idiom. ``convert_vilt``, ``convert_meter``: the research
checkpoints' converters (command lines too). ``convert``: what both share and the recipes use, the
conversion report, the weights-only checkpoint reader and the weights a task derives from another
task's checkpoint.

Nothing here knows about token reduction: the adapters in ``pumer_patch.adapters`` patch these models
as they patch a library's.
"""
