"""MEM and TEM (paper section 3): shapes, routing, HFA scores, PDL, the frozen MEM, the
target-only serving graph, the ablation switches, and learning a planted signal."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from mkt.features import select_rows
from mkt.models import ConfigError, build_model
from mkt.models.base import choose_start
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


def on(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def same(a, b) -> bool:
    """Equal on the CPU; on CUDA within float rounding, since the attention's and pooling's
    `index_add` sums there with atomics in no fixed order (one call is not bitwise another)."""
    if a.device.type == "cpu":
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=0.0, atol=1e-6)


def mem_model(schema, seed=0, **params) -> MEM:
    torch.manual_seed(seed)
    return build_model("mem", schema, params)


@pytest.mark.parametrize("device", DEVICES)
def test_mem_shapes_for_both_entities(schema, batch, device):
    mem = mem_model(schema).to(device)
    b = on(batch, device)
    out = mem(b)
    assert out["logit"].shape == (64,) and out["logit"].device.type == device
    assert out["g_com"].shape == out["g_ind"].shape == (64, 64)
    for entity in schema.entities:
        # HFA runs on the rows of its own entity only.
        rows = int((b["entity_index"] == schema.entity_index(entity)).sum())
        assert out[f"importance_{entity}"].shape == (rows, len(schema.specific_features(entity)))
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


def test_pdl_cosine_is_in_unit_interval_per_row(schema, batch):
    """g_com (MMoE experts) and g_ind (SKE / TKE) end in ReLU, so every row's cosine lies in
    [0, 1]: PDL pushes them towards orthogonality, not opposition (docs/model.md)."""
    mem = mem_model(schema)
    with torch.no_grad():
        out = mem(batch)
    assert (out["g_com"] >= 0).all() and (out["g_ind"] >= 0).all()
    cos = torch.nn.functional.cosine_similarity(out["g_com"], out["g_ind"], dim=1)
    assert cos.shape == (64,) and (cos >= 0).all() and (cos <= 1 + 1e-6).all()
    assert mem.loss(batch, out)["pdl"] == pytest.approx(cos.mean().item())


def test_pdl_gradient_pushes_common_and_independent_apart(schema, batch):
    """The gradient of MEM.loss with the BCE isolated (its logits detached) is gamma times
    the gradient of the batch-mean cosine, reaches CKE and both extractors, and descending
    it lowers the PDL."""
    gamma = 0.5
    mem = mem_model(schema, gamma=gamma)

    def pdl_part(out):
        return mem.loss(batch, dict(out, logit=out["logit"].detach()))["loss"]

    out = mem(batch)
    params = [p for p in mem.parameters() if p.requires_grad]
    through_loss = torch.autograd.grad(pdl_part(out), params, allow_unused=True, retain_graph=True)
    cos = torch.nn.functional.cosine_similarity(out["g_com"], out["g_ind"], dim=1).mean()
    direct = torch.autograd.grad(gamma * cos, params, allow_unused=True)
    for a, b in zip(through_loss, direct, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-7)
    opt = torch.optim.SGD(mem.parameters(), lr=0.1)
    before = mem.loss(batch, mem(batch))["pdl"]
    for _ in range(5):
        opt.zero_grad()
        pdl_part(mem(batch)).backward()
        # CKE and both extractors receive the PDL gradient; the towers get none.
        assert mem.cke.experts[0].net[0].weight.grad.abs().sum() > 0
        for entity in schema.entities:
            assert mem.extractors[entity].net[0].weight.grad.abs().sum() > 0
            assert mem.towers[entity].net[0].weight.grad is None
        opt.step()
    after = mem.loss(batch, mem(batch))["pdl"]
    assert after < before - 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_gamma_zero_drops_pdl_from_the_loss(schema, batch, device):
    """w/o PDL: the loss is the BCE alone, so its gradient equals the BCE's."""
    batch = on(batch, device)
    grads = {}
    for gamma in (0.0, 0.5):
        mem = mem_model(schema, gamma=gamma).to(device)
        out = mem(batch)
        losses = mem.loss(batch, out)
        if gamma == 0:
            assert torch.allclose(losses["loss"], losses["bce_source"] + losses["bce_target"])
        losses["loss"].backward()
        grads[gamma] = mem.extractors["post"].net[0].weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[0.5])


@pytest.mark.parametrize("reads", [False, True])
def test_source_rows_and_the_target_sequence(schema, batch, reads):
    """`source_reads_target_sequence` off (the default): a source row's logit ignores the
    target entity's sequence, its loss moves none of that sequence's item rows, and the L2's
    counting pass does not count them; target rows read both sequences either way."""
    mem = mem_model(schema, source_reads_target_sequence=reads)
    target_seq = next(f for f in schema.sequences if f.entity == schema.target_entity)
    source = batch["entity_index"] == schema.source_index
    assert (batch[target_seq.length_column][source] > 0).any()
    other = dict(batch, **{target_seq.name: batch[target_seq.name].flip(0)})
    mem.eval()
    with torch.no_grad():
        before, after = mem(batch)["logit"], mem(other)["logit"]
    assert torch.equal(before[source], after[source]) != reads
    assert not torch.equal(before[~source], after[~source])  # target rows read it
    mem.train()
    mem.use_sparse_gradients()
    source_rows = select_rows(batch, source)
    mem.loss(source_rows, mem(source_rows))["loss"].backward()
    moved = set(
        mem.inputs.embeddings.tables[schema.item_feature]
        .weight.grad.coalesce()
        .indices()[0]
        .tolist()
    )

    def real_items(seq) -> set[int]:
        slots = torch.arange(schema.seq_len) < source_rows[seq.length_column].unsqueeze(1)
        return set(source_rows[seq.name][slots].tolist())

    read_elsewhere = set(source_rows[schema.item_feature].tolist())
    for seq in schema.sequences:
        if seq is not target_seq:
            read_elsewhere |= real_items(seq)
    only_in_target_seq = real_items(target_seq) - read_elsewhere
    assert only_in_target_seq
    assert bool(only_in_target_seq & moved) == reads
    counts = mem.count_embedding_rows([source_rows])
    bank = mem.inputs.embeddings
    assert bool(bank.touch_counts[schema.item_feature][sorted(only_in_target_seq)].any()) == reads
    assert counts


@pytest.mark.parametrize("device", DEVICES)
def test_without_hfa_specific_features_are_concatenated_unscored(schema, batch, device):
    """w/o HFA: the CKE reads cat([common, v_spec^src, v_spec^tgt]), the other entity's
    block being zeros (its padding index)."""
    batch = on(batch, device)
    mem = mem_model(schema, hfa=False).to(device).eval()
    seen = []
    hook = mem.cke.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        out = mem(batch)
        parts = mem.inputs(batch)
    hook.remove()
    assert len(mem.hfa) == 0 and not any(k.startswith("importance") for k in out)
    specific = parts["specific"]
    expected = torch.cat(
        [mem.common(parts), specific[schema.source_entity], specific[schema.target_entity]],
        dim=1,
    )
    assert len(seen) == 1 and same(seen[0], expected)
    is_target = batch["entity_index"] == schema.target_index
    assert is_target.any() and (~is_target).any()
    assert (specific[schema.source_entity][is_target] == 0).all()
    assert (specific[schema.target_entity][~is_target] == 0).all()
    spec = sum(len(schema.specific_features(e)) for e in schema.entities) * 8
    assert mem.cke.experts[0].net[0].in_features == mem.inputs.common_dim + spec
    with_hfa = mem_model(schema, hfa=True)
    assert with_hfa.cke.experts[0].net[0].in_features == with_hfa.inputs.common_dim + 32


@pytest.mark.parametrize("device", DEVICES)
def test_without_tem_pipeline_is_mem_target_tower(schema, batch, device):
    stages = pipeline("mem_only")
    assert [s.model for s in stages] == ["mem"]
    # No TEM follows, so no target row is held out for one (MKT's MEM: "pretrain" only).
    assert stages[0].target_rows == "all"
    assert pipeline("mkt")[0].target_rows == "pretrain"
    mem = mem_model(schema, interest=False).to(device).eval()
    t = target_rows(schema, on(batch, device))
    with torch.no_grad():
        out = mem(t)
        tower = mem.towers["post"](torch.cat([out["g_com"], out["g_ind"]], dim=1)).squeeze(1)
        assert torch.allclose(out["logit"], tower)
        # With the defaults' interest term too, the target path's logit is the MEM's.
        mem = mem_model(schema).to(device).eval()
        path_logit = mem.target_path(with_logit=True).knowledge_and_logit(t)[4]
        assert torch.allclose(mem(t)["logit"], path_logit, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_mem_target_path_matches_mem(schema, batch, device):
    for hfa in (True, False):
        mem = mem_model(schema, hfa=hfa).to(device).eval()
        t = target_rows(schema, on(batch, device))
        with torch.no_grad():
            parts = mem.inputs(t)
            _, _, _, g_com = mem.target_path()(t)
            assert torch.allclose(g_com, mem(t)["g_com"], atol=1e-6)
            assert parts["user"].shape[1] == mem.target_path().out_dims["user"]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def train_steps(model, optimizer, schema, device, steps, rows):
    """`steps` optimiser steps on fresh toy target batches of `rows` rows."""
    for step in range(steps):
        b = target_rows(schema, on(toy_batch(schema, rows, seed=step), device))
        loss = model.loss(b, model(b))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("device", DEVICES)
def test_tem_keeps_mem_frozen(schema, device):
    mem = mem_model(schema, dropout=0.5).to(device)
    t = target_rows(schema, on(toy_batch(schema, 64, seed=7), device))
    mem.train()
    with torch.no_grad():  # the MEM's dropout is live in training mode
        assert not torch.equal(mem(t)["g_com"], mem(t)["g_com"])
    torch.manual_seed(1)
    tem = TEM(schema, {"dropout": 0.1}, pretrained=mem).to(device)
    tem.train()
    assert not mem.inputs.training and not tem.knowledge.training
    assert tem.training and tem.bottom.training
    # After tem.train() the knowledge is the eval-mode MEM's: no dropout, the same every call.
    with torch.no_grad():
        first, second = tem.knowledge(t), tem.knowledge(t)
        mem.eval()
        reference = mem.inputs(t)
        reference = (reference["user"], reference["seq"], reference["shared"], mem(t)["g_com"])
    for a, b, ref in zip(first, second, reference, strict=True):
        assert same(a, b)
        assert torch.allclose(a, ref, atol=1e-6)
    assert all(not p.requires_grad for p in mem.parameters())
    before = {k: v.clone() for k, v in mem.state_dict().items()}
    # Even an optimiser handed every parameter must leave the MEM untouched.
    opt = torch.optim.AdamW(tem.parameters(), lr=0.05, weight_decay=0.1)
    own_before = tem.bottom.net[0].weight.clone()
    train_steps(tem, opt, schema, device, steps=5, rows=128)
    for key, value in mem.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(tem.bottom.net[0].weight, own_before)


@pytest.mark.parametrize("device", DEVICES)
def test_tem_serving_module_is_target_only(schema, batch, device):
    mem = mem_model(schema)
    tem = TEM(schema, {}, pretrained=mem).to(device).eval()
    serving = tem.serving_module().eval()
    t = target_rows(schema, on(batch, device))
    with torch.no_grad():
        assert torch.allclose(serving(t), tem(t)["logit"])
    names = [n for n, _ in serving.named_parameters()]
    source_tables = [f.name for f in schema.specific_features(schema.source_entity)]
    assert not any(f".tables.{f}." in n for n in names for f in source_tables)
    assert len(tem.knowledge.cke.gates) == 1
    source_params = {
        id(p)
        for module in (
            mem.hfa["product"],
            mem.extractors["product"],
            mem.towers["product"],
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


@pytest.mark.parametrize("device", DEVICES)
def test_wide_adds_each_entitys_first_order_term(schema, batch, device):
    deep = mem_model(schema, seed=5).to(device).eval()
    wide = mem_model(schema, seed=5, wide=True).to(device).eval()
    assert set(wide.wide) == {"product", "post"}
    assert "price" in wide.wide["product"].names and "price" not in wide.wide["post"].names
    wide.load_state_dict(deep.state_dict(), strict=False)
    b = on(batch, device)
    with torch.no_grad():
        assert torch.allclose(wide(b)["logit"], deep(b)["logit"])  # the weights start at 0
        # A weight of the target's `quality` value moves exactly the target rows holding it.
        value = int(b["quality"][b["entity_index"] == schema.target_index][0])
        wide.wide["post"].weights.tables["quality"].weight[value] = 0.7
        moved = wide(b)["logit"] - deep(b)["logit"]
    holds = (b["entity_index"] == schema.target_index) & (b["quality"] == value)
    assert torch.allclose(moved[holds], torch.full_like(moved[holds], 0.7), atol=1e-6)
    assert torch.allclose(moved[~holds], torch.zeros_like(moved[~holds]), atol=1e-6)
    # The TEM that starts from the MEM's logit starts from this one, first-order term included.
    tem = TEM(schema, {"from_mem_logit": True}, pretrained=wide).to(device).eval()
    t = target_rows(schema, b)
    with torch.no_grad():
        assert torch.allclose(tem(t)["logit"], wide(t)["logit"], atol=1e-6)
        assert torch.allclose(tem.serving_module()(t), wide(t)["logit"], atol=1e-6)
        # TEM's own first-order term (TEM alone here) reads the target's features the same way.
        alone = TEM(schema, {"wide": True}).to(device).eval()
        before = alone(t)["logit"]
        alone.wide.weights.tables["quality"].weight[value] = -0.4
        moved = alone(t)["logit"] - before
    holds = t["quality"] == value
    assert torch.allclose(moved[holds], torch.full_like(moved[holds], -0.4), atol=1e-6)
    assert torch.allclose(moved[~holds], torch.zeros_like(moved[~holds]), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_interest_adds_the_dot_product_of_user_fields_and_candidate(schema, batch, device):
    plain = mem_model(schema, seed=3, interest=False).to(device).eval()
    mem = mem_model(schema, seed=3, interest=True).to(device).eval()
    mem.load_state_dict(plain.state_dict(), strict=False)
    b = on(batch, device)
    with torch.no_grad():
        parts = mem.inputs(b)
        dim = mem.inputs.dim
        fields = torch.cat([parts["user"], parts["seq"]], dim=1).view(len(b["label"]), -1, dim)
        item_slot = mem.inputs.shared_names.index(schema.item_feature)
        item = parts["shared"].view(len(b["label"]), -1, dim)[:, item_slot]
        # W_f starts at the identity: the term is the plain sum of dot products, on both entities.
        by_hand = (fields * item.unsqueeze(1)).sum((1, 2))
        assert by_hand.abs().max() > 0
        assert torch.allclose(mem(b)["logit"] - plain(b)["logit"], by_hand, atol=1e-5)
        # The target's W_f of 0 removes that field's share on target rows and no other.
        mem.interest["post"].weight[0].zero_()
        share_0 = (fields[:, 0] * item).sum(1) * (b["entity_index"] == schema.target_index)
        assert torch.allclose(mem(b)["logit"] - plain(b)["logit"], by_hand - share_0, atol=1e-5)
        # The frozen MEM's target logit the TEM starts from holds the term too.
        t = target_rows(schema, b)
        tem = TEM(schema, {"from_mem_logit": True}, pretrained=mem).to(device).eval()
        assert torch.allclose(tem(t)["logit"], mem(t)["logit"], atol=1e-5)
        # TEM's own term reads its own user fields and candidate.
        alone_plain = TEM(schema).to(device).eval()
        alone = TEM(schema, {"interest": True}).to(device).eval()
        alone.load_state_dict(alone_plain.state_dict(), strict=False)
        own = alone.inputs(t)
        own_fields = torch.cat([own["user"], own["seq"]], dim=1).view(len(t["label"]), -1, dim)
        own_item = own["shared"].view(len(t["label"]), -1, dim)[:, item_slot]
        expected = (own_fields * own_item.unsqueeze(1)).sum((1, 2))
        assert torch.allclose(alone(t)["logit"] - alone_plain(t)["logit"], expected, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_tem_from_mem_logit_starts_at_the_mem_and_learns_a_correction(schema, device):
    mem = mem_model(schema, seed=3).to(device).eval()
    torch.manual_seed(4)
    tem = TEM(schema, {"from_mem_logit": True}, pretrained=mem).to(device)
    t = target_rows(schema, on(toy_batch(schema, 256, seed=11), device))
    with torch.no_grad():
        mem_logit = mem(t)["logit"]
        assert torch.allclose(tem.eval()(t)["logit"], mem_logit, atol=1e-6)
    # The tower and TKE are the MEM's own, frozen; they join the TEM (and its serving graph)
    # only with this option.
    assert tem.knowledge.tower is mem.towers["post"] and tem.knowledge.extractor is not None
    assert TEM(schema, {"from_mem_logit": False}, pretrained=mem).knowledge.tower is None
    before = {k: v.clone() for k, v in mem.state_dict().items()}
    tem.train()
    train_steps(tem, torch.optim.Adam(trainable(tem), lr=0.01), schema, device, steps=20, rows=256)
    with torch.no_grad():
        moved = tem.eval()(t)["logit"] - mem_logit
    assert moved.abs().max() > 1e-3  # the DNN learnt a correction on top of the MEM
    assert all(torch.equal(before[k], v) for k, v in mem.state_dict().items())
    serving = tem.serving_module().eval()
    with torch.no_grad():
        assert torch.allclose(serving(t), tem(t)["logit"])


@pytest.mark.parametrize("device", DEVICES)
def test_tem_weighs_its_mem_against_tem_alone(schema, device):
    """MKT's TEM on (MEM, TEM alone), TEM choice 5: it starts from the mean of their logits,
    or from either one, whichever `choose_start` scores best; the weights are then learnt and
    both models stay frozen."""
    mem = mem_model(schema, seed=3).to(device).eval()
    torch.manual_seed(5)
    alone = TEM(schema).to(device)
    train_steps(alone, torch.optim.Adam(alone.parameters(), lr=0.01), schema, device, 5, 128)
    alone.eval()
    torch.manual_seed(6)
    tem = TEM(schema, pretrained=(mem, alone)).to(device)
    t = target_rows(schema, on(toy_batch(schema, 256, seed=11), device))
    with torch.no_grad():
        logits = {"mem": mem(t)["logit"], "tem_alone": alone(t)["logit"]}
        logits["mean"] = (logits["mem"] + logits["tem_alone"]) / 2
        assert tem.start_options() == ("mean", "mem", "tem_alone")
        for start, expected in logits.items():
            tem.use_start(start)
            assert torch.allclose(tem.eval()(t)["logit"], expected, atol=1e-5), start

        # The start that scores best is kept: here, the one closest to TEM alone's logit.
        def closeness():
            return -float((tem(t)["logit"] - logits["tem_alone"]).abs().max())

        start, scored = choose_start(tem, closeness, lambda score: score)
    assert start == "tem_alone" and set(scored) == set(logits)
    assert torch.allclose(tem(t)["logit"], logits["tem_alone"], atol=1e-5)
    with pytest.raises(ValueError, match="no start 'best'"):
        tem.use_start("best")

    def state():
        return {(m, k): v.clone() for m in (mem, alone) for k, v in m.state_dict().items()}

    frozen = state()
    weights = tem.start_weights.detach().clone()
    tem.train()
    assert not alone.training and not mem.training
    train_steps(tem, torch.optim.Adam(trainable(tem), lr=0.01), schema, device, steps=5, rows=256)
    assert not torch.equal(tem.start_weights.detach(), weights)  # learnt
    assert all(torch.equal(frozen[k], v) for k, v in state().items())
    # A TEM alone with a MEM of its own, or the models in the other order, is refused.
    with pytest.raises(ConfigError, match="a MEM and a TEM alone"):
        TEM(schema, pretrained=(alone, mem))
    with pytest.raises(ConfigError, match="a MEM and a TEM alone"):
        TEM(schema, pretrained=(mem, TEM(schema, pretrained=mem)))
    # On a MEM alone (the paper's two stages) there is one start, the MEM's logit as it is.
    assert TEM(schema, pretrained=mem).start_options() == ("as built",)


@pytest.mark.parametrize("device", DEVICES)
def test_tem_plug_switches_and_without_mem(schema, batch, device):
    mem = mem_model(schema).eval()
    t = target_rows(schema, on(batch, device))
    # The paper's output (eq. 13): TEM's DNN gives the whole logit, so each plug shows in it
    # from the start (with from_mem_logit it starts as the MEM's logit, whatever the plugs).
    paper = {"from_mem_logit": False}
    torch.manual_seed(2)
    full = TEM(schema, paper, pretrained=mem).to(device).eval()
    assert set(full.gates) == {"user", "seq", "shared", "cross"}
    with torch.no_grad():
        reference = full(t)["logit"]
        for plug in ("user", "seq", "shared", "cross"):
            torch.manual_seed(2)
            off = TEM(schema, {**paper, f"plug_{plug}": False}, pretrained=mem).to(device).eval()
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
    # w/o MEM: TEM alone, with the full TEM's own weights, scores differently, and is the
    # full TEM with every gate silenced.
    alone = build_model("tem", schema, {}).to(device).eval()
    assert alone.knowledge is None and len(alone.gates) == 0
    missing, unexpected = alone.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith(("knowledge.", "gates.")) for k in unexpected)
    with torch.no_grad():
        without_mem = alone(t)["logit"]
        assert without_mem.shape == (len(t["label"]),)
        assert not torch.allclose(without_mem, reference)
        for gate in full.gates.values():
            gate.value.weight.zero_()
            gate.value.bias.zero_()
        assert torch.allclose(full(t)["logit"], without_mem, atol=1e-6)


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


def test_model_params_doc_lists_every_default() -> None:
    """docs/model-params.md is the one place that shows every model's defaults: it must be what
    `python -m mkt.models --markdown` prints from the model files today."""
    from pathlib import Path

    from mkt.models.__main__ import markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "model-params.md"
    assert doc.read_text() == markdown(), "regenerate: python -m mkt.models --markdown"


@pytest.mark.parametrize("device", DEVICES)
def test_entity_user_rows_add_to_the_shared_vector_on_their_entitys_rows_only(
    schema, batch, device
):
    mem = mem_model(schema, seed=3).to(device)  # entity_user: the default
    b = on(batch, device)
    source, target = schema.source_entity, schema.target_entity
    own = mem.entity_user[target]
    user_id = schema.user_features[0].name
    assert own.tables[user_id].weight.abs().max() == 0  # the shared-vector model at first
    with torch.no_grad():
        own.tables[user_id].weight[1:].normal_()  # row 0 is the padding
    mem.eval()
    # Target rows read shared + the target's row; source rows the shared + the source's (0).
    added = own(b, mem.inputs.user_names).flatten(1)
    is_target = b["entity_index"] == schema.target_index
    assert added[~is_target].abs().max() == 0 and added[is_target].abs().max() > 0
    # The target path (every row the target's) reads the same user vector as the MEM.
    t = target_rows(schema, b)
    with torch.no_grad():
        user, _, _, g_com = mem.target_path()(t)
        assert torch.allclose(g_com, mem(t)["g_com"], atol=1e-6)
        expected = mem.inputs(t)["user"] + own(t, mem.inputs.user_names).flatten(1)
        assert torch.allclose(user, expected)
    # A source row's loss moves the source's own rows and never the target's.
    mem.train()
    rows = (b["entity_index"] == schema.source_index).nonzero().squeeze(1)
    only_source = {k: v[rows] for k, v in b.items()}
    mem.zero_grad()
    mem.loss(only_source, mem(only_source))["loss"].backward()
    grad = own.tables[user_id].weight.grad
    assert grad is None or grad.abs().max() == 0
    assert mem.entity_user[source].tables[user_id].weight.grad.abs().max() > 0
    # The L2's counting pass leaves the other entity's rows out.
    mem.count_embedding_rows([only_source])
    assert own.touch_counts[user_id].sum() == 0
    assert mem.entity_user[source].touch_counts[user_id].sum() > 0
