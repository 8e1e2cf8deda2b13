"""LoRA adapters that cost less on CPU: their dropout, and how their output is added.

PEFT puts an `nn.Dropout` before every LoRA adapter: seven per decoder layer, each on the
full hidden state. On CPU its mask comes from `bernoulli_`, which draws one random number
per element in a scalar loop; in a LoRA step of SmolLM2-135M that was a fifth of the time
(bench/training.py). `FastDropout` draws 64-bit words with `random_` (a vectorised
generator) and cuts each into four 16-bit lanes, 15 of whose bits decide whether an element
is dropped: p is rounded to a multiple of 1/32768 (0.1 becomes 0.100006), and the same
torch seed gives the same masks. The mask is made as a bf16 tensor of 0s and 1s by integer
arithmetic on the lanes (the bit pattern of 1.0 where an element is kept), and applied as a
product, forward and backward: on CPU a comparison to a boolean tensor and `masked_fill`
were each several times slower than a vectorised product.

Only the mask's random stream differs from `nn.Dropout`; the rule is the same inverted
dropout (kept elements scaled by 1 / (1 - p)).

`lean_lora` also gives each plain LoRA layer (one adapter, not merged, no DoRA) a forward that
adds the adapter's product into the base layer's output in one `addmm_`: PEFT's
`result + lora_B(lora_A(dropout(x))) * scaling` passes over the full output twice more (the
scaling, then the sum) and over the input once more (dropout's 1 / (1 - p)); here both scales
are folded into the rank-r product. The arithmetic is the same up to where bf16 rounds.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

LANES = 32768  # 15 random bits per element
BF16_ONE = 0x3F80  # the bits of 1.0 in bf16


class _Drop(torch.autograd.Function):
    """x times `keep` (0 where dropped, 1 elsewhere), scaled (no pass for a scale of 1); the
    gradient likewise, in x's dtype."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale, ctx.dtype = scale, x.dtype
        out = torch.mul(x, keep).to(x.dtype)
        return out if scale == 1 else out.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        grad = torch.mul(grad, keep).to(ctx.dtype)
        return (grad if ctx.scale == 1 else grad.mul_(ctx.scale)), None, None


class FastDropout(torch.nn.Module):
    """Inverted dropout whose mask comes from 15-bit lanes of 64-bit random words."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), not {p}")
        self.threshold = round(p * LANES)
        self.p = self.threshold / LANES

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh bf16 mask of x's shape: 0 where an element is dropped (with probability p), 1
        elsewhere. Only 15 bits of a lane are used: random_ leaves a 64-bit word's sign bit 0."""
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
        lanes = words.view(torch.int16)[:n] & (LANES - 1)
        dropped = lanes.sub_(self.threshold).bitwise_right_shift_(15)  # -1 below the threshold, else 0
        return dropped.bitwise_not_().bitwise_and_(BF16_ONE).view(torch.bfloat16).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        return _Drop.apply(x, self.keep(x), 1.0 / (1.0 - self.p))

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


def _adapter(layer) -> str | None:
    """The one plain adapter `layer` (a PEFT LoRA Linear) runs unmerged, or None."""
    active = layer.active_adapters
    if len(active) != 1 or layer.disable_adapters or layer.merged:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or layer.lora_B[name].bias is not None:
        return None
    return name


def lean_forward(layer, original, x, *args, **kwargs):
    """A PEFT LoRA Linear's forward: base(x) + scaling * B(A(dropout(x))), the adapter's product
    added into the base output in place, dropout's and LoRA's scales applied to it; anything
    but the plain case goes to PEFT's own forward (`original`)."""
    name = None if args or kwargs else _adapter(layer)
    drop = layer.lora_dropout[name] if name else None
    scale = layer.scaling[name] if name else 1.0
    drops = isinstance(drop, FastDropout) and drop.training and drop.threshold > 0
    inert = isinstance(drop, (FastDropout, torch.nn.Identity)) or (isinstance(drop, torch.nn.Dropout)
                                                                   and (drop.p == 0 or not drop.training))
    if not (drops or inert):
        return original(x, *args, **kwargs)
    result = layer.base_layer(x)
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    x = layer._cast_input_dtype(x, lora_a.weight.dtype)
    if drops:  # dropout's 1 / (1 - p) goes into the rank-r product's scale
        x = _Drop.apply(x, drop.keep(x), 1.0)
        scale = scale / (1.0 - drop.p)
    low = lora_a(x)
    dtype = result.dtype
    result.view(-1, result.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]).to(dtype), lora_b.weight.to(dtype).t(),
                                             alpha=scale)
    return result


@contextmanager
def lean_lora(model):
    """fast_lora_dropout, and every PEFT LoRA Linear of `model` on lean_forward, while the block
    runs; then put back."""
    from functools import partial

    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear) and "forward" not in m.__dict__]
    with fast_lora_dropout(model) as swapped:
        for layer in layers:
            layer.forward = partial(lean_forward, layer, layer.forward)
        try:
            yield swapped
        finally:
            for layer in layers:
                del layer.forward
