"""The crash test: SIGKILL `selfreward iterate` at named points spread over every
stage, rerun it, and compare the run with an uninterrupted one of the same seed.

The kill is real: the process sends itself SIGKILL at the point (see
selfreward/failpoints.py), so no cleanup code, finally block or atexit
handler runs, exactly as with `kill -9` from outside. Used by tests/test_chaos.py
(a few points, in CI) and bench/chaos.py (all 20).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import sqlite_utils

# Two rounds at the tiny preset: eval M0, SFT, eval M1; self-instruct, candidates, judge, pairs, DPO, eval M2.
POINTS = [
    "r1:eval_M0:start", "r1:eval_M0:generated#1", "r1:eval_M0:mid-commit",
    "r1:sft:step#1", "r1:sft:merge", "r1:sft:mid-commit",
    "r1:eval_M1:generated#1", "r1:finish",
    "r2:self_instruct:generated#1", "r2:self_instruct:mid-commit",
    "r2:candidates:generated#1", "r2:candidates:mid-commit",
    "r2:judge:generated#2", "r2:judge:mid-commit",
    "r2:pairs:mid-commit",
    "r2:dpo:step#1", "r2:dpo:merge", "r2:dpo:mid-commit",
    "r2:eval_M2:generated#2", "r2:finish",
]
# What CI runs: one of each kind (mid-generation, mid-SFT, mid-merge, mid-judging, mid-commit, mid-DPO).
CI_POINTS = ["r1:eval_M0:generated#1", "r1:sft:merge", "r2:judge:generated#2", "r2:judge:mid-commit",
             "r2:dpo:step#1"]

JUDGE_OUTPUTS = ["Relevant and complete.\nScore: 4", "Partly relevant.\nScore: 1", "I cannot decide.",
                 "Mostly there.\nScore: 3", "Score: 7", "Good answer.\nScore: 5"]


def write_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ift = [{"instruction": f"Explain how a {w} works in three short sentences", "response": f"A {w} works well."}
           for w in ("pump", "lever", "kettle", "bicycle", "compass", "sundial")]
    eft = [{"instruction": f"Name one use of {w}", "response": f"{w} is used for things.",
            "justification": "The response is relevant but vague, earning one point.", "score": s}
           for s, w in enumerate(("salt", "sand", "steam", "copper", "glass", "rubber"))]
    paths = {"ift": folder / "ift.jsonl", "eft": folder / "eft.jsonl", "judge": folder / "judge.json"}
    paths["ift"].write_text("".join(json.dumps(r) + "\n" for r in ift))
    paths["eft"].write_text("".join(json.dumps(r) + "\n" for r in eft))
    paths["judge"].write_text(json.dumps(JUDGE_OUTPUTS))
    return paths


def command(runs: Path, name: str, model: Path, inputs: dict[str, Path]) -> list[str]:
    # gen_batch_size 1: generation is checkpointed in chunks of 4 prompts, so a stage has points inside it.
    return [sys.executable, "-m", "selfreward", "iterate", "--runs-dir", str(runs), "--name", name,
            "--model", str(model), "--ift", str(inputs["ift"]), "--eft", str(inputs["eft"]),
            "--eft-eval", str(inputs["eft"]), "--preset", "tiny", "--engine", "transformers",
            "--judge", "scripted", "--judge-script", str(inputs["judge"]), "--rounds", "2",
            "--set", "prompts_per_round=3", "--set", "n_candidates=3", "--set", "gen_batch_size=1",
            "--set", "eval_eft_size=6"]


def iterate(cmd: list[str], kill_at: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SELFREWARD_KILL_AT"}
    if kill_at:
        env["SELFREWARD_KILL_AT"] = kill_at
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


# Columns that say what the run decided; timestamps, wall times and memory peaks differ run to run.
SNAPSHOT = {
    "prompts": "id, round, text, source",
    "candidates": "id, round, prompt_id, idx, text, n_tokens, finish_reason, model, error",
    "judgments": "id, round, candidate_id, sample, judge, score, reason, rationale, raw, template_sha, "
                 "judge_model_sha, sampling, finish_reason",
    "pairs": "id, round, prompt_id, status, chosen_id, rejected_id, chosen_score, rejected_score, rule",
    "models": "name, round, kind, parent, path, adapter_path, sha256",
    "training_steps": "round, kind, step, round(loss, 5)",
    "eft_eval": "round, model, example, gold_score, score, reason, raw",
    "metrics": "round, model, name, round(value, 6)",
    "stages": "round, stage",
    "rounds": "round, model_in, model_out, finished_at is not null",
}


def snapshot(run_dir: Path) -> dict[str, list[tuple]]:
    db = sqlite_utils.Database(run_dir / "run.db")
    out = {table: sorted((tuple(r) for r in db.execute(f"select {cols} from {table}")), key=repr)
           for table, cols in SNAPSHOT.items()}
    db.close()
    return out


def leftovers(run_dir: Path) -> list[str]:
    """Scratch a finished run must not keep: training work folders, half-merged models, pid files."""
    found = [p for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".work", ".creating", ".merging", ".pid"))]
    found += [p for p in run_dir.parent.glob("*.creating")]
    return sorted(str(p.relative_to(run_dir.parent)) for p in found)


def diff(expected: dict, actual: dict) -> list[str]:
    problems = []
    for table, rows in expected.items():
        got = actual[table]
        if rows != got:
            lost = [r for r in rows if r not in got]
            extra = [r for r in got if r not in rows]
            problems.append(f"{table}: {len(rows)} rows expected, {len(got)} found; "
                            f"{len(lost)} lost or changed, {len(extra)} duplicated or new"
                            + (f"; first lost: {str(lost[0])[:200]}" if lost else "")
                            + (f"; first new: {str(extra[0])[:200]}" if extra else ""))
    return problems


def kill_and_resume(point: str, workdir: Path, model: Path, inputs: dict, baseline: dict) -> list[str]:
    """Kill at `point`, rerun, and return every problem found (empty: the run healed exactly)."""
    runs, name = workdir / "runs", "k"
    cmd = command(runs, name, model, inputs)
    killed = iterate(cmd, kill_at=point)
    if killed.returncode != -signal.SIGKILL:
        return [f"{point}: expected a SIGKILL, got exit {killed.returncode} (point never reached?): "
                f"{killed.stderr[-500:]}"]
    rerun = iterate(cmd)
    if rerun.returncode != 0:
        return [f"{point}: the rerun failed (exit {rerun.returncode}): {rerun.stderr[-1500:]}"]
    problems = [f"{point}: {p}" for p in diff(baseline, snapshot(runs / name))]
    verify = subprocess.run([sys.executable, "-m", "selfreward", "verify", str(runs / name)],
                            capture_output=True, text=True, timeout=120)
    if verify.returncode != 0:
        problems.append(f"{point}: verify failed: {verify.stdout[-500:]}")
    problems += [f"{point}: left behind: {p}" for p in leftovers(runs / name)]
    return problems


def baseline_run(workdir: Path, model: Path, inputs: dict) -> dict:
    runs = workdir / "runs"
    done = iterate(command(runs, "base", model, inputs))
    assert done.returncode == 0, done.stderr[-2000:]
    return snapshot(runs / "base")
