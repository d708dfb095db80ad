"""``model.from_hf=DIR``: a random tiny ``LlamaForCausalLM`` saved with ``save_pretrained``
becomes the Lattice model: its config sets ``model.*`` (a contradicting override fails naming
both), its weights load onto the layout, and the logits equal transformers' (1 process here;
tp=2 and FSDP in tests/distributed/test_hf_import.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.errors import ConfigError

transformers = pytest.importorskip("transformers")

VOCAB = 300


def save_tiny_llama(path: Path, tie: bool = False) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path, max_shard_size="100KB")  # several shards + index
    return hf


def _job(tmp_path: Path, *extra: str):
    from train.cli import load_config
    from train.trainer import plan_run

    job, cfg = load_config(
        [
            f"model.from_hf={tmp_path / 'hf'}",
            "train.seq_len=16",
            "data.max_bytes=200000",
            f"run.dir={tmp_path / 'run'}",
            *extra,
        ]
    )
    return job, cfg, plan_run(job)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_imported_llama_gives_transformers_logits(tmp_path: Path, monkeypatch, tie: bool):
    from train.trainer import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    hf = save_tiny_llama(tmp_path / "hf", tie)
    assert json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    job, cfg, plan = _job(tmp_path)
    assert (job.model.dim, job.model.n_kv_heads, job.model.vocab_size) == (32, 2, VOCAB)
    trainer = Trainer(job, cfg, plan)
    try:
        x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got = trainer.model.eval()(x)[..., :VOCAB]
            want = hf(x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    finally:
        trainer.close()


def test_contradicting_override_and_other_architectures_are_refused(tmp_path: Path):
    save_tiny_llama(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"model.dim=64 contradicts .*config.json \(32\)"):
        _job(tmp_path, "model.dim=64")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"is a MixtralForCausalLM .* only LlamaForCausalLM"):
        _job(tmp_path)
    with pytest.raises(ConfigError, match=r"config.json is missing"):
        _job(tmp_path, f"model.from_hf={tmp_path / 'nothing'}")


def test_missing_shard_and_contradicting_tensor_shape_name_the_file(tmp_path: Path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from train.trainer import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    save_tiny_llama(tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    tensors = load_file(tmp_path / "hf" / shard)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 32)  # config says (64, 32)
    save_file(tensors, tmp_path / "hf" / shard, metadata={"format": "pt"})
    job, cfg, plan = _job(tmp_path)
    with pytest.raises(
        ConfigError, match=r"model.layers.0.mlp.up_proj.weight has shape \(48, 32\)"
    ):
        Trainer(job, cfg, plan)
    (tmp_path / "hf" / shard).unlink()
    with pytest.raises(ConfigError, match=rf"{shard} is missing \(listed in model.safetensors"):
        _job(tmp_path)


def test_data_from_another_tokenizer_than_the_imported_models_is_refused(tmp_path: Path):
    """Build 2 of the real-text issue: shards tokenized with something else than the
    model.from_hf folder's tokenizer.json fail naming both; its own tokenizer passes."""
    from tests.tokenizer_utils import train_byte_bpe
    from train.prepare import PrepareArgs, prepare

    save_tiny_llama(tmp_path / "hf")
    texts = [p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    tok_file = tmp_path / "hf" / "tokenizer.json"
    train_byte_bpe(texts, VOCAB, ["<|endoftext|>"]).save(str(tok_file))
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(texts):
        (src / f"{i}.txt").write_text(text)
    for name, tok in (("bytes_data", "bytes"), ("own_data", str(tok_file))):
        args = PrepareArgs(out=tmp_path / name, inputs=[src], tokenizer=tok, val_fraction=0.5)
        prepare(args)
    shards = ["data.name=shards", "data.max_bytes=16000000"]  # max_bytes: the default back
    with pytest.raises(ConfigError, match=r"bytes_data/meta.json records the bytes tokenizer "):
        _job(tmp_path, *shards, f"data.path={tmp_path / 'bytes_data'}")
    job, _, _ = _job(tmp_path, *shards, f"data.path={tmp_path / 'own_data'}")
    assert job.model.vocab_size == VOCAB
