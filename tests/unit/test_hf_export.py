"""``python -m checkpoint.export --format hf``: transformers loads the folder with no missing or
unexpected key and computes the Lattice model's logits (the Why of the Hugging Face issue: the
old file matched 1 of 21 keys and its RoPE rows were in the other order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoint.consolidate import load_consolidated
from checkpoint.export import main
from checkpoint.format import committed_steps
from models.gpt import GPT, GPTConfig
from tests.trainer_utils import run_trainer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def trained(request, tiny_data: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    run_trainer(
        [
            "train.steps=2",
            "checkpoint.enabled=true",
            f"data.path={tiny_data}",
            f"run.dir={run}",
            f"model.tie_embeddings={str(request.param).lower()}",
            "model.vocab_size=260",
        ]
    )
    return run / "checkpoints"


def _lattice_logits(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    state = json.loads((ckpt / "train_state.json").read_text())
    m = {k: v for k, v in state["config"]["model"].items() if k in GPTConfig.__dataclass_fields__}
    model = GPT(GPTConfig(**m))
    sd = {k.removeprefix("model/"): v for k, v in load_consolidated(ckpt, "model/").items()}
    model.load_state_dict(sd)
    return model.eval()(x)


def test_transformers_loads_the_export_and_matches_logits(trained: Path, tmp_path: Path):
    out = tmp_path / "hf"
    assert main([str(trained), str(out), "--format", "hf", "--max-shard-mb", "0.05"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    hf, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _lattice_logits(committed_steps(trained)[-1], x)
        got = hf.eval()(x).logits
    assert got.shape == want.shape == (2, 24, 260)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_moe_export_is_refused_naming_the_family(tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    (ckpt / "index.json").write_text(
        json.dumps(
            {
                "format": "lattice-universal-checkpoint",
                "version": 1,
                "step": 1,
                "tensors": {},
                "manifest": {},
                "train_state": "train_state.json",
                "world_size": 1,
            }
        )
    )
    # Lattice's default gpt_moe (sparsemixer with RMSNorm) has no HF architecture: PhiMoE's
    # norms are LayerNorm (Mixtral and PhiMoE exports: tests/unit/test_hf_moe.py)
    moe = {"name": "gpt_moe", "router": "sparsemixer", "norm": "rmsnorm"}
    (ckpt / "train_state.json").write_text(json.dumps({"config": {"model": moe}}))
    assert main([str(ckpt), str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert "model.norm='rmsnorm' has no Hugging Face counterpart" in capsys.readouterr().err
    (ckpt / "train_state.json").write_text(json.dumps({"config": {"model": {"name": "dlrm"}}}))
    assert main([str(ckpt), str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert "model.name='dlrm' has no Hugging Face architecture" in capsys.readouterr().err
