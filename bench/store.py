"""Store writes: judgments per second into a real run.db, as ratios against a bare
SQLite table of the same columns measured in the same run.

    .venv/bin/python bench/store.py              # a paper-scale round: 4,000 prompts x 4 candidates x 3 judgments
    .venv/bin/python bench/store.py --quick      # 400 prompts
    .venv/bin/python bench/store.py --json out.json

A judging stage commits all of a round's judgments in one transaction, with the
full-text index (FTS5 over rationale and raw, kept by triggers), the append-only
triggers and the indexes of the real schema. The baseline inserts the same rows
into a table with the same columns and none of those. Rows look like the demo's:
a rationale of about 300 characters and a raw output of about 400.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("the response answers the question directly and accurately but misses one detail a user would "
         "need it is well organised clear and written from an assistant's perspective so it earns points "
         "for relevance usefulness and clarity while the missing example costs the last point").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def rows(n_prompts: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    rng = random.Random(seed)
    prompts = [{"id": i + 1, "round": 2, "text": text(rng, 20), "source": "self_instruct:M1",
                "created_at": "2026-11-22T00:00:00+00:00"} for i in range(n_prompts)]
    cands = [{"id": 4 * i + j + 1, "round": 2, "prompt_id": p["id"], "idx": j,
              "text": text(rng, 60), "n_tokens": 90, "finish_reason": "stop", "model": "M1"}
             for i, p in enumerate(prompts) for j in range(4)]
    judgments = [{"round": 2, "candidate_id": c["id"], "sample": k, "judge": "self:M1",
                  "score": float(rng.randint(0, 5)), "reason": None, "rationale": text(rng, 50),
                  "raw": text(rng, 60) + " Score: 3", "n_tokens": 80, "template_sha": "abc",
                  "created_at": "2026-11-22T00:00:00+00:00", "judge_model_sha": "f" * 16,
                  "sampling": json.dumps({"temperature": 0.7, "top_p": 0.9, "seed": k}), "version": "0.1.0",
                  "retries": 0, "finish_reason": "stop"} for c in cands for k in range(3)]
    return prompts, cands, judgments


def real_store(folder: Path, prompts, cands, judgments) -> float:
    """Seconds to commit the judgments as the judging stage does, into a real run."""
    from selfreward.config import resolve
    from selfreward.core.store import Run

    run = Run.create(folder / "run", resolve({}, {"preset": "tiny"}))
    with run.db.atomic():
        run.db["prompts"].insert_all(prompts)
        run.db["candidates"].insert_all(cands)
    t0 = time.perf_counter()
    with run.stage(2, "judge") as commit:
        commit.insert_all("judgments", judgments)
    seconds = time.perf_counter() - t0
    assert run.db["judgments"].count == len(judgments)
    assert run.db.execute("select count(*) from judgments_fts where judgments_fts match 'missing'").fetchone()[0]
    run.close()
    return seconds


def bare_table(folder: Path, judgments) -> float:
    conn = sqlite3.connect(folder / "bare.db")
    conn.execute("PRAGMA journal_mode = WAL")
    cols = list(judgments[0])
    conn.execute(f"create table judgments (id integer primary key, {', '.join(cols)})")
    t0 = time.perf_counter()
    with conn:
        conn.executemany(f"insert into judgments ({', '.join(cols)}) values ({', '.join('?' * len(cols))})",
                         [tuple(j[c] for c in cols) for j in judgments])
    seconds = time.perf_counter() - t0
    conn.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="400 prompts instead of 4,000")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    n = 400 if args.quick else 4000
    prompts, cands, judgments = rows(n)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        bare = bare_table(Path(tmp), judgments)
        real = real_store(Path(tmp), prompts, cands, judgments)
    result = {"judgments": len(judgments), "bare_s": bare, "run_db_s": real,
              "bare_per_s": len(judgments) / bare, "run_db_per_s": len(judgments) / real}
    print(f"store writes: {len(judgments):,} judgments ({n:,} prompts x 4 candidates x 3 samples) in one "
          f"transaction\n")
    print(f"{'target':34} {'seconds':>8} {'judgments/s':>12} {'ratio':>6}")
    print(f"{'bare table (baseline)':34} {bare:8.2f} {result['bare_per_s']:12,.0f} {1.0:6.2f}")
    print(f"{'run.db: FTS5 + triggers + indexes':34} {real:8.2f} {result['run_db_per_s']:12,.0f} "
          f"{result['run_db_per_s'] / result['bare_per_s']:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
