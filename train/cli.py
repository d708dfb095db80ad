"""Command line: compose the Hydra config, print it, or fail with one line.

We compose with Hydra's ``compose`` API instead of ``@hydra.main`` so that (a) the run
directory is ours (``run.dir``, identical on every torchrun rank, no ``${now:}`` folders and no
change of working directory), and (b) a bad override is reported as one line naming the field
and the fix, before any process group exists. ``--cfg job`` prints the resolved config like
Hydra's flag of the same name.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.errors import ConfigError
from train.config import JobConfig, register_configs

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

USAGE = """usage: python -m train [--cfg job] [KEY=VALUE ...] [group=option ...]

Examples:
  python -m train                                    # default experiment, one process
  python -m train train.steps=50 optim.lr=1e-3
  python -m train experiment=tp2_pp2_dp2 --cfg job   # print the resolved config
  torchrun --nproc_per_node=4 -m train parallel.dp_shard=4
Groups: model parallel optim data checkpoint offload logging experiment debug (see configs/).
"""


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    for line in text[1:]:
        if line.strip().startswith("full_key:"):
            first += f" ({line.strip()})"
    return first


def compose(overrides: list[str]) -> DictConfig:
    """Compose ``configs/config.yaml`` with command-line overrides into a resolved DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from train.families import model_schemas

    register_configs(model_schemas())
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        msg = _one_line(exc)
        m = re.search(r"Key '([^']+)' is not in struct", msg) or re.search(
            r"Could not override '([^']+)'", msg
        )
        hint = "; check the spelling against `python -m train --cfg job`"
        if m:
            hint = unknown_key_hint(m.group(1), overrides)
        raise ConfigError(f"config error: {msg}{hint}") from None
    return cfg


RENAMED: dict[str, str] = {}
"""Public override keys that were renamed: old key -> new key (each fails naming the new one)."""


def _full_key(key: str, overrides: list[str]) -> str:
    """``dim`` (Hydra reports the leaf) -> ``model.dim`` as the user typed it."""
    for o in overrides:
        name = o.split("=", 1)[0].lstrip("+~")
        if name == key or name.endswith("." + key):
            return name
    return key


def unknown_key_hint(key: str, overrides: list[str]) -> str:
    """Why ``key`` is not a config key: renamed (its new name), a field of another model
    family (which one), or unknown."""
    from train.families import owner_of

    full = _full_key(key, overrides)
    if full in RENAMED:
        return f"; `{full}` was renamed to `{RENAMED[full]}`: use {RENAMED[full]}=..."
    group, _, field = full.partition(".")
    owner = owner_of(field) if group == "model" else None
    if owner is not None:
        return (
            f"; `{full}` is a field of the {owner} model family: select it with model=... "
            f"(e.g. {_example_group(owner)}) before setting it"
        )
    return f"; `{full}` is not a config key: see `python -m train --cfg job` for the valid keys"


def _example_group(family: str) -> str:
    files = sorted((CONFIG_DIR / "model").glob("*.yaml"))
    names = [p.stem for p in files if f"- {family}_schema" in p.read_text()]
    return f"model={names[0]}" if names else f"model={family}"


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Turn a composed DictConfig into the typed ``JobConfig``."""
    try:
        job = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config error: {_one_line(exc)}") from None
    assert isinstance(job, JobConfig)
    return job


def load_config(overrides: list[str]) -> tuple[JobConfig, DictConfig]:
    """Compose and type-check a config; raises ConfigError with a one-line message."""
    cfg = compose(overrides)
    job = to_job_config(cfg)
    # The model.* fields set on the command line (not by a config group or an experiment):
    # model.from_hf refuses those that contradict config.json and sets all the others.
    job.model.cli_fields = frozenset(
        o.lstrip("+").split("=", 1)[0].removeprefix("model.")
        for o in overrides
        if o.lstrip("+").startswith("model.") and "=" in o
    )
    return job, cfg


def parse_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split ``--cfg job|all`` and ``--help`` from the Hydra overrides."""
    show: str | None = None
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        if arg in ("--cfg", "-c"):
            show = next(it, "job")
        elif arg.startswith("--cfg="):
            show = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return show, rest
