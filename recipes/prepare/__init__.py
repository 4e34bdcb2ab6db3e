"""The converters: public releases of each dataset -> the jsonl + LMDB data folders the tasks read.

Each checks its input at the door (``checks``): malformed input is refused naming file and line (or
question, pair, image); unusable examples are dropped and counted by reason in
``<name>_conversion.json``; every stored image has been decoded once.
"""
