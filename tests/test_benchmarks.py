"""The benchmark scripts run and write what they promise (numbers come from running them, not from here)."""

from __future__ import annotations

import json

from benchmarks import reduce_op


def test_reduce_op_benchmark_writes_json_and_table(tmp_path):
    reduce_op.main(["--batch", "1", "--tokens", "16", "32", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "reduce_op.json").read_text())["rows"]
    assert [r["image_tokens"] for r in rows] == [16, 32]
    assert all(r["op_ms"] > 0 and r["layer_ms"] > 0 for r in rows)
    assert "| 32 |" in (tmp_path / "reduce_op.md").read_text()
