"""What ``eval`` measures and says: the models' own speed, examples scored and skipped, refusals that name the fix.

Speed: ``recipes.engine.time_models`` times the models alone on batches already loaded, after a
warm-up, in interleaved rounds; checked by its invariants (every pass timed the same number of
times, in rotated order; a loader that sleeps never reaches the timed region) and by a zero-ratio
PuMer config, identical compute, reporting a speedup within a generous band of 1. An SNLI-VE data
folder in the converter's layout (one image that does not decode) and a tiny ViLT with SNLI-VE
labels serve the command-line tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

pytest.importorskip("lmdb")
pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from recipe_helpers import image_bytes, save_tiny_vilt  # noqa: E402
from transformers import BertTokenizerFast, ViltForQuestionAnswering  # noqa: E402

from recipes import cli  # noqa: E402
from recipes.data.loader import make_loader  # noqa: E402
from recipes.data.records import SNLI_VE_LABELS, write_jsonl  # noqa: E402
from recipes.data.store import write_image_store  # noqa: E402
from recipes.engine import evaluate, interleaved_seconds, time_models  # noqa: E402
from recipes.launch import check_launch  # noqa: E402

pytest_plugins = ["recipe_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(220, 20, 20), (20, 20, 220), (20, 200, 20)]


# ---------------------------------------------------------------------------------------- the timing method


class SlowPoints(Dataset[dict[str, Tensor]]):
    """16 points that take ``delay`` seconds each to load: a loader in the timed region would show."""

    def __init__(self, delay: float) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.delay = torch.randn(16, 4, generator=g), delay

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        time.sleep(self.delay)
        return {"index": torch.tensor(i), "x": self.x[i]}


class PointsTask:
    """The engine's task on a linear model: its outputs' argmax as the prediction."""

    def model_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"input": batch["x"]}  # nn.Linear's argument

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> SimpleNamespace:
        return SimpleNamespace(logits=model(batch["x"]))

    def eval_outputs(self, outputs: SimpleNamespace, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"index": batch["index"], "prediction": outputs.logits.argmax(-1)}

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        return {"score": 0.0}


def test_every_pass_is_timed_alike_in_rotated_rounds() -> None:
    calls: list[str] = []
    passes = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    seconds = interleaved_seconds(Accelerator(cpu=True), passes, rounds=4, warmup=2)
    assert {name: len(s) for name, s in seconds.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for s in seconds.values() for t in s)
    # the warm-up, untimed, then every round each pass once, the first place rotating
    assert calls == ["a", "a", "b", "b", "c", "c"] + list("abc" "bca" "cab" "abc")
    with pytest.raises(ValueError, match="rounds >= 1"):
        interleaved_seconds(Accelerator(cpu=True), passes, rounds=0)


def test_the_models_alone_are_timed_not_the_loader() -> None:
    """A loader with 2 workers that needs 8 x 50 ms / 2 = 200 ms for the kept batches: the timed pass
    of a linear layer must be far below it, for the first model as for the second."""
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model, twin = nn.Linear(4, 3), nn.Linear(4, 3)
    loader = acc.prepare(make_loader(SlowPoints(0.05), 4, shuffle=False, workers=2))
    task = PointsTask()
    result = evaluate(acc, model, task, loader, progress=False, keep_batches=2)
    assert [b["index"].tolist() for b in result.batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    timings = time_models(acc, {"first": model, "second": twin}, task, result.batches, rounds=3)
    for name, timing in timings.items():
        assert timing.examples == 8 and len(timing.seconds) == 3 and timing.warmup == 1, name
        assert timing.median_seconds < 0.1, (name, timing.seconds)  # the loader's 200 ms are not in it
    assert timings["first"].speedup_over(timings["first"]) == 1.0
    with pytest.raises(ValueError, match="keep_batches"):
        time_models(acc, {"m": model}, task, [])


# ---------------------------------------------------------------------------------------- eval on SNLI-VE


def write_snli_ve(root: Path, *, broken: str | None = None, missing: str | None = None) -> Path:
    """An SNLI-VE data folder as ``recipes.prepare.convert_snli_ve`` writes it: 12 dev and 12 test pairs
    over 3 images; ``broken``: an image stem whose stored bytes do not decode; ``missing``: one left out
    of the store."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        write_jsonl(root / f"snli_ve_{split}.jsonl",
                    [{"pairID": f"{split}-{i}", "Flickr30K_ID": str(1000 + i % 3),
                      "sentence2": f"the square is {['red', 'blue', 'green', 'purple'][i % 4]}.",
                      "gold_label": SNLI_VE_LABELS[i % 3]} for i in range(12)])
    write_image_store(root / "flickr30k_images.lmdb",
                      [(str(1000 + k), b"not an image" if str(1000 + k) == broken else image_bytes(c))
                       for k, c in enumerate(COLOURS) if str(1000 + k) != missing])
    return root


@pytest.fixture(scope="module")
def vilt_ve(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny ViLT with an SNLI-VE head (its labels in the task's order) and the bundled tokenizer."""
    path = save_tiny_vilt(ViltForQuestionAnswering, tmp_path_factory.mktemp("vilt-ve"), num_labels=3,
                          id2label=dict(enumerate(SNLI_VE_LABELS)),
                          label2id={name: i for i, name in enumerate(SNLI_VE_LABELS)})
    BertTokenizerFast.from_pretrained(str(tokenizer_dir)).save_pretrained(path)
    return path


def _eval_args(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["snli_ve", "eval", "--model", str(model), "--data", str(data), "--output", str(out), "--image-size", "32",
            "--eval-batch", "3", "--no-progress", "--log-level", "WARNING", *extra]


@pytest.mark.filterwarnings("ignore:.*all ratios zero")
def test_a_zero_ratio_config_runs_at_the_unpatched_speed(tmp_path: Path, vilt_ve: Path) -> None:
    """Identical compute (a config whose ratios are all zero), loader workers that start with the first
    variant's pass: the speedup is 1 within noise, both variants timed on the same examples and rounds."""
    data = write_snli_ve(tmp_path / "data")
    out = tmp_path / "eval"
    assert cli.main(_eval_args(data, vilt_ve, out, "--workers", "2", "--pumer", "p0-r0-t0-1", "--pumer-mode",
                               "default", "--timing-rounds", "9")) == 0
    report = json.loads((out / "eval.json").read_text())
    base, zero = report["rows"]
    assert report["timing"]["examples_per_pass"] == 12 and report["timing"]["rounds"] == 9  # 4 kept batches of 3
    assert len(base["round_seconds"]) == len(zero["round_seconds"]) == 9
    assert base["speedup"] == 1.0 and base["gflops_per_example"] == zero["gflops_per_example"]
    # wide: these passes take milliseconds on a shared two-core machine; the start-up cost this guards
    # against made the same config read 2.8-3.7x
    assert 0.4 <= zero["speedup"] <= 2.5, (zero["speedup"], base["round_seconds"], zero["round_seconds"])
    assert zero["examples_per_s"] == pytest.approx(12 / zero["seconds_per_pass"])
    table = (out / "eval.md").read_text()
    assert "| speedup |" in table and "the model alone on batches held in device memory" in table


@pytest.mark.parametrize("bad", ["broken", "missing"])
def test_tables_count_examples_scored_and_skipped_apart(tmp_path: Path, vilt_ve: Path, bad: str) -> None:
    """An image that does not decode (skipped at evaluation) or is missing from the store (its pairs
    dropped when the split is built): both count as skipped, never as scored."""
    data = write_snli_ve(tmp_path / "data", **{bad: "1001"})  # pairs 1, 4, 7, 10 of each split use it
    out = tmp_path / "eval"
    assert cli.main(_eval_args(data, vilt_ve, out, "--workers", "0", "--split", "test", "--on-bad-image", "skip",
                               "--pumer", "p0.3-r0.3-t0.2-1", "--pumer-mode", "default")) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    for row in rows:
        assert (row["examples"], row["skipped"]) == (8, 4), row["variant"]
        assert round(row["score"] * 8) == pytest.approx(row["score"] * 8, abs=1e-6)  # a share of the 8 scored
    table = (out / "eval.md").read_text().splitlines()
    assert table[0].startswith("| variant | accuracy | examples | skipped |")
    assert all(line.split(" | ")[2:4] == ["8", "4"] for line in table[2:4])
    # the reduced variant's trace: image and text tokens after its reducing layer
    assert rows[1]["tokens_per_layer"][0]["layer"] == 1 and rows[0]["tokens_per_layer"] is None
    assert rows[1]["tokens_per_layer"][0]["image"] < 1 + (32 // 8) ** 2
    assert "Tokens after each reducing layer, PuMer p0.3-r0.3-t0.2-1 (default): 1:" in "\n".join(table)


def test_accelerate_launch_that_starts_one_process_for_two_is_refused(tmp_path: Path, vilt_ve: Path) -> None:
    """accelerate's simple launcher runs ``--num_processes 2`` as one process on a CPU machine: refused, with
    the launch that works (torchrun), before any model loads."""
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.is_file():
        pytest.skip("the accelerate launcher is not installed next to this python")
    data = write_snli_ve(tmp_path / "data")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "MASTER_ADDR", "RANK", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(launcher), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                           "no", "--dynamo_backend", "no", "-m", "recipes",
                           *_eval_args(data, vilt_ve, tmp_path / "eval", "--workers", "0")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "asked for several processes but started one" in proc.stderr and "torchrun" in proc.stderr
    assert not (tmp_path / "eval").exists()
    # what each launcher leaves in the environment
    check_launch({})  # plain python
    check_launch({"ACCELERATE_MIXED_PRECISION": "no"})  # accelerate launch, one process asked for
    check_launch({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "h", "WORLD_SIZE": "2"})  # --multi_gpu
    check_launch({"MASTER_ADDR": "h", "WORLD_SIZE": "2"})  # torchrun


def test_eval_of_an_unlabelled_split_points_to_predict(tmp_path: Path, tokenizer_dir: Path) -> None:
    """VQAv2's test questions carry no answers: eval refuses (it would print a score of nothing) and names predict."""
    from test_recipes_vqa import ANSWERS, write_data

    data = write_data(tmp_path / "vqa")
    model = save_tiny_vilt(ViltForQuestionAnswering, tmp_path / "model", num_labels=len(ANSWERS),
                           id2label=dict(enumerate(ANSWERS)), label2id={a: i for i, a in enumerate(ANSWERS)})
    BertTokenizerFast.from_pretrained(str(tokenizer_dir)).save_pretrained(model)
    common = ["--model", str(model), "--data", str(data), "--image-size", "32", "--workers", "0", "--no-progress"]
    with pytest.raises(ValueError, match=r"the test split of VQAv2 has no labels \(5 unlabelled examples\).*"
                                         r"python -m recipes vqa predict --split test"):
        cli.main(["vqa", "eval", *common, "--split", "test", "--output", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()
    assert cli.main(["vqa", "eval", *common, "--split", "val", "--output", str(tmp_path / "val")]) == 0


def test_the_run_folder_keeps_its_log_and_collect_tabulates_every_eval(tmp_path: Path, vilt_ve: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from recipes import collect

    data = write_snli_ve(tmp_path / "data")
    runs = tmp_path / "runs"
    pumer = ["--pumer", "p0.3-r0.3-t0.2-1", "--pumer-mode", "default"]
    for out, extra in ((runs / "vilt" / "eval", pumer), (runs / "vilt" / "eval", pumer), (runs / "plain", [])):
        assert cli.main(_eval_args(data, vilt_ve, out, "--workers", "0", *extra)) == 0
    log = (runs / "vilt" / "eval" / "eval.log").read_text()
    assert log.count("# python -m recipes snli_ve eval --model") == 2  # appended: one header per job
    # INFO records, below the console's --log-level WARNING
    assert "INFO recipes: unpatched: accuracy" in log and "PuMer p0.3-r0.3-t0.2-1 (default): accuracy" in log
    capsys.readouterr()

    assert collect.main([str(runs), "--output", str(tmp_path / "all.md")]) == 0
    table = (tmp_path / "all.md").read_text().splitlines()
    assert capsys.readouterr().out.splitlines() == table
    rows = json.loads((runs / "vilt" / "eval" / "eval.json").read_text())["rows"]
    assert [line.split(" | ")[0] for line in table[2:]] == ["| plain", "| vilt/eval", "| vilt/eval"]
    cells = [line.strip("| ").split(" | ") for line in table[3:]]
    assert [c[3] for c in cells] == ["unpatched", "PuMer p0.3-r0.3-t0.2-1 (default)"]
    assert cells[0][6] == "+0.00" and cells[0][9] == "1.00x"
    assert cells[1][5] == f"{100 * rows[1]['score']:.2f}"
    assert cells[1][6] == f"{100 * (rows[1]['score'] - rows[0]['score']):+.2f}"
    assert cells[1][7] == "12 examples" and cells[1][9] == f"{rows[1]['speedup']:.2f}x"
    with pytest.raises(FileNotFoundError, match="no eval.json"):
        collect.main([str(data)])
