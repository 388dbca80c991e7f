"""Where the generator's within-user signal is, and how much of it the source could carry.

    python jobs/oracle_decomposition.py --users 24000 --seed 0 --samples DATA_DIR/samples
                                        [--output DIR] [--resamples 500]

Generated data only (docs/generator.md): the job replays `jobs/generate_tenrec.py` for the
same (users, seed, default config), keeps each written line's terms of the true logit apart
(user bias, item bias, common interest, specific interest, mood, topic; it checks that their
sum gives the oracle's `p_like` of every line), and scores the target's test rows of
DATA_DIR/samples (built from those raw files; the samples give each line's split) with:

1. partial oracles: the item's bias alone (what a model that learnt nothing of the user-item
   interest can reach within a user), plus one term or another;
2. estimators of the user's common interest from the likes the test rows' sequences may see
   (train + validation blocks, docs/etl.md): the sum of the liked items' common loadings,
   either the generator's true ones or their category's mean (what a model reading the liked
   items' categories could learn), from the target's likes, the source's, or both, each added
   to the item's bias.

"both - target" (paired bootstrap over test users) bounds what the source's likes can add
to a user's ranking of target items with that much knowledge of the items. Prints a markdown
table; with --output writes it (`oracle_decomposition.md`) and the numbers (`.json`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from deltalake import DeltaTable

import jobs.generate_tenrec as gen
from mkt.metrics import auc, gauc, paired_bootstrap
from mkt.schema import samples_table

TERMS = ("user_bias", "item_bias", "common", "specific", "mood", "topic")
# Weight of the liked-loading sum in its score (the generator's gamma_c is 0.9-1.0; a sum over
# several likes overshoots the interest, so a smaller weight ranked best at both sizes).
SUM_WEIGHT = 0.3


def line_terms(users: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per entity, per written line (line_no - 1): the logit's terms, the like, the item, the
    user, the item's common loading."""
    cfg = gen.GeneratorConfig()
    cfg.validate()
    world = gen._make_world(seed, users, cfg)
    intercept = gen._calibrate_intercepts(seed, world, cfg)
    chunks: dict[str, list[dict[str, np.ndarray]]] = {e: [] for e in gen.ENTITIES}
    for chunk, first in enumerate(range(0, users, cfg.users_per_chunk)):
        rng = gen._rng(seed, gen._STREAM_CHUNK, chunk)
        user_ids = np.arange(first, min(first + cfg.users_per_chunk, users))
        drawn = rng.bit_generator.state
        pop = gen._draw_population(rng, user_ids, world, cfg)
        after = rng.bit_generator.state
        # The population's first draws again, in _draw_population's order: its user latents.
        rng.bit_generator.state = drawn
        n, dc, ds = len(user_ids), cfg.common_dim, cfg.specific_dim
        gender = rng.choice(3, size=n, p=gen.GENDER_PROBS)
        age = rng.choice(8, size=n, p=gen.AGE_PROBS)
        common = world.gender_offset[gender] + world.age_offset[age] + rng.standard_normal((n, dc))
        specific = {e: rng.standard_normal((n, ds)) for e in gen.ENTITIES}
        bias = cfg.user_bias_sd * rng.standard_normal(n) + gen.GENDER_EFFECT[gender]
        bias = bias + gen.AGE_EFFECT[age]
        rng.bit_generator.state = after
        terms = {t: np.zeros(len(pop.row_user)) for t in TERMS}
        terms["user_bias"] = bias[pop.row_user]
        for code, e in enumerate(gen.ENTITIES):
            rows = pop.row_entity == code
            items, idx, who = world.items[e], pop.row_item[rows], pop.row_user[rows]
            terms["item_bias"][rows] = items.bias[idx]
            terms["common"][rows] = cfg.gamma_common[e] * np.einsum(
                "ij,ij->i", common[who], items.common[idx]
            )
            terms["specific"][rows] = cfg.gamma_specific[e] * np.einsum(
                "ij,ij->i", specific[e][who], items.specific[idx]
            )
        static = sum(terms[t] for t in ("user_bias", "item_bias", "common", "specific"))
        if not np.allclose(static, pop.row_static):
            raise RuntimeError("the replayed user latents differ from the generator's")
        like = _short_term(pop, intercept, cfg, terms)
        if not (like == gen._run_dynamics(pop, intercept, cfg)[1]).all():
            raise RuntimeError("the replayed likes differ from the generator's")
        for code, e in enumerate(gen.ENTITIES):
            rows = np.flatnonzero(pop.row_entity == code)
            # The written lines: each event, some twice (the duplicates' draw, replayed).
            state = rng.bit_generator.state
            copies = 1 + (rng.random(len(rows)) < cfg.duplicate_rate)
            rng.bit_generator.state = state
            p = gen._sigmoid(static + intercept[pop.row_entity] + terms["mood"] + terms["topic"])
            gen._entity_table(rng, e, pop, p, like, world, cfg)  # the generator's own draws
            lines = np.repeat(rows, copies)
            chunks[e].append(
                {
                    **{t: terms[t][lines] for t in TERMS},
                    "p": p[lines],
                    "like": like[lines],
                    "user": pop.user_ids[pop.row_user[lines]],
                    "item": pop.row_item[lines],
                }
            )
    return {e: {k: np.concatenate([c[k] for c in chunks[e]]) for k in chunks[e][0]} for e in chunks}


def _short_term(pop, intercept, cfg, terms) -> np.ndarray:
    """Walk each user's hidden clock as `_run_dynamics` does, keeping mood and topic apart."""
    delta_m = np.array([cfg.delta_mood[e] for e in gen.ENTITIES])[pop.row_entity]
    delta_h = np.array([cfg.delta_topic[e] for e in gen.ENTITIES])[pop.row_entity]
    base = pop.row_static + intercept[pop.row_entity]
    like = np.zeros(len(base), dtype=bool)
    states = 1 if cfg.cross_entity_link else len(gen.ENTITIES)
    for u in range(len(pop.user_start)):
        mood, topic = np.zeros(states), np.zeros((states, pop.row_common.shape[1]))
        for r in range(pop.user_start[u], pop.user_start[u] + pop.user_len[u]):
            s = pop.row_entity[r] if states > 1 else 0
            a = pop.row_common[r]
            terms["mood"][r] = delta_m[r] * np.tanh(mood[s])
            terms["topic"][r] = delta_h[r] * np.tanh(topic[s] @ a)
            p = gen._sigmoid(base[r] + terms["mood"][r] + terms["topic"][r])
            like[r] = pop.row_uniform[r] < p
            mood *= cfg.decay
            topic *= cfg.decay
            mood[s] += like[r]
            topic[s] += like[r] * a
    return like


def category_loadings(world, entity: str) -> np.ndarray:
    """Each item's common loading replaced by its category's mean (video: `video_category`;
    article: `category_second`, nested in the first level)."""
    items = world.items[entity]
    key = np.asarray(items.columns["video_category" if entity == gen.VIDEO else "category_second"])
    out = np.zeros_like(items.common)
    for k in np.unique(key):
        out[key == k] = items.common[key == k].mean(0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=Path, required=True, help="OUT_DIR of the ETL")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--resamples", type=int, default=500)
    args = parser.parse_args(argv)

    lines = line_terms(args.users, args.seed)
    samples = DeltaTable(str(samples_table(args.samples))).to_pandas(
        columns=["entity", "split", "line_no", "label"]
    )
    for e, d in lines.items():
        rows = samples[samples["entity"] == e]
        if len(rows) and rows["line_no"].max() > len(d["like"]):
            raise SystemExit(
                f"{args.samples}: {e} line {rows['line_no'].max()} is beyond the "
                f"{len(d['like'])} lines the generator writes for --users {args.users} "
                f"--seed {args.seed}; wrong --users or --seed?"
            )
        d["split"] = np.full(len(d["like"]), "", dtype=object)
        d["split"][rows["line_no"].to_numpy() - 1] = rows["split"].to_numpy()
        if not (d["like"][rows["line_no"].to_numpy() - 1] == rows["label"].to_numpy()).all():
            raise SystemExit(f"{args.samples}: labels differ from the generator's; wrong --users?")
    target, source = gen.ARTICLE, gen.VIDEO
    t = lines[target]
    test = t["split"] == "test"
    labels, users = t["like"][test].astype(int), t["user"][test]
    scores: dict[str, np.ndarray] = {"oracle p_like": t["p"][test]}
    item = t["item_bias"][test]
    scores["item bias"] = item
    for parts in (["common"], ["specific"], ["common", "specific"], ["mood", "topic"]):
        scores["item bias + " + " + ".join(parts)] = item + sum(t[p][test] for p in parts)

    cfg = gen.GeneratorConfig()
    world = gen._make_world(args.seed, args.users, cfg)
    for kind in ("true", "category"):
        loads = {
            e: world.items[e].common if kind == "true" else category_loadings(world, e)
            for e in gen.ENTITIES
        }
        liked = {}
        for e, d in lines.items():
            seen = np.isin(d["split"], ["train", "valid"]) & d["like"]
            sums = pd.DataFrame(loads[e][d["item"][seen]]).groupby(d["user"][seen]).sum()
            liked[e] = sums.reindex(users, fill_value=0.0).to_numpy()
        candidate = loads[target][t["item"][test]]
        for name, parts in ((target, [target]), (source, [source]), ("both", [target, source])):
            interest = sum(liked[p] for p in parts)
            scores[f"item bias + liked {name} ({kind} loadings)"] = item + SUM_WEIGHT * np.einsum(
                "ij,ij->i", interest, candidate
            )

    table = ["| score | test AUC | test GAUC |", "|---|---|---|"]
    numbers: dict[str, object] = {"users": args.users, "seed": args.seed}
    for name, s in scores.items():
        g, coverage = gauc(labels, s, users)
        numbers[name] = {"auc": auc(labels, s), "gauc": g, "gauc_coverage": coverage}
        table.append(f"| {name} | {auc(labels, s):.4f} | {g:.4f} |")
    table += ["", "| both - target | AUC [95%] | GAUC [95%] |", "|---|---|---|"]
    for kind in ("true", "category"):
        both = scores[f"item bias + liked both ({kind} loadings)"]
        alone = scores[f"item bias + liked {target} ({kind} loadings)"]
        diff = paired_bootstrap(labels, both, alone, users, resamples=args.resamples)
        cells = []
        for m in ("auc", "gauc"):
            lo, hi = diff[m]["interval_95"]
            cells.append(f"{diff[m]['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
            numbers[f"both - {target} ({kind}) {m}"] = [diff[m]["difference"], lo, hi]
        table.append(f"| {kind} loadings | {cells[0]} | {cells[1]} |")
    text = (
        f"{args.users} users, seed {args.seed}: {int(test.sum())} {target} test rows, "
        f"{labels.sum()} likes, {len(np.unique(users))} users\n\n" + "\n".join(table) + "\n"
    )
    print(text)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "oracle_decomposition.md").write_text(text)
        (args.output / "oracle_decomposition.json").write_text(json.dumps(numbers, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
