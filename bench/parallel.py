"""One node, several copies of the model: vLLM's own data parallelism (one server,
its internal load balancing) against `vllm_replicas` (N servers behind the openai
engine's pool), each as a ratio to one server measured in the same run, on the
embedded SmolLM2-135M-Instruct (issue 22, item 2).

    .venv/bin/python bench/parallel.py                     # 2 copies each (a few minutes on 2 CPU cores)
    .venv/bin/python bench/parallel.py --copies 4 --json parallel.json

Each layout serves 16 IFT seed prompts x 4 samples, 64 new tokens, T 0.7, top-p
0.9, through the vllm engine as the loop uses it, after a warm-up request; its
start is timed too. A layout that does not start is reported with its error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import machine  # noqa: E402  (bench/common.py)
from selfreward.backends.engines import Sampling  # noqa: E402
from selfreward.config import SEED_DIR, resolve  # noqa: E402
from selfreward.data import read_ift  # noqa: E402
from selfreward.errors import SelfRewardError  # noqa: E402

WARM_UP = [{"role": "user", "content": "Say hello."}]


def layouts(copies: int) -> list[tuple[str, dict]]:
    return [("one server", {}),
            (f"vllm_replicas={copies} (our pool)", {"vllm_replicas": copies}),
            (f"vllm_data_parallel_size={copies} (vLLM's own)", {"vllm_data_parallel_size": copies})]


def measure(name: str, settings: dict, model_path: str, prompts: list, sampling: Sampling) -> dict:
    from selfreward.backends.engines.vllm import VLLMEngine

    cfg = resolve({}, {"preset": "demo", "engine": "vllm", **settings})
    print(f"{name}: starting", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        engine = VLLMEngine.from_config(cfg, model_path, Path(tempfile.mkdtemp(prefix="bench-parallel-")))
    except SelfRewardError as e:
        return {"name": name, "settings": settings, "error": str(e)}
    start_s = time.perf_counter() - t0
    try:
        engine.generate([WARM_UP], 1, Sampling(0.7, 0.9, 4, 0), desc="warm-up")
        t0 = time.perf_counter()
        out = engine.generate(prompts, 4, sampling, desc=name)
        seconds = time.perf_counter() - t0
    finally:
        engine.close()
    completions = [c for row in out for c in row]
    tokens = sum(c.n_tokens or 0 for c in completions)
    return {"name": name, "settings": settings, "start_s": start_s, "tokens": tokens, "seconds": seconds,
            "rate": tokens / seconds, "errors": sum(c.error is not None for c in completions)}


def main() -> None:
    from selfreward.backends.models import resolve_source

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2, help="copies of the model in each parallel layout")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    ift = read_ift(SEED_DIR / "ift_heldout.jsonl") + read_ift(SEED_DIR / "ift_train.jsonl")
    prompts = [[{"role": "user", "content": r["instruction"]}] for r in ift[:16]]
    sampling = Sampling(0.7, 0.9, 64, 0)
    model_path = resolve_source("embedded")
    rows = [measure(name, settings, model_path, prompts, sampling) for name, settings in layouts(args.copies)]
    base = rows[0].get("rate")
    m = machine()
    print(f"one node, {args.copies} copies; {m['cores']} cores ({m['usable_cores']} usable), {m['cpu']}, "
          f"load average {m['load_average_at_start']} at start")
    print(f"generation: {len(prompts)} prompts x 4 samples, 64 new tokens, T 0.7, top-p 0.9")
    print(f"  {'layout':<46}{'start s':>9}{'tokens/s':>10}{'ratio':>8}")
    for r in rows:
        if "error" in r:
            print(f"  {r['name']:<46} did not start: {r['error']}")
            continue
        r["ratio"] = r["rate"] / base if base else None
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        print(f"  {r['name']:<46}{r['start_s']:>9.1f}{r['rate']:>10.1f}{ratio:>8}"
              f"{'  ' + str(r['errors']) + ' errors' if r['errors'] else ''}")
    if args.json:
        args.json.write_text(json.dumps({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="minutes"), "command": " ".join(["bench/parallel.py", *sys.argv[1:]]), "machine": m,
            "copies": args.copies, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
