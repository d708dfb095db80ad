"""Shared fixtures: one prepared tiny corpus per session, and the GPU marker's skip."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small stdlib byte corpus (prepared once) for data.path."""
    from train.data import prepare_stdlib

    path = tmp_path_factory.mktemp("data") / "stdlib"
    prepare_stdlib(path, max_bytes=400_000, val_fraction=0.05)
    return str(path)
