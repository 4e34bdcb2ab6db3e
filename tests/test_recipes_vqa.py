"""VQAv2 recipe end to end through ``python -m recipes vqa`` (``recipes.cli.main``), on a generated data folder and tiny random models.

A tiny ViLT (and a tiny METER) saved with ``save_pretrained`` trains 3 steps and evaluates, with and
without PuMer; the best checkpoint reloads and scores what training recorded; a run stopped after
2 steps and resumed ends at the same step, having seen the same data (augmented the same way, with
or without loader workers), with the same weights to the bit, as an uninterrupted one;
eval-only compares unpatched and PuMer side by side; predictions come out in the official format.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmdb")
pytest.importorskip("accelerate")

from recipe_helpers import image_bytes, save_tiny_meter, save_tiny_vilt, train_args  # noqa: E402
from transformers import BertTokenizerFast, ViltForQuestionAnswering  # noqa: E402

from pumer_patch.models.meter import MeterForQuestionAnswering  # noqa: E402
from recipes import cli  # noqa: E402
from recipes.data.records import write_jsonl  # noqa: E402
from recipes.data.store import write_image_store  # noqa: E402

pytest_plugins = ["recipe_fixtures"]

ANSWERS = ["blue", "no", "red", "yes"]
COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220)}


def write_data(root: Path, n_train: int = 12, n_val: int = 6, n_test: int = 5) -> Path:
    """A data folder in ``recipes.prepare.convert_vqav2``'s layout with coloured-square questions."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "answers.json").write_text(json.dumps(ANSWERS))
    images, test_images = [], []
    for split, n, coco in (("train", n_train, "train2014"), ("val", n_val, "val2014"), ("test", n_test, "test2015")):
        rows = []
        for k in range(n):
            colour = "red" if k % 2 else "blue"
            img_id = f"COCO_{coco}_{k:012d}"
            (test_images if split == "test" else images).append((img_id, image_bytes(COLOURS[colour], "PNG" if k % 2 else "JPEG", (48, 40))))
            label = {} if split == "test" else {colour: 1.0, "yes": 0.3}
            answers = [] if split == "test" else [colour] * 9 + ["yes"]  # the raw human answers
            rows.append({"qid": 1000 * len(split) + k, "question": "what colour is the square?", "img_id": img_id,
                         "label": label, "answer_type": None if split == "test" else "other", "answers": answers})
        write_jsonl(root / f"vqav2_{split}.jsonl", rows)
    write_image_store(root / "coco-trainval2014.lmdb", images)
    write_image_store(root / "coco-test2015.lmdb", test_images)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("vqa-data"))


@pytest.fixture(scope="module")
def vilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretrained-style ViLT: placeholder labels, so the recipe builds a head over the vocabulary."""
    return save_tiny_vilt(ViltForQuestionAnswering, tmp_path_factory.mktemp("vilt"))


@pytest.fixture(scope="module")
def meter(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return save_tiny_meter(MeterForQuestionAnswering, tmp_path_factory.mktemp("meter"), tokenizer_dir, vqa_label_size=2)


def _info(out: Path) -> dict:
    return json.loads((out / "train_info.json").read_text())


@pytest.mark.parametrize("pumer", [None, "p0.2-r0.2-t0.2-1"])
def test_vilt_trains_evaluates_and_reloads(data: Path, vilt: Path, tokenizer_dir: Path, tmp_path: Path,
                                           pumer: str | None) -> None:
    extra = [] if pumer is None else ["--pumer", pumer, "--pumer-mode", "default"]
    assert cli.main(train_args("vqa", "vilt-vqa", data, vilt, tmp_path, tokenizer_dir, *extra)) == 0
    info = _info(tmp_path)
    assert info["step"] == 3 == info["total_steps"] and info["examples"] == 12
    assert [h["step"] for h in info["history"]] == [2, 3]
    for h in info["history"]:
        assert h["examples"] == 6 and 0.0 <= h["score"] <= 1.0 and h["examples_per_s"] > 0 and h["gflops_per_example"] > 0
    best = tmp_path / "best"
    assert (best / "model.safetensors").is_file() and (best / "tokenizer_config.json").is_file()
    reloaded = ViltForQuestionAnswering.from_pretrained(best)
    assert [reloaded.config.id2label[i] for i in range(4)] == ANSWERS
    out = tmp_path / "eval"
    args = ["vqa", "eval", "--model", str(best), "--data", str(data), "--output", str(out), "--image-size", "32",
            "--workers", "0", "--eval-batch", "4", "--no-progress"] + ([] if pumer is None else
                                                                       ["--pumer", pumer, "--pumer-mode", "default"])
    assert cli.main(args) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    best_score = max(h["score"] for h in info["history"])
    assert rows[-1]["score"] == pytest.approx(best_score)  # the reloaded best scores what training recorded
    if pumer is not None:
        assert [r["variant"] for r in rows] == ["unpatched", f"PuMer {pumer} (default)"]
        assert rows[1]["gflops_per_example"] < rows[0]["gflops_per_example"]
    table = (out / "eval.md").read_text()
    assert "| variant | VQA accuracy (official) | VQA soft score (from the targets) | examples |" in table
    unpatched = next(line for line in table.splitlines() if line.startswith("| unpatched |"))
    assert unpatched.split(" | ")[2] == f"{100 * rows[0]['soft_score']:.2f}"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_ends_where_an_uninterrupted_run_ends(data: Path, vilt: Path, tokenizer_dir: Path, tmp_path: Path,
                                                     workers: str) -> None:
    from safetensors.torch import load_file

    # batch 4 over 12 questions: 3 steps an epoch, 5 steps cross an epoch boundary; RandAugment on
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ["--max-steps", "5", "--eval-every", "2", "--workers", workers]
    assert cli.main(train_args("vqa", "vilt-vqa", data, vilt, whole, tokenizer_dir, *common)) == 0
    assert cli.main(train_args("vqa", "vilt-vqa", data, vilt, parts, tokenizer_dir, *common, "--stop-after-steps", "2")) == 0
    assert _info(parts)["step"] == 2
    assert cli.main(train_args("vqa", "vilt-vqa", data, vilt, parts, tokenizer_dir, *common, "--resume")) == 0
    a, b = _info(whole), _info(parts)
    assert (a["step"], a["examples"], a["data_digest"]) == (b["step"], b["examples"], b["data_digest"]) == (5, 20, a["data_digest"])
    assert [h["step"] for h in b["history"]] == [h["step"] for h in a["history"]] == [2, 4, 5]
    assert [h["score"] for h in b["history"]] == pytest.approx([h["score"] for h in a["history"]], abs=1e-6)
    # bit for bit, with loader workers too: each example's augmentation is seeded by (seed, epoch, index)
    wa, wb = (load_file(str(out / "state" / "model.safetensors")) for out in (whole, parts))
    assert wa.keys() == wb.keys() and [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def test_meter_trains_and_evaluates(data: Path, meter: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    assert cli.main(train_args("vqa", "meter-vqa", data, meter, tmp_path, tokenizer_dir)) == 0
    info = _info(tmp_path)
    assert info["step"] == 3 and info["settings"]["loss_scale"] == "mean"
    reloaded = MeterForQuestionAnswering.from_pretrained(tmp_path / "best")
    assert reloaded.config.vqa_label_size == len(ANSWERS)


def test_eval_decodes_through_the_models_own_labels_and_predicts(data: Path, vilt: Path, tokenizer_dir: Path,
                                                                 tmp_path: Path) -> None:
    # a finetuned model whose labels are another order and a superset of the data's vocabulary
    model = ViltForQuestionAnswering.from_pretrained(vilt, num_labels=5, id2label=dict(enumerate(["red", "yes", "blue", "green", "no"])),
                                                     label2id={}, ignore_mismatched_sizes=True)
    with torch.no_grad():  # make it answer "red" (its own index 0) always
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.copy_(torch.tensor([5.0, 0, 0, 0, 0]))
    model.save_pretrained(tmp_path / "ft")
    BertTokenizerFast.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp_path / "ft")
    common = ["--model", str(tmp_path / "ft"), "--data", str(data), "--image-size", "32", "--workers", "0",
              "--eval-batch", "4", "--no-progress"]
    assert cli.main(["vqa", "eval", *common, "--output", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())["rows"]
    # red on half the val questions: 9 of 10 people said it, official accuracy 1 and soft score 1 there
    assert rows[0]["score"] == pytest.approx(0.5) and rows[0]["examples"] == 6
    assert rows[0]["soft_score"] == pytest.approx(0.5) and rows[0]["unlabelled"] == 0
    assert cli.main(["vqa", "predict", *common, "--output", str(tmp_path / "pred.json")]) == 0
    pred = json.loads((tmp_path / "pred.json").read_text())
    assert pred == [{"question_id": 4000 + k, "answer": "red"} for k in range(5)]


def test_bad_input_fails_before_training(data: Path, vilt: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="names no folder"):
        cli.main(train_args("vqa", "vilt-vqa", data, tmp_path / "no-such-model", tmp_path / "o", tokenizer_dir))
    with pytest.raises(ValueError, match="--teacher"):
        cli.main(train_args("vqa", "vilt-vqa-pumer", data, vilt, tmp_path / "o", tokenizer_dir))
    with pytest.raises(FileNotFoundError, match="answers.json"):
        cli.main(train_args("vqa", "vilt-vqa", tmp_path, vilt, tmp_path / "o", tokenizer_dir))
    with pytest.raises(ValueError, match="not a multiple"):
        cli.main(train_args("vqa", "vilt-vqa", data, vilt, tmp_path / "o", tokenizer_dir, "--total-batch", "6"))
    assert not (tmp_path / "o" / "state").exists()


def test_two_processes_on_cpu_train_and_count_every_example_once(data: Path, vilt: Path, tokenizer_dir: Path,
                                                                 tmp_path: Path) -> None:
    """torchrun (what ``accelerate launch`` runs) with 2 gloo processes; 6 val examples in batches of 4
    per process leave padding in the last round, which ``gather_for_metrics`` must drop."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = train_args("vqa", "vilt-vqa", data, vilt, tmp_path, tokenizer_dir, "--cpu", "--total-batch", "8", "--eval-batch", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "recipes", *args, "--log-level", "WARNING"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = _info(tmp_path)
    assert info["processes"] == 2 and info["step"] == 3
    assert info["examples"] == 3 * 8  # 2 processes x 4 per step, gathered
    assert [h["examples"] for h in info["history"]] == [6, 6]


def test_pumer_preset_distils_from_a_teacher_with_its_own_label_order(data: Path, vilt: Path, tokenizer_dir: Path,
                                                                     tmp_path: Path) -> None:
    teacher_labels = ["yes", "red", "no", "blue", "green"]  # another order, and one answer more
    teacher = ViltForQuestionAnswering.from_pretrained(vilt, num_labels=5, id2label=dict(enumerate(teacher_labels)),
                                                       label2id={a: i for i, a in enumerate(teacher_labels)},
                                                       ignore_mismatched_sizes=True)
    teacher.save_pretrained(tmp_path / "teacher")
    args = train_args("vqa", "vilt-vqa-pumer", data, vilt, tmp_path / "run", tokenizer_dir, "--teacher",
                      str(tmp_path / "teacher"), "--pumer", "p0.2-r0.2-t0.2-1")
    assert cli.main(args) == 0
    info = _info(tmp_path / "run")
    assert info["step"] == 3 and info["settings"]["distill_weight"] == 1.0
    assert info["settings"]["pumer"] == "p0.2-r0.2-t0.2-1" and info["settings"]["pumer_mode"] == "reference"
