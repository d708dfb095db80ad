"""DMT quality (issue 8, Must-show 4): held-out AUC of DMT vs the flat DLRM, same steps, same data.

    python -m benchmarks.dmt_quality            # writes benchmarks/results/dmt_quality.{json,md}

Trains ``experiment=dlrm_synthetic`` and ``experiment=dmt_synthetic`` through the real entry
point (in this process, one micro-batch per step: the update is the same as with gradient
accumulation, only faster) and records each run's final held-out AUC and normalized entropy,
the planted best achievable AUC of the synthetic data, and whether the criterion holds:
|AUC_dmt - AUC_dlrm| <= 0.002 and both within 0.02 of the planted best.
``tests/e2e/test_recsys_train.py`` runs the same ``train_pair`` and asserts the criterion; this
module only adds the result files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import write_results

MODELS = ("dlrm", "dmt")
AUC_GAP, BEST_GAP = 0.002, 0.02


def train_pair(root: Path, extra: list[str] | None = None) -> dict[str, Any]:
    """Train both models under ``root/<model>``; their final metrics.jsonl records and a
    summary with the criterion (``holds``)."""
    import torch

    from train.__main__ import main

    torch.set_num_threads(1)
    final = {}
    for m in MODELS:
        run = root / m
        args = [
            f"experiment={m}_synthetic",
            "train.micro_batch_size=256",
            f"run.dir={run}",
            "logging.progress=false",
            "logging.plot=false",
            *(extra or []),
        ]
        if main(args) != 0:
            raise RuntimeError(f"python -m train {' '.join(args)} failed")
        lines = (run / "metrics.jsonl").read_text().splitlines()
        final[m] = json.loads(lines[-1])
    best = final["dmt"]["best_auc"]
    diff = final["dmt"]["val_auc"] - final["dlrm"]["val_auc"]
    gaps = {m: best - final[m]["val_auc"] for m in MODELS}
    return {
        "final": final,
        "steps": final["dmt"]["step"],
        "best_auc": best,
        "auc_dmt_minus_dlrm": diff,
        "gap_to_best": gaps,
        "criterion": f"|AUC_dmt - AUC_dlrm| <= {AUC_GAP} and both within {BEST_GAP} of best",
        "holds": abs(diff) <= AUC_GAP and all(g <= BEST_GAP for g in gaps.values()),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        res = train_pair(Path(tmp))
    table = [
        {
            "model": m,
            "steps": res["final"][m]["step"],
            "val_auc": res["final"][m]["val_auc"],
            "val_ne": res["final"][m]["val_ne"],
            "planted best AUC": res["best_auc"],
            "best - val_auc": res["gap_to_best"][m],
        }
        for m in MODELS
    ]
    notes = (
        f"experiment=dlrm_synthetic vs experiment=dmt_synthetic, {res['steps']} steps each, "
        "batch 256, held-out split of the synthetic clicks (planted groups). "
        f"AUC_dmt - AUC_dlrm = {res['auc_dmt_minus_dlrm']:+.4f}; criterion "
        f"({res['criterion']}): {'holds' if res['holds'] else 'does NOT hold'}."
    )
    write_results("dmt_quality", res, table, notes)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
