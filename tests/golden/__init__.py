"""Golden loss trajectories (issue 15, point 6): the first steps of four real runs, fp32 on CPU,
stored as ``tests/golden/<case>.json`` and compared by ``tests/e2e/test_golden_losses.py``.

Equality tests compare two runs of today's code, so a change to math both sides share (the
model, the init, the loss, the data order, the optimizer) passes them; a stored trajectory does
not move with the code. ``python -m tests.golden.regenerate --why "..." [case ...]`` (``make
golden``) rewrites the files; docs/testing.md says when that is legitimate.
"""
