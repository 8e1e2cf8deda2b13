"""The benchmark runner works end to end at smoke sizes (the parts that need no model)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runner_prints_one_table_of_ratios(tmp_path):
    out = tmp_path / "bench.json"
    records = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "all.py"), "--quick", "--only", "dedupe,store",
                           "--json", str(out), "--results", str(records)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("dedupe") and "DedupePool" in line and line.rstrip().endswith("x") for line in lines)
    assert any(line.startswith("store") and "run.db" in line for line in lines)
    assert "kept sets agree with brute force" in proc.stdout and " NO " not in proc.stdout
    results = json.loads(out.read_text())
    assert results["dedupe"]["agree"] is True
    assert results["store"]["judgments"] == 4800 and results["store"]["run_db_per_s"] > 0
    # The dated record: the printed rows and the parts' results, in the shape bench/plan.py reads.
    (record_path,) = records.glob("*-bench.json")
    record = json.loads(record_path.read_text())
    assert record["quick"] is True and record["failed"] == [] and record["parts"] == results
    assert record_path.name.startswith(record["date"][:13].replace(":", "-"))
    assert {(r["part"], r["unit"]) for r in record["rows"]} >= {("store", "judgments/s"), ("dedupe", "bool")}
    assert next(r for r in record["rows"] if r["unit"] == "bool")["value"] is True


def test_bench_runner_refuses_an_unknown_part():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "all.py"), "--only", "nope"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "unknown part nope" in proc.stderr


def test_training_speed_is_against_the_mean_of_the_baseline_and_its_reruns_at_another_seed():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_training", ROOT / "bench" / "training.py")
    training = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(training)
    results = [{"variant": v, "stage": v.split("-")[0], "s_per_seq": s}
               for v, s in (("sft-fp32-mb1", 3.0), ("sft-fp32-seed1", 2.0), ("sft-bf16-lean", 1.25),
                            ("sft-qlora-mb1", 2.5), ("dpo-fp32-mb1", 2.0), ("dpo-bf16-lean", 0.5))]
    training.add_speed(results)
    speed = {r["variant"]: (r["speed_x"], r["speed_baseline_runs"]) for r in results}
    assert speed == {"sft-fp32-mb1": (2.5 / 3.0, 2), "sft-fp32-seed1": (1.25, 2), "sft-bf16-lean": (2.0, 2),
                     "sft-qlora-mb1": (1.0, 2), "dpo-fp32-mb1": (1.0, 1), "dpo-bf16-lean": (4.0, 1)}
