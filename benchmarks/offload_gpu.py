"""GPU half of issue 7's Must show 5: the interleaved placement's iteration time against all-CPU
offload on the same model, and the performance model's prediction of each update phase.

A GPT (``--dim``, ``--layers``) trains on random tokens on the GPU, once with every optimizer
subgroup updated on the CPU (``placement=cpu``: ZeRO-Offload's layout, gradients down and
weights up through pinned buffers) and once with ``placement=auto`` (the performance model
picks device-resident, staged and CPU subgroups from the start-up calibration). The GPU memory
the optimizer state may use is capped at ``--device-budget`` of the state's size (default 0.5),
so that auto has to mix placements, as it would when the model nearly fills the GPU.
Iterations of the two alternate (one warm-up each, then ``--rounds`` rounds of ``--iters``
iterations, order swapped every round); medians of the whole iteration (forward, backward,
update) and of the update phase alone are reported, with ``cpu / auto`` as the speed-up.

Needs CUDA: without a GPU it says so and writes nothing. Run on a GPU machine:
``python -m benchmarks.offload_gpu [--dim 2048 --layers 16 --batch 8 --seq 1024]``
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.common import median, write_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--subgroup", type=int, default=1 << 24)
    ap.add_argument("--device-budget", type=float, default=0.5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("offload_gpu: no CUDA device here; nothing measured, no result written.")
        sys.exit(2)

    from models.gpt import GPT, GPTConfig
    from offload.build import interleaved_optimizer
    from offload.calibrate import calibrate
    from offload.perf_model import predict_update_time

    dev = torch.device("cuda")
    cfg = GPTConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        max_seq_len=args.seq,
    )
    cal = calibrate(dev, None, numel=args.subgroup, cache="")
    runs: dict[str, dict] = {}
    for placement in ("cpu", "auto"):
        torch.manual_seed(0)
        model = GPT(cfg).to(dev)
        n_params = sum(p.numel() for p in model.parameters())
        opt = interleaved_optimizer(
            model.parameters(),
            lr=1e-4,
            betas=(0.9, 0.95),
            weight_decay=0.1,
            placement=placement,
            subgroup_size=args.subgroup,
            max_grad_norm=1.0,
            cpu_kernel="auto",
            calibration=cal,
            device_budget_bytes=int(args.device_budget * 12 * n_params),
        )
        runs[placement] = {"model": model, "opt": opt, "iter": [], "update": []}
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev, generator=gen)
    y = torch.roll(x, -1, dims=1)

    def iteration(run: dict) -> tuple[float, float]:
        model, opt = run["model"], run["opt"]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    for run in runs.values():  # warm-up: state, pinned buffers, kernels
        iteration(run)
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            for _ in range(args.iters):
                it, up = iteration(runs[name])
                runs[name]["iter"].append(it)
                runs[name]["update"].append(up)

    rows = []
    for name, run in runs.items():
        opt = run["opt"]
        numels = [sg.numel for sg in opt.subgroups]
        chosen = [sg.placement for sg in opt.subgroups]
        pred = predict_update_time(numels, chosen, cal, same_resource=False)
        rows.append(
            {
                "placement": name,
                "subgroups": ",".join(f"{k}:{v}" for k, v in opt.placement_summary().items()),
                "iteration_s": median(run["iter"]),
                "update_s": median(run["update"]),
                "predicted_update_s": pred,
                "pred/meas": pred / median(run["update"]),
            }
        )
    speedup = rows[0]["iteration_s"] / rows[1]["iteration_s"]
    for row in rows:
        print(
            f"{row['placement']:>5} [{row['subgroups']}]: iteration {row['iteration_s'] * 1e3:.1f}"
            f" ms, update {row['update_s'] * 1e3:.1f} ms (predicted "
            f"{row['predicted_update_s'] * 1e3:.1f} ms)"
        )
    print(f"all-CPU / interleaved iteration time: {speedup:.3f}")
    n_params = sum(p.numel() for p in runs["cpu"]["model"].parameters())
    notes = (
        f"GPT dim {args.dim}, {args.layers} layers, vocab {args.vocab}: {n_params / 1e6:.0f}M "
        f"params; batch {args.batch} x {args.seq} tokens; subgroups of {args.subgroup}; GPU "
        f"budget for optimizer state {args.device_budget:.2f} of its 12 B/param. "
        f"{args.rounds} rounds x {args.iters} iterations per placement after one warm-up, "
        "order swapped every round, medians. all-CPU / interleaved iteration time = "
        f"{speedup:.3f}.\n\n```\n{cal.table()}\n```"
    )
    write_results(
        "offload_gpu",
        {
            "calibration": cal.__dict__,
            "rows": rows,
            "speedup_cpu_over_auto": speedup,
            "times_s": {k: {"iter": v["iter"], "update": v["update"]} for k, v in runs.items()},
        },
        rows,
        notes,
    )
    for run in runs.values():
        run["opt"].close()


if __name__ == "__main__":
    main()
