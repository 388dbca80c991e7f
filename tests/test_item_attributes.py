"""Item attributes: an item's vector is its id row plus its categories' rows (docs/model.md,
"Item attributes"), with the maps read off the samples' train rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deltalake import DeltaTable

from mkt.contract import FIRST_INDEX, PAD
from mkt.item_attributes import attribute_features, item_attribute_maps
from mkt.layers import EmbeddingBank
from mkt.models import build_model
from mkt.schema import FeatureSchema, samples_table
from mkt.synthetic import toy_batch, toy_schema
from train.checkpoints import (
    ModelLink,
    TrainState,
    build_chain,
    load_weights,
    save_checkpoint,
)
from train.data import train_item_attributes


@pytest.fixture(scope="module")
def schema():
    return toy_schema()


@pytest.fixture(scope="module")
def batch(schema):
    return toy_batch(schema, 64, seed=3)


def random_maps(schema, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = schema.feature(schema.item_feature).vocab_size
    maps = {}
    for name in attribute_features(schema):
        values = torch.randint(FIRST_INDEX, schema.feature(name).vocab_size, (items,), generator=g)
        values[:FIRST_INDEX] = PAD
        maps[name] = values
    return maps


def test_the_attributes_are_the_categorical_specific_features(schema):
    # price and quality are bucketized, catalog is shared: none of them is a category of the item.
    assert attribute_features(schema) == ["brand", "content_style", "noise"]


def test_an_item_gets_the_value_all_its_rows_agree_on(schema):
    items = schema.feature("item_id").vocab_size
    pad = PAD
    # Item 5: brand 7 on rows of two batches. Item 6: brands 8 and 9 (no single value).
    # Item 2 (the OOV row, shared by rare items): never mapped. Item 7: a target item, so its
    # brand is PAD (not applicable) and its content style 5. Item 8: no train row.
    batches = [
        {"item_id": np.array([5, 6, 2, 7]), "brand": np.array([7, 8, 4, pad]),
         "content_style": np.array([pad, pad, pad, 5]), "noise": np.array([pad, pad, pad, 6])},
        {"item_id": np.array([5, 6, 7]), "brand": np.array([7, 9, pad]),
         "content_style": np.array([pad, pad, 5]), "noise": np.array([pad, pad, 4])},
    ]  # fmt: skip
    maps = item_attribute_maps(batches, schema)
    assert set(maps) == {"brand", "content_style", "noise"}
    assert all(m.shape == (items,) and m.dtype == torch.long for m in maps.values())
    assert maps["brand"][5] == 7 and maps["brand"][6] == 0 and maps["brand"][2] == 0
    assert maps["brand"][7] == 0 and maps["content_style"][7] == 5
    assert maps["noise"][7] == 0  # noise 6 and 4: two values
    assert int(maps["brand"].count_nonzero()) == 1
    assert int(maps["content_style"].count_nonzero()) == 1
    assert int(maps["noise"].count_nonzero()) == 0


def test_an_items_vector_adds_its_attributes_rows(schema, batch):
    torch.manual_seed(0)
    bank = EmbeddingBank(schema, 8)
    items = batch["item_id"]
    plain = bank.lookup("item_id", items)
    maps = random_maps(schema)
    assert bank.use_item_attributes(maps) == ["brand", "content_style", "noise"]
    expected = plain + sum(bank.tables[n](maps[n][items]) for n in maps)
    assert torch.allclose(bank.lookup("item_id", items), expected)
    # The fused lookup of a training step gives the same vectors, candidates and sequences.
    gathered = bank.gather(batch)
    assert torch.allclose(gathered.columns["item_id"], expected)
    for seq in schema.sequences:
        keys, rows = gathered.sequences[seq.name]
        vectors, mask = bank.sequence(batch, seq.name)
        assert torch.allclose(keys, vectors[mask])
        assert len(rows) == int(mask.sum())
    # Features other than the item read their own rows only.
    assert torch.equal(bank.lookup("brand", batch["brand"]), bank.tables["brand"](batch["brand"]))
    # The attributes' tables learn from the items' vectors.
    bank.lookup("item_id", items).sum().backward()
    assert bank.tables["content_style"].weight.grad.abs().sum() > 0


def test_a_bank_takes_only_the_attributes_it_holds_tables_for(schema):
    maps = random_maps(schema)
    target_only = EmbeddingBank(schema, 8, names=["user_id", "item_id", "content_style"])
    assert target_only.use_item_attributes(maps) == ["content_style"]
    without_items = EmbeddingBank(schema, 8, names=["user_id", "brand"])
    assert without_items.use_item_attributes(maps) == []
    assert without_items.item_attributes == []


def test_a_bad_map_is_refused_with_its_name(schema):
    bank = EmbeddingBank(schema, 8)
    maps = random_maps(schema)
    with pytest.raises(ValueError, match=r"'brand'.*shape"):
        bank.use_item_attributes({"brand": maps["brand"][:-1]})
    too_large = maps["noise"].clone()
    too_large[FIRST_INDEX] = schema.feature("noise").vocab_size
    with pytest.raises(ValueError, match=r"'noise'.*outside"):
        bank.use_item_attributes({"noise": too_large})


def test_frozen_models_and_first_order_terms_keep_plain_item_rows(schema, batch):
    torch.manual_seed(0)
    mem = build_model("mem", schema, {"wide": True})
    maps = random_maps(schema)
    assert mem.use_item_attributes(maps) == ["brand", "content_style", "noise"]
    # The first-order term stays one weight per item, as a logistic regression's.
    wide_banks = [m.weights for m in mem.modules() if type(m).__name__ == "FirstOrder"]
    assert wide_banks and all(b.item_attributes == [] for b in wide_banks)
    assert build_model("lr", schema).use_item_attributes(maps) == []
    # A TEM on the frozen MEM: the MEM's item vectors (with attributes) are its own, unchanged;
    # the TEM's own bank, if any, takes the maps; the MEM's logit is the same before and after.
    mem.eval()
    before = mem(batch)["logit"]
    tem = build_model("tem", schema, {"embeddings": "own"}, pretrained=mem)
    tem.use_item_attributes(random_maps(schema, seed=1))
    assert torch.equal(mem(batch)["logit"], before)
    assert tem.inputs.embeddings.item_attributes == ["content_style", "noise"]


def test_a_checkpoint_carries_the_maps(schema, batch, tmp_path):
    torch.manual_seed(0)
    mem = build_model("mem", schema)
    mem.use_item_attributes(random_maps(schema))
    mem.eval()
    optimizer = torch.optim.Adam(mem.parameters())
    save_checkpoint(tmp_path, mem, optimizer, TrainState())
    fresh = build_model("mem", schema).eval()
    load_weights(fresh, tmp_path)
    assert fresh.inputs.embeddings.item_attributes == mem.inputs.embeddings.item_attributes
    assert torch.equal(fresh(batch)["logit"], mem(batch)["logit"])
    # Built on it, a TEM reads the MEM's items through its target path with their attributes
    # (the source's brand too: a liked product in the target rows' source sequence has one).
    chain = build_chain(schema, [ModelLink("mem", {}, str(tmp_path)), ModelLink("tem", {})])
    knowledge_bank = chain.eval().knowledge.inputs.embeddings
    assert set(knowledge_bank.item_attributes) == {"brand", "content_style", "noise"}
    items = batch["item_id"]
    assert torch.allclose(
        knowledge_bank.lookup("item_id", items), mem.inputs.embeddings.lookup("item_id", items)
    )


def test_maps_from_the_etls_delta_table(generated_samples):
    schema = FeatureSchema.load(generated_samples)
    maps = train_item_attributes(generated_samples, schema)
    assert set(maps) == {"video_category", "category_first", "category_second"}
    rows = DeltaTable(str(samples_table(generated_samples))).to_pandas(
        columns=["split", "item_id", *maps]
    )
    train = rows[rows["split"] == "train"]
    for name, values in maps.items():
        shown = train[(train[name] != PAD) & (train["item_id"] >= FIRST_INDEX)]
        distinct = shown.groupby("item_id")[name].agg(["nunique", "first"])
        single = distinct[distinct["nunique"] == 1]
        # The generator gives every item one category: every shown item is mapped.
        assert len(single) == len(distinct) > 0
        assert (values[single.index.to_numpy()].numpy() == single["first"].to_numpy()).all()
        unmapped = np.setdiff1d(np.arange(len(values)), single.index.to_numpy())
        assert (values[unmapped].numpy() == 0).all()
