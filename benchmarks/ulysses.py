"""Ulysses: ours vs DeepSpeed's ``DistributedAttention``, bytes per rank, activation memory.

1. Equality and speed: on ``--sp`` gloo ranks, identical (B, S/sp, H, D) q/k/v slices go through
   our ``UlyssesAttention`` and DeepSpeed's ``deepspeed.sequence.layer.DistributedAttention``
   (same local attention: models.gpt.CoreAttention). Outputs and q/k/v gradients are compared;
   forward+backward time is measured alternately, ``--repeats`` times each; medians and the ratio.
2. Communication: one GPT layer forward+backward under Ulysses for (sp, seq_len) = (2, 2L),
   (4, 4L), (8, 8L), with every collective counted at ``torch.distributed`` (a wrapper around
   all_to_all_single / all_gather_into_tensor records each rank's payload). Next to it the same
   count for all-gather based sequence parallelism (every rank all-gathers K and V of the whole
   sequence, as context-parallel attention without ring overlap does).
3. Activation memory: bytes saved for backward (``saved_tensors_hooks``) by a GPT forward at a
   fixed global seq_len for sp = 1, 2, 4: falls close to 1/sp.

    python benchmarks/ulysses.py --sp 2 --repeats 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import median, write_results  # noqa: E402
from models.gpt import GPT, CoreAttention, GPTConfig  # noqa: E402
from parallelism.ulysses import UlyssesAttention, apply_ulysses, sequence_slice  # noqa: E402
from tests.distributed.harness import run_on_ranks  # noqa: E402


# -- collective byte counter ---------------------------------------------------------------------
@contextmanager
def count_collectives(stats: dict[str, int]):
    """Record, per call, the payload this rank hands to a collective (bytes) and the share of it
    that leaves the rank."""
    orig_a2a, orig_ag = dist.all_to_all_single, dist.all_gather_into_tensor

    def a2a(out, inp, *a, **k):
        n = dist.get_world_size(k.get("group"))
        stats["payload"] += inp.numel() * inp.element_size()
        stats["off_rank"] += inp.numel() * inp.element_size() * (n - 1) // n
        return orig_a2a(out, inp, *a, **k)

    def ag(out, inp, *a, **k):
        n = dist.get_world_size(k.get("group"))
        stats["payload"] += inp.numel() * inp.element_size() * (n - 1)  # ring: forwards n-1 chunks
        stats["off_rank"] += inp.numel() * inp.element_size() * (n - 1)
        return orig_ag(out, inp, *a, **k)

    dist.all_to_all_single, dist.all_gather_into_tensor = a2a, ag
    try:
        yield stats
    finally:
        dist.all_to_all_single, dist.all_gather_into_tensor = orig_a2a, orig_ag


# -- 1. ours vs DeepSpeed ------------------------------------------------------------------------
def _vs_deepspeed(rank: int, world: int, shape: tuple[int, ...], repeats: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.set_num_threads(1)
    B, S, H, D = shape
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]
    grad_out = torch.randn(B, S, H, D, generator=g)
    sl = sequence_slice(S, rank, world)
    group = dist.group.WORLD
    ours = UlyssesAttention(CoreAttention(), group)
    theirs = DistributedAttention(CoreAttention(), group, scatter_idx=2, gather_idx=1)

    def step(layer, ds: bool):
        q, k, v = (t[:, sl].clone().requires_grad_() for t in full)
        out = layer(q, k, v, batch_dim_idx=0) if ds else layer(q, k, v)
        out.backward(grad_out[:, sl])
        return out.detach(), [t.grad for t in (q, k, v)]

    o1, g1 = step(ours, False)
    o2, g2 = step(theirs, True)
    diff = max(
        [(o1 - o2).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(g1, g2)]
    )
    times = {"ours": [], "deepspeed": []}
    for _ in range(repeats):
        for name, layer, ds in (("ours", ours, False), ("deepspeed", theirs, True)):
            dist.barrier()
            t0 = time.perf_counter()
            step(layer, ds)
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    return {"max_abs_diff": diff, **times}


# -- 2. bytes per rank per layer -----------------------------------------------------------------
def _bytes(rank: int, world: int, base_seq: int) -> dict:
    torch.set_num_threads(1)
    cfg = GPTConfig(vocab_size=256, dim=128, n_layers=1, n_heads=8, n_kv_heads=8)
    S = base_seq * world
    torch.manual_seed(0)
    model = GPT(cfg)
    group = dist.group.WORLD
    apply_ulysses(model, group)
    sl = sequence_slice(S, rank, world)
    x = torch.randint(0, 256, (1, S))[:, sl]
    ulysses = {"payload": 0, "off_rank": 0}
    with count_collectives(ulysses):
        model(x, torch.arange(sl.start, sl.stop)).float().sum().backward()
    # All-gather based SP: every rank gathers K and V of the whole sequence (forward) and
    # reduce-scatters their gradients (backward, same volume): 2 gathers + 2 reduce-scatters.
    kv = torch.randn(1, S // world, cfg.n_kv_heads, cfg.head_dim)
    gathered = torch.empty(world * kv.numel())
    allgather = {"payload": 0, "off_rank": 0}
    with count_collectives(allgather):
        for _ in range(2):
            dist.all_gather_into_tensor(gathered, kv.flatten(), group=group)
    allgather = {k: 2 * v for k, v in allgather.items()}  # backward reduce-scatters mirror it
    return {"ulysses": ulysses, "allgather": allgather}


# -- 3. activation memory ------------------------------------------------------------------------
def _activation_bytes(rank: int, world: int, seq_len: int) -> int:
    torch.set_num_threads(1)
    cfg = GPTConfig(vocab_size=256, dim=128, n_layers=2, n_heads=8, n_kv_heads=8)
    torch.manual_seed(0)
    model = GPT(cfg)
    if world > 1:
        apply_ulysses(model, dist.group.WORLD)
    sl = sequence_slice(seq_len, rank, world)
    x = torch.randint(0, 256, (2, seq_len))[:, sl]
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # hold references so storages are not freed and reused

    def pack(t: torch.Tensor):
        keep.append(t)
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, torch.arange(sl.start, sl.stop)).float().logsumexp(-1).mean()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss.backward()
    return sum(v for k, v in seen.items() if k not in params)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--shape", type=int, nargs=4, default=[2, 2048, 8, 64], metavar=("B", "S", "H", "D")
    )
    args = ap.parse_args()

    res = run_on_ranks(_vs_deepspeed, args.sp, tuple(args.shape), args.repeats, timeout_s=300)
    r0 = res[0]
    ours_ms, ds_ms = 1e3 * median(r0["ours"]), 1e3 * median(r0["deepspeed"])
    ratio = ours_ms / ds_ms
    print(
        f"ours {ours_ms:.2f} ms  deepspeed {ds_ms:.2f} ms  ratio {ratio:.3f}  max|diff| {r0['max_abs_diff']:.2e}"
    )

    comm = []
    for sp in (2, 4, 8):
        b = run_on_ranks(_bytes, sp, 256, timeout_s=300)[0]
        comm.append(
            {
                "sp": sp,
                "seq_len": 256 * sp,
                **{f"ulysses_{k}": v for k, v in b["ulysses"].items()},
                **{f"allgather_{k}": v for k, v in b["allgather"].items()},
            }
        )
        print(comm[-1])
    base = comm[0]["ulysses_payload"]
    spread = max(abs(c["ulysses_payload"] / base - 1) for c in comm)

    mem = []
    for sp in (1, 2, 4):
        act = (
            run_on_ranks(_activation_bytes, sp, 1024, timeout_s=300)[0]
            if sp > 1
            else _single_activation()
        )
        mem.append({"sp": sp, "activation_bytes_per_rank": act})
    for m in mem:
        m["fraction_of_sp1"] = m["activation_bytes_per_rank"] / mem[0]["activation_bytes_per_rank"]
        m["ideal_1_over_sp"] = 1 / m["sp"]
        print(m)

    data = {
        "shape_BSHD": args.shape,
        "sp": args.sp,
        "repeats": args.repeats,
        "ours_ms_median": ours_ms,
        "deepspeed_ms_median": ds_ms,
        "ratio_ours_over_deepspeed": ratio,
        "max_abs_diff_outputs_and_grads": r0["max_abs_diff"],
        "ours_ms": r0["ours"],
        "deepspeed_ms": r0["deepspeed"],
        "comm_per_rank_per_layer": comm,
        "ulysses_payload_max_relative_spread": spread,
        "activation_memory": mem,
    }
    table = [
        {"measure": "fwd+bwd attention, ours (ms, median)", "value": ours_ms},
        {
            "measure": "fwd+bwd attention, DeepSpeed DistributedAttention (ms, median)",
            "value": ds_ms,
        },
        {"measure": "ratio ours / DeepSpeed (target <= 1.1)", "value": ratio},
        {
            "measure": "max |ours - DeepSpeed| over outputs and q/k/v grads",
            "value": r0["max_abs_diff"],
        },
    ]
    for c in comm:
        table.append(
            {
                "measure": f"sp={c['sp']} seq={c['seq_len']}: Ulysses payload / off-rank bytes per rank per layer; all-gather SP",
                "value": f"{c['ulysses_payload']:,} / {c['ulysses_off_rank']:,}; {c['allgather_payload']:,}",
            }
        )
    table.append(
        {"measure": "Ulysses payload spread across sp=2,4,8 (target < 1%)", "value": spread}
    )
    for m in mem:
        table.append(
            {
                "measure": f"activation bytes per rank, sp={m['sp']} (fraction of sp=1; ideal {m['ideal_1_over_sp']:.3f})",
                "value": f"{m['activation_bytes_per_rank']:,} ({m['fraction_of_sp1']:.3f})",
            }
        )
    write_results(
        "ulysses",
        data,
        table,
        notes=(
            f"{args.sp} gloo ranks on CPU, q/k/v (B,S,H,D)={tuple(args.shape)}, fp32. 'Payload' is what a rank "
            "hands to each collective (the paper's per-link volume M/P); 'off-rank' is the share that leaves "
            "the rank ((sp-1)/sp of an all-to-all). All-gather SP gathers K and V of the whole sequence."
        ),
    )


def _single_activation() -> int:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    return _activation_bytes(0, 1, 1024)


if __name__ == "__main__":
    main()
