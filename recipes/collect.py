"""Every evaluation under some folders in one table: ``python -m recipes.collect runs/ [--output results.md]``.

Each ``eval.json`` (what ``python -m recipes TASK eval`` writes) gives one line per variant: the
run's folder, task and split, the task's metric (percent; retrieval: RSUM), its delta against the
unpatched row of the same evaluation (points), the examples or pairs scored, the speed with its
speedup over that unpatched row, and GFLOPs per example or pair. Reports written before the speed
was timed apart from the loader carry no speedup; theirs reads "-" rather than a misleading ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["collect", "markdown_table", "main"]


def _line(run: str, report: Mapping[str, Any], row: Mapping[str, Any],
          base: Mapping[str, Any] | None) -> dict[str, Any]:
    retrieval = report.get("task") == "retrieval"
    score = row["rsum"] if retrieval else 100 * row["score"]
    base_score = None if base is None else (base["rsum"] if retrieval else 100 * base["score"])
    return {"run": run, "task": report.get("task"), "split": report.get("split"),
            "metric": "RSUM" if retrieval else report.get("metric", "score"), "variant": row["variant"],
            "score": score, "delta": None if base_score is None else score - base_score,
            "scored": row["pairs"] if retrieval else row["examples"], "unit": "pairs" if retrieval else "examples",
            "per_s": row.get("pairs_per_s" if retrieval else "examples_per_s"), "speedup": row.get("speedup"),
            "gflops": row.get("gflops_per_pair" if retrieval else "gflops_per_example")}


def collect(folders: Sequence[Path]) -> list[dict[str, Any]]:
    """One dict per variant of every ``eval.json`` under ``folders`` (sorted by path), with its delta
    and speedup against the unpatched row of its own report."""
    lines: list[dict[str, Any]] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"{folder} does not exist; pass the folders that hold the runs")
        for path in sorted(folder.rglob("eval.json")):
            try:
                report = json.loads(path.read_text())
                rows = report["rows"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path} is no report of python -m recipes TASK eval ({err})") from err
            base = next((r for r in rows if r.get("pumer") is None), None)
            run = str(path.parent.relative_to(folder)) if path.parent != folder else folder.name
            lines += [_line(run, report, row, base) for row in rows]
    return lines


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(lines: Sequence[Mapping[str, Any]]) -> str:
    """The collected lines as one markdown table."""
    out = ["| run | task | split | variant | metric | score | delta | scored | per s | speedup | GFLOPs |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in lines:
        delta = "-" if r["delta"] is None else f"{r['delta']:+.2f}"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        out.append(f"| {r['run']} | {r['task']} | {r['split']} | {r['variant']} | {r['metric']} | {r['score']:.2f} | "
                   f"{delta} | {r['scored']} {r['unit']} | {_number(r['per_s'], '.1f')} | {speedup} | "
                   f"{_number(r['gflops'], '.3f')} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="folders searched for eval.json (recursively)")
    p.add_argument("--output", type=Path, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    lines = collect(args.folders)
    if not lines:
        raise FileNotFoundError(f"no eval.json under {', '.join(map(str, args.folders))}")
    table = markdown_table(lines)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
