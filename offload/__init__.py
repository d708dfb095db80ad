"""Optimizer-state offload (CPU / NVMe tiers, interleaved updates)."""
