"""A few training steps of every recipe, on generated data, through the recipes' own command line.

    accelerate launch --num_processes 1 -m benchmarks.train_steps --steps 20 --mixed-precision bf16 --out OUT
    python -m benchmarks.train_steps --tiny --cpu --steps 2 --batch 4 --out OUT      # the CPU smoke run

No dataset or checkpoint is needed (nor a network): the script writes small files in each dataset's
public layout (VQAv2's question and annotation json with COCO image folders, SNLI-VE's jsonl with
a Flickr30k folder, NLVR2's JSON lines with its image folders, Karpathy's Flickr30k json), converts
them with ``recipes.prepare``'s converters, writes a word-piece vocabulary of the data's words and
random pretrained-style checkpoints (``ViltForMaskedLM``, ``MeterForPreTraining``; full size, or
32 wide with their depths kept under ``--tiny``), and runs ``recipes TASK train`` (``recipes.cli.main``,
in this process, one run after the other) with each family's PuMer preset for ``--steps`` optimizer
steps and one evaluation at the end. The presets distil from a teacher, which a smoke run does not
have: ``--distill-weight 0``. Writes ``train_steps.json`` and ``train_steps.md`` under ``--out``:
per run its steps, examples, wall seconds (loading, training, the evaluation, the saves), training
examples per second, the last loss, the evaluation's score (random weights and data: not a figure
of merit) and, on CUDA, the peak memory; the JSON after every run, so a run stopped by a time limit
keeps the rows before it. Each run's folder (a full-size METER saves about 5 GB) is removed after
it unless ``--keep-runs``. Needs the recipes extra (accelerate, lmdb, safetensors) and open_clip.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BertTokenizerFast, ViltConfig, ViltForMaskedLM

from pumer_patch.models.meter import MeterConfig, MeterForPreTraining
from recipes import cli
from recipes.prepare import convert_nlvr2, convert_retrieval, convert_snli_ve, convert_vqav2

from .speed import machine_info

__all__ = ["RUNS", "main", "write_data", "write_checkpoints"]

log = logging.getLogger("benchmarks.train_steps")

#: (task, family) -> the preset that runs; retrieval's per-device batch counts images (16 captions each)
RUNS: dict[tuple[str, str], str] = {
    ("vqa", "vilt"): "vilt-vqa-pumer",
    ("vqa", "meter"): "meter-vqa-pumer",
    ("snli_ve", "vilt"): "vilt-ve-pumer",
    ("snli_ve", "meter"): "meter-ve-pumer",
    ("nlvr2", "vilt"): "vilt-nlvr2-pumer",
    ("nlvr2", "meter"): "meter-nlvr2-pumer",
    ("retrieval", "vilt"): "vilt-retrieval-flickr-pumer",
    ("retrieval", "meter"): "meter-retrieval-flickr-pumer",
}
COLOURS = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (230, 230, 30), (240, 240, 240), (30, 30, 30),
           (200, 100, 0), (120, 0, 160)]
NAMES = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
TINY_IMAGE = 64  # --tiny: 64 px images, patches of 8 (64 image tokens)


def _image(path: Path, k: int, fmt: str = "JPEG") -> None:
    """Image ``k``: a square of colour ``k % 8`` on a grey ground, larger than the models' inputs."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (480, 400), (128, 128, 128))
    img.paste(COLOURS[k % len(COLOURS)], (60 + 7 * k % 100, 50, 360, 330))
    img.save(path, format=fmt)


def _vqa(raw: Path, out: Path, n: int) -> None:
    """VQAv2's official files: n (at least 48) training and n // 4 validation questions on 4 colours.

    The answer vocabulary keeps answers of at least 9 questions: 4 answers over 48 questions or more.
    """
    questions: dict[str, list[dict]] = {"train2014": [], "val2014": [], "test2015": []}
    annotations: dict[str, list[dict]] = {"train2014": [], "val2014": []}
    counts = {"train2014": max(48, n), "val2014": max(8, n // 4), "test2015": 4}
    for split, count in counts.items():
        for k in range(count):
            image = k % 4
            _image(raw / split / f"COCO_{split}_{image:012d}.jpg", image)
            qid = len(questions["train2014"]) + len(questions["val2014"]) + len(questions["test2015"]) + 1
            questions[split].append({"question_id": qid, "image_id": image, "question": "what colour is the square?"})
            if split in annotations:
                answers = [NAMES[image]] * 9 + ["grey"]
                annotations[split].append({"question_id": qid, "image_id": image, "answer_type": "other",
                                           "multiple_choice_answer": NAMES[image],
                                           "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]})
    for split, qs in questions.items():
        (raw / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": qs}))
    for split, anns in annotations.items():
        (raw / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": anns}))
    convert_vqav2.convert(raw, out, {s: raw / s for s in counts})


def _snli_ve(raw: Path, out: Path, n: int) -> None:
    """SNLI-VE's public jsonl: a hypothesis per pair, its label from whether it names the square's colour."""
    labels = ["entailment", "neutral", "contradiction"]
    for k in range(len(COLOURS)):
        _image(raw / "images" / f"{1000 + k}.jpg", k)
    for split, count in (("train", n), ("dev", max(6, n // 4)), ("test", 6)):
        lines = []
        for i in range(count):
            k, label = i % len(COLOURS), labels[i % 3]
            said = {"entailment": NAMES[k], "neutral": "big", "contradiction": NAMES[(k + 1) % len(NAMES)]}[label]
            lines.append({"Flickr30K_ID": str(1000 + k), "sentence2": f"the square is {said}.", "gold_label": label,
                          "pairID": f"{1000 + k}.jpg#{i}"})
        (raw / f"snli_ve_{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    convert_snli_ve.convert(raw, raw / "images", out)


def _nlvr2(raw: Path, out: Path, n: int) -> None:
    """NLVR2's public JSON lines and image folders: two statements per image pair, n // 2 training pairs."""
    for split, pairs in (("train", max(2, n // 2)), ("dev", 4), ("test1", 4)):
        lines = []
        for k in range(pairs):
            left, right = k % len(COLOURS), (k * 3 + 1) % len(COLOURS)
            folder = raw / "images" / split / (str(k % 2) if split == "train" else "")
            for side, colour in (("img0", left), ("img1", right)):
                _image(folder / f"{split}-{k}-1-{side}.png", colour, "PNG")
            for s, (sentence, truth) in enumerate(((f"the left square is {NAMES[left]}.", True),
                                                   (f"both squares are {NAMES[right]}.", left == right))):
                line = {"identifier": f"{split}-{k}-1-{s}", "sentence": sentence, "label": str(truth)}
                if split == "train":
                    line["directory"] = str(k % 2)
                lines.append(line)
        (raw / "data" / f"{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (raw / "data" / f"{split}.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    convert_nlvr2.convert(raw / "data", raw / "images", out)


def _retrieval(raw: Path, out: Path, n: int) -> None:
    """Karpathy's Flickr30k json: n training images (at least 16: 15 negatives each), 8 val, 8 test, 2 captions each."""
    entries = []
    splits = ["train"] * max(16, n) + ["val"] * 8 + ["test"] * 8
    for i, split in enumerate(splits):
        _image(raw / "images" / f"{2000 + i}.jpg", i)
        sentences = [{"raw": f"a {NAMES[i % len(NAMES)]} square number {i} view {j}", "imgid": i, "sentid": 10 * i + j}
                     for j in range(2)]
        entries.append({"filename": f"{2000 + i}.jpg", "split": split, "imgid": i,
                        "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    (raw / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    convert_retrieval.convert(raw / "dataset_flickr30k.json", raw / "images", out)


WRITERS = {"vqa": _vqa, "snli_ve": _snli_ve, "nlvr2": _nlvr2, "retrieval": _retrieval}


def write_data(root: Path, examples: int) -> dict[str, Path]:
    """Each task's data folder, written by its converter from generated public-layout files under ``root``."""
    folders = {}
    for task, writer in WRITERS.items():
        folders[task] = root / task / "data"
        writer(root / task / "raw", folders[task], examples)
    return folders


def write_tokenizer(path: Path) -> Path:
    """A word-piece vocabulary (BERT's special tokens, the data's words, digits, letters) saved as a tokenizer."""
    words = sorted({*NAMES, "grey", "what", "colour", "is", "the", "square", "left", "both", "squares", "are", "big",
                    "a", "number", "view", ".", "?", *"abcdefghijklmnopqrstuvwxyz0123456789"})
    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(f"##{c}" for c in "0123456789")]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    return path


def write_checkpoints(root: Path, tokenizer: Path, tiny: bool) -> dict[str, Path]:
    """Random pretrained-style ViLT (MLM head) and METER (MLM + ITM heads): full size, or 32 wide with ``tiny``."""
    torch.manual_seed(0)
    vocab = len(BertTokenizerFast.from_pretrained(str(tokenizer)))
    narrow = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, image_size=TINY_IMAGE, patch_size=8)
    vilt = ViltConfig(vocab_size=vocab, max_position_embeddings=40, **(narrow if tiny else {}))
    paths = {"vilt": root / "vilt", "meter": root / "meter"}
    ViltForMaskedLM(vilt).save_pretrained(paths["vilt"])
    narrow = dict(image_size=TINY_IMAGE, vit_patch_size=8, hidden_size=32, num_heads=2, vision_width=32, vision_heads=2,
                  text_hidden_size=32, text_intermediate_size=64, text_heads=2, num_layers=2, mlp_ratio=2)
    MeterForPreTraining(MeterConfig(vocab_size=vocab, **(narrow if tiny else {}))).save_pretrained(paths["meter"])
    return paths


def train_one(task: str, family: str, data: Path, model: Path, tokenizer: Path, out: Path, args: argparse.Namespace) -> dict:
    """``recipes TASK train`` with the family's PuMer preset; its ``train_info`` and what this run measured."""
    batch = args.retrieval_batch if task == "retrieval" else args.batch
    argv = [task, "train", "--preset", RUNS[task, family], "--data", str(data), "--model", str(model),
            "--tokenizer", str(tokenizer), "--output", str(out), "--per-device-batch", str(batch),
            "--total-batch", str(batch), "--max-steps", str(args.steps), "--eval-every", str(args.steps),
            "--workers", str(args.workers), "--mixed-precision", args.mixed_precision, "--no-progress",
            "--log-level", "WARNING"]
    if RUNS[task, family].endswith("-pumer") and task != "retrieval":
        argv += ["--distill-weight", "0"]
    if args.tiny:
        argv += ["--image-size", str(TINY_IMAGE)]
    if args.cpu:
        argv += ["--cpu"]
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    code = cli.main(argv)
    seconds = time.perf_counter() - start
    info = json.loads((out / "train_info.json").read_text())
    last = info["history"][-1] if info["history"] else {}
    return {
        "task": task, "family": family, "preset": RUNS[task, family], "exit": code, "steps": info["step"],
        "examples": info["examples"], "seconds": seconds, "train_examples_per_s": info["examples"] / seconds,
        "loss": info.get("loss"), "eval_score": last.get("score"), "image_size": info["settings"]["image_size"],
        "pumer": info["settings"]["pumer"], "batch": batch,
        **({"peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}),
    }


def table(rows: list[dict]) -> str:
    lines = ["| task | family | preset | PuMer | image px | batch | steps | examples | seconds | train ex/s "
             "| last loss | eval score | peak MiB |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = f"{r['peak_mem_mib']:.0f}" if "peak_mem_mib" in r else "-"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        score = f"{r['eval_score']:.3f}" if r["eval_score"] is not None else "-"
        lines.append(f"| {r['task']} | {r['family']} | {r['preset']} | {r['pumer']} | {r['image_size']} | {r['batch']} "
                     f"| {r['steps']} | {r['examples']} | {r['seconds']:.1f} | {r['train_examples_per_s']:.1f} "
                     f"| {loss} | {score} | {mem} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="train_steps.json / .md here; the runs under OUT/work")
    p.add_argument("--work", type=Path, default=None, help="data, checkpoints and run folders [OUT/work]")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run [20]")
    p.add_argument("--batch", type=int, default=32, help="per-device batch (VQA, SNLI-VE, NLVR2) [32]")
    p.add_argument("--retrieval-batch", type=int, default=4, help="retrieval's per-device batch of images [4]")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="bf16")
    p.add_argument("--tiny", action="store_true", help="32-wide models on 64 px images: the smoke run")
    p.add_argument("--cpu", action="store_true", help="train on CPU even with a GPU")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's folder (its state and best checkpoint)")
    p.add_argument("--only", nargs="+", default=None, metavar="TASK:FAMILY", help=f"these runs only, of {list(RUNS)}")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.retrieval_batch < 1:
        p.error("--steps, --batch and --retrieval-batch must be positive")
    runs = list(RUNS) if args.only is None else [tuple(r.split(":", 1)) for r in args.only]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"--only: unknown runs {unknown}; known: {[':'.join(r) for r in RUNS]}")
    work = args.work or args.out / "work"
    if work.exists() and any(work.iterdir()):
        p.error(f"{work} is not empty (an earlier run's data and runs): remove it or give another --work / --out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    data = write_data(work / "data", max(args.batch, args.retrieval_batch) * 2)
    tokenizer = write_tokenizer(work / "tokenizer")
    models = write_checkpoints(work / "checkpoints", tokenizer, args.tiny)
    log.info("data and checkpoints in %.1f s", time.perf_counter() - started)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    machine: dict[str, Any] = {**machine_info(device, args.mixed_precision), "mixed_precision": args.mixed_precision,
                               "tiny": args.tiny}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failures: list[dict] = []
    for task, family in runs:
        log.info("training %s / %s", task, family)
        run_dir = work / "runs" / f"{task}-{family}"
        try:
            rows.append(train_one(task, family, data[task], models[family], tokenizer, run_dir, args))
        except Exception as err:  # one failing recipe must not hide the others' rows: reported, and the exit code says so
            log.exception("%s / %s failed", task, family)
            failures.append({"task": task, "family": family, "error": f"{type(err).__name__}: {err}"})
        if not args.keep_runs:  # a full-size METER run saves about 5 GB (state and best): bound the disk it takes
            shutil.rmtree(run_dir, ignore_errors=True)
        # after every run, so that a run stopped by a time limit keeps the rows before it
        (args.out / "train_steps.json").write_text(json.dumps({"machine": machine, "rows": rows, "failures": failures},
                                                              indent=2))
    md = f"Machine: {machine}\n\n{table(rows)}\n" + "".join(f"\nFAILED {f['task']} / {f['family']}: {f['error']}\n" for f in failures)
    (args.out / "train_steps.md").write_text(md)
    print(md)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
