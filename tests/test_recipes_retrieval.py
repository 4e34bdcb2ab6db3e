"""Retrieval recipe: Karpathy json -> ``recipes.prepare.convert_retrieval`` -> train / eval for ViLT and METER.

The fixture writes Karpathy's ``dataset_flickr30k.json`` / ``dataset_coco.json`` layout and image
folders of plain-colour JPEGs; the converter writes the data folder. Recall and its tie rule are
checked against hand-computed ranks; the score matrix against itself: resumed by tile, sharded
over two gloo processes, METER on cached unimodal features (with PuMer, and with ToMe in its CLIP
tower) against the whole model per pair. Tiny pretraining-style checkpoints (ITM head, no
``rank_output``) train 3 steps and evaluate, with and without PuMer; a run resumed half-way, scored
by two processes and rescored from its tiles gives what one uninterrupted run and process give.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmdb")
pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from recipe_helpers import image_bytes, save_tiny_vilt  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import BertTokenizerFast, ViltForMaskedLM  # noqa: E402

import pumer_patch  # noqa: E402
from recipes import cli  # noqa: E402
from recipes.data.loader import EpochKeySampler  # noqa: E402
from recipes.data.records import RETRIEVAL_STORES, RetrievalRecord, read_jsonl  # noqa: E402
from recipes.data.store import ImageStore  # noqa: E402
from recipes.data.transforms import build_image_transform  # noqa: E402
from recipes.models import get_family, load_model  # noqa: E402
from recipes.prepare import convert_retrieval  # noqa: E402
from recipes.tasks.retrieval import data as retrieval_data  # noqa: E402
from recipes.tasks.retrieval.task import RetrievalTask  # noqa: E402
from recipes.tasks.retrieval.scoring import (  # noqa: E402
    CachedMeterScorer,
    FullPairScorer,
    distinct_texts,
    image_ranks,
    make_tiles,
    recall,
    score_matrix,
    shortlist,
    text_ranks,
)
from recipes.tasks.retrieval.models import (  # noqa: E402
    CandidateScorer,
    MeterForRetrieval,
    RetrievalOutput,
    ViltForRetrieval,
)

pytest_plugins = ["recipe_fixtures"]

SPLIT_OF = ["train"] * 8 + ["restval"] * 2 + ["val"] * 4 + ["test"] * 4


def _colour(i: int) -> tuple[int, int, int]:
    return (i * 67) % 256, (i * 131) % 256, (i * 29 + 40) % 256


def write_karpathy(root: Path, dataset: str, caption: Callable[[int, int], str] = lambda i, j: f"picture {i} caption {j}",
                   ) -> tuple[Path, Path]:
    """Karpathy's json and image folders: 18 images, image i with 1 + i % 3 captions (the real files
    have 5; fewer exercise uneven counts), caption j of image i reading ``caption(i, j)``. COCO images
    sit in ``train2014/`` or ``val2014/``."""
    images, entries = root / "images", []
    for i, split in enumerate(SPLIT_OF):
        if dataset == "coco":
            folder = "val2014" if split in ("val", "test") else "train2014"
            name = f"COCO_{folder}_{i:012d}.jpg"
            (images / folder).mkdir(parents=True, exist_ok=True)
            (images / folder / name).write_bytes(image_bytes(_colour(i)))
            extra = {"filepath": folder, "cocoid": i}
        else:
            name = f"{1000 + i}.jpg"
            images.mkdir(parents=True, exist_ok=True)
            (images / name).write_bytes(image_bytes(_colour(i)))
            extra = {}
        sentences = [{"raw": f" {caption(i, j)} ", "tokens": ["picture", str(i)], "imgid": i, "sentid": 10 * i + j}
                     for j in range(1 + i % 3)]
        entries.append({"filename": name, "split": split, "imgid": i, "sentids": [s["sentid"] for s in sentences],
                        "sentences": sentences, **extra})
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": entries, "dataset": dataset}))
    return path, images


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("f30k")
    karpathy, images = write_karpathy(root, "flickr30k")
    convert_retrieval.convert(karpathy, images, root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def vilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretrained ViLT as ``convert_vilt --head pretrain`` writes it: MLM weights, ITM aside."""
    path = save_tiny_vilt(ViltForMaskedLM, tmp_path_factory.mktemp("vilt"))
    save_file({"weight": torch.randn(2, 32), "bias": torch.randn(2)}, str(path / "itm_head.safetensors"))
    return path


def _split(data: Path, tokenizer_dir: Path, family: str, split: str = "test") -> retrieval_data.SplitData:
    d = retrieval_data.RetrievalData(data)
    return retrieval_data.SplitData(d.records(split), ImageStore(d.store_path), BertTokenizerFast.from_pretrained(
        str(tokenizer_dir)), family=get_family(family), image_size=32, text_length=12, train=split == "train")


# ---------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("dataset", ["flickr30k", "coco"])
def test_converter_writes_the_seed_layout(tmp_path: Path, dataset: str) -> None:
    karpathy, images = write_karpathy(tmp_path, dataset)
    counts = convert_retrieval.convert(karpathy, images, tmp_path / "data")
    assert counts == {"train": 10, "val": 4, "test": 4}  # restval joins train
    test = read_jsonl(tmp_path / "data" / f"{dataset}_test.jsonl", RetrievalRecord.from_json)
    stem = "COCO_val2014_000000000014" if dataset == "coco" else "1014"
    assert test[0] == RetrievalRecord(item_id=14, captions=("picture 14 caption 0", "picture 14 caption 1",
                                                            "picture 14 caption 2"), img_id=stem)
    store = ImageStore(tmp_path / "data" / RETRIEVAL_STORES[dataset])
    assert len(store) == 18 and store[stem] == (images / ("val2014" if dataset == "coco" else "") / f"{stem}.jpg").read_bytes()
    assert convert_retrieval.convert(karpathy, None, tmp_path / "data", restval=False)["train"] == 8  # store kept
    (images / ("val2014" if dataset == "coco" else "") / f"{stem}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 18 images"):
        convert_retrieval.convert(karpathy, images, tmp_path / "other")


# ---------------------------------------------------------------------------------------- recall and ties


def test_ranks_and_recall_by_hand() -> None:
    # 3 images; captions 0, 1 belong to image 0, caption 2 to image 1, captions 3, 4 to image 2
    caption_image = torch.tensor([0, 0, 1, 2, 2])
    scores = torch.tensor([[0.9, 0.1, 0.9, 0.2, 0.0],   # image 0: best own 0.9 ties caption 2 (wrong): rank 2
                           [0.5, 0.5, 0.5, 0.5, 0.6],   # image 1: own 0.5 ties 3 wrong, 1 above: rank 5
                           [0.3, 0.0, 0.1, 0.2, 0.4]])  # image 2: best own 0.4 is highest: rank 1
    assert text_ranks(scores, caption_image).tolist() == [2, 5, 1]
    # caption 0: own image 0 at 0.9 above 0.5, 0.3: 1; caption 1: own 0.1 below 0.5: 2; caption 2: own
    # image 1 at 0.5 below 0.9: 2; caption 3: own 0.2 ties image 0's 0.2 and is below 0.5: 3; caption 4: 2
    assert image_ranks(scores, caption_image).tolist() == [1, 2, 2, 3, 2]
    metrics = recall(scores, caption_image, ks=(1, 2))
    assert metrics["tr_r1"] == pytest.approx(1 / 3) and metrics["tr_r2"] == pytest.approx(2 / 3)
    assert metrics["ir_r1"] == pytest.approx(1 / 5) and metrics["ir_r2"] == pytest.approx(4 / 5)
    assert metrics["rsum"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 5 + 4 / 5))


def test_ties_count_against_the_model() -> None:
    caption_image = torch.tensor([0, 1, 2, 3])
    constant = torch.zeros(4, 4)  # every pair tied: every true item ranks after all 3 wrong ones
    assert text_ranks(constant, caption_image).tolist() == [4] * 4
    assert image_ranks(constant, caption_image).tolist() == [4] * 4
    assert recall(constant, caption_image, ks=(1, 3))["tr_r3"] == 0.0
    unscored = torch.eye(4).masked_fill(torch.eye(4) == 0, -torch.inf)  # a shortlist that kept only the truth
    unscored[0, 0] = -torch.inf  # ... except image 0's own caption: ranks last
    assert text_ranks(unscored, caption_image).tolist() == [4, 1, 1, 1]
    with pytest.raises(ValueError, match="NaN"):
        recall(torch.full((4, 4), torch.nan), caption_image)


def test_identical_captions_are_one_text() -> None:
    ids = torch.tensor([[5, 6, 0], [7, 0, 0], [5, 6, 0], [5, 6, 0], [7, 0, 0]])
    mask = (ids > 0).long()
    mask[3, 2] = 1  # the same ids, another mask: another input
    first, text_of = distinct_texts(ids, mask)
    assert first.tolist() == [0, 1, 3] and text_of.tolist() == [0, 1, 0, 2, 1]
    assert torch.equal(ids[first][text_of], ids) and torch.equal(mask[first][text_of], mask)


def test_repeated_captions_tie_whatever_the_pair_batch(tmp_path: Path, vilt: Path, tokenizer_dir: Path) -> None:
    """COCO repeats captions. The same text scored in another slot of a pair batch comes out a few ulps
    apart, which the tie rule would break either way; scored once per image, identical captions tie
    exactly and the recall is the same at --pair-batch 7 and 256."""
    karpathy, images = write_karpathy(tmp_path, "coco", caption=lambda i, j: "a picture" if j == 0 else f"picture {i} {j}")
    convert_retrieval.convert(karpathy, images, tmp_path / "data")
    common = ["retrieval", "eval", "--data", str(tmp_path / "data"), "--model", str(vilt), "--tokenizer",
              str(tokenizer_dir), "--workers", "0", "--no-progress", "--eval-batch", "3", "--image-size", "32",
              "--log-level", "WARNING"]
    reports, scores = {}, {}
    for batch in ("7", "256"):
        out = tmp_path / f"eval-{batch}"
        assert cli.main([*common, "--pair-batch", batch, "--output", str(out)]) == 0
        reports[batch] = json.loads((out / "eval.json").read_text())["rows"][0]
        scores[batch] = torch.load(out / "scores" / "unpatched" / "scores.pt")
    captions = [c for r in read_jsonl(tmp_path / "data" / "coco_test.jsonl", RetrievalRecord.from_json) for c in r.captions]
    same = [c for c, text in enumerate(captions) if text == "a picture"]
    assert len(same) == 4 and reports["7"]["captions"] == 9 and reports["7"]["distinct_captions"] == 6
    for batch, matrix in scores.items():
        assert matrix.shape == (4, 9)
        assert all(torch.equal(matrix[:, c], matrix[:, same[0]]) for c in same), batch  # ties, to the bit
    recalls = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")
    assert {k: reports["7"][k] for k in recalls} == {k: reports["256"][k] for k in recalls}


# ---------------------------------------------------------------------------------------- the score matrix


class _Formula:
    """A scorer whose score of (image i, caption c) is ``i * 100 + c``, counting the pairs it scores."""

    def __init__(self, fail_after_tiles: int | None = None) -> None:
        self.prepare_seconds, self.pairs, self.tiles, self.fail_after = 0.0, 0, 0, fail_after_tiles

    def tile(self, rows: range, cols: range):
        if self.fail_after is not None and self.tiles == self.fail_after:
            raise KeyboardInterrupt  # a job killed mid-run
        self.tiles += 1

        def score(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            self.pairs += len(r)
            return (r + rows.start) * 100.0 + (c + cols.start)

        return score


def test_tiles_resume_and_shortlist(tmp_path: Path) -> None:
    acc = Accelerator(cpu=True)
    expected = torch.arange(7)[:, None] * 100.0 + torch.arange(11)[None, :]
    assert sum(t.pairs for t in make_tiles(7, 11, 3, 4)) == 77
    with pytest.raises(KeyboardInterrupt):
        score_matrix(acc, _Formula(fail_after_tiles=4), 7, 11, tmp_path, meta={"m": 1}, tile_images=3, tile_captions=4,
                     pair_batch=5, progress=False)
    assert len(list(tmp_path.glob("tile_*.pt"))) == 4 and not list(tmp_path.glob("*.partial"))
    again = _Formula()
    matrix, stats = score_matrix(acc, again, 7, 11, tmp_path, meta={"m": 1}, tile_images=3, tile_captions=4,
                                 pair_batch=5, progress=False)
    assert torch.equal(matrix, expected)
    assert stats.tiles_skipped == 4 and again.tiles == 5 and again.pairs == stats.scored_now == 77 - (12 + 12 + 9 + 12)
    with pytest.raises(ValueError, match="other settings"):
        score_matrix(acc, _Formula(), 7, 11, tmp_path, meta={"m": 2}, tile_images=3, tile_captions=4)
    mask = shortlist(-expected, 2)  # each image's 2 best captions (0, 1) and each caption's 2 best images (0, 1)
    assert mask.sum() == 2 * 7 + 2 * 11 - 4
    short, stats = score_matrix(acc, _Formula(), 7, 11, tmp_path / "short", meta={}, mask=mask, tile_images=3,
                                tile_captions=4, progress=False)
    assert stats.scored_now == stats.pairs == int(mask.sum())
    assert torch.equal(short[mask], expected[mask]) and torch.isinf(short[~mask]).all()


def test_meter_cached_scores_equal_the_whole_model(data: Path, pretrained_meter: Path, tokenizer_dir: Path) -> None:
    acc = Accelerator(cpu=True)
    split = _split(data, tokenizer_dir, "meter")
    images, captions = split.sizes
    for config in (None, "p0.3r0.3t0.2-02", "tome"):
        model = load_model(get_family("meter"), "retrieval", pretrained_meter, [], image_size=64).eval()
        if config == "tome":  # ToMe in the CLIP tower: 65 tokens -> 57, sizes cached with the features
            pumer_patch.apply(model, layers=[], encoder_merge_schedule=4, mode="default")
        elif config is not None:
            pumer_patch.apply(model, config, mode="default")
        split.images.transform = build_image_transform(get_family("meter").image, 64, train=False)
        cached = CachedMeterScorer(model, split.images, split.input_ids, split.attention_mask, acc, batch=3)
        full = FullPairScorer(model, split.images, split.input_ids, split.attention_mask, acc, batch=3)
        a = cached.tile(range(images), range(captions))
        b = full.tile(range(images), range(captions))
        r, c = torch.arange(images).repeat_interleave(captions), torch.arange(captions).repeat(images)
        with torch.no_grad():
            torch.testing.assert_close(a(r, c), b(r, c), atol=1e-6, rtol=1e-6)
        if config == "tome":
            assert next(iter(cached.image_feats.values())).shape[0] == 57 and cached.image_sizes
        assert cached.cache_bytes()["bytes_per_image"] > 0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_resumed_run_scored_on_two_processes_and_rescored_equals_an_uninterrupted_one(
        data: Path, pretrained_meter: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    """METER trained 3 steps in one job, and in two (stopped after 2, resumed); the resumed run's best
    scored by two torchrun processes, then again by one process into the same folder (every tile
    found): the same scores and recall as the uninterrupted run's best scored by one process."""
    train = ["retrieval", "train", "--preset", "meter-retrieval-flickr", "--data", str(data), "--model",
             str(pretrained_meter), "--tokenizer", str(tokenizer_dir), "--per-device-batch", "2", "--total-batch", "2",
             "--max-steps", "3", "--eval-every", "2", "--image-size", "32", "--workers", "0", "--no-progress",
             "--negatives", "3", "--log-level", "WARNING"]
    assert cli.main([*train, "--output", str(tmp_path / "whole")]) == 0
    assert cli.main([*train, "--output", str(tmp_path / "parts"), "--stop-after-steps", "2"]) == 0
    assert cli.main([*train, "--output", str(tmp_path / "parts"), "--resume"]) == 0
    whole, parts = (json.loads((tmp_path / run / "train_info.json").read_text()) for run in ("whole", "parts"))
    assert (parts["step"], parts["data_digest"], parts["best_step"]) == (whole["step"], whole["data_digest"],
                                                                         whole["best_step"])
    from safetensors.torch import load_file

    best = [load_file(str(tmp_path / run / "best" / "model.safetensors")) for run in ("whole", "parts")]
    assert best[0].keys() == best[1].keys() and all(torch.equal(best[0][k], best[1][k]) for k in best[0])

    def evaluate(model: str) -> list[str]:
        return ["retrieval", "eval", "--data", str(data), "--model", str(tmp_path / model / "best"), "--tokenizer",
                str(tokenizer_dir), "--workers", "0", "--no-progress", "--eval-batch", "3", "--pair-batch", "5",
                "--tile-images", "1", "--tile-captions", "4", "--cpu", "--log-level", "WARNING"]

    assert cli.main([*evaluate("whole"), "--output", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_port()), "-m", "recipes", *evaluate("parts"), "--output", str(tmp_path / "two")],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "scores" / "unpatched" / "scores.pt")
    two = torch.load(tmp_path / "two" / "scores" / "unpatched" / "scores.pt")
    assert one.shape == (4, 9)  # test: images 14-17 with 3 + 1 + 2 + 3 captions
    torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-6)
    report = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert report["processes"] == 2 and report["rows"][0]["pairs"] == 36
    # one speed figure for the job: the 1 x 4 timing tile on both processes, the slower counted; printed once
    assert report["timing"]["pairs_per_pass"] == 2 * 4 and proc.stdout.count("| variant |") == 1
    assert report["rows"][0]["pairs_per_s"] == pytest.approx(8 / report["rows"][0]["seconds_per_pass"])
    assert cli.main([*evaluate("parts"), "--output", str(tmp_path / "two")]) == 0  # re-evaluated: every tile found
    again = json.loads((tmp_path / "two" / "eval.json").read_text())["rows"][0]
    first = json.loads((tmp_path / "one" / "eval.json").read_text())["rows"][0]
    assert again["tiles_skipped"] == 12 and again["pairs_scored_now"] == 0  # 4 x 3 tiles of 1 x 4
    recalls = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")
    assert {k: again[k] for k in recalls} == {k: report["rows"][0][k] for k in recalls} == {k: first[k] for k in recalls}


# ---------------------------------------------------------------------------------------- training


def test_candidates_are_reproducible_distinct_and_change_each_epoch(data: Path, tokenizer_dir: Path) -> None:
    split = _split(data, tokenizer_dir, "vilt", "train")
    groups = retrieval_data.CandidateGroups(split, negatives=5, seed=3)
    n = len(groups)
    for key in range(2 * n):
        i, captions = groups.candidates(key)
        owners = split.caption_image[captions]
        assert owners[0] == i == key % n and len(set(owners.tolist())) == 6  # the true image, 5 distinct others
    assert torch.equal(groups.candidates(4)[1], retrieval_data.CandidateGroups(split, negatives=5, seed=3).candidates(4)[1])
    assert any(not torch.equal(groups.candidates(k)[1], groups.candidates(k + n)[1]) for k in range(n))
    sampler = EpochKeySampler(n, shuffle=True, seed=0)
    sampler.set_epoch(2)
    assert sorted(sampler) == list(range(2 * n, 3 * n))
    with pytest.raises(ValueError, match="--negatives 15"):
        retrieval_data.CandidateGroups(split, negatives=15, seed=0)


def test_loss_and_proxy_metrics_by_hand() -> None:
    task = RetrievalTask()
    logits = torch.zeros(2, 3, 3)
    logits[0, :, 0] = torch.tensor([2.0, 1.0, 0.0])  # image 0: the true caption first
    logits[1, :, 0] = torch.tensor([1.0, 1.0, 0.0])  # image 1: tied with a negative -> not first
    logits[0, 0, 1:] = torch.tensor([0.0, 3.0])  # ITM right on both pairs of image 0, wrong on image 1's
    logits[0, 1, 1:] = torch.tensor([3.0, 0.0])
    outputs = RetrievalOutput(logits=logits[..., 0], itm_logits=logits[..., 1:])  # (B, K) and (B, K, 2)
    ids = torch.arange(2 * 3 * 4).view(2, 3, 4)  # (B, K, T): every caption its own text
    batch = {"index": torch.arange(2), "valid": torch.tensor([True, True]), "input_ids": ids,
             "attention_mask": torch.ones_like(ids)}
    rank = torch.nn.functional.cross_entropy(logits[..., 0], torch.zeros(2, dtype=torch.long))
    itm = torch.nn.functional.cross_entropy(logits[:, :2, 1:].reshape(4, 2), torch.tensor([1, 0, 1, 0]))
    torch.testing.assert_close(task.loss(outputs, batch), rank + 0.5 * itm)
    metrics = task.metrics(task.eval_outputs(outputs, batch))
    assert metrics["score"] == 0.5 and metrics["itm_accuracy"] == 0.5  # image 1's ITM logits tie: wrong on both pairs
    # image 0's second negative is its true caption's text (COCO repeats captions): a tie, whatever its score
    ids[0, 2] = ids[0, 0]
    assert task.metrics(task.eval_outputs(outputs, batch))["score"] == 0.0


@pytest.mark.parametrize("family", ["vilt", "meter"])
def test_heads_load_from_a_pretraining_checkpoint(vilt: Path, pretrained_meter: Path, family: str, tmp_path: Path) -> None:
    model = load_model(get_family(family), "retrieval", vilt if family == "vilt" else pretrained_meter, [], image_size=32)
    assert isinstance(model, ViltForRetrieval if family == "vilt" else MeterForRetrieval)
    itm = model.itm_score if family == "vilt" else model.itm_score.fc
    torch.testing.assert_close(model.rank_output.weight, itm.weight[1:])  # rank_output := the ITM "match" row
    if family == "vilt":
        from safetensors.torch import load_file

        torch.testing.assert_close(itm.weight, load_file(str(vilt / "itm_head.safetensors"))["weight"])
    CandidateScorer(model).save_pretrained(tmp_path)  # what the engine saves reloads with its own heads
    again = load_model(get_family(family), "retrieval", tmp_path, [], image_size=32)
    torch.testing.assert_close(again.rank_output.bias, model.rank_output.bias)


@pytest.mark.parametrize("family", ["vilt", "meter"])
@pytest.mark.parametrize("reduce", [False, True])
def test_trains_and_evaluates(data: Path, vilt: Path, pretrained_meter: Path, tokenizer_dir: Path, tmp_path: Path,
                              family: str, reduce: bool) -> None:
    config = "p0.3-r0.3-t0.2-1" if family == "vilt" else "p0.3r0.3t0.2-02"
    extra = ["--pumer", config, "--pumer-mode", "default"] if reduce else []
    out = tmp_path / "run"
    args = ["retrieval", "train", "--preset", f"{family}-retrieval-flickr", "--data", str(data), "--model",
            str(vilt if family == "vilt" else pretrained_meter), "--tokenizer", str(tokenizer_dir), "--output", str(out),
            "--per-device-batch", "2", "--total-batch", "2", "--max-steps", "3", "--eval-every", "2",
            "--image-size", "32", "--workers", "0", "--no-progress", "--negatives", "3", *extra]
    assert cli.main(args) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["step"] == 3 and info["examples"] == 6 and [h["examples"] for h in info["history"]] == [4, 4]
    assert info["settings"]["task"] == "retrieval" and info["settings"]["dataset"] == "flickr30k"
    common = ["retrieval", "eval", "--data", str(data), "--model", str(out / "best"), "--tokenizer", str(tokenizer_dir),
              "--workers", "0", "--no-progress", "--eval-batch", "4", "--split", "val", "--output", str(tmp_path / "e"),
              "--pumer", config, "--pumer-mode", "default"]
    assert cli.main(common) == 0
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    unpatched, patched = report["rows"]
    assert unpatched["pairs"] == patched["pairs"] == 4 * 8  # val: images 10-13 with 2 + 3 + 1 + 2 captions
    assert patched["gflops_per_pair"] < unpatched["gflops_per_pair"]
    assert ("gflops_per_pair_cached" in unpatched) == (family == "meter")
    assert "| TR@1 |" in (tmp_path / "e" / "eval.md").read_text()
    if reduce:  # best/config.json records the reduction: eval --pumer config needs no retyping, and scores the same
        recorded = json.loads((out / "best" / "config.json").read_text())["pumer_reduction"]
        assert recorded == patched["reduction"] and recorded["mode"] == "default"
        assert cli.main([*common[:-4], "--pumer", "config", "--output", str(tmp_path / "from-config")]) == 0
        again = json.loads((tmp_path / "from-config" / "eval.json").read_text())["rows"][1]
        assert again["variant"] == "PuMer from the checkpoint's config" and again["reduction"] == recorded
        keys = ("tr_r1", "tr_r5", "ir_r1", "rsum", "gflops_per_pair", "tokens_per_layer")
        assert {k: again[k] for k in keys} == {k: patched[k] for k in keys}
    if reduce and family == "vilt":  # trained on without --pumer: its checkpoints record no reduction
        plain = tmp_path / "plain"
        assert cli.main(["retrieval", "train", "--preset", "vilt-retrieval-flickr", "--data", str(data), "--model",
                         str(out / "best"), "--tokenizer", str(tokenizer_dir), "--output", str(plain),
                         "--per-device-batch", "2", "--total-batch", "2", "--max-steps", "1", "--eval-every", "1",
                         "--image-size", "32", "--workers", "0", "--no-progress", "--negatives", "3"]) == 0
        assert "pumer_reduction" not in json.loads((plain / "best" / "config.json").read_text())
        with pytest.raises(ValueError, match="--pumer config: this model's config names no reduction"):
            cli.main([*common[:-4], "--model", str(plain / "best"), "--pumer", "config", "--output",
                      str(tmp_path / "none")])
        assert not (tmp_path / "none" / "scores").exists() and not (tmp_path / "none" / "eval.json").exists()


def test_eval_resumes_from_its_tiles_and_reranks_a_shortlist(data: Path, pretrained_meter: Path, tokenizer_dir: Path,
                                                             tmp_path: Path) -> None:
    args = ["retrieval", "eval", "--data", str(data), "--model", str(pretrained_meter), "--tokenizer", str(tokenizer_dir), "--workers", "0",
            "--no-progress", "--eval-batch", "3", "--tile-images", "2", "--tile-captions", "4", "--log-level", "WARNING"]
    assert cli.main([*args, "--output", str(tmp_path / "exact")]) == 0
    first = json.loads((tmp_path / "exact" / "eval.json").read_text())["rows"][0]
    assert first["tiles_skipped"] == 0 and first["pairs_scored_now"] == 36
    assert cli.main([*args, "--output", str(tmp_path / "exact")]) == 0  # a rerun: every tile found
    again = json.loads((tmp_path / "exact" / "eval.json").read_text())["rows"][0]
    assert again["tiles_skipped"] == 6 and again["pairs_scored_now"] == 0
    assert {k: again[k] for k in ("tr_r1", "ir_r5", "rsum")} == {k: first[k] for k in ("tr_r1", "ir_r5", "rsum")}

    with pytest.raises(ValueError, match="--rerank-pumer"):
        cli.main([*args, "--output", str(tmp_path / "short"), "--rerank-top", "2"])
    with pytest.raises(ValueError, match="--on-bad-image skip does not apply to retrieval eval"):
        cli.main([*args, "--output", str(tmp_path / "skip"), "--on-bad-image", "skip"])
    assert not (tmp_path / "skip").exists()
    assert cli.main([*args, "--output", str(tmp_path / "short"), "--rerank-top", "2",
                           "--rerank-pumer", "p0.5r0.5t0.5-02"]) == 0
    report = json.loads((tmp_path / "short" / "eval.json").read_text())
    row = report["rows"][0]
    assert report["approximate"] and row["first_pass_pairs"] == 36 and row["pairs"] < 36
    exact = torch.load(tmp_path / "exact" / "scores" / "unpatched" / "scores.pt")
    short = torch.load(tmp_path / "short" / "scores" / "unpatched" / "scores.pt")
    kept = torch.isfinite(short)
    assert int(kept.sum()) == row["pairs"]
    torch.testing.assert_close(short[kept], exact[kept], atol=1e-6, rtol=1e-6)  # the shortlist's pairs exactly
    assert "Approximate" in (tmp_path / "short" / "eval.md").read_text()


def test_tiles_of_other_weights_at_the_same_path_are_scored_afresh(data: Path, pretrained_meter: Path,
                                                                   tokenizer_dir: Path, tmp_path: Path) -> None:
    """The tiles' fingerprint holds the weights, not the path: a model retrained in place is scored again."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = shutil.copytree(pretrained_meter, tmp_path / "model")
    out = tmp_path / "eval"
    args = ["retrieval", "eval", "--data", str(data), "--model", str(model), "--tokenizer", str(tokenizer_dir),
            "--workers", "0", "--no-progress", "--eval-batch", "3", "--tile-images", "2", "--tile-captions", "4",
            "--log-level", "WARNING", "--output", str(out)]

    def row() -> dict:
        return json.loads((out / "eval.json").read_text())["rows"][0]

    assert cli.main(args) == 0
    before, before_scores = row(), torch.load(out / "scores" / "unpatched" / "scores.pt")
    g = torch.Generator().manual_seed(1)
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in weights.items()}, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(args) == 0  # the same --model path, other weights: every tile again
    changed, changed_scores = row(), torch.load(out / "scores" / "unpatched" / "scores.pt")
    assert changed["tiles_skipped"] == 0 and changed["pairs_scored_now"] == 36
    assert not torch.allclose(changed_scores, before_scores)
    # what a fresh folder scores for the new weights, RSUM included
    assert cli.main([*args[:-1], str(tmp_path / "fresh")]) == 0
    fresh = json.loads((tmp_path / "fresh" / "eval.json").read_text())["rows"][0]
    assert torch.equal(changed_scores, torch.load(tmp_path / "fresh" / "scores" / "unpatched" / "scores.pt"))
    assert changed["rsum"] == fresh["rsum"]
    assert cli.main(args) == 0  # unchanged weights: every tile found
    again = row()
    assert again["tiles_skipped"] == 6 and again["pairs_scored_now"] == 0 and again["rsum"] == changed["rsum"]
