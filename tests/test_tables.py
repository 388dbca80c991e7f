"""jobs/paper_tables.py and jobs/reproduce_tables.py: the table arithmetic on fabricated
metrics. The job itself runs every model through the real runner with `--quick`
(docs/RESULTS.md); that run is not part of the suite: 15 Ray Train stage start-ups take 5-15
minutes on 2 cores."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from jobs.common import shown_path
from jobs.paper_tables import (
    ENTRIES,
    FLOOR,
    SINGLE,
    TABLE2,
    TABLE4,
    best_single_domain,
    pct,
    stat,
    table2,
    table3,
    table4,
)
from jobs.reproduce_tables import select_entries
from mkt.contract import ConfigError

REPO = Path(__file__).resolve().parents[1]
GROUPS = ["0-10", "10-30", ">30"]
LABELS = {e.key: e.label for e in ENTRIES}


def run(auc: float, gauc: float, by_group: dict[str, float] | None = None) -> dict[str, Any]:
    """A metrics.json as train/run.py writes it, reduced to what the tables read; the groups'
    AUC and GAUC are both `by_group[g]` (default: the overall values)."""
    groups = by_group or dict.fromkeys(GROUPS, gauc)
    return {
        "test": {
            "model": {
                "auc": auc,
                "gauc": gauc,
                "by_activity": {g: {"auc": v, "gauc": v} for g, v in groups.items()},
            },
            "oracle": {"auc": 0.9, "gauc": 0.8},
            "like_rate": {"auc": 0.58, "gauc": 0.53},
        }
    }


def fabricated() -> dict[str, list[dict[str, Any]]]:
    """Every entry with two seeds; `fibinet` is the best single-domain model by GAUC, `din` by
    AUC."""
    results = {e.key: [run(0.60, 0.55), run(0.62, 0.57)] for e in ENTRIES}
    results["din"] = [run(0.70, 0.56), run(0.70, 0.56)]
    results["fibinet"] = [run(0.61, 0.60, {"0-10": 0.5, "10-30": 0.6, ">30": 0.8})] * 2
    results["finetune"] = [run(0.64, 0.62, {"0-10": 0.55, "10-30": 0.6, ">30": 0.4})] * 2
    results["mkt"] = [
        run(0.70, 0.64, {"0-10": 0.6, "10-30": 0.66, ">30": 0.8}),
        run(0.74, 0.68, {"0-10": 0.6, "10-30": 0.66, ">30": 0.8}),
    ]
    results["wo_pdl"] = [run(0.69, 0.66), run(0.71, 0.66)]
    return results


def test_stat_is_mean_and_sample_std_of_finite_values() -> None:
    s = stat([0.5, 0.7, None, math.nan])
    assert (s.mean, s.n) == (pytest.approx(0.6), 2)
    assert s.std == pytest.approx(math.sqrt(0.02))  # ddof=1: ((0.1² + 0.1²) / 1) ** 0.5
    assert math.isnan(stat([0.5]).std) and stat([0.5]).mean == 0.5
    assert stat([None]).n == 0 and math.isnan(stat([None]).mean)


def test_pct_is_relative_change_as_in_the_paper() -> None:
    # Table 4, Tenrec AUC: w/o MEM 0.9381 against full MKT 0.9524 is -1.50%.
    assert pct(0.9381, 0.9524) == pytest.approx(-1.5015, abs=1e-3)
    assert pct(0.55, 0.5) == pytest.approx(10.0)


def test_table2_rows_means_stds_and_oracle() -> None:
    rows = table2(fabricated())
    assert [r["key"] for r in rows] == [e.key for e in TABLE2] + ["oracle", "like_rate"]
    assert rows[0]["key"] == "lr" and rows[0]["group"] == FLOOR  # the floor model comes first
    mkt = next(r for r in rows if r["key"] == "mkt")
    assert mkt["auc_mean"] == pytest.approx(0.72) and mkt["gauc_mean"] == pytest.approx(0.66)
    assert mkt["auc_std"] == pytest.approx(math.sqrt(0.0008))
    assert mkt["seeds"] == 2
    oracle, floor = rows[-2:]
    assert oracle["auc_mean"] == 0.9 and math.isnan(oracle["auc_std"])
    assert floor["gauc_mean"] == 0.53 and floor["model"] == "like-rate floor (smoothed)"
    assert [r["group"] for r in rows[1:4]] == [SINGLE] * 3
    # Without the floor's scores (older runs) there is no floor row.
    for runs in (results := fabricated()).values():
        for r in runs:
            r["test"].pop("like_rate", None)
    assert [r["key"] for r in table2(results)][-2:] == [TABLE2[-1].key, "oracle"]


def test_best_single_domain_by_gauc_or_auc() -> None:
    rows = table2(fabricated())
    assert best_single_domain(rows, "gauc") == "fibinet"
    assert best_single_domain(rows, "auc") == "din"  # MKT's higher AUC does not count


def test_table3_groups_and_improvements() -> None:
    results = fabricated()
    rows = table3(results, "fibinet", GROUPS, LABELS)
    assert [(r["activity"], r["key"]) for r in rows[:3]] == [
        ("0-10", "fibinet"),
        ("0-10", "finetune"),
        ("0-10", "mkt"),
    ]
    assert len(rows) == 9
    by = {(r["activity"], r["key"]): r for r in rows}
    assert by[("0-10", "mkt")]["gauc_vs_single_pct"] == pytest.approx(20.0)  # 0.6 / 0.5
    assert by[("0-10", "mkt")]["gauc_vs_finetune_pct"] == pytest.approx(pct(0.6, 0.55))
    assert by[("0-10", "finetune")]["auc_vs_single_pct"] == pytest.approx(10.0)
    assert by[(">30", "finetune")]["gauc_vs_single_pct"] == pytest.approx(-50.0)
    assert by[(">30", "mkt")]["gauc_vs_single_pct"] == pytest.approx(0.0)
    assert by[("10-30", "fibinet")]["gauc_vs_single_pct"] == 0.0


def test_table4_changes_against_full_mkt() -> None:
    rows = table4(fabricated())
    assert [r["key"] for r in rows] == [e.key for e in TABLE4] + ["mkt"]
    by = {r["key"]: r for r in rows}
    assert by["wo_pdl"]["auc_change_pct"] == pytest.approx(pct(0.70, 0.72))
    assert by["wo_pdl"]["gauc_change_pct"] == pytest.approx(0.0)
    assert by["wo_mem"]["gauc_change_pct"] == pytest.approx(pct(0.56, 0.66))
    assert math.isnan(by["mkt"]["auc_change_pct"])


def test_select_entries_keeps_the_tables_order_and_needs_mkt() -> None:
    assert select_entries(None) == ENTRIES
    chosen = select_entries(["wo_mem", "mkt", "lr"])
    assert [e.key for e in chosen] == ["lr", "mkt", "wo_mem"]
    with pytest.raises(ConfigError, match="unknown \\['nope'\\]"):
        select_entries(["mkt", "nope"])
    with pytest.raises(ConfigError, match="mkt must be among them"):
        select_entries(["lr", "ple"])


def test_tables_name_samples_inside_the_repository_by_a_relative_path(tmp_path: Path) -> None:
    assert shown_path(REPO / "data" / "quickstart" / "samples") == "data/quickstart/samples"
    assert shown_path(tmp_path / "samples") == str(tmp_path / "samples")
