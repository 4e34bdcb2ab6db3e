"""Ratios and paper config names (``pumer_patch.ratios``): every documented form, round trips, bad input."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import ratio_triples

from pumer_patch import Ratios, parse_config

PAPER = Ratios(0.1, 0.3, 0.2)


@pytest.mark.parametrize(
    "spec",
    [
        "p0.1-r0.3-t0.2",
        "p0.1r0.3t0.2",
        "p0.1-r0.3t0.2",
        "  p0.1-r0.3-t0.2\n",
        "p.1-r.3-t.2",
        {"prune": 0.1, "merge": 0.3, "text_merge": 0.2},
        (0.1, 0.3, 0.2),
        [0.1, 0.3, 0.2],
        PAPER,
    ],
    ids=repr,
)
def test_parse_reads_every_documented_form(spec):
    assert Ratios.parse(spec) == PAPER


def test_missing_mapping_keys_and_defaults_are_zero():
    assert Ratios.parse({"merge": 0.3}) == Ratios(0.0, 0.3, 0.0)
    assert Ratios().is_zero and Ratios.parse("p0-r0-t0").is_zero
    assert not Ratios(0.0, 0.0, 0.2).is_zero


def test_str_is_the_paper_form():
    assert str(PAPER) == "p0.1-r0.3-t0.2"
    assert str(Ratios()) == "p0-r0-t0"
    assert str(Ratios(0.5, 0, 0.25)) == "p0.5-r0-t0.25"


@given(ratios=ratio_triples(max_value=math.nextafter(1.0, 0.0)))
def test_every_form_round_trips(ratios):
    text = str(ratios)
    assert Ratios.parse(text) == ratios
    assert Ratios.parse(text.replace("-", "")) == ratios
    assert Ratios.parse((ratios.prune, ratios.merge, ratios.text_merge)) == ratios
    assert Ratios.parse({"prune": ratios.prune, "merge": ratios.merge, "text_merge": ratios.text_merge}) == ratios
    assert all(type(v) is float for v in (ratios.prune, ratios.merge, ratios.text_merge))


@pytest.mark.parametrize(
    "config, ratios, layers",
    [
        ("p0.1-r0.3-t0.2-258", (0.1, 0.3, 0.2), [2, 5, 8]),
        ("p0.1r0.3t0.2-2468", (0.1, 0.3, 0.2), [2, 4, 6, 8]),
        ("p0.2r0.2t0.2-0246", (0.2, 0.2, 0.2), [0, 2, 4, 6]),
        ("p0.3r0.5t0.2-246", (0.3, 0.5, 0.2), [2, 4, 6]),
    ],
)
def test_parse_config_reads_the_paper_names(config, ratios, layers):
    assert parse_config(config) == (Ratios(*ratios), layers)


@given(ratios=ratio_triples(), layers=st.lists(st.integers(0, 9), min_size=1, max_size=6, unique=True))
def test_parse_config_round_trips(ratios, layers):
    assert parse_config(f"{ratios}-{''.join(map(str, layers))}") == (ratios, layers)


def test_parse_config_refuses_a_layer_named_twice():
    with pytest.raises(ValueError, match=r"names layer\(s\) \[1\] more than once"):
        parse_config("p0.1-r0.3-t0.2-11")


@pytest.mark.parametrize(
    "spec, error, fragment",
    [
        ("", ValueError, "ratios string"),
        ("p0.1-r0.3", ValueError, "ratios string"),
        ("p0.1-r0.3-t", ValueError, "ratios string"),
        ("r0.3-p0.1-t0.2", ValueError, "ratios string"),
        ("P0.1-R0.3-T0.2", ValueError, "ratios string"),
        ("p-0.1-r0.3-t0.2", ValueError, "ratios string"),
        ("p0.1--r0.3-t0.2", ValueError, "ratios string"),
        ("p0.1 r0.3 t0.2", ValueError, "ratios string"),
        ("p0.1-r0.3-t0.2-258", ValueError, "ratios string"),
        ("p1.5-r0.3-t0.2", ValueError, "Ratios.prune"),
        ("p0.1-r1-t0", ValueError, "Ratios.merge"),
        ({"keep": 0.1}, ValueError, r"unknown key\(s\) \[.keep.\]; the keys are .prune., .merge. and .text_merge.$"),
        ({"prune": 0.1, "merg": 0.1}, ValueError, r"unknown key\(s\) \[.merg.\].*did you mean .merge. for .merg."),
        ((0.1, 0.2), TypeError, "ratios must be"),
        ((0.1, 0.2, 0.3, 0.4), TypeError, "ratios must be"),
        (0.1, TypeError, "ratios must be"),
        (None, TypeError, "ratios must be"),
        ((True, 0.0, 0.0), TypeError, "Ratios.prune"),
        ((0.0, "0.1", 0.0), TypeError, "Ratios.merge"),
        ((0.0, 0.0, math.nan), ValueError, "Ratios.text_merge"),
        ((0.0, 0.0, -0.1), ValueError, "Ratios.text_merge"),
        ((0.0, math.inf, 0.0), ValueError, "Ratios.merge"),
    ],
    ids=repr,
)
def test_parse_refuses_bad_ratios_naming_what_is_wrong(spec, error, fragment):
    with pytest.raises(error, match=fragment):
        Ratios.parse(spec)


@pytest.mark.parametrize(
    "config, error, fragment",
    [
        ("p0.1-r0.3-t0.2", ValueError, "config"),
        ("p0.1-r0.3-t0.2-", ValueError, "config"),
        ("p0.1-r0.3-258", ValueError, "config"),
        ("vilt-vqa2-p0.1-r0.3-t0.2-258", ValueError, "config"),
        ("p0.1-r0.3-t0.2-2,5,8", ValueError, "config"),
        ("p0.1-r0.3-t0.2-25a", ValueError, "config"),
        ("", ValueError, "config"),
        ("p1.1-r0.3-t0.2-258", ValueError, "Ratios.prune"),
        (None, TypeError, "config"),
        (258, TypeError, "config"),
    ],
    ids=repr,
)
def test_parse_config_refuses_bad_names(config, error, fragment):
    with pytest.raises(error, match=fragment):
        parse_config(config)


@given(text=st.text(max_size=30))
def test_any_string_parses_or_raises_value_error(text):
    """Fuzz: a string is either a valid spec or refused with ``ValueError``, never another exception."""
    for parse in (Ratios.parse, parse_config):
        with contextlib.suppress(ValueError):
            parse(text)
