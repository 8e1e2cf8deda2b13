"""Training precision: bf16 where the hardware multiplies it natively, and the sequence
lengths that keep a CPU's bf16 kernels cached."""

from __future__ import annotations


def use_bf16(setting: str) -> bool:
    """bf16: 'auto' means on CUDA with bf16, and on CPUs that multiply bf16 natively (AMX or
    AVX-512 BF16), where a frozen bf16 base trains 2x+ faster per sequence than fp32 in half the
    activation memory (bench/training.py)."""
    import torch

    if setting != "auto":
        return setting == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16()


def pad_multiple(cfg) -> int | None:
    """Sequence lengths rounded up to a multiple of 64 when a CPU trains in bf16: oneDNN builds
    (JIT) and caches a bf16 kernel per matrix shape, so every new length cost time and kept
    memory (the demo's SFT grew by about 200 MB a step); rounded lengths repeat. None elsewhere."""
    import torch

    return 64 if not torch.cuda.is_available() and use_bf16(cfg.train_precision) else None


def cpu_bf16() -> bool:
    """Whether this CPU has AMX tiles or AVX-512 BF16: bf16 matrix products in hardware (on this
    project's CPU, with AMX, 7.5x the fp32 rate)."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)
