from __future__ import annotations

import math

import pytest

from train.cli import ConfigError, load_config
from train.trainer import lr_lambda


def test_lr_schedule_warmup_then_cosine_to_floor() -> None:
    f = lr_lambda(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_experiments_and_groups_compose() -> None:
    job, _ = load_config(["parallel=fsdp", "debug=tiny", "logging=wandb"])
    assert job.parallel.dp_shard == -1 and job.train.steps == 5 and job.logging.wandb


def test_unknown_key_is_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(["optim.learning_rate=1"])
    assert "learning_rate" in str(e.value) and "\n" not in str(e.value)
