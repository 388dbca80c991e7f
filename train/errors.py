"""Errors a training run ends with that no restart could cure (train/loop.py hands them to the
driver without spending FailureConfig retries). Apart from train/loop.py so that train/run.py
can name them before Ray is imported."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """A NaN or infinite training loss; the message names stage, epoch, step and ranks."""
