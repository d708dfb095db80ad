"""Mixtral and PhiMoE (GRIN-MoE) in and out, and the model features they and Llama 3 need,
each against transformers (random tiny models written by ``save_pretrained``, no download).

- RoPE scaling: ``llama3`` and ``longrope`` inverse frequencies against transformers'
  ``ROPE_INIT_FUNCTIONS``, the rotary tables against ``LlamaRotaryEmbedding`` /
  ``PhimoeRotaryEmbedding``; a Llama 3 (llama3 RoPE, GQA, untied) imports with its logits.
- Import on one process: logits at 1e-5 (fp32), and one training step (loss, gradients and
  AdamW-updated weights, torch AdamW on both sides) at 1e-5, for Mixtral (8 experts, top-2,
  GQA, sliding window) and PhiMoE (16 experts, sparsemixer, longrope, LayerNorm and attention
  and lm_head biases, explicit head_dim, sliding window). The balancing loss is on in both
  (``balance_convention=hf``, ``output_router_logits=True``). PhiMoE's training router samples:
  both sides get the same uniforms (Lattice's ``uniform_fn``; transformers' ``exponential_`` and
  ``rand_like`` draws replaced by the same numbers), so the comparison is exact, not statistical.
- ``balance_convention=hf`` equals transformers' ``load_balancing_loss_func``.
- Export: ``AutoModelForCausalLM.from_pretrained`` loads the folder with no missing or unexpected
  key, its logits equal Lattice's, and importing the export reproduces every tensor bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoint.hf_arch import HFModel, to_hf_tensors
from models.errors import ConfigError
from models.gpt import GPTConfig, model_rope_tables, rope_inv_freq

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

VOCAB, S = 300, 16


# -- tiny HF models ---------------------------------------------------------------------------
def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (biases and norms too, so a missed mapping shows) at
    transformers' ``initializer_range`` 0.02: at 0.05 the 4-rank run's AdamW update of one wq
    element of 1024 differed by 3x the AdamW floor of ``assert_weights_close``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("layernorm.weight") or name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.02 * torch.randn(p.shape, generator=g))


def save_tiny_mixtral(path: Path):
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        sliding_window=8,
        router_aux_loss_coef=0.02,
        output_router_logits=True,
        tie_word_embeddings=False,
    )
    hf = transformers.MixtralForCausalLM(cfg)
    _randomize_(hf, 0)
    hf.save_pretrained(path, max_shard_size="100KB")
    return hf.eval()


LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.9, 3.5, 4.0],
    "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0],
    "short_mscale": 1.1,
    "long_mscale": 1.25,
    "original_max_position_embeddings": 32,
}


def save_tiny_phimoe(path: Path):
    cfg = transformers.PhimoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        head_dim=16,  # explicit: 4 heads x 16 != hidden_size
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        rope_parameters=dict(LONGROPE),
        sliding_window=8,
        attention_bias=True,
        lm_head_bias=True,
        router_jitter_noise=0.3,  # GRIN's jitter_eps; wide, so sampling has choices
        input_jitter_noise=0.0,  # transformers 5 applies it twice (see docs/hf.md)
        router_aux_loss_coef=0.02,
        output_router_logits=True,
        tie_word_embeddings=False,
    )
    hf = transformers.PhimoeForCausalLM(cfg)
    _randomize_(hf, 1)
    hf.save_pretrained(path, max_shard_size="100KB")
    return hf.eval()


def _trainer(tmp_path: Path, hf_dir: Path, *extra: str, family: str = "gpt_moe"):
    from train.cli import load_config
    from train.trainer import Trainer, plan_run

    job, cfg = load_config(
        [
            *(["model=gpt_moe"] if family == "gpt_moe" else []),
            f"model.from_hf={hf_dir}",
            f"train.seq_len={S}",
            "data.max_bytes=200000",
            f"run.dir={tmp_path / 'run'}",
            *extra,
        ]
    )
    return Trainer(job, cfg, plan_run(job))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(0, VOCAB, (2, S + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :S], t[:, 1:]


# -- lattice weights as a transformers model --------------------------------------------------
def as_hf_model(tensors: dict[str, torch.Tensor], hf_dir: Path, out: Path, kw: dict):
    """A transformers model whose parameters are ``tensors`` (Lattice names and layout),
    converted with the export mapping and loaded by ``from_pretrained``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    hf_sd = {}
    for name, t in tensors.items():
        t = t[:VOCAB] if name.startswith(("tok_embeddings", "output")) else t
        for key, v in to_hf_tensors(name, t, kw["head_dim"], kw["n_experts"]):
            hf_sd[key] = v.contiguous()
    save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((hf_dir / "config.json").read_text())
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def _compare_models(got, want) -> None:
    g, w = dict(got.named_parameters()), dict(want.named_parameters())
    assert g.keys() == w.keys()
    for name in w:
        torch.testing.assert_close(
            g[name], w[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


# -- the sparsemixer's draws, shared ----------------------------------------------------------
class _Draw:
    """What ``torch.empty_like(x).exponential_()`` / ``torch.rand_like(x).uniform_()`` return
    in transformers' ``sparsemixer``, with fixed numbers."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def exponential_(self) -> torch.Tensor:
        return self.t

    def uniform_(self) -> torch.Tensor:
        return self.t

    def __gt__(self, other: float) -> torch.Tensor:
        return self.t > other


class _TorchWithDraws:
    """``torch`` for ``modeling_phimoe`` with the random draws taken from a list."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self.draws = iter(draws)

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def empty_like(self, t, **kw):
        return _Draw(next(self.draws))

    def rand_like(self, t, **kw):
        return _Draw(next(self.draws))


def shared_uniforms(model, n_layers: int, T: int, E: int, monkeypatch) -> _TorchWithDraws:
    """Lattice's ``uniform_fn`` per layer and transformers' draws from the same uniforms:
    Gumbel ``-log(-log u)`` = ``-log(Exp)`` with ``Exp = -log u``; Heun coin ``u < 0.25`` =
    ``1 - u > 0.75``."""
    from transformers.models.phimoe import modeling_phimoe

    from models.moe import clamp_uniforms

    g = torch.Generator().manual_seed(7)
    draws = []
    for moe in model.moe_layers().values():
        u = torch.rand(T, 2, E + 1, generator=g)
        moe.uniform_fn = lambda t, e, u=u: u
        c = clamp_uniforms(u)
        for slot in range(2):
            draws += [-torch.log(c[:, slot, :E]), 1.0 - c[:, slot, E:]]
    assert len(draws) == 4 * n_layers
    shim = _TorchWithDraws(draws)
    monkeypatch.setattr(modeling_phimoe, "torch", shim)
    return shim


# -- RoPE scaling -----------------------------------------------------------------------------
def _llama3_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,  # wavelengths of 6..6000 span all 3 bands
        },
    )


def _gpt_config(hf_config) -> GPTConfig:
    from checkpoint.hf_arch import model_kwargs

    arch = {"llama": "LlamaForCausalLM", "phimoe": "PhimoeForCausalLM"}[hf_config.model_type]
    kw = model_kwargs({**hf_config.to_dict(), "architectures": [arch]})
    return GPTConfig(**{k: v for k, v in kw.items() if k in GPTConfig.__dataclass_fields__})


def test_llama3_rope_equals_transformers() -> None:
    hf_cfg = _llama3_config()
    cfg = _gpt_config(hf_cfg)
    want, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    got, got_scale = rope_inv_freq(cfg)
    assert cfg.rope_scaling == "llama3" and got_scale == scale == 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    base, _ = rope_inv_freq(GPTConfig(dim=32, n_heads=4))
    assert (got < base).any() and (got == base).any()  # scaled and kept bands both present
    rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    pos = torch.arange(40)
    cos_hf, sin_hf = rot(torch.zeros(1, 40, 8), pos[None])
    cos, sin = model_rope_tables(cfg, pos)
    torch.testing.assert_close(cos, cos_hf[0, :, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_hf[0, :, :4], rtol=0, atol=1e-6)


def test_longrope_equals_transformers() -> None:
    hf_cfg = transformers.PhimoeConfig(
        hidden_size=32,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters=dict(LONGROPE),
    )
    cfg = _gpt_config(hf_cfg)
    for seq_len in (16, 32, 33, 100):
        want, _ = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, seq_len=seq_len)
        got, scale = rope_inv_freq(cfg, seq_len)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert scale == (1.25 if seq_len > 32 else 1.1)
    rot = transformers.models.phimoe.modeling_phimoe.PhimoeRotaryEmbedding(hf_cfg)
    for n in (16, 32, 40):  # the mscale switches at the original length, as in transformers
        pos = torch.arange(n)
        cos_hf, sin_hf = rot(torch.zeros(1, n, 16), pos[None])
        if n > 32:  # transformers 5 keeps the short factors beyond it (docs/hf.md): mscale only
            assert torch.allclose(cos_hf[0, 0], torch.full((16,), 1.25))
            continue
        cos, sin = model_rope_tables(cfg, pos)
        torch.testing.assert_close(cos, cos_hf[0, :, :8], rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, sin_hf[0, :, :8], rtol=0, atol=1e-6)


def test_llama3_llama_imports_with_transformers_logits(tmp_path: Path, monkeypatch) -> None:
    from train.cli import load_config
    from train.trainer import Trainer, plan_run

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(_llama3_config()).eval()
    hf.save_pretrained(tmp_path / "hf")
    job, cfg = load_config(
        [f"model.from_hf={tmp_path / 'hf'}", "train.seq_len=48", f"run.dir={tmp_path / 'r'}"]
    )
    trainer = Trainer(job, cfg, plan_run(job))
    assert (job.model.rope_scaling, job.model.rope_original_max_seq_len) == ("llama3", 32)
    try:
        x = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got = trainer.model.eval()(x)[..., :VOCAB]
            torch.testing.assert_close(got, hf(x).logits, rtol=1e-5, atol=1e-5)
    finally:
        trainer.close()


# -- import: logits and one training step -----------------------------------------------------
def _hf_step(hf, x, y, opt) -> tuple[torch.Tensor, torch.Tensor]:
    out = hf(input_ids=x, output_router_logits=True)
    ce = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    loss = ce + hf.config.router_aux_loss_coef * out.aux_loss
    loss.backward()
    return loss.detach(), out.aux_loss.detach()


def _lattice_step(trainer, x, y, opt) -> torch.Tensor:
    model = trainer.model
    loss = trainer.family.loss(model(x), y, VOCAB)
    loss.backward()
    return loss.detach()


def _adamw(params) -> torch.optim.AdamW:
    """The same torch AdamW on both sides. Adam's first step moves a weight by about
    ``lr * g / (|g| + eps)``: for a gradient near ``eps`` (an expert that got one token) the
    fp32 rounding of g moves it by up to ~lr x 1e-2, so lr stays at a fine-tuning 1e-3."""
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _check_step(trainer, hf, hf_dir: Path, tmp_path: Path) -> None:
    """Logits (eval), then loss, gradients and AdamW-updated weights of one training step."""
    model, kw = trainer.model, HFModel(hf_dir).kwargs
    x, y = _batch(3)
    with torch.no_grad():
        got = model.eval()(x)[..., :VOCAB]
        torch.testing.assert_close(got, hf.eval()(x).logits, rtol=1e-5, atol=1e-5)
    model.train(), hf.train()
    opt_l, opt_h = _adamw(model.parameters()), _adamw(hf.parameters())
    loss_h, aux_h = _hf_step(hf, x, y, opt_h)
    loss_l = _lattice_step(trainer, x, y, opt_l)
    assert float(aux_h) > 0
    torch.testing.assert_close(loss_l, loss_h, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters()}
    _compare_models(
        as_hf_model({n: g for n, g in grads.items()}, hf_dir, tmp_path / "g", kw),
        _grads_as_params(hf),
    )
    opt_l.step(), opt_h.step()
    weights = {n: p.detach() for n, p in model.named_parameters()}
    _compare_models(as_hf_model(weights, hf_dir, tmp_path / "w", kw), hf)


def _grads_as_params(hf):
    clone = type(hf)(hf.config)
    with torch.no_grad():
        for (name, p), (_, q) in zip(hf.named_parameters(), clone.named_parameters(), strict=True):
            assert p.grad is not None, name
            q.copy_(p.grad)
    return clone


def test_mixtral_import_logits_and_training_step(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    hf = save_tiny_mixtral(tmp_path / "hf")
    trainer = _trainer(tmp_path, tmp_path / "hf")
    m = trainer.job.model
    assert (m.router, m.n_experts, m.top_k, m.n_kv_heads, m.sliding_window) == (
        "softmax",
        8,
        2,
        2,
        8,
    )
    assert (m.balance_convention, m.aux_loss_coef) == ("hf", 0.02)
    try:
        _check_step(trainer, hf, tmp_path / "hf", tmp_path)
    finally:
        trainer.close()


def test_phimoe_import_logits_and_training_step(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    hf = save_tiny_phimoe(tmp_path / "hf")
    trainer = _trainer(tmp_path, tmp_path / "hf")
    m = trainer.job.model
    assert (m.router, m.norm, m.head_dim, m.rope_scaling, m.jitter_eps) == (
        "sparsemixer",
        "layernorm",
        16,
        "longrope",
        0.3,
    )
    assert m.attention_bias and m.lm_head_bias and m.n_experts == 16
    try:
        shim = shared_uniforms(trainer.model, 2, 2 * S, 16, monkeypatch)
        _check_step(trainer, hf, tmp_path / "hf", tmp_path)
        assert next(shim.draws, None) is None  # transformers drew every shared number
    finally:
        trainer.close()


# -- balancing-loss convention ----------------------------------------------------------------
def test_hf_balance_convention_equals_load_balancing_loss_func() -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from models.moe import GPTMoE, MoE, MoEConfig, hf_balance_loss

    g = torch.Generator().manual_seed(0)
    x = [torch.randn(24, 8, generator=g) for _ in range(3)]  # router logits of 3 layers
    moe = MoE(16, 8, 8, top_k=2, router="softmax", balance_convention="hf")
    want = load_balancing_loss_func(tuple(x), 8, 2)
    torch.testing.assert_close(hf_balance_loss([moe.hf_stats(t) for t in x]), want)
    # one layer: transformers' loss is top_k x Lattice's Switch loss on the same picks
    lattice = moe.balance_loss(x[0], x[0].softmax(-1).topk(2).indices)
    torch.testing.assert_close(load_balancing_loss_func((x[0],), 8, 2), 2 * lattice)
    # in the model: the loss on the logits pools the layers (sparsemixer picks differ from
    # top-k in training; transformers counts the top-k of the softmax, and so does hf)
    torch.manual_seed(0)
    model = GPTMoE(MoEConfig(dim=16, n_layers=3, n_heads=2, balance_convention="hf")).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(model.init_tensor(name, tuple(p.shape), g))
    captured = []
    for m in model.moe_layers().values():
        m.router.register_forward_hook(lambda mod, inp, out: captured.append(out))
    out = model(torch.randint(0, 256, (2, 12), generator=g))
    want = load_balancing_loss_func(tuple(captured), 8, 2)
    assert len(captured) == 3
    torch.testing.assert_close(out.moe_aux_loss, want, rtol=1e-6, atol=1e-7)


# -- export -----------------------------------------------------------------------------------
def save_tiny_llama3(path: Path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(_llama3_config())
    hf.save_pretrained(path)
    return hf.eval()


SAVERS = {"mixtral": save_tiny_mixtral, "phimoe": save_tiny_phimoe, "llama3": save_tiny_llama3}
EXPORTED = {
    "mixtral": "MixtralForCausalLM",
    "phimoe": "PhimoeForCausalLM",
    "llama3": "LlamaForCausalLM",
}


@pytest.mark.parametrize("arch", list(SAVERS))
def test_export_loads_in_transformers_and_reimports_bit_for_bit(
    arch: str, tmp_path: Path, monkeypatch
) -> None:
    from checkpoint.consolidate import load_consolidated
    from checkpoint.export import main
    from checkpoint.format import committed_steps

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    SAVERS[arch](tmp_path / "hf")
    extra = ["train.steps=2", "checkpoint.enabled=true", "train.global_batch_size=4"]
    family = "gpt" if arch == "llama3" else "gpt_moe"
    trainer = _trainer(tmp_path, tmp_path / "hf", *extra, "train.micro_batch_size=2", family=family)
    try:
        trainer.fit()
        model = trainer.model.eval()
        x, _ = _batch(5)
        with torch.no_grad():
            want = model(x)[..., :VOCAB]
    finally:
        trainer.close()
    ckpt = tmp_path / "run" / "checkpoints"
    out = tmp_path / "export"
    assert main([str(ckpt), str(out), "--format", "hf", "--max-shard-mb", "0.05"]) == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).logits, want, rtol=1e-5, atol=1e-5)
    saved = load_consolidated(committed_steps(ckpt)[-1], "model/")
    back = HFModel(out)
    for name, t in saved.items():
        name = name.removeprefix("model/")
        assert torch.equal(back.lattice_tensor(name), t), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [EXPORTED[arch]]
    if arch == "llama3":
        assert config["rope_parameters"]["rope_type"] == "llama3"


# -- refusals ---------------------------------------------------------------------------------
def test_other_architectures_and_wrong_family_are_refused(tmp_path: Path) -> None:
    save_tiny_mixtral(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"MixtralForCausalLM .* imports as model=gpt_moe"):
        _trainer_job(tmp_path, [f"model.from_hf={tmp_path / 'hf'}"])
    with pytest.raises(ConfigError, match=r"model.n_experts=4 contradicts .*config.json \(8\)"):
        _trainer_job(
            tmp_path, ["model=gpt_moe", f"model.from_hf={tmp_path / 'hf'}", "model.n_experts=4"]
        )
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["architectures"] = ["Qwen2MoeForCausalLM"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"architecture Qwen2MoeForCausalLM .* not supported"):
        _trainer_job(tmp_path, ["model=gpt_moe", f"model.from_hf={tmp_path / 'hf'}"])


def _trainer_job(tmp_path: Path, overrides: list[str]):
    from train.cli import load_config
    from train.trainer import plan_run

    job, _ = load_config([*overrides, f"train.seq_len={S}", f"run.dir={tmp_path / 'run'}"])
    return plan_run(job)
