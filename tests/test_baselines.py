"""The paper's baselines (section 4.1.2): every model builds from the toy schema, trains on the
rows its stage reads, routes each row to its own entity's parts, and the two-stage baselines
transfer exactly what docs/baselines.md says."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from mkt.features import Batch, select_rows
from mkt.layers.partitioned_norm import PartitionedNorm
from mkt.models import MODELS, ConfigError, CTRModel, build_model
from mkt.pipelines import pipeline
from mkt.synthetic import toy_batch, toy_schema

SCHEMA = toy_schema()
SOURCE, TARGET = SCHEMA.source_index, SCHEMA.target_index
SINGLE = ["mlp", "din", "fibinet"]
JOINT = ["mmoe", "ple", "star", "conet", "minet"]
TWO_STAGE = ["finetune", "ctnet"]


@pytest.fixture(scope="module")
def batch() -> Batch:
    return toy_batch(SCHEMA, 256, seed=0, target_share=0.5)


def rows(batch: Batch, entities: str) -> Batch:
    if entities == "both":
        return batch
    index = SOURCE if entities == "source" else TARGET
    return select_rows(batch, batch["entity_index"] == index)


def fit(model: CTRModel, batch: Batch, steps: int, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model.loss(batch, model(batch))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def pretrained(batch: Batch) -> CTRModel:
    """Stage 1 of the Finetune / CTNet pipelines, briefly trained on the source rows."""
    torch.manual_seed(1)
    base = build_model("din_source", SCHEMA)
    fit(base, rows(batch, "source"), steps=5)
    return base.eval()


def build(name: str, batch: Batch) -> CTRModel:
    torch.manual_seed(0)
    if name in TWO_STAGE:
        return build_model(name, SCHEMA, pretrained=pretrained(batch))
    return build_model(name, SCHEMA)


# -- the zoo and the pipelines ---------------------------------------------------------------


def test_registered_with_the_rows_they_train_on() -> None:
    expected = {name: "target" for name in SINGLE + TWO_STAGE}
    expected |= {name: "both" for name in JOINT}
    expected["din_source"] = "source"
    assert {name: MODELS[name].train_entities for name in expected} == expected


def test_each_model_name_has_its_own_file() -> None:
    """`mkt/models/<name>.py` registers `name` (din_source included), as docs/baselines.md
    says; configs name models, never files."""
    assert {name: cls.__module__ for name, cls in MODELS.items()} == {
        name: f"mkt.models.{name}" for name in MODELS
    }
    assert issubclass(MODELS["din_source"], MODELS["din"])


@pytest.mark.parametrize("name", TWO_STAGE)
def test_two_stage_pipelines(name: str) -> None:
    stages = pipeline(name)
    assert [(s.model, s.entities) for s in stages] == [("din_source", "source"), (name, "target")]
    assert stages[1].pretrained_from == stages[0].name
    for stage in stages:
        assert MODELS[stage.model].train_entities == stage.entities


# -- every model: builds, runs, learns --------------------------------------------------------


@pytest.mark.parametrize("name", [*SINGLE, *JOINT, "din_source", *TWO_STAGE])
def test_trains_on_its_rows(name: str, batch: Batch) -> None:
    model = build(name, batch)
    data = rows(batch, model.train_entities)
    if model.train_entities == "both":
        assert set(data["entity_index"].tolist()) == {SOURCE, TARGET}
    out = model(data)
    assert out["logit"].shape == data["label"].shape
    assert torch.isfinite(out["logit"]).all()
    model.loss(data, out)["loss"].backward()
    # Every trainable weight is reached (no dead branch; DDP needs no unused parameters).
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    model.zero_grad()
    losses = fit(model, data, steps=50)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


@pytest.mark.parametrize("name", [*SINGLE, *JOINT, "din_source", *TWO_STAGE])
def test_unknown_param_is_named(name: str) -> None:
    with pytest.raises(ConfigError, match="hiden"):
        build_model(name, SCHEMA, {"hiden": [8, 1]})


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("mlp", {"hidden": [16, 4]}, "hidden"),
        ("din", {"dropout": 1.5}, "dropout"),
        ("fibinet", {"bilinear_type": "field_pairs"}, "bilinear_type"),
        ("mmoe", {"num_experts": 0}, "num_experts"),
        ("ple", {"expert_hidden": []}, "expert_hidden"),
        ("star", {"aux_hidden": [16]}, "aux_hidden"),
        ("conet", {"hidden": [1]}, "hidden"),
        ("minet", {"tower_hidden": [16, 0]}, "tower_hidden"),
    ],
)
def test_bad_value_is_named(name: str, params: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build_model(name, SCHEMA, params)


@pytest.mark.parametrize("kind", ["field_all", "field_each", "field_interaction"])
def test_fibinet_bilinear_types(kind: str, batch: Batch) -> None:
    model = build_model("fibinet", SCHEMA, {"bilinear_type": kind})
    target = rows(batch, "target")
    assert torch.isfinite(model(target)["logit"]).all()


# -- joint models: each row by its own entity ------------------------------------------------


@pytest.mark.parametrize("name", JOINT)
def test_joint_rows_do_not_depend_on_the_batch_mix(name: str, batch: Batch) -> None:
    model = build(name, batch)
    fit(model, batch, steps=3)  # moves STAR's per-domain moving statistics off their init
    model.eval()
    with torch.no_grad():
        mixed = model(batch)["logit"]
        for index in (SOURCE, TARGET):
            mask = batch["entity_index"] == index
            alone = model(select_rows(batch, mask))["logit"]
            torch.testing.assert_close(alone, mixed[mask])


# (model, the part perturbed, whether source rows change, whether target rows change)
ROUTES: list[tuple[str, Callable[[nn.Module], nn.Module | torch.Tensor], bool, bool]] = [
    ("mmoe", lambda m: m.towers.towers[TARGET], False, True),
    ("mmoe", lambda m: m.mmoe.gates[TARGET], False, True),
    ("mmoe", lambda m: m.mmoe.experts[0], True, True),
    ("ple", lambda m: m.towers.towers[TARGET], False, True),
    ("ple", lambda m: m.levels[-1].specific[TARGET], False, True),
    # Progressive routing: the first level's target experts reach source rows via the
    # shared path.
    ("ple", lambda m: m.levels[0].specific[TARGET], True, True),
    ("star", lambda m: m.star.domain_weight[0][TARGET], False, True),
    ("star", lambda m: m.star.weight[0], True, True),
    ("conet", lambda m: m.output.towers[TARGET], False, True),
    # Cross connections: the source network's layers reach target rows.
    ("conet", lambda m: m.networks.first[SOURCE], True, True),
    ("minet", lambda m: m.towers.towers[TARGET], False, True),
    ("minet", lambda m: m.interest_attention[TARGET], False, True),
    # The transfer matrix of the source sequence acts on rows of the other entity only.
    ("minet", lambda m: m.item_attention[SOURCE].transfer, False, True),
]


@pytest.mark.parametrize(("name", "part", "source_changes", "target_changes"), ROUTES)
def test_joint_routing(
    name: str,
    part: Callable[[nn.Module], nn.Module | torch.Tensor],
    source_changes: bool,
    target_changes: bool,
    batch: Batch,
) -> None:
    assert SCHEMA.sequences[SOURCE].entity == SCHEMA.source_entity  # item_attention order
    model = build(name, batch).eval()
    with torch.no_grad():
        before = model(batch)["logit"]
        chosen = part(model)
        for p in chosen.parameters() if isinstance(chosen, nn.Module) else [chosen]:
            p.add_(torch.randn_like(p))
        after = model(batch)["logit"]
    changed = after != before  # rows a part cannot reach come out bit-identical
    for index, expect in ((SOURCE, source_changes), (TARGET, target_changes)):
        assert bool(changed[batch["entity_index"] == index].any()) == expect


def test_star_normalises_each_domain_with_its_own_statistics(batch: Batch) -> None:
    model = build("star", batch).train()
    is_source = batch["entity_index"] == SOURCE
    with torch.no_grad():
        before = model(batch)["logit"]
        moved = dict(batch)
        # Other users, items and fields on the source rows shift the source statistics only.
        for name in ("user_id", "item_id", "price", "brand"):
            moved[name] = torch.where(is_source, (batch[name] + 7) % 50 + 3, batch[name])
        after = model(moved)["logit"]
    torch.testing.assert_close(after[~is_source], before[~is_source])
    assert not torch.allclose(after[is_source], before[is_source])
    # Moving averages are kept per domain.
    mean = model.norm.running_mean
    assert not torch.allclose(mean[SOURCE], mean[TARGET])


def test_partitioned_norm_uses_per_domain_batch_statistics() -> None:
    torch.manual_seed(0)
    norm = PartitionedNorm(4, num_domains=2).train()
    domain = torch.tensor([0] * 64 + [1] * 32)
    x = torch.randn(96, 4) + torch.where(domain == 0, 5.0, -3.0).unsqueeze(1)
    out = norm(x, domain)
    for d in (0, 1):
        rows_d = out[domain == d]
        torch.testing.assert_close(rows_d.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(rows_d.var(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    assert norm.running_mean[0].mean() > 0.4 > -0.2 > norm.running_mean[1].mean()


# -- two-stage baselines: what transfers -------------------------------------------------------


def linears(model: CTRModel) -> list[nn.Linear]:
    return [m for m in model.dnn.net if isinstance(m, nn.Linear)]


def test_finetune_starts_from_the_pretrained_weights(batch: Batch) -> None:
    base = pretrained(batch)
    model = build_model("finetune", SCHEMA, pretrained=base)
    common = [f.name for f in (*SCHEMA.user_features, *SCHEMA.shared_features)]
    own, src = model.inputs.embeddings.tables, base.inputs.embeddings.tables
    for name in common:
        assert torch.equal(own[name].weight, src[name].weight)
    target_specific = {f.name for f in SCHEMA.specific_features(SCHEMA.target_entity)}
    assert set(own) == set(common) | target_specific
    assert not target_specific & set(src)
    for key, value in base.inputs.attention.state_dict().items():
        assert torch.equal(model.inputs.attention.state_dict()[key], value)
    first, first_base = linears(model)[0], linears(base)[0]
    width = model.common_dim
    assert torch.equal(first.weight[:, :width], first_base.weight[:, :width])
    assert torch.equal(first.bias, first_base.bias)
    assert first.weight.shape[1] - width == 8 * len(target_specific)  # fresh columns
    for layer, layer_base in zip(linears(model)[1:], linears(base)[1:], strict=True):
        assert torch.equal(layer.weight, layer_base.weight)
    # Copies, not shared tensors: fine-tuning leaves stage 1 as it was.
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    fit(model, rows(batch, "target"), steps=3)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(own["user_id"].weight, src["user_id"].weight)


def test_finetune_refuses_a_base_it_cannot_transfer(batch: Batch) -> None:
    with pytest.raises(ConfigError, match="hidden"):
        build_model("finetune", SCHEMA, {"hidden": [64, 1]}, pretrained=pretrained(batch))
    with pytest.raises(ConfigError, match="DIN"):
        build_model("finetune", SCHEMA, pretrained=build_model("mlp", SCHEMA))


def test_ctnet_transfers_only_user_and_shared_embeddings(batch: Batch) -> None:
    base = pretrained(batch)
    model = build_model("ctnet", SCHEMA, pretrained=base)
    common = [f.name for f in (*SCHEMA.user_features, *SCHEMA.shared_features)]
    source = model.source_embeddings.tables
    assert list(source) == common
    for name in common:
        assert torch.equal(source[name].weight, base.inputs.embeddings.tables[name].weight)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"source_embeddings.tables.{name}.weight" for name in common}
    # Nothing else comes from stage 1: the target tower starts from its own initialisation.
    base_params = dict(base.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad and name in base_params and p.shape == base_params[name].shape:
            assert not torch.equal(p, base_params[name]), name
    before = {n: t.weight.clone() for n, t in source.items()}
    fit(model, rows(batch, "target"), steps=3)
    assert all(torch.equal(source[n].weight, w) for n, w in before.items())
