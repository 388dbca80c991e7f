"""Imports every model file so that each registers itself (one name per model file)."""

from mkt.models import (  # noqa: F401
    conet,
    ctnet,
    din,
    din_source,
    fibinet,
    finetune,
    lr,
    mem,
    minet,
    mlp,
    mmoe,
    ple,
    star,
    tem,
)
