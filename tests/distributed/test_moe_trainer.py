"""``python -m train model=gpt_moe`` through the real Trainer (``load_config`` -> ``plan_run`` ->
``Trainer.fit``) on composed layouts equals the single-process run: EP x expert TP x FSDP
(tp=2, ep=2, dp_shard=2) and pipeline x TP (pp=2, tp=2), per-step losses (rel 1e-5, the global
balancing loss included) and every final weight (element-wise rel 1e-4 with an absolute floor of
0.2% of one AdamW step, rel 1e-4 per tensor: ``tests.trainer_utils.assert_weights_close``). Plain top-2 routing keeps the routing
deterministic across layouts (SparseMixer-v2's sampled layouts are in test_moe_parallel.py);
each layout's reference uses the same global micro-batches, so the per-micro-batch balancing
loss is the same sets of tokens."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.trainer_utils import assert_weights_close, run_trainer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LR = 3e-3  # the default optim.lr, explicit for the weights' absolute floor
MOE = [
    "model=gpt_moe",
    *("model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"),
    *("model.n_experts=4", "model.router=softmax", "model.aux_loss_coef=0.1"),
    *("train.steps=4", "train.seed=0", "optim.impl=foreach", "optim.eps=1e-5", f"optim.lr={LR}"),
]
# (layout overrides, micro_batch_size); the single-process reference uses micro_batch x dp
LAYOUTS = [
    (["parallel.tp=2", "parallel.dp_shard=2", "parallel.ep=2"], 4, 2),
    (["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=1"], 4, 1),
]


def _rank_fn(rank: int, world: int, data: str, tmp: str) -> list:
    out = []
    for i, (layout, mb, _) in enumerate(LAYOUTS):
        over = [*MOE, *layout, f"train.micro_batch_size={mb}", f"data.path={data}"]
        r = run_trainer([*over, f"run.dir={tmp}/l{i}"])
        r["weights"] = {k: v.numpy() for k, v in r["weights"].items()}
        out.append(r)
    return out


def test_gpt_moe_trainer_composed_layouts_equal_single_process(tiny_data, tmp_path) -> None:
    results = run_on_ranks(_rank_fn, 4, tiny_data, str(tmp_path), timeout_s=120)
    for i, (layout, mb, dp) in enumerate(LAYOUTS):
        over = [*MOE, f"train.micro_batch_size={mb * dp}", f"data.path={tiny_data}"]
        ref = run_trainer([*over, f"run.dir={tmp_path}/ref{i}"])
        got = results[0][i]
        assert len(got["losses"]) == 4 and ref["losses"][-1] < ref["losses"][0]
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0
        )
        merged: dict = {}
        for r in results:  # pipeline stages each hold their own blocks
            merged.update(r[i]["weights"])
        assert merged.keys() == ref["weights"].keys(), (layout, set(merged) ^ set(ref["weights"]))
        for name, want in ref["weights"].items():
            got_w = torch.from_numpy(merged[name])
            if got_w.shape[0] > want.shape[0]:  # tp vocabulary padding stays zero
                assert torch.count_nonzero(got_w[want.shape[0] :]) == 0, (layout, name)
                got_w = got_w[: want.shape[0]]
            assert_weights_close(got_w, want, f"{layout} {name}", LR)
