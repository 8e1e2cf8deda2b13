"""The ray engine against the vllm engine, and both against bare vLLM, measured in one run on
the embedded SmolLM2-135M-Instruct.

    .venv/bin/python bench/ray_engine.py                 # make bench's sizes (about 8 minutes on 2 CPU cores)
    .venv/bin/python bench/ray_engine.py --quick         # smoke sizes: checks that everything runs
    .venv/bin/python bench/ray_engine.py --json ray.json

Rows (progress to stderr, the table to stdout), each block against the vllm engine:
- generation: the engine sizes of bench/engines.py (--medium: 16 prompts x 4 samples, 64 new
  tokens); judging: 12 held-out EFT answers x 2 samples with the additive prompt, 128 tokens.
- vllm engine: one long-lived server, warmed up, then one generate call per block (baseline).
- bare vLLM: `vllm.LLM(...).chat` in a subprocess with the server's own settings, on the
  same chats (judging: the rendered judge prompts): what the engines could reach.
- ray engine: each call is a Ray Data job that starts its engine replica, so a row is given
  twice: the job's wall time, and net of the replica's start, which a second 4-token job
  measures in the same run (the job start row below; the first also pays one-time imports).
  The target is on the net rate.
- start: the vllm server, the local Ray cluster (once per command) and a job's replica.

Targets: the ray engine's net rate within 15% of the vllm engine's (>= 0.85x), and the vllm
engine's judging at >= 90% of bare vLLM's judgments/s. They are set for make bench's sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, publish, verdict  # noqa: E402  (bench/common.py)
from engines import (MEDIUM, QUICK, bare_vllm, block_lines, log, measure_generation, measure_judging,  # noqa: E402
                     start_lines, versions, warm_up)
from selfreward.backends.engines import Sampling  # noqa: E402
from selfreward.config import SEED_DIR, resolve  # noqa: E402
from selfreward.data import read_eft, read_ift  # noqa: E402
from selfreward.errors import SelfRewardError  # noqa: E402

TARGETS = {"ray_net": 0.85, "vllm_of_bare_judging": 0.90}


def judge_prompts(groups) -> list[list[dict]]:
    """The chats the additive judge sends for these answers (bare vLLM judges the same ones)."""
    from selfreward.backends.judges.llm import LLMJudge

    judge = LLMJudge(None, Sampling(0, 1, 1, 0), mode="additive")
    return [[{"role": "user", "content": judge._render(g, r)}] for g in groups for r in g.responses]


def run(sizes, workdir: Path) -> dict:
    from selfreward.backends.engines.ray_data import RayEngine
    from selfreward.backends.engines.vllm import VLLMEngine
    from selfreward.backends.judges import Group
    from selfreward.backends.models import resolve_source

    model_path = resolve_source("embedded")
    cfg = resolve({}, {"preset": "demo", "engine": "vllm"})
    ift = read_ift(SEED_DIR / "ift_heldout.jsonl") + read_ift(SEED_DIR / "ift_train.jsonl")
    prompts = [[{"role": "user", "content": r["instruction"]}] for r in ift[: sizes.prompts]]
    groups = [Group(r["instruction"], [r["response"]]) for r in read_eft(SEED_DIR / "eft_heldout.jsonl")[: sizes.answers]]
    gen = Sampling(0.7, 0.9, sizes.gen_tokens, 0)
    judging = Sampling(cfg.judge_temperature, cfg.judge_top_p, sizes.judge_tokens, 0)
    n, k = sizes.samples, sizes.judge_samples
    generation, judgments, starts = [], [], []

    log("vllm engine: starting the server")
    engine = VLLMEngine(cfg, model_path, workdir / "vllm", served_name="policy")
    try:
        starts.append({"name": "vllm engine: server start", "seconds": engine.start_s})
        warm_up(engine)
        log(f"vllm engine: generating {len(prompts)} x {n}, judging {len(groups)} x {k}")
        generation.append({"name": "vllm engine", **measure_generation(engine, prompts, n, gen)})
        judgments.append({"name": "vllm engine", **measure_judging(engine, groups, k, judging)})
    finally:
        engine.close()

    log("bare vLLM: generating, then judging, each in a subprocess")
    bare = bare_vllm(cfg, model_path, prompts, n, gen, workdir)
    starts.append({"name": "bare vLLM LLM(...) load (for reference)", "seconds": bare.pop("load_s")})
    generation.append({"name": f"bare vLLM, LLM.chat n={n}", **bare})
    chats = judge_prompts(groups)
    bare = bare_vllm(cfg, model_path, chats, k, judging, workdir)
    bare.pop("load_s")
    judgments.append({"name": f"bare vLLM, LLM.chat n={k}", "count": len(chats) * k, "seconds": bare["seconds"],
                      "errors": 0})

    log("ray engine: starting a local cluster")
    ray_cfg = dataclasses.replace(cfg, engine="ray")
    engine = RayEngine(ray_cfg, model_path, workdir / "ray")
    try:
        starts.append({"name": "ray engine: local cluster start (once per command)", "seconds": engine.start_s})
        warm_up(engine)  # the first job also pays this process's one-time imports (vLLM's, in Ray's processor)
        t0 = time.perf_counter()
        warm_up(engine)  # one 4-token row: what any later job pays before its first row, the replica's start
        job_start = time.perf_counter() - t0
        starts.append({"name": "ray engine: a job's replica start (a 4-token job)", "seconds": job_start})
        log(f"ray engine: generating {len(prompts)} x {n}, judging {len(groups)} x {k}")
        for rows, row in ((generation, measure_generation(engine, prompts, n, gen)),
                          (judgments, measure_judging(engine, groups, k, judging))):
            rows.append({"name": "ray engine, the job's wall time", **row})
            rows.append({"name": "ray engine, net of the replica's start", **row,
                         "seconds": max(row["seconds"] - job_start, 1e-3), "target": TARGETS["ray_net"]})
    finally:
        engine.close()

    for rows in (generation, judgments):
        base = rows[0]["count"] / rows[0]["seconds"]
        for row in rows:
            row["rate"] = row["count"] / row["seconds"]
            row["ratio"] = row["rate"] / base
    vllm_of_bare = judgments[0]["rate"] / judgments[1]["rate"]
    return {"sizes": dataclasses.asdict(sizes), "generation": generation, "judging": judgments, "starts": starts,
            "vllm_of_bare_judging": vllm_of_bare,
            "vllm_of_bare_generation": generation[0]["rate"] / generation[1]["rate"], "targets": TARGETS}


def table(report: dict) -> str:
    s, m, v = report["sizes"], report["machine"], report["versions"]
    quick = "  (--quick: sizes too small for the targets)" if report["quick"] else ""
    lines = [f"selfreward ray engine benchmark, {report['date']}{quick}",
             f"machine: {m['cores']} cores, {m['cpu']}, {m['memory_gib']} GiB{', GPU ' + m['gpu'] if m['gpu'] else ''}"
             f"; load average {m['load_average_at_start']} at start",
             f"versions: ray {report['ray']}, vllm {v['vllm']}, torch {v['torch']}, transformers {v['transformers']}",
             "model: SmolLM2-135M-Instruct (embedded)", ""]

    def block(title, rows, unit, rate_unit):
        lines.extend(block_lines(title, rows, unit, rate_unit))

    block(f"generation: {s['prompts']} prompts x {s['samples']} samples, {s['gen_tokens']} new tokens",
          report["generation"], "tokens", "tokens/s")
    lines.append(f"  vllm engine at {100 * report['vllm_of_bare_generation']:.1f}% of bare vLLM's tokens/s")
    lines.append("")
    block(f"judging: {s['answers']} held-out EFT answers x {s['judge_samples']} samples, additive prompt, "
          f"{s['judge_tokens']} new tokens", report["judging"], "judgments", "judgments/s")
    ok = report["vllm_of_bare_judging"] >= TARGETS["vllm_of_bare_judging"]
    lines.append(f"  vllm engine at {100 * report['vllm_of_bare_judging']:.1f}% of bare vLLM's judgments/s "
                 f"(target >= {100 * TARGETS['vllm_of_bare_judging']:.0f}%: {verdict(ok)})")
    lines.append("")
    lines.extend(start_lines("start", report["starts"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke sizes (bench/engines.py --quick's)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args()
    from engines import version

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks end the servers and the cluster
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "quick": args.quick,
              "machine": machine(), "versions": versions(), "ray": version("ray")}
    workdir = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        report.update(run(QUICK if args.quick else MEDIUM, workdir))
    except SelfRewardError as e:
        sys.exit(f"error: {e}\n(logs kept in {workdir})")
    shutil.rmtree(workdir, ignore_errors=True)
    publish(table(report), report, args.json)


if __name__ == "__main__":
    main()
