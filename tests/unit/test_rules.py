"""Tests for fleetmpi.rules: parsing, unit conversion, evaluation and error messages."""

from __future__ import annotations

import builtins
import math
from typing import Any

import pytest

from fleetmpi.rules import (
    METRICS,
    QUALIFIED_METRICS,
    Comparison,
    Condition,
    RuleSyntaxError,
    format_bytes,
    parse_condition,
)


def only(text: str) -> Comparison:
    """Parse a single-comparison condition and return that comparison."""
    cond = parse_condition(text)
    assert len(cond.comparisons) == 1
    return cond.comparisons[0]


def test_metrics_table_covers_required_names_and_kinds() -> None:
    required = {
        "sync_bytes_total": "bytes", "sync_bytes_per_step": "bytes",
        "sync_bytes_per_s": "bytes_per_s", "wire_bytes_per_step": "bytes", "epoch": "epochs",
        "step": "count", "loss": "loss", "valid_loss": "loss", "valid_accuracy": "fraction",
        "loss_plateau_steps": "count", "cpu_util": "percent", "mem_util": "percent",
        "comm_fraction": "fraction", "elapsed_s": "seconds", "phase_elapsed_s": "seconds",
        "phase_steps": "count", "samples_per_s": "count", "ranks": "count",
        "idle_nodes": "count", "gpu_util": "percent", "gpu_mem_util": "percent",
    }
    for name, kind in required.items():
        assert METRICS[name] == kind
    assert type(METRICS) is dict
    assert QUALIFIED_METRICS == {"idle_nodes", "gpu_util", "gpu_mem_util"}


# --- every operator, both sides ------------------------------------------------------------

@pytest.mark.parametrize(
    ("op", "true_at", "false_at"),
    [
        ("<", 2.0, 3.0), ("<=", 3.0, 4.0), (">", 4.0, 3.0),
        (">=", 3.0, 2.0), ("==", 3.0, 4.0), ("!=", 4.0, 3.0),
    ],
)
def test_each_operator_true_and_false(op: str, true_at: float, false_at: float) -> None:
    cond = parse_condition(f"epoch {op} 3")
    assert cond.comparisons[0].op == op
    assert cond.holds({"epoch": true_at}) is True
    assert cond.holds({"epoch": false_at}) is False


def test_le_and_ge_include_boundary_but_lt_gt_do_not() -> None:
    assert parse_condition("step <= 10").holds({"step": 10})
    assert parse_condition("step >= 10").holds({"step": 10})
    assert not parse_condition("step < 10").holds({"step": 10})
    assert not parse_condition("step > 10").holds({"step": 10})


# --- numbers and units ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("sync_bytes_per_step < 64KiB", 65536.0),
        ("sync_bytes_per_step < 64 KiB", 65536.0),
        ("sync_bytes_total > 1.5MB", 1_500_000.0),
        ("sync_bytes_total > 2kB", 2000.0),
        ("sync_bytes_total > 2KB", 2000.0),
        ("sync_bytes_total > 3GB", 3e9),
        ("sync_bytes_total > 1MiB", 1024.0**2),
        ("sync_bytes_total > 2GiB", 2 * 1024.0**3),
        ("wire_bytes_per_step >= 512B", 512.0),
        ("wire_bytes_per_step >= 512", 512.0),
        ("sync_bytes_per_s > 10MiB/s", 10 * 1024.0**2),
        ("sync_bytes_per_s > 100B/s", 100.0),
        ("sync_bytes_per_s > 1.5MB/s", 1.5e6),
        ("elapsed_s == 2min", 120.0),
        ("elapsed_s > 250ms", 0.25),
        ("elapsed_s > 1.5h", 5400.0),
        ("phase_elapsed_s > 30s", 30.0),
        ("phase_elapsed_s > 30", 30.0),
        ("cpu_util < 50%", 50.0),
        ("cpu_util < 50", 50.0),
        ("comm_fraction < 50%", 0.5),
        ("comm_fraction < 0.5", 0.5),
        ("valid_accuracy >= 92.5%", 0.925),
        ("loss < 1e-3", 1e-3),
        ("loss < 2.5E+1", 25.0),
        ("loss < .5", 0.5),
        ("step > 1_000", 1000.0),
        ("loss > -1", -1.0),
        ("epoch >= 3", 3.0),
    ],
)
def test_value_converted_to_base_unit(text: str, value: float) -> None:
    assert only(text).value == pytest.approx(value, rel=1e-12)


def test_64kib_is_exactly_65536_and_compares_exactly() -> None:
    cond = parse_condition("sync_bytes_per_step == 64KiB")
    assert cond.comparisons[0].value == 65536
    assert cond.holds({"sync_bytes_per_step": 65536})
    assert not cond.holds({"sync_bytes_per_step": 65535})


def test_two_minutes_evaluates_against_seconds() -> None:
    cond = parse_condition("elapsed_s >= 2min")
    assert cond.holds({"elapsed_s": 120.0})
    assert not cond.holds({"elapsed_s": 119.9})


def test_percent_on_fraction_and_percent_metrics() -> None:
    frac = parse_condition("comm_fraction > 50%")
    assert frac.holds({"comm_fraction": 0.6}) and not frac.holds({"comm_fraction": 0.4})
    pct = parse_condition("gpu_util < 50%")
    assert pct.holds({"gpu_util": 49.0}) and not pct.holds({"gpu_util": 51.0})


# --- 'and' chains, qualifiers, text ---------------------------------------------------------

def test_and_chain_needs_every_comparison() -> None:
    cond = parse_condition("sync_bytes_per_step < 64KiB and epoch >= 3 AND loss < 0.5")
    assert [c.metric for c in cond.comparisons] == ["sync_bytes_per_step", "epoch", "loss"]
    ok = {"sync_bytes_per_step": 1000, "epoch": 3, "loss": 0.1}
    assert cond.holds(ok)
    assert not cond.holds({**ok, "epoch": 2})
    assert not cond.holds({**ok, "sync_bytes_per_step": 65536})
    assert not cond.holds({**ok, "loss": 0.5})
    assert cond.metrics_used() == {"sync_bytes_per_step", "epoch", "loss"}


def test_and_is_case_insensitive_and_whitespace_free() -> None:
    cond = parse_condition("  epoch>=3\tAnD\nstep<10  ")
    assert cond.holds({"epoch": 3, "step": 9})
    assert [c.text for c in cond.comparisons] == ["epoch>=3", "step<10"]


def test_text_fields_record_the_source() -> None:
    text = "sync_bytes_per_step < 64KiB and epoch >= 3"
    cond = parse_condition(text)
    assert cond.text == text
    assert [c.text for c in cond.comparisons] == ["sync_bytes_per_step < 64KiB", "epoch >= 3"]


@pytest.mark.parametrize("metric", ["idle_nodes", "gpu_util", "gpu_mem_util"])
def test_qualifier_is_kept_and_used_as_lookup_key(metric: str) -> None:
    cond = parse_condition(f"{metric}[gpu-a100_2] >= 4")
    comp = cond.comparisons[0]
    assert comp.metric == metric and comp.qualifier == "gpu-a100_2"
    key = f"{metric}[gpu-a100_2]"
    assert cond.metrics_used() == {key}
    assert cond.holds({key: 4})
    assert not cond.holds({key: 3})
    assert not cond.holds({metric: 10})  # the unqualified value is a different metric


def test_qualified_and_unqualified_in_one_condition() -> None:
    cond = parse_condition("idle_nodes[cpu] >= 4 and idle_nodes[gpu] < 1 and gpu_util < 30%")
    assert [c.qualifier for c in cond.comparisons] == ["cpu", "gpu", None]
    assert cond.holds({"idle_nodes[cpu]": 5, "idle_nodes[gpu]": 0, "gpu_util": 10})
    assert not cond.holds({"idle_nodes[cpu]": 5, "idle_nodes[gpu]": 2, "gpu_util": 10})
    assert cond.metrics_used() == {"idle_nodes[cpu]", "idle_nodes[gpu]", "gpu_util"}


def test_parsed_objects_are_frozen() -> None:
    cond = parse_condition("epoch >= 3")
    with pytest.raises(AttributeError):
        cond.comparisons[0].value = 1.0  # type: ignore[misc]
    assert isinstance(cond, Condition)


# --- holds() never raises -------------------------------------------------------------------

@pytest.mark.parametrize(
    "metrics",
    [{}, {"other": 1.0}, {"epoch": None}, {"epoch": math.nan}, {"epoch": "three"}],
)
def test_missing_or_unusable_metric_is_false(metrics: dict[str, Any]) -> None:
    assert parse_condition("epoch >= 3").holds(metrics) is False
    assert parse_condition("epoch != 3").holds(metrics) is False


def test_missing_metric_in_chain_is_false() -> None:
    cond = parse_condition("epoch >= 3 and loss < 1")
    assert cond.holds({"epoch": 5}) is False


# --- syntax errors --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ["empty condition", "at 0"]),
        ("   ", ["empty condition", "at 0"]),
        ("epoch >= 3 step > 2", ["'step'", "at 11", "expected 'and' or end of text"]),
        ("epoch >= 3 4", ["number '4'", "at 11", "expected 'and'"]),
        ("epoch 3", ["missing operator", "at 6", "expected one of <"]),
        ("epoch", ["missing operator", "end of text", "at 5"]),
        ("epoch >=", ["missing number", "end of text", "at 8"]),
        ("epoch >= abc", ["missing number", "'abc'", "at 9"]),
        ("epoch >= 1.2.3", ["bad number '1.2.3'", "at 9"]),
        ("step > 1__000", ["bad number '1__000'", "at 7"]),
        ("epoch >= 1e999", ["'1e999'", "out of range", "at 9"]),
        ("sync_bytes_per_step < 64KIB", ["unknown unit 'KIB'", "at 24", "did you mean 'KiB'",
                                          "valid units:"]),
        ("elapsed_s > 3 sec", ["unknown unit 'sec'", "at 14", "ms, s, min, h"]),
        ("step > 3x", ["unknown unit 'x'", "at 8", "bare number"]),
        ("epoch >= 3KiB", ["unit 'KiB' not allowed", "'epoch'", "at 10", "bare number"]),
        ("step > 5%", ["unit '%' not allowed", "'step'", "at 8"]),
        ("elapsed_s > 3MiB", ["unit 'MiB' not allowed", "at 13", "ms, s, min, h"]),
        ("sync_bytes_per_s < 3MiB", ["unit 'MiB' not allowed", "did you mean 'MiB/s'",
                                      "at 20"]),
        ("sync_bytes_total < 3MiB/s", ["unit 'MiB/s' not allowed", "at 20", "KiB"]),
        ("epoch >= 3 or step > 1", ["'or' is not supported", "at 11", "only 'and'"]),
        ("epoch >= 3 OR step > 1", ["'or' is not supported", "at 11"]),
        ("epoch >= 3 && step > 1", ["'&'", "at 11", "'and'"]),
        ("epoch >= 3 || step > 1", ["'|'", "at 11", "'and'"]),
        ("(epoch >= 3)", ["parentheses are not supported", "at 0"]),
        ("epoch >= (3)", ["parentheses are not supported", "at 9"]),
        ("epoch[cpu] >= 1", ["'epoch' takes no qualifier", "at 5", "idle_nodes"]),
        ("idle_nodes[] > 1", ["empty qualifier", "at 10"]),
        ("idle_nodes[cpu > 1", ["unclosed '['", "at 10"]),
        ("idle_nodes[c$u] > 1", ["bad character '$' in qualifier", "at 12"]),
        ("epoch >= 3 [cpu]", ["'[cpu]'", "at 11", "expected 'and'"]),
        ("sync_byte_per_step < 64KiB", ["unknown metric 'sync_byte_per_step'", "at 0",
                                         "did you mean 'sync_bytes_per_step'", "valid: "]),
        ("Epoch > 3", ["unknown metric 'Epoch'", "did you mean 'epoch'"]),
        ("epoch = 3", ["bad operator '='", "at 6", "did you mean '=='"]),
        ("epoch => 3", ["bad operator '=>'", "at 6", "did you mean '>='"]),
        ("epoch ! 3", ["bad operator '!'", "at 6"]),
        ("epoch >= 3 and", ["dangling 'and'", "at 11"]),
        ("and epoch >= 3", ["unexpected 'and'", "at 0", "metric name"]),
        ("3 < epoch", ["number '3'", "at 0", "metric name"]),
        ("epoch >= 3 $", ["unexpected character '$'", "at 11"]),
        ("comm_fraction < 50", ["outside [0, 1]", "at 16", "50%"]),
        ("valid_accuracy > 150%", ["outside [0, 1]", "at 17"]),
        ("epoch >= 3 and and step > 1", ["unexpected 'and'", "at 15"]),
    ],
)
def test_syntax_errors_are_one_line_and_point_at_the_problem(
    text: str, fragments: list[str]
) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_condition(text)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert f'in "{text}"' in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(info.value, ValueError)
    assert info.value.text == text
    assert f"at {info.value.position} " in message


def test_unknown_metric_lists_all_valid_names_sorted() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_condition("throughput > 3")
    message = str(info.value)
    assert message.endswith("valid: " + ", ".join(sorted(METRICS)))
    assert "did you mean" not in message


def test_message_stays_one_line_for_multiline_text() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_condition("epoch >= 3\nand\nbogus > 1")
    message = str(info.value)
    assert "\n" not in message
    assert "unknown metric 'bogus'" in message and "at 15" in message
    assert "\\n" in message


def test_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_condition(3)  # type: ignore[arg-type]


# --- never evaluates Python ------------------------------------------------------------------

@pytest.mark.parametrize(
    "text",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "epoch >= __import__('os')",
        "epoch >= 3 and exec('1')",
        "epoch.__class__ > 1",
        "epoch >= 3; import os",
        "lambda: 1",
    ],
)
def test_python_code_is_a_clean_syntax_error(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the rule parser must never evaluate text")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "compile", forbidden)
    with pytest.raises(RuleSyntaxError) as info:
        parse_condition(text)
    assert "\n" not in str(info.value)


def test_valid_rules_parse_without_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the rule parser must never evaluate text")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    cond = parse_condition("sync_bytes_per_step < 64KiB and idle_nodes[cpu] >= 4")
    assert cond.holds({"sync_bytes_per_step": 1, "idle_nodes[cpu]": 4})


# --- format_bytes ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"), (100, "100 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (65536, "64.0 KiB"),
        (1.5 * 1024**2, "1.5 MiB"), (3 * 1024**3, "3.0 GiB"), (2 * 1024**4, "2.0 TiB"),
        (5000 * 1024**4, "5000.0 TiB"), (-65536, "-64.0 KiB"),
    ],
)
def test_format_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text


def test_format_bytes_round_trips_through_parser() -> None:
    shown = format_bytes(65536)  # "64.0 KiB"
    assert only(f"sync_bytes_per_step == {shown}").value == 65536
