"""``model=gpt_moe`` writes per-layer expert load histograms and routing entropies to
metrics.jsonl (issue 5, Build: Metrics), and they are what they claim: the load of layer i is the
fraction of the last micro-batch's routed token-slots (tokens x top_k) per expert, so times the
slot count it is a histogram of integer counts summing to the slots; the entropy is the mean
routing entropy in nats, within [0, ln E]."""

from __future__ import annotations

import math

from tests.trainer_utils import run_trainer
from train.metrics import read_metrics

E, K, LAYERS, MICRO, SEQ = 4, 2, 2, 2, 16


def test_gpt_moe_logs_load_histogram_and_entropy(tiny_data: str, tmp_path) -> None:
    run_trainer(
        [
            "model=gpt_moe",
            f"model.n_experts={E}",
            f"model.top_k={K}",
            f"model.n_layers={LAYERS}",
            "train.steps=3",
            f"train.micro_batch_size={MICRO}",
            f"train.seq_len={SEQ}",
            f"data.path={tiny_data}",
            f"run.dir={tmp_path}",
        ]
    )
    recs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    slots = MICRO * SEQ * K  # routed token copies in one micro-batch (single process)
    for r in recs:
        assert sorted(k for k in r if k.startswith("moe_")) == sorted(
            [f"moe_load/{i}" for i in range(LAYERS)] + [f"moe_entropy/{i}" for i in range(LAYERS)]
        ), r
        for i in range(LAYERS):
            load = r[f"moe_load/{i}"]
            assert len(load) == E and all(0.0 <= f <= 1.0 for f in load), load
            counts = [f * slots for f in load]  # logged to 4 decimals
            assert all(abs(c - round(c)) < 1e-4 * slots for c in counts), counts
            assert sum(round(c) for c in counts) == slots, counts
            assert max(round(c) for c in counts) <= MICRO * SEQ  # top-2 picks distinct experts
            ent = r[f"moe_entropy/{i}"]
            assert 0.0 <= ent <= math.log(E) + 1e-4, ent
            # a freshly initialised router (std 0.02) is close to uniform
            assert ent > 0.9 * math.log(E), ent
