"""Entry point.

python -m train                                   # one process, default experiment
python -m train train.steps=50 --cfg job          # print the resolved config
torchrun --nproc_per_node=4 -m train parallel.dp_shard=4
launch/run.sh / launch/slurm.sbatch               # multi-node
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from models.errors import LatticeUserError
from train.cli import load_config, parse_argv
from train.signals import (
    PREEMPTED_EXIT,
    Preempted,
    die_with_parent,
    preempted_earlier,
    under_launcher,
)


def _prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


def main(argv: list[str] | None = None) -> int:
    if under_launcher():
        die_with_parent()  # a killed torchrun agent takes its workers with it
    show, overrides = parse_argv(sys.argv[1:] if argv is None else argv)
    trainer = None
    try:
        job, cfg = load_config(overrides)
        if show:
            print(OmegaConf.to_yaml(cfg))
            return 0
        earlier = preempted_earlier(Path(job.run.dir))
        if earlier is not None:
            print(
                f"{_prefix()}this launch was preempted by {earlier['signal']} at step "
                f"{earlier['step']}; not restarting it: relaunch to resume",
                file=sys.stderr,
            )
            return PREEMPTED_EXIT
        from train.trainer import Trainer, plan_run

        trainer = Trainer(job, cfg, plan_run(job))
        trainer.fit()
    except LatticeUserError as exc:
        print(f"{_prefix()}error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        if os.environ.get("RANK", "0") == "0":
            print(str(exc), file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
