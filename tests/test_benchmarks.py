"""The benchmark scripts run and write what they promise (numbers come from running them, not from here)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import pumer_patch
from benchmarks import reduce_op
from pumer_patch.flops import gflops_per_example


def test_reduce_op_benchmark_writes_json_and_table(tmp_path):
    reduce_op.main(["--batch", "1", "--tokens", "16", "32", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "reduce_op.json").read_text())["rows"]
    assert [r["image_tokens"] for r in rows] == [16, 32]
    assert all(r["op_ms"] > 0 and r["layer_ms"] > 0 for r in rows)
    assert "| 32 |" in (tmp_path / "reduce_op.md").read_text()


def test_speed_benchmark_rows_flops_and_equal_flops_baseline(tmp_path):
    from benchmarks import speed

    # batch 1 among the sizes: its throughput and the latency come from one timing
    speed.main(["--models", "vit_tiny_patch16_224", "--batch-sizes", "1", "2", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows)[:3] == ["unpatched", "ToMe r=16", "prune+merge p0.2-r0.2-369"]
    base, tome, pm = rows["unpatched"], rows["ToMe r=16"], rows["prune+merge p0.2-r0.2-369"]
    (matched,) = [r for name, r in rows.items() if name.startswith("ToMe-style")]
    # ViT-Ti/16 (192 wide, 12 blocks, 197 tokens), attention included: 2 * 12 * (12 N C^2 + 2 N^2 C) per image
    n, c = 197, 192
    patch_and_head = base["gflops"] - 2 * 12 * (12 * n * c * c + 2 * n * n * c) / 1e9
    assert 0 < patch_and_head < 0.1 * base["gflops"]
    assert tome["flops_ratio"] < pm["flops_ratio"] < 1.0
    assert abs(matched["gflops"] - pm["gflops"]) <= 0.03 * pm["gflops"]  # the searched ratio meets the FLOPs
    assert matched["apply"]["layers"] == list(range(12)) and matched["apply"]["merge_ratio"] > 0
    assert [t["image"] for t in tome["tokens"]] == [197 - 16 * (i + 1) for i in range(11)] + [11]
    # ToMe's GFLOPs from its token counts: each block's attention runs on the tokens it receives, its
    # MLP (hidden 4C) on those it keeps; ToMe's matching adds well under 1 %
    counts = [n] + [t["image"] for t in tome["tokens"]]
    blocks = sum(2 * (4 * a * c * c + 2 * a * a * c) + 2 * 8 * b * c * c for a, b in zip(counts, counts[1:]))
    assert abs(tome["gflops"] - (patch_and_head + blocks / 1e9)) <= 0.02 * tome["gflops"]
    assert base["speedup_b2"] == base["efficiency"] == 1.0  # the unpatched row is the reference
    for row in rows.values():
        assert row["throughput_b2"] > 0 and row["latency_ms"] > 0 and row["speedup_b2"] > 0
        assert row["throughput_b1"] == pytest.approx(1e3 / row["latency_ms"]) and row["speedup_b1"] > 0
    assert result["machine"]["dtype"] == "fp32" and result["machine"]["torch"] == torch.__version__
    assert "| vit_tiny_patch16_224 | ToMe r=16 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "speedup.png").stat().st_size > 0


def test_overhead_benchmark_separates_the_reduction_from_fewer_tokens(tmp_path):
    from benchmarks import overhead
    from benchmarks.speed import build

    overhead.main(["--models", "vit_tiny_patch16_224", "--batch-size", "2", "--repeats", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "overhead.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["ToMe r=16", "prune+merge p0.2-r0.2-369"]
    for r in rows:
        assert 0.4 < r["flops_ratio"] < 0.6 and min(r["unpatched_ms"], r["patched_ms"], r["same_counts_ms"]) > 0
    assert "| vit_tiny_patch16_224 | ToMe r=16 |" in (tmp_path / "overhead.md").read_text()
    # what "overhead" divides by: the same-counts forward does the patched model's work less the
    # reduction's own (ToMe's matching: under 2 % of the FLOPs here)
    net, make_batch, _ = build("vit_tiny_patch16_224")
    patched = pumer_patch.apply(copy.deepcopy(net), merge_schedule=16)
    patched_gflops = gflops_per_example(patched, make_batch(1))
    counts = {c.layer: c.image for c in pumer_patch.last_trace(patched).counts}
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        overhead.same_counts(net, "vit_tiny_patch16_224", make_batch(1), counts)()
    same_gflops = counter.get_total_flops() / 1e9
    assert 0.98 * patched_gflops < same_gflops < patched_gflops


def test_same_counts_forward_is_the_model_when_nothing_is_dropped():
    import timm
    from transformers import ViltConfig, ViltModel

    from benchmarks.overhead import same_counts

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    x = {"x": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        torch.testing.assert_close(same_counts(vit, "vit", x, {})(), vit(**x))
    vilt = ViltModel(ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=32, patch_size=8, max_position_embeddings=8)).eval()
    batch = {"input_ids": torch.randint(1, 100, (2, 8)), "pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        torch.manual_seed(1)
        pooled = same_counts(vilt, "vilt8", batch, {})()
        torch.manual_seed(1)  # ViLT draws its patch order at random
        torch.testing.assert_close(pooled, vilt(**batch).pooler_output)


def test_speed_compile_rows_beside_the_eager_rows(tmp_path):
    from benchmarks import speed

    pm = "prune+merge p0.2-r0.2-369"
    speed.main(["--models", "vit_tiny_patch16_224", "--configs", pm, "--batch-sizes", "2", "--repeats", "1",
                "--no-latency", "--compile", "--compile-backend", "eager", "--device", "cpu", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    base, patched = result["rows"]  # --configs keeps the named row and the unpatched baseline
    assert (base["config"], patched["config"]) == ("unpatched", pm)
    assert result["machine"]["compile_backend"] == "eager"
    for row in (base, patched):
        assert row["compiled_throughput_b2"] > 0 and row["throughput_b2"] > 0 and row["compile_s"] > 0
        assert "latency_ms" not in row and "compiled_latency_ms" not in row  # --no-latency: no batch-1 run
    assert base["graphs"] == 1 and base["graph_breaks"] == []  # the unpatched timm ViT is one graph
    assert patched["graphs"] >= 1 and bool(patched["graph_breaks"]) == (patched["graphs"] > 1)  # breaks named
    assert base["compiled_speedup_b2"] == 1.0
    assert patched["compiled_speedup_b2"] == pytest.approx(patched["compiled_throughput_b2"] / base["compiled_throughput_b2"])
    assert patched["speedup_b2"] == pytest.approx(patched["throughput_b2"] / base["throughput_b2"])
    text = (tmp_path / "results.md").read_text()
    assert "compiled speedup @2" in text and f"| vit_tiny_patch16_224 | {pm} |" in text
    head, rule = text.splitlines()[2:4]
    assert head.count("|") == rule.count("|")


def test_speed_refuses_bad_options_before_measuring(tmp_path):
    from benchmarks import speed

    with pytest.raises(ValueError, match=r"none of \['ToMe r=8'\] is a config of 'vit_tiny_patch16_224'.*ToMe r=16"):
        speed.main(["--models", "vit_tiny_patch16_224", "--configs", "ToMe r=8", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="needs the config it matches"):
        speed.main(["--models", "vit_tiny_patch16_224", "--configs", "ToMe-style", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):  # argparse's error: "torch sees no CUDA device here; use --device cpu"
            speed.main(["--device", "cuda", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--tiny builds"):
        speed.build("open_clip:ViT-B-16", tiny=True)
    assert not (tmp_path / "results.json").exists()


def test_tiny_builds_keep_the_token_counts(tmp_path):
    from benchmarks import speed

    # --tiny narrows the models and keeps depth and tokens: the reduce layers see the counts of full size
    speed.main(["--models", "vilt40", "meter384_32", "--tiny", "--configs", "p0.1-r0.3-t0.2-258", "p0.2r0.2t0.2-0246",
                "--batch-sizes", "1", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)])
    rows = {r["model"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"] if r["tokens"]}
    assert [(t["image"], t["text"]) for t in rows["vilt40"]["tokens"]] == [(88, 32), (53, 26), (32, 21)]
    assert [(t["image"], t["text"]) for t in rows["meter384_32"]["tokens"]] == [(347, 26), (209, 21), (125, 17), (75, 14)]
    assert rows["vilt40"]["gflops"] < 1


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_step(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    # the GPU run's every step on CPU at tiny sizes (benchmarks.vlm has tests of its own: left out)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "gpu"), "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), "--dry-run", "--skip", "vlm"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "gpu"
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.log", "gpu.md"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("pumer-gpu.")] == []  # the work folder is gone
    result = json.loads((out / "gpu.json").read_text())
    assert {s["step"]: s["status"] for s in result["steps"]} == {
        "device": "ok", "speed": "ok", "compile": "ok", "vlm": "skipped", "train": "ok"}
    assert result["device"]["device"] and result["device"]["torch"] == torch.__version__
    speed_rows = result["speed"]["rows"]
    assert [r["model"] for r in speed_rows] == ["vilt40"] * 2 + ["meter384_32"] * 2 + ["vit_base_patch16_224"] * 2
    assert result["speed"]["machine"]["dtype"] == "bf16 autocast" and result["speed"]["machine"]["tiny"]
    assert all(r["compiled_throughput_b2"] > 0 and r["compile_s"] > 0 for r in result["compile"]["rows"])
    train = result["train"]
    assert train["failures"] == [] and len(train["rows"]) == 8
    assert {(r["task"], r["family"]) for r in train["rows"]} == {
        (t, f) for t in ("vqa", "snli_ve", "nlvr2", "retrieval") for f in ("vilt", "meter")}
    assert all(r["steps"] == 2 and r["pumer"] and r["eval_score"] is not None for r in train["rows"])
    assert train["machine"]["mixed_precision"] == "bf16"
    md = (out / "gpu.md").read_text()
    assert "## torch.compile: compiled pair beside the eager pair" in md and "| retrieval | meter |" in md


def test_gpu_script_refuses_unknown_arguments(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
    for args in (["--fast"], ["--skip", "speedd"]):
        done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "gpu.sh:" in done.stderr
