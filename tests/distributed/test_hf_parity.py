"""``model.from_hf`` on tp=2 x pp=2 (two virtual stages each, interleaved 1F1B) x dp_shard=2, 8
gloo ranks, against transformers: the Llama's logits, and one training step (loss, clipped
gradients, AdamW-updated weights) equal the same step in ``LlamaForCausalLM`` with
``torch.optim.AdamW`` (fp32, 1e-5); every rank reads exactly its shard's bytes. The same run
trains 3 steps and checkpoints, and its export is the round trip: ``from_pretrained`` reports
no missing or unexpected key, its logits equal the trained layout's, importing the export gives
the checkpoint's tensors bit for bit, and the source folder's tokenizer files come along.

One spawn serves both tests (module fixture). The single-process version is
tests/unit/test_hf_import.py::test_one_training_step_equals_transformers_adamw.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.hf_reference import STEP, assert_step_equal, hf_step, lattice_side
from tests.unit.test_hf_import import LLAMA_VARIANTS, VOCAB, save_tiny_llama

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
transformers = pytest.importorskip("transformers")

LAYOUT = [
    "parallel.tp=2",
    "parallel.pp=2",
    "parallel.dp_shard=2",
    "parallel.pp_schedule=interleaved_1f1b",
    "parallel.pp_virtual=2",
]
# Copied along on export. No tokenizer.json: the run trains on byte data, and a folder's
# tokenizer.json must match the data's tokenizer (the import checks it).
TOKENIZER = {
    "tokenizer_config.json": '{"model_max_length": 64}',
    "special_tokens_map.json": '{"eos_token": "</s>"}',
}


def _rank(rank: int, world: int, overrides: list[str], x: torch.Tensor) -> dict:
    return lattice_side(overrides, x)


@pytest.fixture(scope="module", params=sorted(LLAMA_VARIANTS))
def run_8(request, tiny_data: str, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("hf8")
    hf = save_tiny_llama(tmp / "hf", n_layers=4, **LLAMA_VARIANTS[request.param])
    for name, text in TOKENIZER.items():
        (tmp / "hf" / name).write_text(text)
    over = [
        f"model.from_hf={tmp / 'hf'}",
        f"data.path={tiny_data}",
        f"run.dir={tmp / 'run'}",
        "train.steps=3",
        "checkpoint.enabled=true",
        *LAYOUT,
    ]
    x = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    ranks = run_on_ranks(_rank, 8, over, x, timeout_s=240)
    return {"hf": hf, "tmp": tmp, "over": over, "x": x, "ranks": ranks}


def _merged(ranks: list[dict], kind: str) -> dict:
    """Full tensors by name from the tp=0, dp=0 rank of each pipeline stage."""
    out: dict = {}
    for r in ranks:
        if r["coord"]["tp"] == 0 and r["coord"]["dp_shard"] == 0:
            out.update(r[kind])
    return out


def test_8_rank_import_equals_transformers(run_8: dict) -> None:
    from train.cli import load_config

    hf, x, ranks = run_8["hf"], run_8["x"], run_8["ranks"]
    with torch.no_grad():
        want_logits = hf.eval()(x).logits
    last = [r for r in ranks if r["logits"] is not None]
    assert len(last) == 4, "the last stage lives on 2 tp x 2 dp ranks"
    for r in last:
        assert (r["logits"][..., :VOCAB] - want_logits).abs().max() <= 1e-5, r["coord"]
    batch = [
        b for r in ranks if r["coord"]["tp"] == 0 and r["coord"]["pp"] == 0 for b in r["batch"]
    ]
    assert sum(len(b[0]) for b in batch) == 8  # the global batch, from both dp ranks
    want = hf_step(hf, batch, load_config([*STEP, *run_8["over"]])[0].optim)
    loss = ranks[0]["losses"][0]
    assert abs(loss - want["loss"]) <= 1e-5 * abs(want["loss"]), (loss, want["loss"])
    got = {"grads": _merged(ranks, "grads"), "weights": _merged(ranks, "weights")}
    assert_step_equal(got, want, "tp2 x pp2(v2) x dp_shard2")
    total = sum(t.numel() * 4 for t in want["weights"].values())
    for r in ranks:  # each rank read its shard's bytes and nothing more
        assert r["bytes_read"] == r["shard_bytes"] < total / 4, (r["coord"], r["bytes_read"])


def test_8_rank_round_trip_through_export(run_8: dict) -> None:
    from checkpoint.consolidate import load_consolidated
    from checkpoint.export import export_hf
    from checkpoint.format import committed_steps
    from checkpoint.hf_arch import HFModel

    tmp, ranks = run_8["tmp"], run_8["ranks"]
    ckpt = committed_steps(tmp / "run" / "checkpoints")[-1]
    assert ckpt.name.endswith("3"), ckpt
    export_hf(ckpt, tmp / "out", max_shard_mb=0.05)  # several output shards
    index = json.loads((tmp / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = hf.eval()(run_8["x"]).logits
    for r in ranks:
        if r["final_logits"] is not None:  # the trained model, on its layout
            assert (r["final_logits"][..., :VOCAB] - logits).abs().max() <= 1e-5, r["coord"]
    saved = {k.removeprefix("model/"): v for k, v in load_consolidated(ckpt, "model/").items()}
    folder = HFModel(tmp / "out")
    for name, t in saved.items():  # import(export) == the checkpoint, bit for bit
        full = tuple(torch.arange(n) for n in t.shape)
        assert torch.equal(folder.read_local(name, full), t), name
    assert not torch.equal(  # the 3 steps trained the weights
        HFModel(tmp / "hf").lattice_tensor("layers.0.attention.wq.weight"),
        saved["layers.0.attention.wq.weight"],
    )
    for name, text in TOKENIZER.items():
        assert (tmp / "out" / name).read_text() == text, name
    assert (tmp / "out" / "generation_config.json").read_text() == (
        tmp / "hf" / "generation_config.json"
    ).read_text()
