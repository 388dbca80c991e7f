"""Spark's `xxhash64` of long columns, in numpy, for the Arrow passes.

The shuffle assigns users to groups by `xxhash64(user_key)` and the samples files order their
rows by a hash of (seed, user_key, line_no); the passes compute the same numbers on their
columns instead of receiving them from Spark as extra columns. Spark's XXH64 (catalyst's
XXH64.java) chains the children: each value is hashed with the previous hash as its seed,
42 first; an int literal with `hashInt`, a long with `hashLong`; a null leaves the hash as it
is. tests/test_etl_build.py holds these against Spark's own.
"""

from __future__ import annotations

import numpy as np

SEED = np.uint64(42)
_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)


def _rotate_left(x: np.ndarray, bits: int) -> np.ndarray:
    return (x << np.uint64(bits)) | (x >> np.uint64(64 - bits))


def _finish(h: np.ndarray) -> np.ndarray:
    h = (h ^ (h >> np.uint64(33))) * _P2
    h = (h ^ (h >> np.uint64(29))) * _P3
    return h ^ (h >> np.uint64(32))


def hash_int(value: int, seed: np.ndarray) -> np.ndarray:
    """XXH64.hashInt(value, seed) for every seed: an int literal's step."""
    with np.errstate(over="ignore"):
        h = seed + _P5 + np.uint64(4)
        h = h ^ (np.uint64(value & 0xFFFFFFFF) * _P1)
        return _finish(_rotate_left(h, 23) * _P2 + _P3)


def hash_long(values: np.ndarray, seed: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """XXH64.hashLong(value, seed) per row; where `valid` is False (a null) the seed stays."""
    with np.errstate(over="ignore"):
        h = seed + _P5 + np.uint64(8)
        k = _rotate_left(np.asarray(values, np.int64).view(np.uint64) * _P2, 31) * _P1
        h = _finish(_rotate_left(h ^ k, 27) * _P1 + _P4)
    return h if valid is None else np.where(valid, h, seed)


def signed(h: np.ndarray) -> np.ndarray:
    """The hash as Spark's (signed) long."""
    return h.view(np.int64)
