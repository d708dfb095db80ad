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


def save_tiny_llama(
    path: Path, tie: bool = False, n_layers: int = 2, **config: object
) -> transformers.LlamaForCausalLM:
    """A random GQA ``LlamaForCausalLM`` written by ``save_pretrained`` in several shards.
    ``config``: more ``LlamaConfig`` fields (e.g. llama3 ``rope_parameters`` once Lattice's GPT
    has RoPE scaling: see ``LLAMA_VARIANTS``)."""
    torch.manual_seed(0)
    fields = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie,
    }
    cfg = transformers.LlamaConfig(**{**fields, **config})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path, max_shard_size="100KB")  # several shards + index
    return hf


def _job(tmp_path: Path, *extra: str, data: str = ""):
    from train.cli import load_config
    from train.trainer import plan_run

    job, cfg = load_config(
        [
            f"model.from_hf={tmp_path / 'hf'}",
            "train.seq_len=16",
            *([f"data.path={data}"] if data else ["data.max_bytes=200000"]),
            f"run.dir={tmp_path / 'run'}",
            *extra,
        ]
    )
    return job, cfg, plan_run(job)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_imported_llama_gives_transformers_logits(
    tmp_path: Path, monkeypatch, tie: bool, tiny_data: str
):
    from train.trainer import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    hf = save_tiny_llama(tmp_path / "hf", tie)
    assert json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    job, cfg, plan = _job(tmp_path, data=tiny_data)
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
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"architecture GPTNeoXForCausalLM .* not supported"):
        _job(tmp_path)
    with pytest.raises(ConfigError, match=r"config.json is missing"):
        _job(tmp_path, f"model.from_hf={tmp_path / 'nothing'}")


# The Llama the parity tests import (issue 16): GQA, untied, Llama 3.x RoPE scaling (llama3
# rescales the low frequencies whatever the sequence length, so seq 16 exercises it).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
LLAMA_VARIANTS: dict[str, dict] = {"gqa_untied_llama3": {"rope_parameters": LLAMA3_ROPE}}


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_one_training_step_equals_transformers_adamw(
    tmp_path: Path, monkeypatch, tiny_data: str, variant: str
):
    """Logits of a batch, then one step: loss, clipped gradients and AdamW-updated weights equal
    the same step in transformers with torch.optim.AdamW (fp32, 1e-5)."""
    from tests.hf_reference import STEP, assert_step_equal, hf_step, lattice_side
    from train.cli import load_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    hf = save_tiny_llama(tmp_path / "hf", **LLAMA_VARIANTS[variant])
    over = [f"model.from_hf={tmp_path / 'hf'}", f"data.path={tiny_data}", "train.steps=1"]
    x = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
    got = lattice_side([*over, f"run.dir={tmp_path / 'run'}"], x)
    with torch.no_grad():
        want_logits = hf(x).logits
    assert (got["logits"][..., :VOCAB] - want_logits).abs().max() <= 1e-5
    want = hf_step(hf, got["batch"], load_config([*STEP, *over])[0].optim)
    assert abs(got["losses"][0] - want["loss"]) <= 1e-5 * abs(want["loss"]), (got, want["loss"])
    assert_step_equal(got, want, variant)


def test_read_box_reads_any_index_set_of_a_tensor(tmp_path: Path):
    """Row/column sets in any order, with gaps and repeats (a strided shard, RoPE rows)."""
    from safetensors.torch import save_file

    from checkpoint.safetensors_slices import read_box, runs

    full = torch.randn(12, 10)
    save_file({"w": full, "b": full[0].clone()}, tmp_path / "t.safetensors")
    rows, cols = torch.tensor([7, 0, 1, 2, 9, 9, 11]), torch.tensor([3, 4, 8, 0])
    assert runs(rows) == [(0, 3), (7, 8), (9, 10), (11, 12)]
    got = read_box(tmp_path / "t.safetensors", "w", (rows, cols))
    assert torch.equal(got, full[rows][:, cols])
    assert torch.equal(read_box(tmp_path / "t.safetensors", "w", (torch.arange(4, 8),)), full[4:8])
    assert torch.equal(read_box(tmp_path / "t.safetensors", "b", (cols,)), full[0][cols])
    assert read_box(tmp_path / "t.safetensors", "w", (rows[:0], cols)).shape == (0, 4)


def test_config_group_values_yield_to_config_json(tmp_path: Path, tiny_data: str):
    """gpt_tiny.yaml sets n_kv_heads=2 and dim=128: config.json's 4 and 32 win (only a
    command-line ``model.*`` that contradicts config.json is refused)."""
    save_tiny_llama(tmp_path / "hf", num_key_value_heads=4)
    job, _, _ = _job(tmp_path, data=tiny_data)
    assert (job.model.n_kv_heads, job.model.dim) == (4, 32)
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=2 contradicts .*config.json \(4\)"):
        _job(tmp_path, "model.n_kv_heads=2")


def _break_folder(hf: Path, case: str) -> str:
    """Damage a saved folder as ``case`` says; the text the error line must contain."""
    from safetensors.torch import load_file, save_file

    index_path = hf / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.1.mlp.down_proj.weight"
    shard = index["weight_map"][key]
    if case == "no_config":
        (hf / "config.json").unlink()
        return f"{hf / 'config.json'} is missing"
    if case == "architecture":
        cfg = json.loads((hf / "config.json").read_text())
        cfg["architectures"] = ["GPT2LMHeadModel"]
        (hf / "config.json").write_text(json.dumps(cfg))
        return "architecture GPT2LMHeadModel (config.json architectures) is not supported"
    if case == "shard_file":
        (hf / shard).unlink()
        return f"{hf / shard} is missing (listed in model.safetensors.index.json)"
    if case == "key_not_in_index":
        del index["weight_map"][key]
        index_path.write_text(json.dumps(index))
        return f"{index_path} holds no tensor '{key}'"
    tensors = load_file(hf / shard)
    tensors[key] = torch.zeros(32, 48)  # config.json says (32, 64)
    save_file(tensors, hf / shard, metadata={"format": "pt"})
    return f"tensor {key} has shape (32, 48), but config.json implies (32, 64)"


@pytest.mark.parametrize(
    "case", ["no_config", "architecture", "shard_file", "key_not_in_index", "shape"]
)
def test_bad_folder_fails_with_one_line_naming_the_file_or_key(
    tmp_path: Path, monkeypatch, capsys, tiny_data: str, case: str
):
    from train.__main__ import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    save_tiny_llama(tmp_path / "hf")
    expected = _break_folder(tmp_path / "hf", case)
    capsys.readouterr()  # save_pretrained's progress bar
    argv = [f"model.from_hf={tmp_path / 'hf'}", f"data.path={tiny_data}", "train.seq_len=16"]
    assert main([*argv, f"run.dir={tmp_path / 'run'}", "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert expected in err, err


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
