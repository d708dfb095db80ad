"""Lattice trainer: entry point, typed config, loop, data, metrics."""
