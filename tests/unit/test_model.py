from __future__ import annotations

import torch

from models.gpt import GPT, GPTConfig, apply_rope, rope_tables
from parallelism.init import materialize_and_init_

CFG = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


def _init(seed: int, **kw) -> GPT:
    with torch.device("meta"):
        m = GPT(GPTConfig(**{**CFG, **kw}))
    materialize_and_init_(m, seed)
    return m


def test_same_seed_same_weights_and_padding_is_zero() -> None:
    a, b, c = _init(0), _init(0), _init(1)
    for (n, p), (_, q), (_, r) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters()
    ):
        assert torch.equal(p, q), n
        if "norm" not in n:
            assert not torch.equal(p, r), n
    padded = _init(0, padded_vocab_size=70)
    assert torch.equal(padded.tok_embeddings.weight[:64], a.tok_embeddings.weight)
    assert padded.output.weight[64:].abs().sum() == 0


def test_weights_do_not_depend_on_which_layers_exist() -> None:
    full = _init(0)
    with torch.device("meta"):
        stage = GPT(GPTConfig(**CFG))
    del stage.layers["0"]
    stage.tok_embeddings = None
    materialize_and_init_(stage, 0)
    assert torch.equal(stage.layers["1"].attention.wq.weight, full.layers["1"].attention.wq.weight)


def test_forward_shapes_and_causality() -> None:
    m = _init(0)
    x = torch.randint(0, 64, (2, 12))
    out = m(x)
    assert out.shape == (2, 12, 64)
    x2 = x.clone()
    x2[:, 8:] = 0
    torch.testing.assert_close(m(x2)[:, :8], out[:, :8])


def test_rope_uses_global_positions() -> None:
    q = torch.randn(1, 8, 2, 16)
    cos, sin = rope_tables(16, torch.arange(8), 10000.0)
    full = apply_rope(q, cos, sin)
    cos2, sin2 = rope_tables(16, torch.arange(4, 8), 10000.0)
    torch.testing.assert_close(apply_rope(q[:, 4:], cos2, sin2), full[:, 4:])
    # rotation preserves norms
    torch.testing.assert_close(full.norm(dim=-1), q.norm(dim=-1))


def test_sliding_window_masks_old_keys_in_training_and_cached_decoding() -> None:
    """Query i sees keys i - window < j <= i: changing a token beyond the window leaves later
    logits alone, and prefill + one-token decoding give the full forward's logits."""
    from models.gpt import KVCache

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, sliding_window=3)).eval()
    x = torch.randint(0, 64, (1, 10))
    y = x.clone()
    y[0, 2] = (x[0, 2] + 1) % 64
    with torch.no_grad():
        a, b = model(x), model(y)
        assert torch.equal(a[0, 5:], b[0, 5:]) and not torch.allclose(a[0, 2:5], b[0, 2:5])
        cache = KVCache.for_model(model, 1, 10)
        steps = [model(x[:, :4], cache=cache)] + [
            model(x[:, i : i + 1], cache=cache) for i in range(4, 10)
        ]
        torch.testing.assert_close(torch.cat(steps, dim=1), a, rtol=1e-5, atol=1e-5)
