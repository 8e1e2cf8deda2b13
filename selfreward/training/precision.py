"""Training precision: the sequence lengths that keep a CPU's bf16 kernels cached. Whether to use
bf16 at all (use_bf16) is selfreward.backends.models', as generation asks it too."""

from __future__ import annotations

from selfreward.backends.models import use_bf16


def pad_multiple(cfg) -> int | None:
    """Sequence lengths rounded up to a multiple of 64 when a CPU trains in bf16: oneDNN builds
    (JIT) and caches a bf16 kernel per matrix shape, so every new length cost time and kept
    memory (the demo's SFT grew by about 200 MB a step); rounded lengths repeat. None elsewhere."""
    import torch

    return 64 if not torch.cuda.is_available() and use_bf16(cfg.train_precision) else None
