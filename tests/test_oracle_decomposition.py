"""jobs/oracle_decomposition.py: the replay of the generator that splits each line's true
logit into its terms, on generated files built into samples by the real Spark ETL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mkt.metrics import auc

REPO = Path(__file__).resolve().parents[1]
USERS, SEED = 600, 4


@pytest.fixture(scope="module")
def default_world(spark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw files of the generator's default config (the job replays that one) -> samples."""
    from etl.build_samples import build_samples
    from jobs.generate_tenrec import generate

    root = tmp_path_factory.mktemp("oracle_world")
    generate(root / "raw", num_users=USERS, seed=SEED)
    build_samples(spark, REPO / "conf" / "data" / "tenrec.yaml", root / "raw", root / "samples")
    return root


def test_replayed_terms_give_every_written_lines_true_probability(default_world: Path) -> None:
    from jobs.generate_tenrec import ORACLE_FILE
    from jobs.oracle_decomposition import TERMS, line_terms

    lines = line_terms(USERS, SEED)
    oracle = pq.read_table(default_world / "raw" / ORACLE_FILE).to_pandas()
    for entity, d in lines.items():
        written = oracle[oracle["entity"] == entity].sort_values("line_no")
        assert written["line_no"].tolist() == list(range(1, len(d["p"]) + 1))
        np.testing.assert_allclose(d["p"], written["p_like"].to_numpy(), rtol=1e-12)
        # Each term is a real part of the logit: none is identically zero.
        assert all(np.abs(d[t]).max() > 0 for t in TERMS)


def test_table_scores_the_samples_test_rows(default_world: Path, tmp_path: Path) -> None:
    from deltalake import DeltaTable

    from jobs.oracle_decomposition import main
    from mkt.schema import samples_table

    args = ["--users", str(USERS), "--seed", str(SEED), "--samples", str(default_world / "samples")]
    assert main([*args, "--output", str(tmp_path), "--resamples", "50"]) == 0
    numbers = json.loads((tmp_path / "oracle_decomposition.json").read_text())
    # The oracle row is the generator's p_like on exactly the samples' article test rows.
    test = DeltaTable(str(samples_table(default_world / "samples"))).to_pandas(
        columns=["entity", "split", "line_no", "label"],
        filters=[("entity", "=", "article"), ("split", "=", "test")],
    )
    oracle = pq.read_table(default_world / "raw" / "oracle.parquet").to_pandas()
    p = oracle[oracle["entity"] == "article"].set_index("line_no").loc[test["line_no"], "p_like"]
    assert numbers["oracle p_like"]["auc"] == pytest.approx(auc(test["label"].to_numpy(), p))
    low, high = numbers["both - article (true) auc"][1:]
    assert low <= numbers["both - article (true) auc"][0] <= high
    assert "| both - target |" in (tmp_path / "oracle_decomposition.md").read_text()


def test_samples_of_another_world_are_refused(default_world: Path) -> None:
    from jobs.oracle_decomposition import main

    samples = str(default_world / "samples")
    with pytest.raises(SystemExit, match=r"wrong --users"):
        main(["--users", str(USERS // 2), "--seed", str(SEED), "--samples", samples])
