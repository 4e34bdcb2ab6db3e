"""What both checkpoint converters share: the report, the weights-only reader, the two derived weights."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pumer_patch.models import convert_meter, convert_vilt
from pumer_patch.models.convert import ConversionReport, grow_token_types, rank_from_itm_match_row, read_checkpoint


def test_grow_token_types_copies_the_last_row_into_the_new_ones():
    weight = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    grown = grow_token_types(weight, 3)
    assert grown.shape == (3, 5)
    assert torch.equal(grown[:2], weight) and torch.equal(grown[2], weight[1])  # NLVR2: row 2 := row 1
    assert torch.equal(grow_token_types(weight, 4)[3], weight[1])
    assert torch.equal(grow_token_types(weight, 2), weight)
    with pytest.raises(ValueError, match="cannot grow 2 token types to 1"):
        grow_token_types(weight, 1)
    with pytest.raises(ValueError, match=r"\(types, C\)"):
        grow_token_types(weight[0], 3)


def test_rank_from_itm_match_row_takes_row_1_as_a_copy():
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(2, 4, generator=g), torch.randn(2, generator=g)
    rank_weight, rank_bias = rank_from_itm_match_row(weight, bias)
    assert rank_weight.shape == (1, 4) and rank_bias.shape == (1,)
    assert torch.equal(rank_weight[0], weight[1]) and torch.equal(rank_bias[0], bias[1])  # "match" is row 1
    rank_weight.zero_()
    assert weight[1].abs().sum() > 0  # the ITM head is untouched
    with pytest.raises(ValueError, match=r"weight \(2, C\) and bias \(2,\)"):
        rank_from_itm_match_row(torch.randn(3, 4), torch.randn(3))


def test_read_checkpoint_gives_the_state_dict_of_every_format(tmp_path):
    state = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "lightning.ckpt")
    torch.save(state, tmp_path / "plain.pt")
    save_file(state, tmp_path / "weights.safetensors")
    for name in ("lightning.ckpt", "plain.pt", "weights.safetensors"):
        read = read_checkpoint(tmp_path / name)
        assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)


class _Callback:
    """Stands for the objects a Lightning checkpoint pickles besides tensors."""


def damaged_files(folder: Path) -> dict[str, Path]:
    """Files a converter may be handed instead of a checkpoint, by what is wrong with them."""
    torch.save({"x": torch.zeros(4, 4)}, folder / "good.pt")
    files = {
        "empty": b"",
        "text": b"these are not the weights\n",
        "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1024\n",
        "truncated": (folder / "good.pt").read_bytes()[:300],
    }
    paths = {}
    for kind, data in files.items():
        paths[kind] = folder / f"{kind}.ckpt"
        paths[kind].write_bytes(data)
    paths["corrupt safetensors"] = folder / "corrupt.safetensors"
    paths["corrupt safetensors"].write_bytes(b"\x00\x01garbage")
    paths["no tensors"] = folder / "numbers.pt"
    torch.save({"state_dict": {"lr": 1e-4}}, paths["no tensors"])
    return paths


def test_read_checkpoint_names_the_file_and_what_is_wrong(tmp_path):
    paths = damaged_files(tmp_path)
    reasons = {
        "empty": "is empty", "text": "is not a checkpoint that torch.load can read", "lfs": "git-lfs pointer",
        "truncated": "is not a checkpoint that torch.load can read",
        "corrupt safetensors": "is not a checkpoint that safetensors can read", "no tensors": "state_dict of tensors",
    }
    for kind, path in paths.items():
        with pytest.raises(ValueError, match=reasons[kind]) as error:
            read_checkpoint(path)
        assert str(path) in str(error.value), kind
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "absent.ckpt")
    trusted = tmp_path / "callbacks.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callbacks": _Callback()}, trusted)
    with pytest.raises(ValueError, match=r"weights_only=True.*--trust-pickle"):
        read_checkpoint(trusted)
    assert read_checkpoint(trusted, weights_only=False).keys() == {"x"}


@pytest.mark.parametrize("converter", [convert_vilt, convert_meter])
def test_both_commands_exit_1_on_a_damaged_file_and_name_it(tmp_path, caplog, converter):
    for kind, path in damaged_files(tmp_path).items():
        out = tmp_path / f"out-{path.stem}"
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger=converter.__name__):
            assert converter.main([str(path), str(out), "--head", "vqa"]) == 1, kind
        assert str(path) in caplog.text, kind
        assert not out.exists()


def test_check_names_every_problem_with_a_block_as_one_entry():
    block = [f"meter.cross_modal_text_layers.1.part{i}.weight" for i in range(6)]
    report = ConversionReport(
        head="ve", source="original METER", missing=[*block, "ve_classifier.0.bias"],
        unexpected=["extra.weight"], mismatched={"ve_classifier.3.weight": ((4, 8), (3, 8))},
    )
    assert not report.ok
    with pytest.raises(ValueError) as error:
        report.check("Check --head.")
    message = str(error.value)
    missing = "meter.cross_modal_text_layers.1.* (6 keys), ve_classifier.0.bias"
    assert f"missing (the 've' model needs them): {missing}" in message
    assert "unexpected (no place in the 've' model): extra.weight" in message
    assert "ve_classifier.3.weight: [4, 8] vs [3, 8]" in message
    assert "Check --head." in message and "--no-strict" in message
    summary = report.summary()
    assert "7 missing, 1 unexpected, 1 mismatched" in summary and all(f"missing {k}" in summary for k in block)
    ConversionReport(head="vqa", source="PuMer ViLT", initialized=["classifier.0.weight"]).check()  # nothing to refuse
