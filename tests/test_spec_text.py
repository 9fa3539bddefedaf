"""The one NAME[:key=value,…] grammar (sdk/spec_text.py) that codecs, attacks, aggregation rules and
staleness weights share: what it splits, and what it refuses, saying why."""
from __future__ import annotations

import pytest

from edgetrain.aggregator.fedbuff import StalenessWeight
from edgetrain.aggregator.robust_strategy import AggregationRule
from edgetrain.sdk.attack import Attack
from edgetrain.sdk.codecs import parse_codec_spec
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.spec_text import spec_number, split_spec


@pytest.mark.parametrize("spec, expected", [
    ("dense", ("dense", {})), (" dgc : sparsity = 0.99 , momentum=0 ", ("dgc", {"sparsity": "0.99", "momentum": "0"})),
    ("multi-krum:f=1,m=5", ("multi-krum", {"f": "1", "m": "5"})), ("x:k=a=b", ("x", {"k": "a=b"}))])
def test_split_spec_splits_the_name_and_keeps_values_as_written(spec: str, expected: tuple) -> None:
    assert split_spec(spec, "thing") == expected


@pytest.mark.parametrize("spec, problem", [
    ("", "no name"), (":k=1", "no name"), ("dgc:", "':' must be followed by key=value"),
    ("dgc: ", "':' must be followed by key=value"), ("dgc:k", "expected key=value, got 'k'"),
    ("dgc:k=", "expected key=value, got 'k='"), ("dgc:=1", "expected key=value"), ("dgc:1k=1", "expected key=value"),
    ("dgc:k=1,", "expected key=value, got ''"), ("dgc:k=1,k=2", "parameter 'k' repeated")])
def test_split_spec_refuses_bad_syntax_naming_the_spec(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as raised:
        split_spec(spec, "thing")
    assert str(raised.value).startswith("thing ")


def test_split_spec_refuses_what_is_not_text() -> None:
    with pytest.raises(ConfigError, match="thing must be a string, got int"):
        split_spec(3, "thing")  # type: ignore[arg-type]


def test_spec_number_reads_ints_and_finite_floats() -> None:
    assert spec_number("w", "a", "0.5") == 0.5 and spec_number("w", "f", "3", integer=True) == 3
    for text, integer, problem in (("x", False, "'x' is not a number"), ("1.5", True, "'1.5' is not an integer"),
                                   ("nan", False, "must be finite"), ("-inf", False, "must be finite")):
        with pytest.raises(ConfigError, match=problem):
            spec_number("w", "a", text, integer=integer)


@pytest.mark.parametrize("parse", [parse_codec_spec, Attack.parse, AggregationRule.parse, StalenessWeight.parse],
                         ids=["codec", "attack", "aggregation", "staleness"])
def test_every_spec_kind_refuses_the_same_bad_syntax(parse) -> None:
    """One grammar: a repeated key or an item without '=' fails the same way whatever the spec is for."""
    for bad, problem in (("mean:f=1,f=2", "repeated"), ("mean:f", "expected key=value")):
        with pytest.raises(ConfigError, match=problem):
            parse(bad)
