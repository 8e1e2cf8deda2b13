"""TRL's fused LM head (trl.kernels.chunked_logprob) without its waste on CPU.

TRL scores the LM head in vocabulary tiles of up to 32768 logits per token, and off Triton
devices its torch fallback handles each tile as whole tensors:

- it scores every position (so that a compiler sees the same tile shapes each batch), where
  only the labelled ones count; `compact` has it score only those, as on Triton devices;
- it multiplies each tile by the logit scale and by 1 / temperature even when both are 1, and
  its backward builds the gradient in six more passes (a zero tensor, a one-hot of the
  targets, products, sums): on a DPO pair's 130 completion tokens each pass is a 17 MB fp32
  tensor. `backward_tile` writes the same gradient, -g * p plus g at the target, in three;
- it adds the gradient's product with the head's weight into an fp32 accumulator through
  copies of both factors to fp32 and an fp32 product; `addmm_fp32` uses two bf16 products.

Each falls back to TRL's own code wherever its case is not the plain one.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import partial

import torch


def addmm_fp32(acc, a, b, fallback):
    """acc += a @ b for an fp32 acc and bf16 a, b on CPU: the bf16 product plus its rounding
    error (an addmm of the same product minus the rounded one, which oneDNN accumulates in fp32
    before it rounds), added in fp32. Within 3e-6 of the fp32 product, in half the time of
    TRL's fp32 copies and product. Anything else goes to `fallback`, TRL's own."""
    if acc.device.type != "cpu" or acc.dtype != torch.float32 or a.dtype != torch.bfloat16 or b.dtype != a.dtype:
        return fallback(acc, a, b)
    high = a @ b
    acc.add_(high).add_(torch.addmm(high, a, b, beta=-1))


def transform(z, logit_scale, softcap, inv_t, HAS_SOFTCAP, fallback):  # noqa: N803 (TRL's names)
    """TRL's logit transform; the identity when there is nothing to scale or cap."""
    if not HAS_SOFTCAP and logit_scale == 1 and inv_t == 1:
        return z
    return fallback(z, logit_scale, softcap, inv_t, HAS_SOFTCAP)


def backward_tile(tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols,
                  logit_scale, softcap, inv_t, HAS_SOFTCAP, HAS_LOGPROB_GRAD, HAS_ENTROPY_GRAD,  # noqa: N803
                  BLOCK_SIZE, fallback):  # noqa: N803
    """TRL's `_backward_tile` (the tile's logits turned into their gradient, in place) for the
    plain case, a log-probability gradient g only: g * (1[j = target] - p_j)."""
    if HAS_SOFTCAP or HAS_ENTROPY_GRAD or not HAS_LOGPROB_GRAD or logit_scale != 1 or inv_t != 1:
        return fallback(tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start,
                        n_cols, logit_scale, softcap, inv_t, HAS_SOFTCAP=HAS_SOFTCAP,
                        HAS_LOGPROB_GRAD=HAS_LOGPROB_GRAD, HAS_ENTROPY_GRAD=HAS_ENTROPY_GRAD, BLOCK_SIZE=BLOCK_SIZE)
    grad = tile.float().sub_(log_z.unsqueeze(-1)).exp_().mul_(-grad_logprobs.unsqueeze(-1))
    local = targets - vocab_start
    rows = ((local >= 0) & (local < n_cols)).nonzero().squeeze(-1)
    grad[rows, local[rows]] += grad_logprobs[rows]
    tile.copy_(grad)


@contextmanager
def lean_head(compact: bool = True):
    """While the block runs, on CPU: TRL's fused head scores labelled positions only (`compact`)
    and its torch fallback takes this module's functions."""
    import trl.trainer.utils as trl_utils

    kernel = sys.modules.get("trl.kernels.chunked_logprob")
    saved = []
    if compact and callable(getattr(trl_utils, "_use_triton", None)):
        triton = trl_utils._use_triton
        saved.append((trl_utils, "_use_triton", triton))
        trl_utils._use_triton = lambda device: device.type == "cpu" or triton(device)
    for name, lean in (("_addmm_fp32", addmm_fp32), ("_torch_transform", transform), ("_backward_tile", backward_tile)):
        original = getattr(kernel, name, None)
        if callable(original):
            saved.append((kernel, name, original))
            setattr(kernel, name, partial(lean, fallback=original))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
