"""``train.generate``: the KV cache equals the full forward, a converted HF Llama decodes like
transformers' ``generate``, and the CLI runs end to end on a real checkpoint."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint.hf_llama import llama_to_lattice, unpermute_rope
from models.gpt import GPT, GPTConfig, KVCache
from models.moe import GPTMoE, MoEConfig
from parallelism.init import materialize_and_init_
from tests.tokenizer_utils import train_byte_bpe
from train.generate import (
    BYTES,
    Streamer,
    generate,
    load_model,
    load_tokenizer,
    main,
    sample_next,
)

ROOT = Path(__file__).resolve().parents[2]
CFG = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.3)


def _gpt(cls: type = GPT, cfg_cls: type = GPTConfig, **kw) -> GPT:
    with torch.device("meta"):
        m = cls(cfg_cls(**{**CFG, **kw}))
    materialize_and_init_(m, 0)
    return m.eval()


@pytest.mark.parametrize("family", ["gpt", "gpt_moe"])
def test_kv_cache_greedy_equals_full_forward(family: str) -> None:
    model = _gpt() if family == "gpt" else _gpt(GPTMoE, MoEConfig, n_experts=4)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 12, use_cache=True)
    full = generate(model, prompt, 12, use_cache=False)
    assert torch.equal(cached, full)
    assert len(set(cached[0, 5:].tolist())) > 1  # not a degenerate repeat of one token
    # Last-position logits: one cached step after prefill vs the full forward.
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 17)
        model(cached[:, :16], cache=cache)
        step = model(cached[:, 16:17], cache=cache)[:, -1]
        ref = model(cached)[:, -1]
    assert cache.start_pos == 17
    torch.testing.assert_close(step, ref, rtol=0, atol=1e-5)


def test_cache_uses_start_pos_for_rope_and_mask() -> None:
    """Decoding position S with the wrong rotary position would change the logits; a chunk of
    several tokens after a prefill needs the bottom-right-aligned causal mask."""
    model, x = _gpt(), torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        full = model(x)
        ref = full[:, -1]
        chunked = KVCache.for_model(model, 1, 9)
        model(x[:, :5], cache=chunked)
        torch.testing.assert_close(model(x[:, 5:], cache=chunked), full[:, 5:], rtol=0, atol=1e-5)
        cache = KVCache.for_model(model, 1, 9)
        model(x[:, :8], cache=cache)
        got = model(x[:, 8:], cache=cache)[:, -1]
        bad_cache = KVCache.for_model(model, 1, 9)
        model(x[:, :8], cache=bad_cache)
        bad = model(x[:, 8:], positions=torch.tensor([0]), cache=bad_cache)[:, -1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert (bad - ref).abs().max() > 1e-3


def test_top_p_keeps_the_nucleus_and_seed_repeats() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are never drawn
    assert int(sample_next(logits, 0.0, 0.1, g)) == 0
    a = [int(sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(3))) for _ in range(5)]
    b = [int(sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(3))) for _ in range(5)]
    assert a == b


def test_unpermute_rope_inverts_hf_permute() -> None:
    """HF's convert_llama_weights_to_hf ``permute`` then ours is the identity."""
    w, H = torch.randn(4 * 8, 16), 4
    hf = w.view(H, 8 // 2, 2, 16).transpose(1, 2).reshape(32, 16)
    assert torch.equal(unpermute_rope(hf, H), w)


def _hf_llama(tmp_path: Path, tie: bool = False, n_kv_heads: int = 2, vocab_size: int = 96):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        attention_bias=False,
        initializer_range=0.2,  # varied greedy tokens, not one repeated
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()


@pytest.mark.parametrize(("tie", "n_kv_heads"), [(False, 2), (True, 1)])
def test_converted_llama_matches_transformers_generate(
    tmp_path: Path, tie: bool, n_kv_heads: int
) -> None:
    """Must-show 5: logits agree (measured max |diff| ~5e-6 on logits of magnitude ~5), then
    greedy decoding agrees token for token (GQA and untied; multi-query and tied)."""
    hf = _hf_llama(tmp_path, tie, n_kv_heads)
    kw, sd = llama_to_lattice(hf.state_dict(), hf.config)
    assert kw["ffn_hidden"] == 160 and kw["n_kv_heads"] == n_kv_heads
    assert kw["tie_embeddings"] == tie
    model = GPT(GPTConfig(**kw)).eval()
    model.load_state_dict(sd)
    x = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff < 2e-5, diff
    n = 20
    want = hf.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0
    )
    got = generate(model, x, n, temperature=0.0)
    assert want.shape == got.shape == (2, 11 + n)
    assert torch.equal(got, want)
    assert len(set(got[0, 11:].tolist())) > 2


def _byte_bpe(vocab_size: int):
    """A byte-level BPE trained on the stdlib json package's sources (no download)."""
    texts = [p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    tok = train_byte_bpe(texts, vocab_size)
    assert tok.get_vocab_size() == vocab_size
    return tok


def test_generate_on_an_imported_llama_folder_equals_transformers_generate(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Must-show 5 through the entry point: ``python -m train.generate HF_DIR`` on a random
    ``LlamaForCausalLM`` saved with ``save_pretrained`` (and its tokenizer.json) decodes
    greedily what transformers' ``generate`` decodes, token for token (API and CLI)."""
    hf = _hf_llama(tmp_path, vocab_size=320)
    folder = tmp_path / "llama"
    tok = _byte_bpe(320)
    tok.save(str(folder / "tokenizer.json"))
    prompt, n = "def load(self, ", 24
    ids = tok.encode(prompt).ids
    x = torch.tensor([ids])
    want = hf.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0
    )
    model, cfg = load_model(folder)
    assert cfg == {"hf": str(folder)} and model.cfg.vocab_size == 320
    got = generate(model, x, n, temperature=0.0)
    assert torch.equal(got, want)
    assert len(set(got[0, len(ids) :].tolist())) > 2  # not one repeated token
    r = _cli(str(folder), "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0")
    assert r.returncode == 0, r.stderr
    full = tok.decode(want[0].tolist())
    assert r.stdout == prompt + full[len(tok.decode(ids)) :] + "\n"
    (folder / "tokenizer.json").unlink()
    capsys.readouterr()  # transformers' progress bars so far
    assert main([str(folder), "--prompt", prompt]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and "--data" in err and err.count("\n") == 1


# -- the command line, end to end ------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: str) -> Path:
    """A real 2-step run of the trainer with checkpointing on (byte-level stdlib data)."""
    from train.cli import load_config
    from train.trainer import Trainer, plan_run

    tmp = tmp_path_factory.mktemp("gen")
    job, cfg = load_config(
        [
            "train.steps=2",
            "checkpoint.enabled=true",
            f"run.dir={tmp / 'run'}",
            f"data.path={tiny_data}",
            "model.dim=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "train.seq_len=32",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.eval_every=0",
            "train.eval_batches=1",
            "logging.progress=false",
            "logging.plot=false",
        ]
    )
    trainer = Trainer(job, cfg, plan_run(job))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return tmp / "run"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "train.generate", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_cli_generates_from_a_checkpoint(saved_run: Path) -> None:
    ckpt = saved_run / "checkpoints"
    args = ("--prompt", "def ", "--max-new-tokens", "8", "--seed", "0")
    a, b = _cli(str(ckpt), *args), _cli(str(ckpt), *args)
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("def ")
    assert len(a.stdout) > len("def \n")
    assert a.stdout == b.stdout
    greedy = _cli(str(ckpt), *args, "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr
    assert greedy.stdout.startswith("def ")


def test_cli_missing_checkpoint_fails_with_one_line() -> None:
    r = _cli("/no/such/ckpt", "--prompt", "x")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: CKPT '/no/such/ckpt': no such checkpoint folder"
    ]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("--prompt", "x", "--top-p", "0"), "--top-p"),
        (("--prompt", "x", "--top-p", "1.5"), "--top-p"),
        (("--prompt", "x", "--temperature", "-1"), "--temperature"),
        (("--prompt", "x", "--max-new-tokens", "100000"), "--max-new-tokens"),
        (("--prompt", "x", "--max-new-tokens", "two"), "--max-new-tokens"),
        (("--prompt", ""), "--prompt"),
    ],
)
def test_cli_bad_inputs_fail_with_one_line(
    saved_run: Path, args: tuple, names: str, capsys: pytest.CaptureFixture
) -> None:
    """In-process ``main`` (a subprocess per case costs seconds of imports)."""
    try:
        rc = main([str(saved_run), *args])
    except SystemExit as e:  # argparse's errors exit from parse_args
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err


def test_streamer_holds_back_partial_characters() -> None:
    out = io.StringIO()
    ids = list("é!".encode())
    s = Streamer(BYTES, list(b"a"), out)
    s(torch.tensor([ids[0]]))
    assert out.getvalue() == ""  # half of a two-byte character
    s(torch.tensor([ids[1]]))
    s(torch.tensor([ids[2]]))
    s.flush()
    assert out.getvalue() == "é!"
    assert BYTES.decode([0xFF, 0x41]) == "\ufffdA"


def test_tokenizer_from_meta_json(tmp_path: Path) -> None:
    """meta.json naming an HF tokenizer.json is used; no meta.json or "bytes" means bytes."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"])
    tok.train_from_iterator(["def main():\n    return 0\n"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    meta = {"tokenizer": {"kind": "hf", "name": "tokenizer.json", "sha256": "x"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    got = load_tokenizer(tmp_path)
    ids = got.encode("def main():")
    assert got.kind == "hf" and len(ids) < len("def main():")
    assert got.decode(ids) == "def main():"
    assert load_tokenizer(tmp_path / "nothing") is BYTES
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "bytes"}))
    assert load_tokenizer(tmp_path) is BYTES
