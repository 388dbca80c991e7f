"""How much can any model learn from these samples, and how much of it comes from the source?

    python jobs/signal_audit.py --samples OUT_DIR [--output DIR] [--oracle PATH]
                                [--resamples 1000]

A model that ends near a logistic regression is either failing to learn or facing data that
hold little more than the regression can read. This job tells the two apart on any samples
written by etl/build_samples.py (generated or real Tenrec files), with no deep model involved:

1. `floor`: a logistic regression (scikit-learn, L2, C chosen on the target's validation AUC)
   on one-hot user, shared and target-specific features: the per-user and per-item rates.
2. `source activity`: the floor plus the user's activity in the source entity: the logit of
   the user's source like rate (smoothed towards the source's rate by `SMOOTHING_ROWS`
   pseudo-rows), log(1 + source rows) and log(1 + source likes). What a shared user
   representation must carry across: the user's propensity, seen on many more source rows.
3. `cross-entity`: source activity plus the user's source-entity likes as a share per value of
   each categorical source-specific feature (video category), crossed with each categorical
   target-specific feature (article categories): the source-to-target interest map, written
   down by hand. The user's source rows are those the samples' other-entity sequences may
   see (docs/etl.md): train rows for train and valid rows, train + valid rows for test rows.
4. With the generator's oracle (`p_like` of every line): its AUC, and the AUC of "user mean
   plus item mean of the true logit", the best a model of a bias per user and per item could
   reach even if it knew them exactly (averaged over all target rows: a ceiling, not a model).

The differences source activity - floor and cross-entity - floor are the test AUC/GAUC that
hand-made transfer adds, each with its paired bootstrap over test users
(mkt.metrics.paired_bootstrap). Outputs in DIR:
`signal_audit.json`, `signal_audit.md` (also printed) and `signal_audit.png`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from deltalake import DeltaTable
from sklearn.linear_model import LogisticRegression

from mkt.metrics import auc, gauc, paired_bootstrap
from mkt.schema import FeatureSchema, samples_table
from train.evaluate import oracle_path, oracle_scores

# Inverse L2 strengths tried on validation; the floor's and the cross model's best were
# inside this range on 24k and 100k generated users.
C_GRID = (0.03, 0.1, 0.3, 1.0)
# Pseudo-rows at the source's like rate added to every user's source rows before the rate's
# logit is taken: a user with a handful of rows gets about the entity's rate, one with many
# rows their own; of the order of the median user's source rows (generator: 10).
SMOOTHING_ROWS = 20.0


def read_rows(samples: Path, schema: FeatureSchema) -> pd.DataFrame:
    """Every sample row with the columns the audit reads."""
    features = [f.name for f in schema.features if f.kind != "sequence"]
    c = schema.columns
    cols = [c["entity"], c["split"], c["user_key"], c["line_no"], c["label"], *features]
    return DeltaTable(str(samples_table(samples))).to_pandas(columns=cols)


def one_hot(values: np.ndarray, size: int) -> sp.csr_matrix:
    rows = np.arange(len(values))
    return sp.csr_matrix((np.ones(len(values)), (rows, values)), shape=(len(values), size))


def source_profiles(
    rows: pd.DataFrame, schema: FeatureSchema, splits: tuple[str, ...]
) -> dict[str, Any]:
    """The users' source rows in `splits`: `activity`, users x (smoothed like-rate logit,
    log(1 + rows), log(1 + likes)); `shares`, per categorical source-specific feature, users x
    values share of the user's source likes."""
    c = schema.columns
    source = rows[(rows[c["entity"]] == schema.source_entity) & rows[c["split"]].isin(splits)]
    users = schema.feature("user_id").vocab_size
    shown = np.bincount(source["user_id"], minlength=users).astype(float)
    likes = np.bincount(source["user_id"], weights=source[c["label"]], minlength=users)
    base = likes.sum() / max(shown.sum(), 1.0)
    rate = (likes + SMOOTHING_ROWS * base) / (shown + SMOOTHING_ROWS)
    rate = np.clip(rate, 1e-6, 1 - 1e-6)
    activity = np.stack([np.log(rate / (1 - rate)), np.log1p(shown), np.log1p(likes)], axis=1)
    liked = source[source[c["label"]] == 1]
    shares = {}
    for f in schema.specific_features(schema.source_entity):
        if f.kind != "categorical":
            continue
        counts = np.zeros((users, f.vocab_size))
        np.add.at(counts, (liked["user_id"].to_numpy(), liked[f.name].to_numpy()), 1.0)
        shares[f.name] = counts / np.maximum(counts.sum(axis=1), 1.0)[:, None]
    return {"activity": activity, "shares": shares}


def design(
    part: pd.DataFrame,
    schema: FeatureSchema,
    profiles: dict[str, Any] | None = None,
    interests: bool = False,
) -> sp.csr_matrix:
    """One-hot floor features; with `profiles`, the user's source activity, and with
    `interests` also the source profile x target category crosses."""
    target = schema.target_entity
    floor = [*schema.user_features, *schema.shared_features, *schema.specific_features(target)]
    blocks = [one_hot(part[f.name].to_numpy(), f.vocab_size) for f in floor]
    if profiles:
        user = part["user_id"].to_numpy()
        blocks.append(sp.csr_matrix(profiles["activity"][user]))
    if profiles and interests:
        crossed = [f for f in schema.specific_features(target) if f.kind == "categorical"]
        for share in profiles["shares"].values():
            profile = sp.csr_matrix(share[user]).tocoo()
            for f in crossed:
                value = part[f.name].to_numpy()[profile.row]
                cols = profile.col * f.vocab_size + value
                shape = (len(part), share.shape[1] * f.vocab_size)
                blocks.append(sp.csr_matrix((profile.data, (profile.row, cols)), shape=shape))
    return sp.hstack(blocks).tocsr()


def scores(
    label: str,
    splits: dict[str, pd.DataFrame],
    matrices: dict[str, sp.csr_matrix],
    schema: FeatureSchema,
) -> dict[str, Any]:
    """Fit on train for each C, keep the best validation AUC; its valid and test scores."""
    c = schema.columns
    y = {s: splits[s][c["label"]].to_numpy() for s in splits}
    best = None
    for strength in C_GRID:
        model = LogisticRegression(C=strength, max_iter=5000)
        model.fit(matrices["train"], y["train"])
        valid = model.predict_proba(matrices["valid"])[:, 1]
        value = auc(y["valid"], valid)
        print(f"  {label}: C={strength} valid AUC {value:.4f}", flush=True)
        if best is None or value > best[0]:
            best = (value, strength, valid, model.predict_proba(matrices["test"])[:, 1])
    _, strength, valid, test = best
    return {"C": strength, "valid": valid, "test": test}


def metrics(labels: np.ndarray, score: np.ndarray, users: np.ndarray) -> dict[str, float]:
    value, covered = gauc(labels, score, users)
    return {"auc": auc(labels, score), "gauc": value, "gauc_coverage": covered}


def oracle_ceilings(
    rows: pd.DataFrame, schema: FeatureSchema, path: Path, test: pd.DataFrame
) -> dict[str, dict[str, float]]:
    c = schema.columns
    target = rows[rows[c["entity"]] == schema.target_entity]
    p = oracle_scores(path, schema, target[c["line_no"]].to_numpy())
    logit = pd.Series(np.log(p / (1.0 - p)), index=target.index)
    user_mean = logit.groupby(target[c["user_key"]]).mean()
    item_mean = logit.groupby(target[schema.item_feature]).mean()
    labels, users = test[c["label"]].to_numpy(), test[c["user_key"]].to_numpy()
    bias_ceiling = (
        test[c["user_key"]].map(user_mean).to_numpy()
        + test[schema.item_feature].map(item_mean).to_numpy()
    )
    return {
        "oracle (true p_like)": metrics(labels, logit.loc[test.index].to_numpy(), users),
        "oracle user mean + item mean": metrics(labels, bias_ceiling, users),
    }


def report(summary: dict[str, Any]) -> str:
    lines = [
        f"Samples: {summary['samples']} (target {summary['target_entity']}: "
        f"{summary['test_rows']} test rows, {summary['test_likes']} likes; "
        f"{summary['valid_likes']} validation likes)",
        "",
        "| scores | C | valid AUC | test AUC | test GAUC | GAUC coverage |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in summary["models"].items():
        t = r["test"]
        valid = f"{r['valid']['auc']:.4f}" if "valid" in r else ""
        lines.append(
            f"| {name} | {r.get('C', '')} | {valid} | {t['auc']:.4f} | {t['gauc']:.4f} | "
            f"{t['gauc_coverage']:.3f} |"
        )
    for key, name in (
        ("activity_minus_floor", "source activity - floor"),
        ("cross_minus_floor", "cross-entity - floor"),
    ):
        gain = summary[key]
        lines += ["", f"{name}, paired bootstrap over {gain['groups']} test users:"]
        for m in ("auc", "gauc"):
            g = gain[m]
            lines.append(
                f"- {m.upper()}: {g['observed']:+.4f} (95% interval {g['low']:+.4f} to "
                f"{g['high']:+.4f}; better in {g['share_better']:.0%} of resamples)"
            )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["models"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, m in zip(axes, ("auc", "gauc"), strict=True):
        values = [summary["models"][n]["test"][m] for n in names]
        ax.barh(names, values, color="tab:blue")
        ax.set_xlim(0.5, max(values) + 0.03)
        ax.set_title(f"target test {m.upper()}")
        for y, v in enumerate(values):
            ax.text(v + 0.002, y, f"{v:.3f}", va="center", fontsize=8)
    fig.suptitle(
        f"Signal audit: {summary['target_entity']} test rows {summary['test_rows']:,}, "
        f"likes {summary['test_likes']:,}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def audit(samples: Path, oracle: str | None = None, resamples: int = 1000) -> dict[str, Any]:
    schema = FeatureSchema.load(samples)
    c = schema.columns
    started = time.time()
    rows = read_rows(samples, schema)
    print(f"read {len(rows):,} sample rows in {time.time() - started:.1f} s", flush=True)
    target = rows[rows[c["entity"]] == schema.target_entity]
    splits = {s: target[target[c["split"]] == s] for s in ("train", "valid", "test")}
    # Which source likes a row may see: the other-entity sequence rule of docs/etl.md.
    seen = {"train": ("train",), "valid": ("train",), "test": ("train", "valid")}
    profiles = {s: source_profiles(rows, schema, seen[s]) for s in splits}
    if not profiles["train"]["shares"]:
        raise ValueError(
            f"{samples}: the source entity {schema.source_entity!r} has no categorical "
            "specific feature, so there is no source profile to cross"
        )
    designs = {
        "LR floor (one-hot)": ("floor", None, False),
        "LR + source activity (like rate, rows, likes)": ("source activity", profiles, False),
        "LR + source activity + source-like profile x target categories": (
            "cross-entity",
            profiles,
            True,
        ),
    }
    fitted = {
        name: scores(
            label,
            splits,
            {s: design(splits[s], schema, prof and prof[s], cross) for s in splits},
            schema,
        )
        for name, (label, prof, cross) in designs.items()
    }
    test, valid = splits["test"], splits["valid"]
    labels, users = test[c["label"]].to_numpy(), test[c["user_key"]].to_numpy()
    models: dict[str, Any] = {
        name: {
            "C": r["C"],
            "valid": metrics(valid[c["label"]].to_numpy(), r["valid"], valid[c["user_key"]]),
            "test": metrics(labels, r["test"], users),
        }
        for name, r in fitted.items()
    }
    path = oracle_path(schema, oracle)
    if path is not None:
        for name, m in oracle_ceilings(rows, schema, path, test).items():
            models[name] = {"test": m}
    floor, activity, cross = (r["test"] for r in fitted.values())
    gains = {
        "cross_minus_floor": paired_bootstrap(labels, cross, floor, users, resamples=resamples),
        "activity_minus_floor": paired_bootstrap(
            labels, activity, floor, users, resamples=resamples
        ),
    }
    return {
        "samples": str(samples),
        "target_entity": schema.target_entity,
        "test_rows": len(test),
        "test_likes": int(labels.sum()),
        "valid_likes": int(valid[c["label"]].sum()),
        "models": models,
        **{
            key: {
                "groups": gain["groups"],
                **{
                    m: {
                        "observed": gain[m]["difference"],
                        "standard_error": gain[m]["standard_error"],
                        "low": gain[m]["interval_95"][0],
                        "high": gain[m]["interval_95"][1],
                        "share_better": gain[m]["a_better_share"],
                    }
                    for m in ("auc", "gauc")
                },
            }
            for key, gain in gains.items()
        },
        "wall_s": round(time.time() - started, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, type=Path, help="OUT_DIR of the ETL")
    parser.add_argument("--output", type=Path, help="where to write (default: --samples)")
    parser.add_argument("--oracle", help="oracle.parquet (default: beside the raw input)")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args(argv)
    summary = audit(args.samples, args.oracle, args.resamples)
    out = args.output or args.samples
    out.mkdir(parents=True, exist_ok=True)
    (out / "signal_audit.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = report(summary)
    (out / "signal_audit.md").write_text(text + "\n")
    plot(summary, out / "signal_audit.png")
    print(text)
    print(f"\nwritten: {out / 'signal_audit.md'}, .json, .png ({summary['wall_s']} s)")
    return summary


def cli() -> None:
    """The command line, also installed as `mkt-signal-audit` (pyproject.toml)."""
    main()


if __name__ == "__main__":
    cli()
