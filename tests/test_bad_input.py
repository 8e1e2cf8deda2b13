"""Bad input: one clear error line, a non-zero exit, and no run folder left behind."""

import pytest
from click.testing import CliRunner

from selfreward.cli import cli


@pytest.fixture
def invoke(tmp_path, tiny_model, seed_files):
    def run(*args, model=None):
        base = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "bad", "--preset", "tiny",
                "--model", model or str(tiny_model), "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"])]
        return CliRunner().invoke(cli, base + list(args))
    return run


def assert_clean_failure(result, tmp_path, message):
    assert result.exit_code != 0
    assert message in result.output
    assert result.output.strip().count("\n") == 0, result.output  # one line
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "bad").exists()


def test_missing_file(invoke, tmp_path):
    assert_clean_failure(invoke("--ift", str(tmp_path / "nope.jsonl")), tmp_path, "data file not found")


def test_malformed_jsonl_names_file_and_line(invoke, tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": oops}\n')
    assert_clean_failure(invoke("--ift", str(bad)), tmp_path, "broken.jsonl:2: malformed JSON")


def test_missing_field(invoke, tmp_path):
    bad = tmp_path / "eft.jsonl"
    bad.write_text('{"instruction": "a", "response": "b", "score": 3}\n')
    assert_clean_failure(invoke("--eft", str(bad)), tmp_path, "missing field 'justification'")


def test_unknown_model_path(invoke, tmp_path):
    assert_clean_failure(invoke(model=str(tmp_path / "no-model")), tmp_path, "model not found")


def test_unknown_hub_model(invoke, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub here; fail at once
    assert_clean_failure(invoke(model="someone/no-such-model"), tmp_path, "the hub could not provide it")


def test_missing_gguf(invoke, tmp_path):
    assert_clean_failure(invoke(model=str(tmp_path / "m.gguf")), tmp_path, "GGUF file not found")


def test_bad_set_value(invoke, tmp_path):
    assert_clean_failure(invoke("--set", "n_candidates=many"), tmp_path, "is not a number")
    assert_clean_failure(invoke("--set", "nonsense=1"), tmp_path, "unknown config key 'nonsense'")


def test_scripted_judge_needs_a_valid_script(invoke, tmp_path):
    script = tmp_path / "judge.json"
    script.write_text("{not json")
    assert_clean_failure(invoke("--judge", "scripted", "--judge-script", str(script)), tmp_path, "not valid JSON")


def test_status_of_missing_run(tmp_path):
    result = CliRunner().invoke(cli, ["status", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "no run at" in result.output


# --- a table of malformed inputs: each one line, a non-zero exit, no run folder ---

KEY = "sk-live-abcdef0123456789abcdef"


def _file(tmp_path, name, text, errors="strict"):
    path = tmp_path / name
    path.write_text(text, errors=errors)
    return str(path)


def _bin_only(tmp_path):
    # Accepted at creation once, then refused at the first load: the run hashes and loads safetensors only.
    folder = tmp_path / "bin-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"pickled weights")
    return str(folder)


CASES = {
    # id: (setup(tmp_path) -> extra CLI args, expected message)
    "jsonl-not-json": (lambda t: ["--ift", _file(t, "a.jsonl", "{oops}\n")], "malformed JSON"),
    "jsonl-a-list": (lambda t: ["--ift", _file(t, "a.jsonl", "[1, 2]\n")], "expected a JSON object, got list"),
    "jsonl-a-string": (lambda t: ["--ift", _file(t, "a.jsonl", '"text"\n')], "expected a JSON object, got str"),
    "jsonl-huge-integer": (lambda t: ["--ift", _file(t, "a.jsonl", '{"instruction": ' + "9" * 5000 + "}\n")],
                           "a.jsonl:1: malformed JSON (Exceeds the limit (4300 digits)"),
    "jsonl-deep-nesting": (lambda t: ["--eft", _file(t, "e.jsonl", "[" * 100000 + "\n")],
                           "e.jsonl:1: malformed JSON (nested too deeply)"),
    "eval-line-not-object": (lambda t: ["--eft-eval", _file(t, "v.jsonl", "[1, 2]\n")],
                             "v.jsonl:1: expected a JSON object, got list"),
    "eval-line-a-number": (lambda t: ["--eft-eval", _file(t, "v.jsonl", "\n7\n")], "v.jsonl:2: expected a JSON object"),
    "eval-set-binary": (lambda t: ["--eft-eval", _file(t, "v.jsonl", "\udcff\udcfe\x00", "surrogateescape")],
                        "cannot read as JSONL"),
    "eval-set-bad-gzip": (lambda t: ["--eft-eval", _file(t, "v.jsonl.gz", "not gzip")],
                          "cannot read as gzipped JSONL"),
    "jsonl-empty-file": (lambda t: ["--ift", _file(t, "a.jsonl", "\n\n")], "no rows"),
    "jsonl-binary": (lambda t: ["--ift", _file(t, "a.jsonl.gz", "not gzip")], "cannot read as gzipped JSONL"),
    "ift-missing-response": (lambda t: ["--ift", _file(t, "a.jsonl", '{"instruction": "x"}\n')],
                             "missing field 'response'"),
    "ift-empty-instruction": (lambda t: ["--ift", _file(t, "a.jsonl", '{"instruction": " ", "response": "r"}\n')],
                              "field 'instruction' is empty"),
    "ift-number-for-text": (lambda t: ["--ift", _file(t, "a.jsonl", '{"instruction": 3, "response": "r"}\n')],
                            "field 'instruction' must be a string"),
    "eft-score-as-text": (lambda t: ["--eft", _file(t, "e.jsonl", '{"instruction": "i", "response": "r", '
                                     '"justification": "j", "score": "4"}\n')], "must be an integer"),
    "eft-score-out-of-range": (lambda t: ["--eft", _file(t, "e.jsonl", '{"instruction": "i", "response": "r", '
                                          '"justification": "j", "score": 9}\n')], "outside 0..5"),
    "eft-score-bool": (lambda t: ["--eft", _file(t, "e.jsonl", '{"instruction": "i", "response": "r", '
                                  '"justification": "j", "score": true}\n')], "must be an integer"),
    "directory-for-a-file": (lambda t: ["--ift", str(t)], "data file not found"),
    "eval-set-missing": (lambda t: ["--eft-eval", str(t / "none.jsonl")], "evaluation set not found"),
    "unknown-model-folder": (lambda t: ["--model", str(t / "nope")], "model not found"),
    "model-folder-without-config": (lambda t: ["--model", str(t)], "has no config.json"),
    "model-folder-bin-only": (lambda t: ["--model", _bin_only(t)], "has no .safetensors weights"),
    "bad-toml": (lambda t: ["--config", _file(t, "c.toml", "n_candidates = = 3\n")], "is not valid TOML"),
    "toml-unknown-key": (lambda t: ["--config", _file(t, "c.toml", "candidates = 3\n")],
                         "unknown config key 'candidates'"),
    "toml-wrong-type": (lambda t: ["--config", _file(t, "c.toml", 'n_candidates = "four"\n')], "wants a int"),
    "missing-config-file": (lambda t: ["--config", str(t / "none.toml")], "config file not found"),
    "set-without-equals": (lambda t: ["--set", "n_candidates"], "--set wants key=value"),
    "set-fraction-for-int": (lambda t: ["--set", "judge_samples=2.5"], "wants a int"),
    "one-candidate": (lambda t: ["--set", "n_candidates=1"], "n_candidates must be at least 2"),
    "infinite-float": (lambda t: ["--set", "api_timeout=1e999"], "must be a finite number"),
    "nan-in-toml": (lambda t: ["--config", _file(t, "c.toml", "judge_temperature = nan\n")], "must be a finite number"),
    "binary-toml": (lambda t: ["--config", _file(t, "c.toml", "\udcff\x00", "surrogateescape")], "not valid TOML"),
    "min-words-zero": (lambda t: ["--set", "min_words=0"], "min_words must be at least 1"),
    "negative-temperature": (lambda t: ["--set", "candidate_temperature=-1"], "must be >= 0"),
    "rho-out-of-range": (lambda t: ["--set", "length_rho=0.9"], "length_rho must lie in [0, 0.5]"),
    "gpu-fraction-out-of-range": (lambda t: ["--set", "vllm_gpu_memory_utilization=2"], "must lie in (0, 1]"),
    "unknown-engine": (lambda t: ["--set", "engine=tgi"], "engine 'tgi' cannot serve the policy"),
    "openai-engine-for-the-policy": (lambda t: ["--set", "engine=openai"], "serves a fixed model"),
    "key-pasted-as-key-variable": (lambda t: ["--set", f"api_key_env={KEY}"], "looks like a key itself"),
    "api-url-with-credentials": (lambda t: ["--judge", "api", "--api-model", "m", "--api-base",
                                            f"http://user:{KEY}@127.0.0.1:9/v1"], "must not carry credentials"),
    "api-url-not-http": (lambda t: ["--judge", "api", "--api-model", "m", "--api-base", "ftp://x/v1"],
                         "must be an http(s) URL"),
    "api-judge-without-url": (lambda t: ["--judge", "api", "--api-model", "m"], "needs api_base"),
    "scripted-judge-not-a-list": (lambda t: ["--judge", "scripted", "--judge-script", _file(t, "j.json", '{"a": 1}')],
                                  "must hold a JSON list of strings"),
    "unwritable-runs-folder": (lambda t: ["--runs-dir", _file(t, "a-file", "x") + "/runs"], "cannot create the run folder"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_is_one_line(case, invoke, tmp_path):
    setup, message = CASES[case]
    result = invoke(*setup(tmp_path))
    assert_clean_failure(result, tmp_path, message)
    assert KEY not in result.output  # a secret is never echoed back


def test_credentials_never_reach_a_resumed_run(tmp_path, tiny_model, seed_files, judge_script):
    # A resume may change where the API is, but a URL with credentials is refused before it is stored.
    base = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "ok", "--preset", "tiny", "--rounds", "1",
            "--model", str(tiny_model), "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]),
            "--eft-eval", "", "--judge", "scripted", "--judge-script", str(judge_script)]
    assert CliRunner().invoke(cli, base).exit_code == 0
    result = CliRunner().invoke(cli, base + ["--api-base", f"http://u:{KEY}@127.0.0.1:9/v1"])
    assert result.exit_code == 1 and "must not carry credentials" in result.output
    run_dir = tmp_path / "runs" / "ok"
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".db", ".toml", ".json", ".log", ""):
            assert KEY.encode() not in path.read_bytes(), path


def test_an_input_edited_between_rounds_stops_the_resume(tmp_path, tiny_model, seed_files, judge_script):
    base = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "ok", "--preset", "tiny",
            "--model", str(tiny_model), "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]),
            "--eft-eval", "", "--judge", "scripted", "--judge-script", str(judge_script)]
    assert CliRunner().invoke(cli, base + ["--rounds", "1"]).exit_code == 0
    with seed_files["ift"].open("a") as fh:
        fh.write('{"instruction": "A new row added mid-run", "response": "r"}\n')
    result = CliRunner().invoke(cli, base + ["--rounds", "2"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert "ift file" in result.output and "has changed since run" in result.output
    from selfreward.core.store import Run

    with Run.open(tmp_path / "runs" / "ok") as run:
        assert not run.stage_done(2, "self_instruct")


def test_a_gzipped_eval_set_loads(tmp_path):
    # It was accepted by name and then read as text: a .jsonl.gz eval set never loaded.
    import gzip
    import json

    from selfreward.evaluation.judge_quality import load_eval_set

    rows = [{"instruction": f"Q{k}", "responses": [{"text": "good", "rank": 0}, {"text": "bad", "rank": 1}]}
            for k in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "v.jsonl").write_text(text)
    with gzip.open(tmp_path / "v.jsonl.gz", "wt") as fh:
        fh.write(text)
    assert load_eval_set(tmp_path / "v.jsonl.gz") == load_eval_set(tmp_path / "v.jsonl")
    assert len(load_eval_set(tmp_path / "v.jsonl.gz")) == 3


def test_a_judge_reply_with_a_lone_surrogate_does_not_stop_the_run(tmp_path, tiny_model, seed_files):
    import json
    import sqlite3

    script = tmp_path / "judge.json"
    # json.dumps writes the lone surrogate as the escape an API's JSON would carry.
    script.write_text(json.dumps(["Relevant \ud83d but broken. Score: 4", "Partly \udfff relevant. Score: 1"]))
    base = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "s", "--preset", "tiny", "--rounds", "2",
            "--model", str(tiny_model), "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]),
            "--eft-eval", "", "--judge", "scripted", "--judge-script", str(script),
            "--set", "prompts_per_round=2", "--set", "n_candidates=2", "--set", "judge_samples=1"]
    result = CliRunner().invoke(cli, base)
    assert result.exit_code == 0, result.output
    db = sqlite3.connect(tmp_path / "runs" / "s" / "run.db")
    raws = {r[0] for r in db.execute("select raw from judgments where round = 2")}
    assert raws and raws <= {"Relevant \ufffd but broken. Score: 4", "Partly \ufffd relevant. Score: 1"}, raws
    verified = CliRunner().invoke(cli, ["verify", str(tmp_path / "runs" / "s")])
    assert verified.exit_code == 0, verified.output


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_run_db_is_one_line(tmp_path, damage):
    from selfreward.config import resolve
    from selfreward.core.store import Run

    Run.create(tmp_path / "runs" / "r", resolve({}, {"preset": "tiny"})).close()
    db = tmp_path / "runs" / "r" / "run.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    else:
        db.write_bytes(db.read_bytes()[:100] + b"\0" * 3000)  # the header kept, the pages gone
    for args in (["status", "r"], ["verify", "r"], ["iterate", "--name", "r", "--rounds", "1"]):
        result = CliRunner().invoke(cli, [*args, "--runs-dir", str(tmp_path / "runs")])
        assert result.exit_code == 1, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert "damaged" in result.output


def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, tiny_model, seed_files, judge_script, monkeypatch):
    """SQLITE_FULL on a real file: the writers' connections may not grow run.db by one page
    (PRAGMA max_page_count), as on a full disk."""
    from selfreward.core import store

    base = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "f", "--preset", "tiny",
            "--model", str(tiny_model), "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]),
            "--eft-eval", "", "--judge", "scripted", "--judge-script", str(judge_script),
            "--set", "prompts_per_round=4", "--set", "n_candidates=4", "--set", "candidate_max_new_tokens=64"]
    assert CliRunner().invoke(cli, base + ["--rounds", "1"]).exit_code == 0
    connect = store.connect

    def full(db_path, writer):
        db = connect(db_path, writer)
        if writer:
            db.execute("VACUUM")  # no free pages left to fill first
            db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        return db

    monkeypatch.setattr(store, "connect", full)
    result = CliRunner().invoke(cli, base + ["--rounds", "2"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: the disk is full (database or disk is full)"), result.output
    monkeypatch.setattr(store, "connect", connect)
    result = CliRunner().invoke(cli, base + ["--rounds", "2"])
    assert result.exit_code == 0, result.output


def test_no_space_for_a_model_is_one_line_and_the_run_resumes(tmp_path, tiny_model, seed_files, judge_script,
                                                               monkeypatch):
    """ENOSPC from the kernel while a trained model's files are written (here: /dev/full, written in
    place of the flush before the stage commits) is one line; nothing is committed, and a rerun finishes."""
    from selfreward.backends import models
    from selfreward.core.store import Run

    base = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "nospace", "--preset", "tiny",
            "--model", str(tiny_model), "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]),
            "--eft-eval", "", "--judge", "scripted", "--judge-script", str(judge_script)]
    flush = models.fsync_tree

    def full(folder):
        with open("/dev/full", "wb", buffering=0) as fh:
            fh.write(b"weights")  # OSError(ENOSPC), as from a full disk

    monkeypatch.setattr(models, "fsync_tree", full)
    result = CliRunner().invoke(cli, base + ["--rounds", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == ("Error: no space left on device: free space and run the "
                                                      "command again (what finished before is saved)")
    with Run.open(tmp_path / "runs" / "nospace") as run:
        assert run.rows("select name from models") == [{"name": "M0"}]
    monkeypatch.setattr(models, "fsync_tree", flush)
    result = CliRunner().invoke(cli, base + ["--rounds", "1"])
    assert result.exit_code == 0, result.output
