"""Lean training on CPU, switched on for one training by `lean` (lean_training: yes; auto = off).

One kernel is kept, because it measured at least 1.3x over the best setting that a library
already offers (bench/training.py, docs/training.md "Precision and lean training"): TRL's fused
LM head scoring only the positions that have a label, in leaner torch tiles (lmhead; TRL's own
CPU path scores every position, for compilers that want fixed shapes).

It patches private names of TRL (PATCHED). Where one has moved or its parameters changed, lean
training is off, with the reason logged, and tests/test_lean.py fails: the kernel never falls
back silently to a changed library.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from contextlib import contextmanager

log = logging.getLogger(__name__)

# The private names the kernels patch or call, with the parameters they were written against
# (TRL 1.16).
PATCHED = {
    "trl.kernels.chunked_logprob._use_triton": ["device"],
    "trl.trainer.utils._use_triton": ["device"],
    "trl.kernels.chunked_logprob._addmm_fp32": ["acc", "a", "b"],
    "trl.kernels.chunked_logprob._torch_transform": ["z", "logit_scale", "softcap", "inv_t", "HAS_SOFTCAP"],
    "trl.kernels.chunked_logprob._backward_tile": [
        "tile", "tile_stride", "targets", "log_z", "entropy", "grad_logprobs", "grad_entropy", "vocab_start", "n_cols",
        "logit_scale", "softcap", "inv_t", "HAS_SOFTCAP", "HAS_LOGPROB_GRAD", "HAS_ENTROPY_GRAD", "BLOCK_SIZE"],
}


def _find(path: str):
    """The object a dotted path names (its longest importable module, then attributes), or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name, None)
        return obj
    return None


def unsupported() -> list[str]:
    """Why the installed TRL cannot take the kernel: one line per patched name
    that is gone or whose parameters are not PATCHED's; empty where they can."""
    reasons = []
    for path, params in PATCHED.items():
        obj = _find(path)
        if not callable(obj):
            reasons.append(f"{path} is gone")
            continue
        found = list(inspect.signature(obj).parameters)
        if found != params:
            reasons.append(f"{path} takes ({', '.join(found)}), not ({', '.join(params)})")
    return reasons


@contextmanager
def lean(trainer, cfg):
    """While `trainer` trains on CPU with cfg.lean_training 'yes', TRL's fused LM head scores
    labelled positions only, in leaner tiles (selfreward.training.cpu.lmhead). 'auto' is off:
    over a bf16 base the kernel trained NaN weights on two sets of the tiny test model's pairs
    (docs/training.md), so it runs only where a user asks for it."""
    import torch

    from selfreward.training.cpu.lmhead import lean_head

    if cfg.lean_training != "yes" or torch.cuda.is_available():
        yield
        return
    reasons = unsupported()
    if reasons:
        log.warning("lean training off: the kernel was written against TRL 1.16; here %s", "; ".join(reasons))
        yield
        return
    with lean_head():
        yield
