"""The training recipe's pieces in mkt (docs/training.md, "The training recipe"): the
embedding L2 on the rows a batch touches, output biases at the like rate, TEM's embeddings
from the MEM, the logistic-regression and like-rate floors. No Ray, no Spark."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mkt.layers.embedding import EmbeddingBank
from mkt.like_rate import Counts, fit_strength, like_rate_scores
from mkt.models import MODELS, build_model
from mkt.synthetic import toy_batch, toy_schema

RATES = {"product": 0.04, "post": 0.01}


@pytest.fixture(scope="module")
def schema():
    return toy_schema(like_rates=RATES)


def test_touched_rows_l2_sums_to_the_whole_table_l2_over_an_epoch(schema):
    """Summed over an epoch's batches, each row touched in the epoch counts ||w||^2 once,
    however many batches touch it; rows no batch touches count nothing."""
    torch.manual_seed(0)
    bank = EmbeddingBank(schema, 4, init_std=0.3)
    batches = [toy_batch(schema, n, seed=s) for s, n in enumerate([40, 40, 25])]
    bank.reset_touch_counts()
    for batch in batches:
        bank.count_rows(batch)
    total = sum(float(bank.l2_penalty(b).detach()) for b in batches)
    expected = 0.0
    for name, table in bank.tables.items():
        rows = set()
        for b in batches:
            rows |= set(bank.touched_rows(b).get(name, torch.zeros(0)).tolist())
        rows.discard(0)
        assert rows, name
        expected += float(table.weight[sorted(rows)].pow(2).sum())
    assert total == pytest.approx(expected, rel=1e-5)
    # A row in every batch weighs 1/3 per batch; the item table also counts sequence slots.
    user = int(batches[0]["user_id"][0])
    seen = sum(bool((b["user_id"] == user).any()) for b in batches)
    assert float(bank.touch_counts["user_id"][user]) == seen


def test_touched_rows_l2_has_gradient_only_on_touched_rows(schema):
    bank = EmbeddingBank(schema, 4)
    batch = toy_batch(schema, 30, seed=3)
    bank.reset_touch_counts()
    bank.count_rows(batch)
    bank.l2_penalty(batch).backward()
    grad = bank.tables["user_id"].weight.grad
    touched = torch.zeros(grad.shape[0], dtype=torch.bool)
    touched[batch["user_id"]] = True
    assert (grad[touched].abs().sum(1) > 0).all()
    assert (grad[~touched] == 0).all()


def test_l2_needs_the_counting_pass_and_skips_frozen_tables(schema):
    bank = EmbeddingBank(schema, 4)
    batch = toy_batch(schema, 10)
    with pytest.raises(RuntimeError, match="count_rows"):
        bank.l2_penalty(batch)
    bank.requires_grad_(False)
    assert float(bank.l2_penalty(batch)) == 0.0


def model_for(name, schema):
    torch.manual_seed(0)
    pretrained = None
    if name == "tem":
        pretrained = build_model("mem", schema)
    elif name in ("finetune", "ctnet"):
        pretrained = build_model("din_source", schema)
    return build_model(name, schema, pretrained=pretrained)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_starts_at_its_entity_like_rate(schema, name):
    """Before any step, each entity's rows are predicted near that entity's train like rate
    (the output biases), not near 0.5."""
    model = model_for(name, schema).eval()
    batch = toy_batch(schema, 400, seed=5, target_share=0.5)
    with torch.no_grad():
        p = torch.sigmoid(model(batch)["logit"])
    entities = schema.entities if model.train_entities == "both" else [schema.target_entity]
    if name == "din_source":
        entities = [schema.source_entity]
    for entity in entities:
        rows = batch["entity_index"] == schema.entity_index(entity)
        mean = float(p[rows].mean())
        assert RATES[entity] / 2 < mean < RATES[entity] * 2, (entity, mean)


def test_logistic_regression_is_its_bias_plus_one_weight_per_feature_value(schema):
    lr = build_model("lr", schema)
    batch = toy_batch(schema, 50, seed=2, target_share=1.0)
    prior = math.log(RATES["post"] / (1 - RATES["post"]))
    assert torch.allclose(lr(batch)["logit"], torch.full((50,), prior))  # weights start at 0
    with torch.no_grad():
        lr.wide.weights.tables["quality"].weight[5] = 1.5
    expected = prior + 1.5 * (batch["quality"] == 5).float()
    assert torch.allclose(lr(batch)["logit"], expected)
    assert "seq_post" not in lr.names  # one-hot fields only, no bags


def test_tem_embeddings_from_the_mem(schema):
    torch.manual_seed(0)
    mem = build_model("mem", schema)
    frozen = build_model("tem", schema, {"embeddings": "frozen_mem"}, pretrained=mem)
    table = frozen.inputs.embeddings.tables["user_id"]
    assert table is mem.inputs.embeddings.tables["user_id"] and not table.weight.requires_grad
    assert not any(p.requires_grad for p in frozen.inputs.embeddings.parameters())
    copied = build_model("tem", schema, {"embeddings": "init_from_mem"}, pretrained=mem)
    own = copied.inputs.embeddings.tables["user_id"]
    assert own.weight.requires_grad and own is not table
    assert torch.equal(own.weight, table.weight)
    fresh = build_model("tem", schema, {"embeddings": "own"}, pretrained=mem)
    assert not torch.equal(fresh.inputs.embeddings.tables["user_id"].weight, table.weight)
    alone = build_model("tem", schema, {"embeddings": "frozen_mem"})  # no MEM: own tables
    assert alone.inputs.embeddings.tables["user_id"].weight.requires_grad
    with pytest.raises(ValueError, match="embedding_dim"):
        build_model("tem", schema, {"embedding_dim": 4}, pretrained=mem)
    with pytest.raises(ValueError, match=r"TEM\.embeddings"):
        build_model("tem", schema, {"embeddings": "shared"}, pretrained=mem)


def test_like_rate_floor_scores_and_strength():
    users = Counts.of(np.array([7, 3]), np.array([10, 100]), np.array([5, 1]))
    items = Counts.of(np.array([1]), np.array([50]), np.array([10]))
    prior = 0.1
    p = like_rate_scores(users, items, prior, np.array([3, 7, 99]), np.array([1, 1, 1]), 10.0)

    def logit(x):
        return math.log(x / (1 - x))

    r_item = (10 + 10 * prior) / (50 + 10)
    for score, (likes, rows) in zip(p, [(1, 100), (5, 10), (0, 0)], strict=True):
        r_user = (likes + 10 * prior) / (rows + 10)
        z = logit(r_user) + logit(r_item) - logit(prior)
        assert score == pytest.approx(1 / (1 + math.exp(-z)))
    # A user never seen in train is scored by the item alone.
    assert p[2] == pytest.approx(r_item)
    with pytest.raises(ValueError, match="duplicate"):
        Counts.of(np.array([1, 1]), np.array([1, 1]), np.array([0, 0]))


def test_fit_strength_picks_the_best_validation_auc():
    rng = np.random.default_rng(0)
    n_users, rows = 400, 20000
    propensity = rng.normal(-3.5, 1.0, n_users)
    user = rng.integers(0, n_users, rows)
    label = (rng.random(rows) < 1 / (1 + np.exp(-propensity[user]))).astype(np.int64)
    train, valid = slice(0, 10000), slice(10000, None)
    counts = np.bincount(user[train], minlength=n_users)
    likes = np.bincount(user[train], weights=label[train], minlength=n_users)
    users = Counts.of(np.arange(n_users), counts, likes)
    items = Counts.of(np.array([0]), np.array([10000]), np.array([label[train].sum()]))
    prior = float(label[train].mean())
    item_keys = np.zeros(len(user[valid]), dtype=np.int64)
    chosen = fit_strength(users, items, prior, user[valid], item_keys, label[valid])
    aucs = {
        s: roc_auc_score(
            label[valid], like_rate_scores(users, items, prior, user[valid], item_keys, s)
        )
        for s in (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
    }
    assert aucs[chosen] == max(aucs.values())
    assert aucs[chosen] > 0.6  # the planted propensity is found


def test_recipe_curves_keep_every_epoch_of_every_stage(tmp_path) -> None:
    """jobs/recipe_curves.py's figure and JSON hold each run's per-epoch validation numbers,
    stage by stage, as the runs' metrics.json recorded them."""
    from jobs.recipe_curves import curves, plot

    def run(aucs: list[float]) -> dict:
        history = [{"valid_auc": a, "valid_logloss": 0.1 + a / 10} for a in aucs]
        for epoch, record in enumerate(history[1:], start=2):
            record["epoch"] = epoch
            if record["valid_auc"] <= max(aucs[: epoch - 1]):
                record["restored_epoch"] = 1
        return {
            "stages": [{"name": "mem", "history": history}, {"name": "tem", "history": history[:2]}]
        }

    data = curves({"recipe": run([0.5, 0.6, 0.7]), "recipe_off": run([0.6, 0.55, 0.5])})
    assert data["recipe"]["mem"]["valid_auc"] == [0.5, 0.6, 0.7]
    assert data["recipe_off"]["tem"]["valid_logloss"] == pytest.approx([0.16, 0.155])
    assert data["recipe"]["mem"]["restored_epochs"] == []
    assert data["recipe_off"]["mem"]["restored_epochs"] == [2, 3]
    plot(data, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
