"""The real CLI, as a user runs it, on the embedded SmolLM2-135M at the tiny preset."""

import json
import subprocess
import sys

import pytest
import sqlite_utils

pytestmark = pytest.mark.slow


def test_embedded_model_two_rounds(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "selfreward", "iterate", "--runs-dir", str(runs), "--name", "e2e",
           "--preset", "tiny", "--rounds", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "M1->M2" in proc.stdout

    db = sqlite_utils.Database(runs / "e2e" / "run.db")
    models = {m["name"]: m for m in db["models"].rows}
    assert set(models) == {"M0", "M1", "M2"}
    assert models["M0"]["note"] == "source: embedded"
    assert (runs / "e2e" / "models" / "M1" / "model.safetensors").is_file()
    assert db["eft_eval"].count_where("model = 'M0'") == 3
    judgments = list(db["judgments"].rows)
    assert judgments and all(j["judge"] == "self:M1" and j["raw"] is not None for j in judgments)
    # Whatever the 135M model wrote, a score is either parsed from its text or NULL with a reason.
    assert all((j["score"] is None) == (j["reason"] is not None) for j in judgments)
    assert db["pairs"].count == db["prompts"].count_where("round = 2")
    # DPO's pairs scored after training, in fp32: every kept pair (a round without any copies M1).
    kept = db["pairs"].count_where("round = 2 and status = 'kept'")
    fit = json.loads(models["M2"]["detail"] or "{}").get("fit_pairs", 0)
    assert fit == (kept if models["M2"]["kind"] != "copy" else 0)
    assert "acc after" in proc.stdout

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout
