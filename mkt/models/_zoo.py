"""Imports every model file so that each registers itself (one line per model)."""
from mkt.models import mem, tem  # noqa: F401
from mkt.models import conet, ctnet, din, fibinet, finetune, minet, mlp, mmoe, ple, star  # noqa: F401
