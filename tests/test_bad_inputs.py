"""The bad-input matrix (src/matvlm_hf/bad_inputs.py) in full: nothing lost, no crash, every error clear.

The model core's cases (owner "model core": processor(text=""), prompts past the position limit, a hand-edited
mamba_layers) are checked on their own.
"""

from __future__ import annotations

import pytest

from matvlm_hf.bad_inputs import report, run_matrix


@pytest.fixture(scope="module")
def rows():
    return run_matrix()


def test_nothing_lost_anywhere(rows):
    assert [r["case"] for r in rows if r["lost"]] == []


def test_every_entry_point_case_is_clear_or_handled(rows):
    bad = [
        (r["case"], r["verdict"], r["message"])
        for r in rows
        if r["owner"] != "model core" and r["verdict"] not in ("clear", "handled")
    ]
    assert bad == []
    assert len([r for r in rows if r["owner"] != "model core"]) >= 55


def test_model_core_cases_are_clear(rows):
    assert [(r["case"], r["verdict"]) for r in rows if r["owner"] == "model core" and r["verdict"] != "clear"] == []


def test_report_counts_match_rows(rows):
    text = report(rows, fast=False)
    assert f"**{len(rows)} cases: " in text and text.count("\n| ") == len(rows) + 1
