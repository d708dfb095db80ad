"""Entry point.

python -m train                                   # one process, default experiment
python -m train train.steps=50 --cfg job          # print the resolved config
torchrun --nproc_per_node=4 -m train parallel.dp_shard=4
launch/run.sh / launch/slurm.sbatch               # multi-node
"""

from __future__ import annotations

import os
import sys

from omegaconf import OmegaConf

from models.errors import LatticeUserError
from train.cli import load_config, parse_argv


def main(argv: list[str] | None = None) -> int:
    show, overrides = parse_argv(sys.argv[1:] if argv is None else argv)
    trainer = None
    try:
        job, cfg = load_config(overrides)
        if show:
            print(OmegaConf.to_yaml(cfg))
            return 0
        from train.trainer import Trainer, plan_run

        trainer = Trainer(job, cfg, plan_run(job))
        trainer.fit()
    except LatticeUserError as exc:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
