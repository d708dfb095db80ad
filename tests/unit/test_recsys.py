"""Click data, metrics, the tower partitioner (Must-show 3) and config errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from models.partitioner import (
    TowerPlan,
    adjusted_rand_index,
    partition_features,
    plan_from_affinity,
)
from train.recsys_data import CRITEO_SPARSE, CriteoTSV, SyntheticClicks, write_fake_criteo
from train.recsys_metrics import auc, normalized_entropy


def test_auc_matches_pair_counting_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    y = torch.randint(0, 2, (60,), generator=g).float()
    pos, neg = s[y == 1], s[y == 0]
    brute = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)).item()
    assert auc(s, y) == pytest.approx(brute / (len(pos) * len(neg)), abs=1e-12)


def test_normalized_entropy_is_one_at_base_rate() -> None:
    y = torch.tensor([1.0, 0, 0, 0])
    assert normalized_entropy(torch.full((4,), torch.logit(torch.tensor(0.25)).item()), y) == (
        pytest.approx(1.0, abs=1e-9)
    )


def test_synthetic_is_deterministic_and_layout_invariant() -> None:
    d1, d2 = SyntheticClicks(seed=3), SyntheticClicks(seed=3)
    a, b = d1.batch("train", 5, 64), d2.batch("train", 5, 64)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.sparse.values(), b.sparse.values())
    assert not torch.equal(a.labels, d1.batch("val", 5, 64).labels)
    # two ranks' slices concatenate to the global batch
    lo, hi = a.slice(0, 32), a.slice(32, 64)
    assert torch.equal(torch.cat([lo.dense, hi.dense]), a.dense)
    for k in a.sparse.keys():  # noqa: SIM118 (KJT is not a dict)
        assert torch.equal(
            torch.cat([lo.sparse[k].values(), hi.sparse[k].values()]), a.sparse[k].values()
        )
    # planted groups partition the features; best AUC is well above chance
    assert sorted(f for g in d1.groups for f in g) == list(range(16))
    assert 0.8 < d1.best_auc(4, 1024) < 1.0


def test_criteo_loader_reads_generated_file(tmp_path) -> None:
    path = tmp_path / "day_0.tsv"
    write_fake_criteo(path, 50, seed=1)
    data = CriteoTSV(path, num_embeddings=100, val_fraction=0.2)
    b = data.batch("train", 0, 8)
    assert b.dense.shape == (8, 13) and b.labels.shape == (8,)
    assert b.sparse.keys() == [f"f{i}" for i in range(CRITEO_SPARSE)]
    first = path.read_text().splitlines()[0].split("\t")
    lengths = b.sparse.lengths().view(CRITEO_SPARSE, 8)[:, 0]
    assert lengths.tolist() == [int(x != "") for x in first[14:]]
    ids = [int(x, 16) % 100 for x in first[14:] if x]
    got = [b.sparse[f"f{i}"].values()[:1].tolist() for i in range(CRITEO_SPARSE) if first[14 + i]]
    assert [x[0] for x in got] == ids
    assert float(first[0]) == b.labels[0].item()
    assert data.batch("val", 0, 10).labels.shape == (10,)  # the held-out split wraps around


def test_criteo_bad_line_names_the_format(tmp_path) -> None:
    (tmp_path / "bad.tsv").write_text("1\t2\t3\n")
    with pytest.raises(ValueError, match="expected 40"):
        CriteoTSV(tmp_path / "bad.tsv", 10)


def test_partition_balances_heterogeneous_costs() -> None:
    # two planted blocks, one feature 3x as expensive: the cost bound must hold
    aff = torch.zeros(6, 6)
    for blk in ([0, 1, 2], [3, 4, 5]):
        for i, j in itertools.permutations(blk, 2):
            aff[i, j] = 1.0
    costs = [3.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    groups = partition_features(aff, costs, 2, max_imbalance=1.1)
    tc = [sum(costs[i] for i in g) for g in groups]
    assert sorted(tc) == [4.0, 4.0]  # mean 4, bound 4.4: only an exact split fits


def test_plan_roundtrips_through_yaml(tmp_path) -> None:
    plan = TowerPlan([["f0", "f2"], ["f1", "f3"]], [32.0, 32.0])
    plan.save(tmp_path / "plan.yaml")
    back = TowerPlan.load(tmp_path / "plan.yaml")
    assert back.towers == plan.towers and back.imbalance == 1.0


def test_ari() -> None:
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) < 0


@pytest.mark.slow
def test_partitioner_recovers_planted_groups() -> None:
    """Must-show 3: from a 200-step flat-DLRM warm-up, ARI >= 0.9 and max/mean cost <= 1.1."""
    from parallelism.dims import ParallelDims
    from train.cli import load_config
    from train.families.dmt import DMTFamily, warmup_plan

    torch.set_num_threads(1)
    job, _ = load_config(["experiment=dmt_synthetic"])
    data = DMTFamily(job, ParallelDims(1), 0).click_data()
    plan = warmup_plan(job, data, job.model.partition_warmup_steps)
    tower_of = {f: t for t, fs in enumerate(plan.towers) for f in fs}
    planted = [int(data.group_of[i]) for i in range(data.num_sparse)]
    found = [tower_of[n] for n in data.names]
    assert adjusted_rand_index(planted, found) >= 0.9, (plan.towers, data.groups)
    assert plan.imbalance <= 1.1


def test_plan_from_affinity_on_block_matrix() -> None:
    names = [f"f{i}" for i in range(8)]
    groups = [[0, 5, 6, 3], [1, 2, 4, 7]]
    aff = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    for g in groups:
        for i, j in itertools.permutations(g, 2):
            aff[i, j] += 1
    aff = (aff + aff.t()) / 2
    plan = plan_from_affinity(aff, names, 2, dim=16)
    assert sorted(sorted(t) for t in plan.towers) == sorted(
        sorted(names[i] for i in g) for g in groups
    )


def test_recsys_config_errors_name_the_field() -> None:
    from models.errors import ConfigError, LayoutError
    from train.cli import load_config
    from train.trainer import plan_run

    job, _ = load_config(["experiment=dmt_synthetic", "model.tower_plan=/nope.yaml"])
    with pytest.raises(LayoutError, match=r"model.tower_plan"):
        plan_run(job)
    job, _ = load_config(["experiment=dlrm_synthetic", "data=stdlib"])
    with pytest.raises(ConfigError, match=r"data.name"):
        plan_run(job)
    job, _ = load_config(["experiment=dmt_synthetic", "model.num_towers=17"])
    with pytest.raises(LayoutError, match=r"model.num_towers"):
        plan_run(job)
    job, _ = load_config(["experiment=dlrm_synthetic", "train.compile=true"])
    with pytest.raises(
        ConfigError, match=r"train.compile=True is not supported for model.name=dlrm"
    ):
        plan_run(job)
    job, _ = load_config(["experiment=dmt_synthetic", "parallel.backend=nccl"])
    with pytest.raises(LayoutError, match=r"parallel.backend=nccl"):
        plan_run(job)


def test_criteo_file_trains_through_entry_point(tmp_path, capsys) -> None:
    """A generated Criteo TSV through ``python -m train`` (DMT, 26 features in 2 towers); the
    start-up log names the kernels, as the token trainer's does."""
    import json

    from train.__main__ import main

    write_fake_criteo(tmp_path / "day.tsv", 120, seed=2)
    run = tmp_path / "run"
    args = [
        "experiment=dmt_synthetic",
        "data.name=criteo",
        f"data.path={tmp_path / 'day.tsv'}",
        "data.val_fraction=0.25",
        "model.num_towers=2",
        "model.tower_plan=round_robin",
        "train.steps=3",
        "train.global_batch_size=16",
        "train.micro_batch_size=16",
        "train.eval_batches=2",
        f"run.dir={run}",
        "logging.progress=false",
        "logging.plot=false",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "kernels: optimizer torch AdamW (auto), norm none (no RMSNorm in this model) (" in out
    assert "| data.backend=torch" in out
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= last["val_auc"] <= 1.0 and last["val_ne"] > 0
    assert main([*args[:2], "data.path=/no/such.tsv", *args[3:]]) == 2


def test_dmt_topology_errors_before_any_process_group(monkeypatch) -> None:
    from parallelism.dims import LayoutError
    from train.cli import load_config
    from train.trainer import plan_run

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    job, _ = load_config(["experiment=dmt_synthetic"])
    with pytest.raises(LayoutError, match="LOCAL_WORLD_SIZE"):
        plan_run(job)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    job, _ = load_config(["experiment=dmt_synthetic", "model.num_towers=2"])
    with pytest.raises(LayoutError, match=r"model.num_towers=2 < 4 hosts"):
        plan_run(job)
