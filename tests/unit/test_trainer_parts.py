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


def test_readme_layout_table_matches_the_tree() -> None:
    """Every top-level folder is in the README's layout table, and every path it names exists."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text()
    table = text[text.index("## Layout") : text.index("## Tests and benchmarks")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    folders = {re.match(r"\| `([^`]+)/`", r).group(1) for r in rows}
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    top = {f.split("/")[0] for f in tracked if "/" in f and not f.startswith(".")}
    assert top == folders, (sorted(top - folders), sorted(folders - top))
    for path in re.findall(r"`([\w./-]+/[\w./-]*)`", table):
        assert (root / path).exists(), f"README layout table names {path}, which does not exist"


def test_family_args_mirror_the_model_configs() -> None:
    """The typed model.* schemas and the model configs they build name the same fields with
    the same defaults (one place per rule: derived sizes live in the model config)."""
    import dataclasses

    from models.gpt import GPTConfig
    from models.moe import MoEConfig
    from train.families.gpt import GPTArgs
    from train.families.gpt_moe import MoEArgs

    def default(f: dataclasses.Field):  # a list field's factory: compared as a tuple
        if f.default_factory is not dataclasses.MISSING:
            return tuple(f.default_factory())
        return f.default

    for args, cfg in ((GPTArgs, GPTConfig), (MoEArgs, MoEConfig)):
        # model.vocab_size=0 means "from the data's meta.json", resolved before a config exists
        a = {f.name: default(f) for f in dataclasses.fields(args) if f.name != "name"}
        c = {f.name: default(f) for f in dataclasses.fields(cfg) if f.name != "padded_vocab_size"}
        assert a.pop("vocab_size") == 0 and c.pop("vocab_size") == 256
        assert a.pop("from_hf") == ""  # where the fields come from, not a model field
        assert a == c, (args.__name__, set(a.items()) ^ set(c.items()))


def test_a_field_of_another_family_names_that_family() -> None:
    with pytest.raises(ConfigError, match=r"`model.n_experts` is a field of the gpt_moe model"):
        load_config(["model.n_experts=4"])
    with pytest.raises(ConfigError, match=r"`model.num_towers` is a field of the dmt .*dmt_tiny"):
        load_config(["model.num_towers=4"])
    with pytest.raises(ConfigError, match=r"model.name=gpt_moe with the gpt model schema"):
        from train.trainer import plan_run

        plan_run(load_config(["model.name=gpt_moe"])[0])


def test_a_renamed_key_names_its_new_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from train import cli

    monkeypatch.setitem(cli.RENAMED, "train.total_steps", "train.steps")
    with pytest.raises(ConfigError, match=r"`train.total_steps` was renamed to `train.steps`"):
        load_config(["train.total_steps=5"])
