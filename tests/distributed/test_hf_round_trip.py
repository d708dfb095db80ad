"""Hugging Face round trip: import a Llama, train 3 steps on tp=2 x pp=2, export; transformers
loads the export with no missing or unexpected key and computes the trained model's logits, and
importing the export gives back the checkpoint's tensors bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoint.consolidate import load_consolidated
from checkpoint.export import export_hf
from checkpoint.format import committed_steps
from checkpoint.hf_llama import HFFolder
from tests.distributed.harness import run_on_ranks
from tests.trainer_utils import run_trainer
from tests.unit.test_hf_import import VOCAB, save_tiny_llama

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")


def _rank(rank: int, world: int, overrides: list[str]) -> dict:
    return run_trainer(overrides)


def test_import_train_on_3d_export_round_trip(tiny_data: str, tmp_path: Path) -> None:
    save_tiny_llama(tmp_path / "hf")
    run = tmp_path / "run"
    over = [
        "train.steps=3",
        f"model.from_hf={tmp_path / 'hf'}",
        f"data.path={tiny_data}",
        f"run.dir={run}",
        "checkpoint.enabled=true",
        "parallel.tp=2",
        "parallel.pp=2",
        "parallel.dp_shard=1",
    ]
    run_on_ranks(_rank, 4, over, timeout_s=180)
    ckpt = committed_steps(run / "checkpoints")[-1]
    export_hf(ckpt, tmp_path / "out")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    saved = {k.removeprefix("model/"): v for k, v in load_consolidated(ckpt, "model/").items()}
    folder = HFFolder(tmp_path / "out")
    for name, t in saved.items():  # import(export) == the checkpoint, bit for bit
        assert torch.equal(folder.lattice_tensor(name), t), name
    from checkpoint.hf_llama import gpt_config_kwargs
    from models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(**gpt_config_kwargs(folder.config)))
    model.load_state_dict(saved)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).logits, model.eval()(x), rtol=1e-5, atol=1e-5)
    original = HFFolder(tmp_path / "hf")
    assert not torch.equal(  # the 3 steps trained the weights
        original.lattice_tensor("layers.0.attention.wq.weight"),
        saved["layers.0.attention.wq.weight"],
    )
