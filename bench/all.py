"""`make bench`: every benchmark in bench/, one after the other, then one table of
ratios, each against a baseline measured in the same run.

    .venv/bin/python bench/all.py                      # make bench's sizes (about 25 minutes on 2 CPU cores)
    .venv/bin/python bench/all.py --quick              # smoke sizes: checks that everything runs
    .venv/bin/python bench/all.py --json bench.json --only training,store

A run at full sizes also writes its record to bench/results/<date>-bench.json (the
printed rows and every part's results), which bench/plan.py and docs/benchmarks.md
read; --results DIR writes it elsewhere (a --quick run writes one only then).

Parts (each is also a script of its own, with its full sizes and its own table):
- engines   bench/engines.py --medium --skip-bare: generation and judging per engine,
            against the transformers engine.
- ray       bench/ray_engine.py: the ray engine (its jobs' wall time, and net of each job's
            replica start) and bare vLLM against the vllm engine, generation and judging.
- training  bench/training.py: SFT and DPO seconds per sequence and peak memory for
            LoRA fp32 (the baseline: the settings before the performance work), a
            bf16 base with lean training (today's CPU default) and QLoRA (nf4),
            16 examples each.
- dedupe    bench/dedupe.py: self-instruct's ROUGE-L dedupe against a 20,000 pool,
            the indexed pool against the brute-force rule.
- store     bench/store.py: judgments per second committed into run.db (FTS5,
            triggers) against a bare table.

Each part runs in its own process; a part that fails is reported and the others
still run. The exit status is 1 if any part failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# fp32 seed 1 beside fp32 seed 0: the noise that the other variants' losses are compared with.
TRAINING_VARIANTS = ("sft-fp32-mb1,sft-fp32-seed1,sft-bf16-lean,sft-qlora-mb1,"
                     "dpo-fp32-mb1,dpo-fp32-seed1,dpo-bf16-lean,dpo-qlora-mb1")


def commands(quick: bool, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "engines": [py, str(HERE / "engines.py"), "--quick" if quick else "--medium", "--skip-bare",
                    "--json", str(out / "engines.json")],
        "ray": [py, str(HERE / "ray_engine.py"), *(["--quick"] if quick else []), "--json", str(out / "ray.json")],
        "training": [py, str(HERE / "training.py"), "--examples", "8" if quick else "16",
                     "--variants", TRAINING_VARIANTS, "--json", str(out / "training.json")],
        "dedupe": [py, str(HERE / "dedupe.py"), *(["--quick"] if quick else []), "--json", str(out / "dedupe.json")],
        "store": [py, str(HERE / "store.py"), *(["--quick"] if quick else []), "--json", str(out / "store.json")],
    }


def rows_engines(r: dict) -> list[tuple]:
    out = []
    for block, unit in (("generation", "tokens/s"), ("judging", "judgments/s")):
        for row in r[block]:
            out.append((f"{block}: {row['name']}", row["rate"], unit, row["ratio"]))
    return out


def rows_training(r: dict) -> list[tuple]:
    out = []
    for stage in ("sft", "dpo"):
        rows = [x for x in r["results"] if x["stage"] == stage]
        if not rows:
            continue
        base = rows[0]
        for x in rows:
            out.append((f"{x['variant']}: s per sequence", x["s_per_seq"], "s", x["speed_x"]))
            out.append((f"{x['variant']}: peak training memory", x["train_peak_mib"], "MiB",
                        x["train_peak_mib"] / base["train_peak_mib"]))
            if x.get("exact") and base.get("exact"):
                out.append((f"{x['variant']}: DPO loss after, in fp32", x["exact"]["loss"], "nats",
                            x["exact"]["loss"] / base["exact"]["loss"]))
    return out


def rows_dedupe(r: dict) -> list[tuple]:
    first, fast_all = r["dedupe"][0], r["dedupe"][-1]
    b = r["build"]
    return [(f"dedupe {r['sizes']['new']} new vs a {r['sizes']['pool']:,} pool: brute force", first["ms_per"],
             "ms/instr", 1.0),
            (f"dedupe {r['sizes']['new']} new vs a {r['sizes']['pool']:,} pool: DedupePool", fast_all["ms_per"],
             "ms/instr", first["ms_per"] / fast_all["ms_per"]),
            (f"build a {b['count']:,} pool (target <= {b['target_s']:g} s)", b["seconds"], "s",
             b["brute_lower_bound_s"] / b["seconds"]),
            ("kept sets agree with brute force", float(r["agree"]), "bool", None)]


def rows_store(r: dict) -> list[tuple]:
    return [(f"{r['judgments']:,} judgments into a bare table", r["bare_per_s"], "judgments/s", 1.0),
            (f"{r['judgments']:,} judgments into run.db (FTS5, triggers)", r["run_db_per_s"], "judgments/s",
             r["run_db_per_s"] / r["bare_per_s"])]


# bench/ray_engine.py's rows have the engines part's shape (generation and judging blocks, ratio per row).
READERS = {"engines": rows_engines, "ray": rows_engines, "training": rows_training, "dedupe": rows_dedupe,
           "store": rows_store}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke sizes for every part")
    ap.add_argument("--only", help="comma list of parts: " + ", ".join(READERS))
    ap.add_argument("--json", type=Path, help="also write every part's results here")
    ap.add_argument("--results", type=Path, metavar="DIR",
                    help="folder for this run's dated record (default bench/results/; --quick: none unless given)")
    args = ap.parse_args()
    parts = [p.strip() for p in (args.only or ",".join(READERS)).split(",") if p.strip()]
    unknown = [p for p in parts if p not in READERS]
    if unknown:
        sys.exit(f"error: unknown part {', '.join(unknown)}; choose from {', '.join(READERS)}")
    out = Path(tempfile.mkdtemp(prefix="bench-all-"))
    results, failed, walls = {}, [], {}
    for name in parts:
        cmd = commands(args.quick, out)[name]
        print(f"== {name}: {' '.join(Path(c).name if c.startswith('/') else c for c in cmd[1:])}", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress and errors go to our stderr
        walls[name] = time.perf_counter() - t0
        if proc.returncode != 0:
            failed.append(name)
            continue
        print(proc.stdout, file=sys.stderr)  # each part's own table, for the record
        results[name] = json.loads((out / f"{name}.json").read_text())
    started = datetime.datetime.now().astimezone()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    print(f"selfreward benchmarks, {started.isoformat(timespec='minutes')}{' (--quick)' if args.quick else ''}: "
          f"{machine}")
    print(f"\n{'part':9} {'measurement':62} {'value':>11} {'unit':12} {'ratio':>8}")
    rows = []
    for name in parts:
        if name not in results:
            print(f"{name:9} FAILED (see its output above)")
            continue
        for label, value, unit, ratio in READERS[name](results[name]):
            rows.append({"part": name, "measurement": label, "value": bool(value) if unit == "bool" else value,
                         "unit": unit, "ratio": ratio})
            shown = ("yes" if value else "NO") if unit == "bool" else f"{value:11.4f}" if unit == "nats" \
                else f"{value:11.2f}"
            print(f"{name:9} {label[:62]:62} {shown:>11} {'' if unit == 'bool' else unit:12} "
                  f"{'' if ratio is None else f'{ratio:7.2f}x':>8}")
    print("\nratio: against the first row of its block, measured in this run (for memory and loss, above 1 is "
          "more; for everything else, above 1 is better); a training speed against the mean of the fp32 runs "
          "(seeds 0 and 1, the same work). Wall time per part: "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in walls.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    folder = args.results or (None if args.quick else HERE / "results")
    if folder is not None and results:
        folder.mkdir(parents=True, exist_ok=True)
        record = {"date": started.isoformat(timespec="minutes"), "command": " ".join(["bench/all.py", *sys.argv[1:]]),
                  "quick": args.quick, "machine": machine, "failed": failed,
                  "wall_s": {k: round(v, 1) for k, v in walls.items()}, "rows": rows, "parts": results}
        path = folder / f"{started.strftime('%Y-%m-%dT%H-%M')}-bench.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
