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
