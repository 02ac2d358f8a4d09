"""CausalSelfAttention against torch's scaled_dot_product_attention and layer_norm."""

import math

import pytest
import torch
import torch.nn.functional as F

import steadytrain
from steadytrain.nn import CausalSelfAttention, causal_mask


def reference(block: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The same projections through torch's own attention (and layer norm for qk-norm)."""
    batch, length, dim = x.shape
    heads, head = block.heads, block.head_dim
    q, k, v = F.linear(x, block.qkv.weight, block.qkv.bias).split(dim, dim=-1)
    q, k, v = (t.reshape(batch, length, heads, head).transpose(1, 2) for t in (q, k, v))
    if block.qk_layernorm:
        q = F.layer_norm(q, (head,), block.q_norm.weight, block.q_norm.bias)
        k = F.layer_norm(k, (head,), block.k_norm.weight, block.k_norm.bias)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(out.transpose(1, 2).reshape(batch, length, dim), block.proj.weight,
                    block.proj.bias)


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_output_matches_torch_attention(qk_layernorm):
    torch.manual_seed(0)
    block = CausalSelfAttention(12, 3, qk_layernorm=qk_layernorm).double()
    if qk_layernorm:  # non-trivial affine parameters, so that they are tested too
        for norm in (block.q_norm, block.k_norm):
            torch.nn.init.normal_(norm.weight, 1.0, 0.3)
            torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(block(x), reference(block, x))


def test_a_query_never_sees_the_future():
    torch.manual_seed(1)
    block = CausalSelfAttention(8, 2)
    x = torch.randn(1, 6, 8)
    changed = x.clone()
    changed[:, 4:] += 5.0
    torch.testing.assert_close(block(x)[:, :4], block(changed)[:, :4])
    assert causal_mask(3).tolist() == [[False, True, True], [False, False, True],
                                        [False, False, False]]


@torch.no_grad()
def largest_visible_logit(block: CausalSelfAttention, x: torch.Tensor) -> float:
    batch, length, dim = x.shape
    q, k, _ = block.qkv(x).split(dim, dim=-1)
    q = q.reshape(batch, length, block.heads, block.head_dim)
    k = k.reshape(batch, length, block.heads, block.head_dim)
    if block.qk_layernorm:
        q, k = block.q_norm(q), block.k_norm(k)
    best = -math.inf
    for b in range(batch):
        for h in range(block.heads):
            for i in range(length):
                for j in range(i + 1):  # the keys query i sees
                    dot = float(q[b, i, h] @ k[b, j, h]) / block.head_dim**0.5
                    best = max(best, dot)
    return best


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_reports_the_largest_visible_logit_into_the_open_step(qk_layernorm):
    torch.manual_seed(2)
    block = CausalSelfAttention(8, 2, qk_layernorm=qk_layernorm)
    with torch.no_grad():
        block.qkv.weight.mul_(4.0)  # large logits, so that masked ones would be noticed
    x = torch.randn(2, 5, 8)
    pipe = steadytrain.Pipeline().setup(block)
    ctx = pipe.before_step()
    block(x)
    block(x)
    reported = ctx.outputs["attention_logits_max"]
    assert isinstance(reported, list) and len(reported) == 2
    assert reported[0].item() == pytest.approx(largest_visible_logit(block, x), rel=1e-5)
    assert not reported[0].requires_grad
    quiet = CausalSelfAttention(8, 2, report_as=None)
    quiet(x)
    assert len(ctx.outputs["attention_logits_max"]) == 2


def test_qk_layernorm_bounds_the_logits_when_the_weights_grow():
    torch.manual_seed(3)
    x = torch.randn(1, 16, 8)
    largest = {}
    for qk_layernorm in (False, True):
        block = CausalSelfAttention(8, 1, qk_layernorm=qk_layernorm)
        with torch.no_grad():
            block.qkv.weight.mul_(100.0)
        largest[qk_layernorm] = largest_visible_logit(block, x)
    # With unit-variance, zero-mean q and k, q·k / √d is at most √d by Cauchy-Schwarz.
    assert largest[True] <= 8**0.5 + 1e-4 < 100 < largest[False]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((10, 3), {}, r"dim \(10\) must be a multiple of heads \(3\)"),
        ((0, 1), {}, "CausalSelfAttention.dim: must be an integer >= 1"),
        ((8, 0), {}, "CausalSelfAttention.heads: must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_named(args, kwargs, message):
    with pytest.raises((ValueError, steadytrain.ConfigError), match=message):
        CausalSelfAttention(*args, **kwargs)


def test_inputs_of_the_wrong_shape_are_named():
    block = CausalSelfAttention(8, 2)
    with pytest.raises(ValueError, match=r"must have 8 features .* shape \(2, 5, 6\)"):
        block(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"must be \(batch, length, dim\), got shape \(5, 8\)"):
        block(torch.randn(5, 8))
