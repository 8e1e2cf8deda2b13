"""The benchmark runner works end to end at smoke sizes (the parts that need no model)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runner_prints_one_table_of_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "all.py"), "--quick", "--only", "dedupe,store",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("dedupe") and "DedupePool" in line and line.rstrip().endswith("x") for line in lines)
    assert any(line.startswith("store") and "run.db" in line for line in lines)
    assert "kept sets agree with brute force" in proc.stdout and " NO " not in proc.stdout
    results = json.loads(out.read_text())
    assert results["dedupe"]["agree"] is True
    assert results["store"]["judgments"] == 4800 and results["store"]["run_db_per_s"] > 0


def test_bench_runner_refuses_an_unknown_part():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "all.py"), "--only", "nope"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "unknown part nope" in proc.stderr
