"""The small modules of mkt/layers: shapes, masking, padding / OOV and per-row gating; the
schema rule the sequence attention relies on."""

from __future__ import annotations

import pytest
import torch

from mkt.layers import (
    MLP,
    CrossNetwork,
    EmbeddingBank,
    EntityInputs,
    GLUGate,
    MMoE,
    TargetAttention,
)
from mkt.schema import FeatureSchema, SchemaError
from mkt.synthetic import toy_batch, toy_schema


@pytest.fixture(scope="module")
def schema():
    return toy_schema()


@pytest.fixture()
def batch(schema):
    return toy_batch(schema, 32, seed=3)


def test_embedding_bank_padding_oov_and_shapes(schema, batch):
    torch.manual_seed(0)
    bank = EmbeddingBank(schema, dim=8)
    out = bank(batch, ["user_id", "gender", "price"])
    assert out.shape == (32, 3, 8)
    vocab = schema.feature("brand").vocab_size
    idx = torch.tensor([0, 2, vocab, vocab + 100, -1, 5])
    emb = bank.lookup("brand", idx)
    assert torch.all(emb[0] == 0)  # padding embeds to zeros
    oov = bank.tables["brand"].weight[2]
    for row in (2, 3, 4):  # out-of-range indices read as OOV
        assert torch.equal(emb[row], oov)
    assert not torch.equal(emb[5], oov)
    # Padding gets no gradient.
    bank.lookup("brand", idx).sum().backward()
    assert torch.all(bank.tables["brand"].weight.grad[0] == 0)
    assert torch.any(bank.tables["brand"].weight.grad[2] != 0)


def test_embedding_bank_sequence_uses_item_table_and_length_mask(schema, batch):
    bank = EmbeddingBank(schema, dim=4)
    keys, mask = bank.sequence(batch, "seq_post")
    assert keys.shape == (32, schema.seq_len, 4) and mask.shape == (32, schema.seq_len)
    assert torch.equal(mask.sum(1), batch["seq_post_len"])
    item_table = bank.tables[schema.item_feature].weight
    assert torch.equal(keys[0, 0], item_table[batch["seq_post"][0, 0]])
    with pytest.raises(KeyError, match="not a sequence"):
        bank.sequence(batch, "user_id")


def test_embedding_bank_names_and_subset(schema):
    bank = EmbeddingBank(schema, names=["user_id", "item_id"])
    assert set(bank.tables) == {"user_id", "item_id"}
    with pytest.raises(KeyError, match="nope"):
        EmbeddingBank(schema, names=["nope"])
    full = EmbeddingBank(schema)
    sub = full.subset(["user_id"])
    assert sub.tables["user_id"].weight is full.tables["user_id"].weight
    with pytest.raises(KeyError, match="no table"):
        sub.lookup("price", torch.tensor([3]))


def test_mlp_dims_activation_and_errors():
    mlp = MLP(6, [5, 3], last_activation=False)
    assert mlp.out_dim == 3
    torch.manual_seed(0)
    out = mlp(torch.randn(200, 6))
    assert (out < 0).any()  # no ReLU on the last layer
    assert (MLP(6, [5, 3])(torch.randn(200, 6)) >= 0).all()
    assert MLP(6, []).out_dim == 6
    with pytest.raises(ValueError, match="activation"):
        MLP(3, [2], activation="swishy")


def test_cross_network_is_dcn_v1():
    torch.manual_seed(0)
    net = CrossNetwork(4, num_layers=1)
    with torch.no_grad():
        net.biases[0].fill_(0.5)
    x = torch.randn(3, 4)
    expected = x * (x @ net.weights[0]).unsqueeze(1) + 0.5 + x
    assert torch.allclose(net(x), expected)
    assert net.out_dim == 4


def test_target_attention_masks_slots():
    torch.manual_seed(0)
    att = TargetAttention(4)
    q, keys = torch.randn(2, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, False, False, False], [False] * 5])
    out = att(q, keys, mask)
    assert out.shape == (2, 4)
    assert torch.all(out[1] == 0)  # nothing to attend to
    changed = keys.clone()
    changed[0, 2:] = 100.0  # masked slots must not matter
    assert torch.allclose(att(q, changed, mask), out)


def test_target_attention_real_slots_equal_every_slot_masked():
    """Training scores only the real slots; a traced graph scores every slot and masks the
    weights. Both give the same pooled vectors and the same gradients."""
    torch.manual_seed(0)
    att = TargetAttention(8)
    q, keys = torch.randn(6, 8, requires_grad=True), torch.randn(6, 7, 8, requires_grad=True)
    mask = torch.rand(6, 7) < 0.4
    mask[2] = False  # an empty sequence
    dense_weights = att.weigh(q.unsqueeze(1).expand_as(keys), keys) * mask.float()
    dense = torch.bmm(dense_weights.unsqueeze(1), keys).squeeze(1)
    packed = att(q, keys, mask)
    assert torch.allclose(packed, dense, atol=1e-6)
    assert torch.all(packed[2] == 0)
    grads = torch.autograd.grad(packed.sum(), [q, keys, *att.parameters()])
    expected = torch.autograd.grad(dense.sum(), [q, keys, *att.parameters()])
    for got, want in zip(grads, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    traced = torch.jit.trace(att, (q.detach(), keys.detach(), mask))
    other = torch.rand(6, 7) < 0.7  # a different number of real slots than at tracing
    assert torch.allclose(traced(q, keys, other), att(q, keys, other), atol=1e-6)


def test_mmoe_mixes_each_row_by_its_gate():
    torch.manual_seed(0)
    mmoe = MMoE(6, num_experts=3, expert_hidden=[8, 4], num_gates=2)
    x = torch.randn(10, 6)
    gate = torch.tensor([0, 1] * 5)
    mixed = mmoe(x, gate)
    assert mixed.shape == (10, 4)
    all0, all1 = mmoe(x, torch.zeros_like(gate)), mmoe(x, torch.ones_like(gate))
    assert torch.allclose(mixed[gate == 0], all0[gate == 0])
    assert torch.allclose(mixed[gate == 1], all1[gate == 1])
    assert not torch.allclose(all0, all1)
    only1 = mmoe.select_gates([1])
    assert len(only1.gates) == 1 and only1.experts is mmoe.experts
    assert torch.allclose(only1(x, torch.zeros_like(gate)), all1)


def test_glu_gate_formula():
    torch.manual_seed(0)
    gate = GLUGate(3, 5)
    x = torch.randn(4, 3)
    assert torch.allclose(gate(x), gate.value(x) * torch.sigmoid(gate.gate(x)))


def test_entity_inputs_parts(schema, batch):
    torch.manual_seed(0)
    inputs = EntityInputs(schema, dim=8)
    parts = inputs(batch)
    assert parts["user"].shape == (32, 8 * len(schema.user_features))
    assert parts["seq"].shape == (32, 8 * len(schema.sequences))
    assert parts["shared"].shape == (32, 8 * len(schema.shared_features))
    assert inputs.common_dim == 8 * 6
    for entity in schema.entities:
        spec = parts["specific"][entity]
        assert spec.shape == (32, 8 * len(schema.specific_features(entity)))
        other = batch["entity_index"] != schema.entity_index(entity)
        assert torch.all(spec[other] == 0)  # other entity's rows: padding
        assert torch.any(spec[~other] != 0)
    # One attention for every entity's sequence, querying with the shared item feature.
    assert sum(isinstance(m, TargetAttention) for m in inputs.modules()) == 1
    target_only = EntityInputs(
        schema,
        embeddings=inputs.embeddings,
        attention=inputs.attention,
        entities=[schema.target_entity],
    )
    assert torch.equal(target_only(batch)["seq"], parts["seq"])
    assert set(target_only(batch)["specific"]) == {schema.target_entity}


@pytest.mark.parametrize("item", ["brand", "user_id"])
def test_attention_item_feature_must_be_entity_shared(schema, item):
    """The attention's query is the row's item embedding on rows of every entity, so the
    schema rejects an item feature that is entity-specific or a user feature, naming the key."""
    raw = schema.to_dict()
    raw["item_feature"] = item
    for f in raw["features"]:
        if f["group"] == "sequence":
            f["item_feature"] = item
    group = schema.feature(item).group
    with pytest.raises(SchemaError, match=rf"\.item_feature: '{item}' is a {group} feature"):
        FeatureSchema.from_dict(raw)
    raw["item_feature"] = "catalog"  # another shared feature is fine
    for f in raw["features"]:
        if f["group"] == "sequence":
            f["item_feature"] = "catalog"
    assert FeatureSchema.from_dict(raw).item_feature == "catalog"


def _gradients(model, batches) -> dict[str, torch.Tensor]:
    """Mean over `batches` of each parameter's gradient of (loss + embedding L2), dense."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        loss = model.loss(batch, model(batch))["loss"] + model.embedding_l2(batch)
        (loss / len(batches)).backward()
    return {
        name: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }


def test_sparse_embedding_gradients_equal_dense_ones(schema):
    """Sparse gradients (lookups and the L2) are the dense ones, and a row-wise optimiser
    moves only the rows a batch touched."""
    from mkt.models import build_model

    batches = [toy_batch(schema, 64, seed=s) for s in (1, 2)]
    torch.manual_seed(0)
    model = build_model("mem", schema, {})
    model.count_embedding_rows(batches)
    dense = _gradients(model, batches)
    model.use_sparse_gradients()
    tables = model.embedding_tables()
    assert tables
    sparse = _gradients(model, batches)
    assert all(t.grad.is_sparse for t in tables if t.grad is not None)
    assert dense.keys() == sparse.keys()
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-6, atol=1e-7)
    # SparseAdam on the tables: an untouched row stays as it was.
    table = model.inputs.embeddings.tables["brand"].weight
    touched = set(torch.cat([b["brand"] for b in batches]).tolist())
    untouched = [r for r in range(1, table.shape[0]) if r not in touched]
    assert untouched
    before = table.detach().clone()
    torch.optim.SparseAdam(tables, lr=0.1).step()
    after = table.detach()
    assert torch.equal(after[untouched], before[untouched])
    assert not torch.equal(after[sorted(touched - {0})], before[sorted(touched - {0})])


def _per_feature_parts(inputs: EntityInputs, batch) -> dict:
    """The four parts from one lookup per feature and per sequence (what a traced graph runs)."""
    return {
        "user": inputs.user(batch),
        "seq": inputs.seq(batch),
        "shared": inputs.shared(batch),
        "specific": {e: inputs.specific(batch, e) for e in inputs.entities},
    }


def _flat(parts: dict) -> torch.Tensor:
    specific = [parts["specific"][e] for e in sorted(parts["specific"])]
    return torch.cat([parts["user"], parts["seq"], parts["shared"], *specific], dim=1)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("pooler", ["attention", "mean"])
def test_fused_lookup_equals_per_feature_lookups(schema, pooler, sparse):
    """`EntityInputs.forward` looks each table up once (`EmbeddingBank.gather`): the same parts
    and the same gradients as one lookup per feature and per sequence, and a sparse table's
    gradient has one entry per distinct row read instead of one per cell."""
    from mkt.layers.pooling import MeanPooling

    batch = toy_batch(schema, 48, seed=5)
    torch.manual_seed(0)
    attention = TargetAttention(8) if pooler == "attention" else MeanPooling()
    inputs = EntityInputs(schema, dim=8, attention=attention)
    inputs.embeddings.use_sparse_gradients(sparse)
    projection = torch.randn(_flat(inputs(batch)).shape[1])

    def gradients(parts_of) -> tuple[torch.Tensor, dict]:
        inputs.zero_grad(set_to_none=True)
        out = _flat(parts_of(batch))
        (out @ projection).pow(2).sum().backward()
        return out.detach(), {n: p.grad for n, p in inputs.named_parameters() if p.grad is not None}

    fused_out, fused = gradients(inputs)
    plain_out, plain = gradients(lambda b: _per_feature_parts(inputs, b))
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-6, atol=1e-7)
    assert fused.keys() == plain.keys()
    for name in fused:
        assert fused[name].is_sparse == plain[name].is_sparse == (sparse and ".tables." in name)
        torch.testing.assert_close(
            fused[name].to_dense(), plain[name].to_dense(), rtol=1e-5, atol=1e-7
        )
    if sparse:
        item = f"embeddings.tables.{schema.item_feature}.weight"
        read = torch.cat([c for _, c in inputs.embeddings.cells(batch)[schema.item_feature]])
        entries = fused[item]._indices()[0]
        assert len(entries) == len(entries.unique()) == len(read.unique()) - (0 in read)
        assert plain[item]._indices().shape[1] > len(entries)  # one per cell, padding too


def test_l2_penalty_reuses_the_forward_lookup_once(schema):
    """After a training forward, `l2_penalty` of the same batch reads the forward's vectors
    (same value and gradient as its own lookup) and releases them: a second call, a call
    after a backward, another batch or a no-grad forward look the rows up again."""
    batches = [toy_batch(schema, 48, seed=s) for s in (6, 7)]
    torch.manual_seed(0)
    inputs = EntityInputs(schema, dim=8)
    bank = inputs.embeddings
    bank.reset_touch_counts()
    for b in batches:
        bank.count_rows(b)

    def penalty_and_grads(forward_first: bool) -> tuple[torch.Tensor, dict]:
        inputs.zero_grad(set_to_none=True)
        out = _flat(inputs(batches[0])).sum() if forward_first else torch.zeros(())
        penalty = bank.l2_penalty(batches[0])
        (out + penalty).backward()
        return penalty.detach(), {n: p.grad.clone() for n, p in bank.named_parameters()}

    reused, reused_grads = penalty_and_grads(forward_first=True)
    assert bank.last_gathered is None  # read once, then released
    inputs.zero_grad(set_to_none=True)
    _flat(inputs(batches[0])).sum().backward()
    forward_only = {n: p.grad.clone() for n, p in bank.named_parameters()}
    assert bank.last_gathered is None  # the backward freed the lookup's graph
    own = bank.l2_penalty(batches[0])  # its own lookup
    torch.testing.assert_close(reused, own.detach())
    inputs.zero_grad(set_to_none=True)
    own.backward()
    for name, grad in reused_grads.items():
        torch.testing.assert_close(
            grad, forward_only[name] + dict(bank.named_parameters())[name].grad
        )
    inputs(batches[1])
    assert bank.last_gathered is not None and bank.last_gathered[0] is batches[1]
    torch.testing.assert_close(bank.l2_penalty(batches[0]), own.detach())  # not batch 1's rows
    with torch.no_grad():
        inputs(batches[0])
    assert bank.last_gathered is None
