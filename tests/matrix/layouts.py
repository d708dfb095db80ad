"""The layout matrix (issue 19): every layout of ``gpt`` and ``gpt_moe`` on 1 to 8 ranks.

A layout is the degrees (tp, pp, sp, dp_shard, dp_replicate, ep) whose mesh product is the world
size, a pipeline schedule (gpipe, 1f1b, interleaved 1f1b with 2 virtual stages) when pp > 1, and
sequence-parallel norms on or off when tp > 1; ep ranges over the divisors of the data ranks
(dp_replicate x dp_shard x sp) for ``gpt_moe``. One model admits every layout whose degrees are
powers of two up to 8 (8 heads, 4 kv heads, 8 layers, 8 experts, seq_len 16, vocabulary 257 so
tp pads it); the others (a degree of 3, 5, 6 or 7 on a model dimension, pp x virtual = 16, ...)
are invalid and ``expected_error`` predicts, from the model's sizes alone, the field the one-line
error must name. The batch: each data rank runs ``max(2, pp)`` micro-batches of 1 sample, so the
global batch is ``dp x max(2, pp)`` and the single-process reference runs micro-batches of ``dp``
samples (the same global micro-batches: ``train.data.micro_batch_offset``).

``pairwise_subset`` picks the CI subset: every pair of features (a non-trivial degree, a
schedule, sequence-parallel norms, the family) together at least once, plus one layout of every
assignment of 4 or more non-trivial degrees at world 8, the schedule rotating among them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

N_HEADS, N_KV_HEADS, N_LAYERS, N_EXPERTS = 8, 4, 8, 8
DIM, FFN, MOE_FFN, SEQ, VOCAB = 32, 64, 32, 16, 257
STEPS, LR = 3, 1e-2
FAMILIES = ("gpt", "gpt_moe")
CONFIG = {"gpt": "gpt_tiny", "gpt_moe": "gpt_moe"}
"""The ``configs/model`` file each family starts from (its sizes are overridden)."""
DIMS = ("tp", "pp", "sp", "dp_shard", "dp_replicate", "ep")


@dataclass(frozen=True)
class Layout:
    family: str
    tp: int = 1
    pp: int = 1
    sp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    ep: int = 1
    schedule: str = "1f1b"
    virtual: int = 1
    sp_norms: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.sp * self.dp_shard * self.dp_replicate

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate

    @property
    def n_micro(self) -> int:
        """Micro-batches per data rank (one sample each)."""
        return max(2, self.pp)

    @property
    def global_batch(self) -> int:
        return self.dp * self.n_micro

    def features(self) -> frozenset[str]:
        out = {d for d in DIMS if getattr(self, d) > 1} | {self.family}
        if self.pp > 1:
            out.add(f"schedule={self.schedule}")
        if self.sp_norms:
            out.add("sp_norms")
        return frozenset(out)

    @property
    def n_dims(self) -> int:
        return sum(getattr(self, d) > 1 for d in DIMS)

    @property
    def name(self) -> str:
        parts = [f"{d}{getattr(self, d)}" for d in DIMS if getattr(self, d) > 1] or ["single"]
        if self.pp > 1:
            parts.append(self.schedule + (f"_v{self.virtual}" if self.virtual > 1 else ""))
        if self.sp_norms:
            parts.append("spnorms")
        return f"{self.family}:" + "_".join(parts)

    def overrides(self) -> list[str]:
        """Config overrides of this layout (model and data are ``model_overrides``)."""
        return [
            f"model={CONFIG[self.family]}",
            *model_overrides(self.family),
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.sp={self.sp}",
            f"parallel.dp_shard={self.dp_shard}",
            f"parallel.dp_replicate={self.dp_replicate}",
            *([f"parallel.ep={self.ep}"] if self.ep > 1 else []),
            f"parallel.pp_schedule={self.schedule}",
            f"parallel.pp_virtual={self.virtual}",
            f"parallel.sequence_parallel_norms={str(self.sp_norms).lower()}",
            f"train.global_batch_size={self.global_batch}",
            "train.micro_batch_size=1",
        ]

    def reference_overrides(self) -> list[str]:
        """The single process on the same global micro-batches."""
        return [
            f"model={CONFIG[self.family]}",
            *model_overrides(self.family),
            f"train.global_batch_size={self.global_batch}",
            f"train.micro_batch_size={self.dp}",
        ]

    @property
    def reference_key(self) -> tuple:
        return (self.family, self.global_batch, self.dp)


def model_overrides(family: str) -> list[str]:
    out = [
        f"model.dim={DIM}",
        f"model.n_layers={N_LAYERS}",
        f"model.n_heads={N_HEADS}",
        f"model.n_kv_heads={N_KV_HEADS}",
        f"model.ffn_hidden={FFN}",
        f"model.vocab_size={VOCAB}",
    ]
    if family == "gpt_moe":
        out += [f"model.n_experts={N_EXPERTS}", f"model.moe_ffn_hidden={MOE_FFN}"]
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(worlds: range = range(1, 9)) -> list[Layout]:
    """Every layout (valid or not) of both families on ``worlds`` ranks."""
    out: list[Layout] = []
    for family, world in itertools.product(FAMILIES, worlds):
        for tp in _divisors(world):
            for pp in _divisors(world // tp):
                for sp in _divisors(world // tp // pp):
                    for dps in _divisors(world // tp // pp // sp):
                        dpr = world // tp // pp // sp // dps
                        data = dpr * dps * sp
                        eps = _divisors(data) if family == "gpt_moe" else [1]
                        scheds = (
                            [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)]
                            if pp > 1
                            else [("1f1b", 1)]
                        )
                        norms = [False, True] if tp > 1 else [False]
                        for ep, (sched, v), spn in itertools.product(eps, scheds, norms):
                            out.append(Layout(family, tp, pp, sp, dps, dpr, ep, sched, v, spn))
    # the dense family refuses expert parallelism (one representative)
    out.append(Layout("gpt", dp_shard=2, ep=2))
    return out


def expected_error(lay: Layout) -> str | None:
    """The text the layout's one-line error must contain, or None if it must train.

    Derived from the model sizes above, in the order the checks run (family refusals, Ulysses,
    tensor parallelism, pipeline, then the MoE checks)."""
    tp, sp, pp = lay.tp, lay.sp, lay.pp
    if lay.family == "gpt" and lay.ep > 1:
        return "parallel.ep"
    if sp > 1:
        if N_HEADS % (tp * sp):
            return f"model.n_heads={N_HEADS} is not divisible by parallel.tp x parallel.sp"
        if N_KV_HEADS % tp:
            return f"model.n_kv_heads={N_KV_HEADS} is not divisible by parallel.tp={tp}"
        kv_local = N_KV_HEADS // tp
        if kv_local % sp and sp % kv_local:
            return f"model.n_kv_heads={N_KV_HEADS} leaves {kv_local} kv heads"
        if SEQ % sp:
            return f"train.seq_len={SEQ} is not divisible by parallel.sp={sp}"
    if tp > 1:
        if N_HEADS % tp:
            return f"model.n_heads={N_HEADS} is not divisible by parallel.tp={tp}"
        if N_KV_HEADS % tp:
            return f"model.n_kv_heads={N_KV_HEADS} is not divisible by parallel.tp={tp}"
        if FFN % tp:
            return f"model.ffn_hidden={FFN}"
    if pp > 1 and N_LAYERS % (pp * lay.virtual):
        return f"model.n_layers={N_LAYERS} is not divisible by parallel.pp x parallel.pp_virtual"
    if lay.family == "gpt_moe":
        if lay.ep > 1 and N_EXPERTS % lay.ep:
            return f"model.n_experts={N_EXPERTS} is not divisible by parallel.ep={lay.ep}"
        if tp > 1 and MOE_FFN % tp:
            return f"model.moe_ffn_hidden={MOE_FFN}"
        if tp > 1 and lay.sp_norms:
            return "parallel.sequence_parallel_norms=true is not supported for model.name=gpt_moe"
    return None


def degrees(lay: Layout) -> tuple:
    """The layout without its pipeline schedule: the family, the degrees and the norms."""
    return (lay.family, *(getattr(lay, d) for d in DIMS), lay.sp_norms)


def four_dim_layouts(valid: list[Layout]) -> list[Layout]:
    """One layout per assignment of degrees with 4 or more non-trivial dimensions at world 8.

    Where pp > 1 the schedule rotates (gpipe, 1f1b, interleaved 1f1b) from one assignment to
    the next, so each schedule runs under about a third of them; the full matrix runs all
    three under every one. Each layout at world 8 costs ~20 s on 2 cores (DTensor's sharding
    propagation for every new mesh, for 8 ranks), and 36 layouts instead of 20 would not fit
    the suite's budget."""
    groups: dict[tuple, list[Layout]] = {}
    for lay in sorted(valid, key=lambda x: x.name):
        if lay.world == 8 and lay.n_dims >= 4:
            groups.setdefault(degrees(lay), []).append(lay)
    return [g[i % len(g)] for i, g in enumerate(groups.values())]


def pairwise_subset(layouts: list[Layout]) -> list[Layout]:
    """Valid layouts covering every pair of features at least once (greedy, cheapest world
    first), plus one layout of every assignment of 4 or more non-trivial degrees at world 8
    (``four_dim_layouts``)."""
    valid = [lay for lay in layouts if expected_error(lay) is None]
    pairs = {
        frozenset(p) for lay in valid for p in itertools.combinations(sorted(lay.features()), 2)
    }
    chosen: list[Layout] = four_dim_layouts(valid)
    covered = {frozenset(p) for lay in chosen for p in itertools.combinations(lay.features(), 2)}
    while pairs - covered:
        best = max(
            valid,
            key=lambda lay: (
                len({frozenset(p) for p in itertools.combinations(lay.features(), 2)} - covered),
                -lay.world,
            ),
        )
        chosen.append(best)
        covered |= {frozenset(p) for p in itertools.combinations(best.features(), 2)}
    return sorted(set(chosen), key=lambda lay: (lay.world, lay.name))
