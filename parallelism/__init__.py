"""Parallelism: the device mesh and every apply_* transformation of a plain model."""
