"""LoRA dropout that costs less on CPU.

PEFT puts an `nn.Dropout` before every LoRA adapter: seven per decoder layer, each on the
full hidden state. On CPU its mask comes from `bernoulli_`, which draws one random number
per element in a scalar loop; in a LoRA step of SmolLM2-135M that was a fifth of the time
(bench/training.py). `FastDropout` draws 64-bit words with `random_` (a vectorised
generator) and cuts each into four 16-bit lanes, 15 of whose bits decide whether an element
is dropped: p is rounded to a multiple of 1/32768 (0.1 becomes 0.100006), and the same
torch seed gives the same masks. The backward pass reuses the boolean mask it saved.

Only the mask's random stream differs from `nn.Dropout`; the rule is the same inverted
dropout (kept elements scaled by 1 / (1 - p)).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

LANES = 32768  # 15 random bits per element


class _Drop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, drop, scale):
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0).mul_(ctx.scale), None, None


class FastDropout(torch.nn.Module):
    """Inverted dropout whose mask comes from 15-bit lanes of 64-bit random words."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), not {p}")
        self.threshold = round(p * LANES)
        self.p = self.threshold / LANES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
        lanes = words.view(torch.int16)[:n].view(x.shape) & (LANES - 1)
        return _Drop.apply(x, lanes < self.threshold, 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p:.6f}"


@contextmanager
def fast_lora_dropout(model):
    """Every LoRA dropout of `model` (PEFT's `lora_dropout` ModuleDicts of nn.Dropout) swapped
    for FastDropout with the same p while the block runs, then put back."""
    swapped = []
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                drops[name] = FastDropout(drop.p).train(drop.training)
                swapped.append((drops, name, drop))
    try:
        yield len(swapped)
    finally:
        for drops, name, drop in swapped:
            drops[name] = drop
