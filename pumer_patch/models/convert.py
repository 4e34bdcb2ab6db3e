"""The public face of what the checkpoint converters share (``convert_vilt``, ``convert_meter``, the recipes).

``ConversionReport``: what a conversion did with every key. ``read_checkpoint``: one checkpoint
file's tensors, read weights-only. ``grow_token_types`` and ``rank_from_itm_match_row``: the two
weights a task derives when it starts from another task's checkpoint (NLVR2's third token type,
retrieval's score from the ITM "match" row).
"""

from pumer_patch.models._convert import ConversionReport, grow_token_types, rank_from_itm_match_row, read_checkpoint

__all__ = ["ConversionReport", "read_checkpoint", "grow_token_types", "rank_from_itm_match_row"]
