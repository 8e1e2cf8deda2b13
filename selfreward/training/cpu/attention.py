"""Causal self-attention for training short sequences on CPU, as whole-matrix products.

SDPA's CPU kernel for a causal bf16 attention is flash attention: it walks the score matrix in
small tiles, which keeps memory O(T) but multiplies slowly at a head size of 64. On the
embedded SmolLM2-135M at 512 tokens its forward and backward took about 17 ms a layer on this
project's 2-core CPU, against about 9 ms here, where each step is one batched product over all
heads that share a key/value head (grouped-query attention needs no copies of K and V):

    S = Q K^T * scale + bias      one baddbmm, the (causal or packed) mask as its additive input
    P = softmax(S)                computed in fp32 inside the kernel, stored in bf16
    O = P V

The backward pass recomputes S and P from Q and K (deterministically: the same P as the
forward's) rather than keeping P, so what a layer keeps between the passes is Q, K, V and O,
as with flash attention. Scores are rounded to bf16 before the softmax, as transformers'
eager attention does in bf16; tests/test_attention.py bounds the difference from float64
against bf16 SDPA's.

`attention_forward` takes this path on CPU, in bf16, for queries and keys of the same length
up to MAX_TOKENS (beyond it, flash attention's O(T) memory traffic wins), no attention dropout,
and either no mask (causal; lean training's causal_only removed a right-padded batch's) or a
boolean (1, 1, T, T) one (a packed row's block-diagonal causal mask, selfreward.training.cpu.packing).
Anything else goes to transformers' SDPA function.
"""

from __future__ import annotations

import torch

NAME = "selfreward_cpu"
MAX_TOKENS = 768

_causal: dict = {}
_masked: list = [None, None, None]  # the mask (kept, so its identity stays unique), (groups, dtype), its bias


def attention_bias(mask, length: int, groups: int, dtype, device) -> torch.Tensor:
    """(groups * length, length) additive bias: 0 where a query may attend, -inf elsewhere; the
    rows of a key/value head's query heads stacked. `mask`: None (causal) or a boolean
    (1, 1, length, length) mask, True where a query attends (a packed batch's block-diagonal
    causal mask). The last bias of each kind is kept: the layers of one forward pass share it."""
    if mask is None:
        key = (length, groups, dtype, device)
        if key not in _causal:
            _causal.clear()
            _causal[key] = _bias(~torch.ones(length, length, dtype=torch.bool, device=device).triu_(1), groups, dtype)
        return _causal[key]
    if _masked[0] is not mask or _masked[1] != (groups, dtype):
        _masked[:] = [mask, (groups, dtype), _bias(mask[0, 0], groups, dtype)]
    return _masked[2]


def _bias(allowed: torch.Tensor, groups: int, dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device) \
        .masked_fill_(~allowed, float("-inf")).repeat(groups, 1)


def _probabilities(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """P for grouped queries q (B*KV, G*T, D) and keys k (B*KV, T, D): (B*KV, G*T, T)."""
    n, rows = q.shape[0], q.shape[1]
    return torch.softmax(torch.baddbmm(bias.expand(n, rows, k.shape[1]), q, k.transpose(1, 2), alpha=scale), dim=-1)


class CausalAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + bias) V for Q (B, H, T, D) and K, V (B, KV, T, D), H a multiple
    of KV, and `bias` from attention_bias; returns (B, H, T, D)."""

    @staticmethod
    def forward(ctx, query, key, value, scale: float, bias: torch.Tensor):
        b, heads, length, dim = query.shape
        kv = key.shape[1]
        groups = heads // kv
        q = query.reshape(b * kv, groups * length, dim)
        k = key.reshape(b * kv, length, dim)
        v = value.reshape(b * kv, length, dim)
        out = torch.bmm(_probabilities(q, k, bias, scale), v)
        ctx.save_for_backward(q, k, v, out, bias)
        ctx.scale, ctx.shape = scale, (b, heads, length, dim, kv, groups)
        return out.view(b, heads, length, dim)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, bias = ctx.saved_tensors
        b, heads, length, dim, kv, groups = ctx.shape
        p = _probabilities(q, k, bias, ctx.scale)
        grad = grad.reshape(b * kv, groups * length, dim)
        grad_v = torch.bmm(p.transpose(1, 2), grad)
        # dS = P * (dP - rowsum(dO * O)); masked entries have P = 0, so their dS is 0
        delta = (grad.float() * out.float()).sum(-1, keepdim=True).to(p.dtype)
        grad_s = torch.bmm(grad, v.transpose(1, 2)).sub_(delta).mul_(p)
        grad_q = torch.bmm(grad_s, k).mul_(ctx.scale)
        grad_k = torch.bmm(grad_s.transpose(1, 2), q).mul_(ctx.scale)
        return (grad_q.view(b, heads, length, dim), grad_k.view(b, kv, length, dim),
                grad_v.view(b, kv, length, dim), None, None)


def applies(query, key, attention_mask, dropout: float, is_causal) -> bool:
    """Whether this path computes what SDPA would (see the module's docstring)."""
    length = query.shape[2]
    if attention_mask is None:
        if is_causal is False:
            return False
    elif attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (1, 1, length, length):
        return False
    return (not dropout and query.device.type == "cpu" and query.dtype == torch.bfloat16 and key.dtype == query.dtype
            and 1 < length <= MAX_TOKENS and key.shape[2] == length and query.shape[1] % key.shape[1] == 0)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention-function signature; returns (B, T, H, D) and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not applies(query, key, attention_mask, dropout, causal) or kwargs.get("position_bias") is not None \
            or kwargs.get("cache") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bias = attention_bias(attention_mask, query.shape[2], query.shape[1] // key.shape[1], query.dtype, query.device)
    return CausalAttention.apply(query, key, value, scale, bias).transpose(1, 2).contiguous(), None


def register() -> str:
    """Registers the function (and SDPA's mask function beside it) with transformers; its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(NAME, attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
