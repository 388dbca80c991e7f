"""Which categories each item has, learnt from the samples' train rows (docs/model.md,
"Item attributes").

An item's attributes are its entity's categorical specific features (Tenrec: a video's
`video_category`, an article's `category_first` and `category_second`). The samples carry them
on every row the item is shown in, but a behaviour sequence carries only item indices: these
maps let a model read a liked item's categories too (`EmbeddingBank.use_item_attributes`).

An item gets an attribute's index when all its train rows agree on one value; an item whose
rows disagree (the out-of-vocabulary row, shared by every rare item), or that no train row
shows, gets 0, the padding row: no attribute.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from mkt.contract import FIRST_INDEX, PAD
from mkt.schema import FeatureSchema


def attribute_features(schema: FeatureSchema) -> list[str]:
    """The schema's categorical entity-specific features: the candidates for item attributes."""
    return [f.name for f in schema.features if f.group == "specific" and f.kind == "categorical"]


def item_attribute_maps(
    batches: Iterable[Mapping[str, np.ndarray]], schema: FeatureSchema
) -> dict[str, torch.Tensor]:
    """Per attribute feature, item index -> its index (`[item vocab]`, long), from batches of
    train rows holding the item feature and every attribute feature's column. Memory: the
    distinct (item, value) pairs, not the rows."""
    item_feature = schema.item_feature
    items = schema.feature(item_feature).vocab_size
    names = attribute_features(schema)
    sizes = {n: schema.feature(n).vocab_size for n in names}
    pairs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in batches:
        item = np.asarray(batch[item_feature], dtype=np.int64)
        real = item >= FIRST_INDEX
        for name in names:
            value = np.asarray(batch[name], dtype=np.int64)
            # PAD: the row is another entity's, which has no such feature.
            shown = real & (value != PAD)
            pairs[name].append(np.unique(item[shown] * sizes[name] + value[shown]))
    maps = {}
    for name in names:
        codes = np.unique(np.concatenate(pairs[name])) if pairs[name] else np.empty(0, np.int64)
        item, value = np.divmod(codes, sizes[name])
        values_per_item = np.bincount(item, minlength=items)
        single = values_per_item[item] == 1
        out = np.zeros(items, dtype=np.int64)
        out[item[single]] = value[single]
        maps[name] = torch.from_numpy(out)
    return maps
