"""GRIN SparseMixer-v2 router math and the dropless MoE block (issue 5, must-show 1 and 2)."""

from __future__ import annotations

import math

import pytest
import torch

from models.moe import MoE, dense_moe_reference, sparsemixer_v2, topk_softmax


def test_eps_zero_is_hard_top2_with_unit_weights():
    torch.manual_seed(0)
    s = torch.randn(512, 8)
    for training in (True, False):
        w, idx = sparsemixer_v2(s, jitter_eps=0.0, training=training)
        assert torch.equal(w, torch.ones_like(w))
        assert torch.equal(idx, s.topk(2, dim=-1).indices)


def test_eval_examples_from_the_issue():
    w, idx = sparsemixer_v2(torch.tensor([[5.0, 3.0, 1.0, 0.0]]), 0.01, training=False)
    assert idx.tolist() == [[0, 1]] and w.tolist() == [[1.0, 1.0]]
    w, idx = sparsemixer_v2(torch.tensor([[1.0, 0.995, 0.5, 0.0]]), 0.01, training=False)
    # slot 1: experts 0 and 1 survive the 2*eps relative-gap mask -> softmax([1, 0.995])[0];
    # slot 2: expert 0 removed, only expert 1 within 2*eps of 0.995 -> 1.
    expected = 1.0 / (1.0 + math.exp(-0.005))  # 0.500125
    assert idx.tolist() == [[0, 1]]
    assert w[0, 0].item() == pytest.approx(expected, abs=1e-6)
    assert w[0].tolist() == pytest.approx([0.5012, 1.0], abs=1e-3)


def test_heun_factor_and_distinct_second_expert():
    torch.manual_seed(0)
    T = 200_000
    # Two experts tied within eps: ~half the Gumbel samples are not the argmax.
    s = torch.tensor([1.0, 0.999, -5.0, -6.0]).expand(T, 4).contiguous()
    s = s + 1e-4 * torch.randn(T, 4)
    w, idx = sparsemixer_v2(s, 0.01, training=True)
    assert (idx[:, 0] != idx[:, 1]).all()
    with torch.no_grad():
        pi = torch.softmax(s.masked_fill(torch.arange(4) >= 2, float("-inf")), -1)
    slot1_pi = pi.gather(1, idx[:, :1]).squeeze(1)
    non_argmax = idx[:, 0] != s.argmax(-1)
    factor = w[non_argmax, 0] / slot1_pi[non_argmax]
    assert non_argmax.sum() > 50_000
    assert set(torch.round(factor * 3).unique().tolist()) <= {1.0, 3.0}
    assert factor.mean().item() == pytest.approx(0.5, abs=0.01)
    # argmax picks always get factor 1
    assert torch.allclose(w[~non_argmax, 0], slot1_pi[~non_argmax])


def test_second_expert_differs_even_when_all_tied():
    s = torch.zeros(10_000, 4, requires_grad=True)
    _, idx = sparsemixer_v2(s, 0.01, training=True)
    assert (idx[:, 0] != idx[:, 1]).all()


@pytest.mark.parametrize("training", [True, False])
def test_router_gradient_is_pi_times_ei_minus_pi(training):
    torch.manual_seed(1)
    T, E = 64, 6
    s = (1.0 + 0.006 * torch.randn(T, E)).requires_grad_()  # gaps ~eps: several experts kept
    w, idx = sparsemixer_v2(s, 0.01, training=training)
    for slot in range(2):
        g = torch.randn(T)
        (grad,) = torch.autograd.grad((w[:, slot] * g).sum(), s, retain_graph=True)
        assert grad.sum(-1).abs().max() < 1e-6
        assert (grad != 0).sum(-1).gt(1).float().mean() > 0.5  # non-trivial masked softmax
        # the masked softmax of this slot, recomputed from the definition
        with torch.no_grad():
            avail = torch.ones(T, E, dtype=torch.bool)
            if slot == 1:
                avail[torch.arange(T), idx[:, 0]] = False
            sc = s.masked_fill(~avail, float("-inf"))
            top = sc.max(-1, keepdim=True).values
            gap = (top - s) / torch.maximum(s.abs(), top)
            pi = torch.softmax(sc.masked_fill(gap > 0.02, float("-inf")), -1)
            pi_i = pi.gather(1, idx[:, slot : slot + 1])
            e_i = torch.nn.functional.one_hot(idx[:, slot], E).float()
            expected = g[:, None] * pi_i * (e_i - pi)
        assert torch.equal(grad, expected)


def test_topk_softmax_router():
    s = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, idx = topk_softmax(s, 2)
    assert idx.tolist() == [[0, 1]]
    assert w[0].tolist() == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])


def _moe(router, E=4, D=16, H=32, seed=0):
    torch.manual_seed(seed)
    m = MoE(D, H, E, 2, router, 0.01)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


@pytest.mark.parametrize("router", ["sparsemixer", "softmax"])
@pytest.mark.parametrize("use_grouped_mm", [True, False])
@pytest.mark.parametrize("skew", [False, True])
def test_dropless_equals_dense_reference(router, use_grouped_mm, skew):
    m = _moe(router).eval()
    m.experts.use_grouped_mm = use_grouped_mm
    x = torch.randn(2, 24, 16)
    if skew:  # every token picks the same two experts (0 first, then 3)
        with torch.no_grad():
            m.router.weight.zero_()
            m.router.weight[0, 0] = 10.0
            m.router.weight[3, 0] = 5.0
        x[..., 0] = x[..., 0].abs() + 1.0
    y = m(x)
    _, _, idx = m.route(x.reshape(-1, 16))
    if skew:
        assert (idx[:, 0] == 0).all() and (idx[:, 1] == 3).all()
    ref = dense_moe_reference(m, x.reshape(-1, 16)).view_as(y)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_dropless_gradients_match_dense_reference_in_training():
    m = _moe("sparsemixer")
    m.train()
    x = torch.randn(40, 16)
    u = torch.rand(40, 2, 5)
    m.uniform_fn = lambda T, E: u
    y = m(x)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), list(m.parameters()))
    ref = dense_moe_reference(m, x)
    rgrads = torch.autograd.grad((ref * gy).sum(), list(m.parameters()))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_balance_loss_uniform_is_one():
    m = _moe("softmax", E=4)
    with torch.no_grad():
        m.router.weight.zero_()
    m.train()
    # zero logits -> P_e = 1/E; ties -> topk picks experts 0,1 -> f = (1/2, 1/2, 0, 0)
    m(torch.randn(8, 16))
    assert m.aux_loss.item() == pytest.approx(4 * (0.5 * 0.25 + 0.5 * 0.25))


def test_bad_moe_config_fails_before_any_process_group():
    from models.errors import ConfigError, LayoutError
    from parallelism.dims import ParallelDims
    from train.cli import load_config
    from train.families.gpt_moe import GPTMoEFamily

    def validate(overrides: list[str], dims: ParallelDims) -> None:
        job, _ = load_config(["model=gpt_moe", *overrides])
        GPTMoEFamily(job, dims, 0).validate()

    with pytest.raises(LayoutError, match=r"model.n_experts=6 is not divisible by parallel.ep=4"):
        validate(["model.n_experts=6"], ParallelDims(4, dp_shard=4, ep=4))
    with pytest.raises(ConfigError, match=r"model.top_k=3"):
        validate(["model.top_k=3"], ParallelDims(1))
    validate([], ParallelDims(8, dp_shard=2, tp=2, pp=2, ep=2))  # composes
    with pytest.raises(LayoutError, match=r"model.moe_ffn_hidden=33 .* parallel.tp=2"):
        validate(["model.moe_ffn_hidden=33"], ParallelDims(4, dp_shard=2, tp=2, ep=2))
    with pytest.raises(LayoutError, match=r"parallel.sequence_parallel_norms=true"):
        validate(["parallel.sequence_parallel_norms=true"], ParallelDims(2, tp=2))


def test_input_jitter_scales_the_moe_input_by_keyed_uniforms_in_training_only():
    """``input_jitter``: the MoE of ``x * U(1 - j, 1 + j)`` (router and experts both see it),
    the uniforms a function of the token key (so a permuted batch permutes the output) and
    nothing in eval."""
    from models.moe import keyed_uniform

    torch.manual_seed(0)
    kw = dict(dim=16, hidden=8, n_experts=4, top_k=2, router="softmax")
    jit, plain = MoE(**kw, input_jitter=0.2), MoE(**kw)
    for m in (jit, plain):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
    plain.load_state_dict(jit.state_dict())
    x, keys = torch.randn(1, 6, 16), torch.arange(100, 106)[None]
    u = keyed_uniform(keys.flatten(), jit.noise_salt + (1 << 31), 16)
    want = plain.train()(x * (0.8 + 0.4 * u)[None], keys)
    torch.testing.assert_close(jit.train()(x, keys), want)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(jit(x[:, perm], keys[:, perm]), want[:, perm])
    assert not torch.allclose(want, plain(x, keys))  # the jitter changes the output
    torch.testing.assert_close(jit.eval()(x, keys), plain.eval()(x, keys))
