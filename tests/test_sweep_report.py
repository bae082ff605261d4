"""The accuracy report's composition and calibration-shift tables (sere.harness.zoo.sweep), on
synthetic rows and on the committed report's rows: no model runs here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sere.harness.zoo import sweep

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "accuracy.json"


def _row(method, composition, kl, kl0=None, experts=10.0, part="compositions", **kw):
    return {"model": "m", "part": part, "composition": composition, "method": method, "kl": kl,
            "kl_by_row": [kl if kl0 is None else kl0, kl], "top1_agreement": 0.5, "top1_by_row": [0.4, 0.5],
            "experts_after": experts, "stock_experts": 30.0, "select_top_k": 1, "threshold": -1e9, **kw}


def test_composition_rows_pick_the_best_similarity_and_read_the_minority_row():
    rows = [_row("sere", "mixed", 0.30), _row("sere[substitution]", "mixed", 0.10),
            _row("random", "mixed", 0.20, seed=0), _row("random", "mixed", 0.25, seed=1),
            # minority: the headline KL is row 0's, not the batch mean
            _row("sere", "minority", 0.05, kl0=0.90), _row("sere[substitution]", "minority", 0.01, kl0=0.50),
            _row("random", "minority", 0.02, kl0=0.40, seed=0)]
    got = {c["composition"]: c for c in sweep.composition_rows(rows)}
    assert got["mixed"]["best"] == "sere[substitution]" and got["mixed"]["best_beats_all"]
    assert not got["mixed"]["cka_beats_all"] and got["mixed"]["random_kl"] == (0.20, 0.25) and got["mixed"]["seeds"] == 2
    assert got["minority"]["kl"]["sere"] == 0.90 and got["minority"]["best"] == "sere[substitution]"
    assert not got["minority"]["best_beats_all"]  # 0.50 against a draw of 0.40
    lines = "\n".join(sweep._composition_section(rows))
    assert "best similarity beats every random draw in 1, CKA in 0" in lines


def test_shift_table_marks_the_lowest_kl_per_row():
    rows = [_row(m, "domain:kjv", kl, part="shift") for m, kl in (("sere", 0.3), ("sere[cka_kjv]", 0.2), ("sere[cka_pycode]", 0.4))]
    table = sweep._shift_section(rows)
    body = [line for line in table if line.startswith("| m |")]
    assert body == ["| m | kjv | 1 | all move | 0.3000 | **0.2000** | 0.4000 |"]


@pytest.mark.skipif(not RESULTS.exists(), reason="no committed accuracy report")
def test_committed_report_renders_and_says_where_cka_stands(tmp_path):
    saved = json.loads(RESULTS.read_text())
    rows = [r for r in saved["rows"] if r["model"] == "qwen2_moe"]
    assert {r["part"] for r in rows} >= {"methods", "seeds", "batch", "compositions", "shift"}
    sweep.write_markdown(rows, tmp_path / "accuracy.md", saved["meta"], "", Path(__file__).parent / "zoo")
    text = (tmp_path / "accuracy.md").read_text()
    assert "## Batch compositions at equal budget" in text and "## Calibration-domain shift" in text
    crow = sweep.composition_rows(rows)
    assert len(crow) == len(sweep.COMPOSITIONS) and not any(c["cka_beats_all"] for c in crow)


def test_grid_and_batch64_tables_read_their_own_parts():
    grid = [_row(m, "minority", 0.1, kl0=kl0, part="grid", threshold=0.0, batch_size=16)
            for m, kl0 in (("sere", 0.3), ("random", 0.4), ("truncate", 0.9), ("drop", 0.5), ("oea", 0.45))]
    lines = sweep._grid_section(grid)
    assert "| m | minority | 10.00 / 30.00 | 0.3000 | 0.4000 | 0.9000 | 0.5000 | 0.4500 |" in lines  # the minority's own KL
    b64 = [_row("truncate", "mixed", 0.2, part="batch64", threshold=0.0, batch_size=64),
           _row("random", "mixed", 0.05, part="batch64", threshold=0.0, batch_size=64, seed=1),
           _row("random", "mixed", 0.07, part="batch64", threshold=0.0, batch_size=64, seed=2)]
    table = "\n".join(sweep._batch64_section(b64))
    assert "| m | 1 | 0 | truncate | 10.00 / 30.00 | 0.2000 |" in table and "random (2 seeds)" in table and "0.0500-0.0700" in table
    assert sweep._grid_section(b64) == [] and sweep._batch64_section(grid) == []


def test_batch64_similarity_table_reads_the_random_draws_at_that_budget():
    draws = [_row("random", "mixed", kl, part=part, threshold=0.0, batch_size=64, seed=seed)
             for part, kl, seed in (("batch", 0.06, 0), ("batch64", 0.05, 1), ("batch64", 0.07, 2))]
    draws.append(_row("random", "mixed", 0.001, part="batch64", threshold=0.1, select_top_k=2, batch_size=64, seed=1))
    sims = [_row("sere", "mixed", 0.08, part="batch64sim", batch_size=64),
            _row("sere[substitution]", "mixed", 0.04, part="batch64sim", batch_size=64)]
    lines = sweep._batch64_similarity_section(draws + sims)
    assert "| m | sere[cka] | 10.00 / 30.00 | 0.0800 | 0.0500-0.0700 (3) | no | 0.5000 |" in lines  # S=2 draw not counted
    assert "| m | sere[substitution] | 10.00 / 30.00 | 0.0400 | 0.0500-0.0700 (3) | yes | 0.5000 |" in lines
    assert sweep._batch64_similarity_section(draws) == []
