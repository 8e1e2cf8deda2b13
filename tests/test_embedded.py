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

    # The actor, measured each round on the embedded verifiable-instruction set.
    assert "actor quality" in proc.stdout and "IF prompt strict" in proc.stdout
    assert db["eval_answers"].count_where("dataset = 'if' and model = 'M2'") == 4

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout

    # `eval instruct` on any IFEval-format file: an id newer than the checkers is unchecked, not a fail.
    data = tmp_path / "ifeval.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [
        {"key": 1, "prompt": "Write one sentence about rain, in lowercase letters only.",
         "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
        {"key": 2, "prompt": "Name three fruits without using any commas.",
         "instruction_id_list": ["punctuation:no_comma", "future:not_a_checker_yet"], "kwargs": [{}, {}]}]))
    out = subprocess.run([sys.executable, "-m", "selfreward", "eval", "instruct", str(runs / "e2e"), "--data",
                          str(data), "--models", "M0,M2", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)
    assert [r["model"] for r in rows] == ["M0", "M2"]
    assert all(r["if_checked"] == 1 and r["if_unchecked"] == 1 for r in rows)
    reasons = [c["unchecked"] for c in db["if_checks"].rows_where("instruction_id = 'future:not_a_checker_yet'")]
    assert len(reasons) == 2 and all("unknown instruction id" in r for r in reasons)
