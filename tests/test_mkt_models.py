"""MEM and TEM (paper section 3): shapes, routing, HFA scores, PDL, the frozen MEM, the
target-only serving graph, the ablation switches, and learning a planted signal."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from mkt.features import select_rows
from mkt.models import ConfigError, build_model
from mkt.models.mem import MEM
from mkt.models.tem import TEM
from mkt.pipelines import pipeline
from mkt.synthetic import toy_batch, toy_schema

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def schema():
    return toy_schema()


@pytest.fixture(scope="module")
def batch(schema):
    return toy_batch(schema, 64, seed=1)


def target_rows(schema, batch):
    return select_rows(batch, batch["entity_index"] == schema.target_index)


def mem_model(schema, seed=0, **params) -> MEM:
    torch.manual_seed(seed)
    return build_model("mem", schema, params)


@pytest.mark.parametrize("device", DEVICES)
def test_mem_shapes_for_both_entities(schema, batch, device):
    mem = mem_model(schema).to(device)
    b = {k: v.to(device) for k, v in batch.items()}
    out = mem(b)
    assert out["logit"].shape == (64,) and out["logit"].device.type == device
    assert out["g_com"].shape == out["g_ind"].shape == (64, 64)
    for entity in schema.entities:
        assert out[f"importance_{entity}"].shape == (64, len(schema.specific_features(entity)))
    losses = mem.loss(b, out)
    assert set(losses) == {"loss", "bce_source", "bce_target", "pdl"}
    expected = losses["bce_source"] + losses["bce_target"] + 0.01 * losses["pdl"]
    assert torch.allclose(losses["loss"], expected)


def test_mem_routes_each_row_by_its_entity(schema, batch):
    """A mixed batch gives every row the logit it gets in a batch of its entity alone, and
    that logit is its entity's tower."""
    mem = mem_model(schema).eval()
    with torch.no_grad():
        mixed = mem(batch)["logit"]
        for entity in schema.entities:
            rows = batch["entity_index"] == schema.entity_index(entity)
            alone = mem(select_rows(batch, rows))["logit"]
            assert torch.allclose(mixed[rows], alone, atol=1e-6)
        # Relabelling target rows as source changes their logits (another HFA, gate, tower).
        relabelled = dict(batch, entity_index=torch.full_like(batch["entity_index"], 0))
        rows = batch["entity_index"] == schema.target_index
        assert not torch.allclose(mem(relabelled)["logit"][rows], mixed[rows])


def test_hfa_importance_scores_in_open_interval(schema, batch):
    """Eq. 4: 2 * sigmoid, so a score can halve a feature or double it, never flip it."""
    mem = mem_model(schema)
    out = mem(batch)
    for entity in schema.entities:
        p = out[f"importance_{entity}"]
        assert torch.all(p > 0) and torch.all(p < 2)
    with torch.no_grad():  # a sharper score layer reaches towards both ends
        for hfa in mem.hfa.values():
            hfa.score.weight.mul_(300)
            hfa.score.bias.zero_()
        out = mem(batch)
    p = torch.cat([out[f"importance_{e}"].flatten() for e in schema.entities])
    assert p.min() < 0.2 and p.max() > 1.8 and torch.all(p <= 2)


def test_hfa_cross_with_shared_switch(schema, batch):
    """With the switch on, a feature's importance depends on the user; off (eq. 3), only on
    the entity-specific features."""
    other_user = dict(batch, user_id=torch.roll(batch["user_id"], 1))
    for with_shared in (True, False):
        mem = mem_model(schema, hfa_cross_with_shared=with_shared).eval()
        with torch.no_grad():
            a = mem(batch)["importance_post"]
            b = mem(other_user)["importance_post"]
        assert torch.allclose(a, b) != with_shared


def test_pdl_gradient_pushes_common_and_independent_apart(schema, batch):
    mem = mem_model(schema, gamma=1.0)
    opt = torch.optim.SGD(mem.parameters(), lr=0.05)
    before = mem.loss(batch, mem(batch))["pdl"]
    for _ in range(5):
        opt.zero_grad()
        out = mem(batch)
        pdl = torch.nn.functional.cosine_similarity(out["g_com"], out["g_ind"], dim=1).mean()
        pdl.backward()
        # Both extractors receive the PDL gradient.
        assert mem.cke.experts[0].net[0].weight.grad.abs().sum() > 0
        assert mem.extractors["post"].net[0].weight.grad.abs().sum() > 0
        opt.step()
    after = mem.loss(batch, mem(batch))["pdl"]
    assert after < before - 0.01


def test_gamma_zero_drops_pdl_from_the_loss(schema, batch):
    """w/o PDL: the loss is the BCE alone, so its gradient equals the BCE's."""
    grads = {}
    for gamma in (0.0, 0.5):
        mem = mem_model(schema, gamma=gamma)
        out = mem(batch)
        losses = mem.loss(batch, out)
        if gamma == 0:
            assert torch.allclose(losses["loss"], losses["bce_source"] + losses["bce_target"])
        losses["loss"].backward()
        grads[gamma] = mem.extractors["post"].net[0].weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[0.5])


def test_without_hfa_specific_features_are_concatenated_unscored(schema, batch):
    mem = mem_model(schema, hfa=False)
    out = mem(batch)
    assert len(mem.hfa) == 0 and not any(k.startswith("importance") for k in out)
    spec = sum(len(schema.specific_features(e)) for e in schema.entities) * 8
    assert mem.cke.experts[0].net[0].in_features == mem.inputs.common_dim + spec
    with_hfa = mem_model(schema, hfa=True)
    assert with_hfa.cke.experts[0].net[0].in_features == with_hfa.inputs.common_dim + 32


def test_without_tem_pipeline_is_mem_target_tower(schema, batch):
    stages = pipeline("mem_only")
    assert [s.model for s in stages] == ["mem"]
    mem = mem_model(schema).eval()
    t = target_rows(schema, batch)
    with torch.no_grad():
        out = mem(t)
        tower = mem.towers["post"](torch.cat([out["g_com"], out["g_ind"]], dim=1)).squeeze(1)
    assert torch.allclose(out["logit"], tower)


def test_mem_target_path_matches_mem(schema, batch):
    for hfa in (True, False):
        mem = mem_model(schema, hfa=hfa).eval()
        t = target_rows(schema, batch)
        with torch.no_grad():
            parts = mem.inputs(t)
            _, _, _, g_com = mem.target_path()(t)
            assert torch.allclose(g_com, mem(t)["g_com"], atol=1e-6)
            assert parts["user"].shape[1] == mem.target_path().out_dims["user"]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_tem_keeps_mem_frozen(schema):
    mem = mem_model(schema)
    mem.train()
    torch.manual_seed(1)
    tem = TEM(schema, {"dropout": 0.1}, pretrained=mem)
    tem.train()
    assert not mem.inputs.training and not tem.knowledge.training
    assert tem.training and tem.bottom.training
    assert all(not p.requires_grad for p in mem.parameters())
    before = {k: v.clone() for k, v in mem.state_dict().items()}
    # Even an optimiser handed every parameter must leave the MEM untouched.
    opt = torch.optim.AdamW(tem.parameters(), lr=0.05, weight_decay=0.1)
    own_before = tem.bottom.net[0].weight.clone()
    for step in range(5):
        b = target_rows(schema, toy_batch(schema, 128, seed=step))
        loss = tem.loss(b, tem(b))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, value in mem.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(tem.bottom.net[0].weight, own_before)


def test_tem_serving_module_is_target_only(schema, batch):
    mem = mem_model(schema)
    tem = TEM(schema, {}, pretrained=mem).eval()
    serving = tem.serving_module().eval()
    t = target_rows(schema, batch)
    with torch.no_grad():
        assert torch.allclose(serving(t), tem(t)["logit"])
    names = [n for n, _ in serving.named_parameters()]
    source_tables = [f.name for f in schema.specific_features(schema.source_entity)]
    assert not any(f".tables.{f}." in n for n in names for f in source_tables)
    assert not any("extractors" in n or "towers" in n for n in names)
    assert len(tem.knowledge.cke.gates) == 1
    source_params = {
        id(p)
        for module in (
            mem.hfa["product"],
            mem.extractors,
            mem.towers,
            mem.cke.gates[schema.source_index],
        )
        for p in module.parameters()
    }
    source_params |= {id(mem.inputs.embeddings.tables[f].weight) for f in source_tables}
    assert not source_params & {id(p) for p in serving.parameters()}
    # The serving batch needs no source-specific column.
    t_no_source = {k: v for k, v in t.items() if k not in source_tables}
    with torch.no_grad():
        assert torch.allclose(serving(t_no_source), tem(t)["logit"])
    exported = torch.export.export(serving, (t_no_source,))
    assert torch.allclose(exported.module()(t_no_source), serving(t_no_source), atol=1e-6)


def test_tem_plug_switches_and_without_mem(schema, batch):
    mem = mem_model(schema).eval()
    t = target_rows(schema, batch)
    torch.manual_seed(2)
    full = TEM(schema, {}, pretrained=mem).eval()
    assert set(full.gates) == {"user", "seq", "shared", "cross"}
    with torch.no_grad():
        reference = full(t)["logit"]
        for plug in ("user", "seq", "shared", "cross"):
            torch.manual_seed(2)
            off = TEM(schema, {f"plug_{plug}": False}, pretrained=mem).eval()
            assert plug not in off.gates
            off.load_state_dict(full.state_dict(), strict=False)
            assert not torch.allclose(off(t)["logit"], reference)
            # Silencing that gate in the full model gives the switched-off computation.
            gate = full.gates[plug]
            saved = gate.value.weight.clone(), gate.value.bias.clone()
            gate.value.weight.zero_()
            gate.value.bias.zero_()
            assert torch.allclose(off(t)["logit"], full(t)["logit"], atol=1e-6)
            gate.value.weight.copy_(saved[0])
            gate.value.bias.copy_(saved[1])
    alone = build_model("tem", schema, {})
    assert alone.knowledge is None and len(alone.gates) == 0
    assert alone(t)["logit"].shape == (len(t["label"]),)


def test_bad_params_are_named(schema):
    with pytest.raises(ConfigError, match=r"MEM: unknown parameter\(s\) \['nope'\]"):
        build_model("mem", schema, {"nope": 1})
    with pytest.raises(ConfigError, match=r"TEM.cross_layer"):
        build_model("tem", schema, {"cross_layer": 4})
    with pytest.raises(ConfigError, match=r"MEM.gamma"):
        build_model("mem", schema, {"gamma": -1.0})
    with pytest.raises(ConfigError, match=r"TEM: pretrained must be a MEM"):
        TEM(schema, {}, pretrained=build_model("tem", schema, {}))


def fit(model, schema, steps, target_only, seed, lr=3e-3):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(trainable(model), lr=lr)
    model.train()
    for step in range(steps):
        b = toy_batch(schema, 256, seed=1000 * seed + step)
        if target_only:
            b = target_rows(schema, b)
        loss = model.loss(b, model(b))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = target_rows(schema, toy_batch(schema, 3000, seed=99))
    with torch.no_grad():
        scores = model(test)["logit"].numpy()
    return roc_auc_score(test["label"].numpy(), scores)


def test_mem_and_tem_learn_the_planted_signal(schema):
    mem = mem_model(schema)
    mem_auc = fit(mem, schema, 200, target_only=False, seed=1, lr=1e-2)
    assert mem_auc > 0.75
    torch.manual_seed(3)
    tem = TEM(schema, {}, pretrained=mem)
    tem_auc = fit(tem, schema, 100, target_only=True, seed=2, lr=1e-2)
    assert tem_auc > 0.75
