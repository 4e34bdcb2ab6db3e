"""The converters: public releases of each dataset -> the jsonl + LMDB data folders the tasks read."""
