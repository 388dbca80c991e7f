"""Imports every model file so that each registers itself (one line per model)."""
