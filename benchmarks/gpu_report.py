"""``benchmarks/gpu.sh``'s device record and report: every step's status and results in one ``gpu.json`` and one ``gpu.md``.

    python -m benchmarks.gpu_report device WORK/device.json [--cpu]    # what the run ran on
    python -m benchmarks.gpu_report merge WORK OUT                     # the report

``WORK`` is the script's work folder: ``device.json``, ``steps.jsonl`` (one line per step: name,
status ``ok`` / ``failed`` / ``timeout`` / ``skipped``, exit code, seconds, a note) and each step's
own output folder (``speed/``, ``compile/``, ``vlm/``, ``train/``, as the benchmarks write them).
``OUT`` gets ``gpu.json`` (the device, the steps, and each step's JSON as it wrote it) and ``gpu.md``
(the device, the steps table and each step's markdown tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["OUTPUTS", "device_info", "main", "report"]

#: step -> (its JSON, its markdown), relative to the work folder
OUTPUTS = {
    "speed": ("speed/results.json", "speed/results.md"),
    "compile": ("compile/results.json", "compile/results.md"),
    "vlm": ("vlm/vlm.json", "vlm/vlm.md"),
    "train": ("train/train_steps.json", "train/train_steps.md"),
}
TITLES = {
    "speed": "Eager: throughput, latency, peak memory",
    "compile": "torch.compile: compiled pair beside the eager pair",
    "vlm": "A vision-language LLM geometry",
    "train": "Training steps of every recipe",
}


def device_info(cpu: bool) -> dict[str, Any]:
    """The CUDA device (name, CUDA version, capability, memory, multiprocessors) unless ``cpu``, and the host."""
    import torch

    from .speed import cpu_name

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_name(), "cpu_count": os.cpu_count()}
    if cpu or not torch.cuda.is_available():
        return {"device": info["cpu"], **info}
    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
            "capability": list(torch.cuda.get_device_capability(0)), "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, **info}


def report(work: Path) -> tuple[dict[str, Any], str]:
    """The merged JSON and markdown of a work folder."""
    device = json.loads((work / "device.json").read_text()) if (work / "device.json").is_file() else {}
    lines = (work / "steps.jsonl").read_text().splitlines() if (work / "steps.jsonl").is_file() else []
    steps = [json.loads(line) for line in lines if line.strip()]
    merged: dict[str, Any] = {"device": device, "steps": steps}
    md = ["# GPU run", "", f"Device: {device}", "", "| step | status | exit | seconds | note |", "|---|---|---:|---:|---|"]
    md += [f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']:.0f} | {s.get('note', '')} |" for s in steps]
    for step, (js, text) in OUTPUTS.items():
        if (work / js).is_file():
            merged[step] = json.loads((work / js).read_text())
        if (work / text).is_file():
            md += ["", f"## {TITLES[step]}", "", (work / text).read_text().strip()]
    return merged, "\n".join(md) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("device", help="write the device record")
    d.add_argument("path", type=Path)
    d.add_argument("--cpu", action="store_true", help="the CPU run (gpu.sh --dry-run), even where there is a GPU")
    m = sub.add_parser("merge", help="merge a work folder into gpu.json and gpu.md")
    m.add_argument("work", type=Path)
    m.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "device":
        info = device_info(args.cpu)
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(json.dumps(info, indent=2))
        print("device:", info)
        return 0
    merged, md = report(args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(merged, indent=2))
    (args.out / "gpu.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
