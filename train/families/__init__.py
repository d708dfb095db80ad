"""The model-family registry: ``model.name`` -> the ``Family`` the one trainer drives.

Adding a family: a module here with its typed args (a ``train.config.ModelArgs`` subclass) and
a ``Family`` subclass (``train/families/base.py``), one entry below, and a
``configs/model/<name>*.yaml`` whose defaults list selects ``<name>_schema``.
"""

from __future__ import annotations

from models.errors import ConfigError
from train.families.base import Family
from train.families.dlrm import DLRMFamily
from train.families.dmt import DMTFamily
from train.families.gpt import GPTFamily
from train.families.gpt_moe import GPTMoEFamily

FAMILIES: dict[str, type[Family]] = {
    f.name: f for f in (GPTFamily, GPTMoEFamily, DLRMFamily, DMTFamily)
}


def model_schemas() -> dict[str, type]:
    """Family name -> its ``model.*`` dataclass (registered in Hydra's ConfigStore)."""
    return {name: f.args for name, f in FAMILIES.items()}


def _is_schema(model_args: object, schema: type) -> bool:
    """A family's schema is its set of fields (MoEArgs extends GPTArgs: no isinstance)."""
    return type(model_args).__dataclass_fields__.keys() == schema.__dataclass_fields__.keys()


def get_family(model_args: object) -> type[Family]:
    """The family of a typed ``model`` config; its args must be that family's schema."""
    name = getattr(model_args, "name", "")
    if name not in FAMILIES:
        raise ConfigError(f"model.name={name!r} is unknown: choose one of {sorted(FAMILIES)}")
    family = FAMILIES[name]
    if not _is_schema(model_args, family.args):
        have = next((n for n, f in FAMILIES.items() if _is_schema(model_args, f.args)), "?")
        raise ConfigError(
            f"model.name={name} with the {have} model schema: choose the family with the config "
            f"group (model={name} or a configs/model/ file of that family), not by setting "
            "model.name"
        )
    return family


def owner_of(field: str) -> str | None:
    """The family whose schema has ``model.<field>`` (for a one-line error naming it)."""
    for name, f in FAMILIES.items():
        if field in f.args.__dataclass_fields__:
            return name
    return None
