"""The typed config: an old run folder (tests/fixtures/pre-typed-config, made by the code before the
config was typed, by the landed main) opens, verifies and resumes, its stored config converted once by the store's
migration m012_config_keys; the first days' key names convert too; and a user's TOML or --set that
still uses an old name is refused with the new one."""

import dataclasses
import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from selfreward.cli import cli
from selfreward.config import Config, GROUPS, FIELDS, TYPES, grouped, help_text, load_toml, resolve, validate
from selfreward.core.store import Run
from selfreward.errors import SelfRewardError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre-typed-config"


@pytest.fixture
def old_run(tmp_path) -> Path:
    path = tmp_path / "runs" / "old"
    shutil.copytree(FIXTURE, path)
    return path


def stored(path: Path) -> dict:
    with sqlite3.connect(path / "run.db") as db:
        return {k: json.loads(v) for k, v in db.execute("select key, value from config")}


def applied(path: Path) -> list[str]:
    with sqlite3.connect(path / "run.db") as db:
        return [name for (name,) in db.execute("select name from _sqlite_migrations where name like 'm012%'")]


def cli_run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_the_fixture_is_a_run_from_before_the_typed_config(old_run):
    values = stored(old_run)
    assert values["api_send_seed"] == "yes" and values["meta_rewarding"] == "no"
    assert applied(old_run) == []


def test_an_old_run_opens_verifies_and_reads_its_config_typed(old_run):
    runs = old_run.parent
    # A reader never converts it (auditing a copy must not change the evidence); a writer does, once.
    status = cli_run("status", "old", "--runs-dir", runs)
    assert status.exit_code == 1 and "old schema: a writer upgrades it" in status.output
    assert applied(old_run) == []
    Run.open(old_run, writer=True).close()
    status = cli_run("status", "old", "--runs-dir", runs)
    assert status.exit_code == 0, status.output
    assert "M1->M2" in status.output
    verify = cli_run("verify", "old", "--runs-dir", runs)
    assert verify.exit_code == 0 and verify.output.startswith("ok:"), verify.output
    with Run.open(old_run) as run:
        cfg = run.config()
    assert (cfg.api_send_seed, cfg.vllm_prefix_caching, cfg.meta_rewarding, cfg.consistency) == (True, True, False,
                                                                                                 False)
    assert (cfg.preset, cfg.judge, cfg.n_candidates, cfg.judge_logprobs) == ("tiny", "scripted", 3, "auto")
    validate(cfg)
    values = stored(old_run)
    assert values["api_send_seed"] is True and values["consistency"] is False
    # config.toml was written again from the converted rows: it reads back as the same typed config.
    text = (old_run / "config.toml").read_text()
    assert "api_send_seed = true" in text and "meta_rewarding = false" in text
    assert Config(**load_toml(old_run / "config.toml")) == cfg
    assert applied(old_run) == ["m012_config_keys"]


def test_an_old_run_resumes_against_its_typed_config(old_run):
    runs = old_run.parent
    done = cli_run("iterate", "--name", "old", "--runs-dir", runs, "--rounds", "2", "--set", "consistency=no")
    assert done.exit_code == 0, done.output
    assert "nothing to do" in done.output
    changed = cli_run("iterate", "--name", "old", "--runs-dir", runs, "--rounds", "2", "--set", "meta_rewarding=yes")
    assert changed.exit_code != 0
    assert "was made with meta_rewarding=False, not True" in changed.output


def test_renamed_keys_of_an_old_run_convert_once(old_run):
    # A run from the first days: the candidates' sampling and the api settings under their old names.
    with sqlite3.connect(old_run / "run.db") as db:
        for old, new, value in (("temperature", "candidate_temperature", 0.5), ("top_p", "candidate_top_p", 0.8),
                                ("judge_api_timeout", "api_timeout", 12.0)):
            db.execute("update config set key = ?, value = ? where key = ?", [old, json.dumps(value), new])
    toml = (old_run / "config.toml").read_text().replace("candidate_temperature = 0.7", "temperature = 0.5")
    (old_run / "config.toml").write_text(toml)

    with Run.open(old_run, writer=True) as run:
        cfg = run.config()
    assert (cfg.candidate_temperature, cfg.candidate_top_p, cfg.api_timeout) == (0.5, 0.8, 12.0)
    values = stored(old_run)
    assert not {"temperature", "top_p", "judge_api_timeout"} & values.keys()
    assert values["candidate_temperature"] == 0.5 and values["api_send_seed"] is True
    text = (old_run / "config.toml").read_text()
    assert "\ncandidate_temperature = 0.5\n" in text and "\ntemperature =" not in text
    assert Config(**load_toml(old_run / "config.toml")) == cfg

    # Once: a second open finds nothing pending and leaves the files as they are.
    before = (old_run / "config.toml").stat().st_mtime_ns
    with Run.open(old_run, writer=True) as run:
        assert run.config() == cfg
    assert applied(old_run) == ["m012_config_keys"] and (old_run / "config.toml").stat().st_mtime_ns == before


def test_a_new_run_stores_booleans(tmp_path):
    cfg = resolve({}, {"preset": "tiny", "vllm_prefix_caching": False})
    with Run.create(tmp_path / "runs" / "new", cfg) as run:
        assert run.config() == cfg
        assert stored(run.path)["vllm_prefix_caching"] is False
        assert applied(run.path) == ["m012_config_keys"]


@pytest.mark.parametrize("where", ["toml", "set"])
def test_an_old_key_name_given_by_a_user_is_refused_with_its_new_name(tmp_path, where):
    toml = tmp_path / "c.toml"
    toml.write_text("temperature = 0.5\n")
    with pytest.raises(SelfRewardError, match="'temperature' was renamed to 'candidate_temperature'"):
        load_toml(toml)
    args = ["--config", toml] if where == "toml" else ["--set", "temperature=0.5"]
    result = cli_run("iterate", "--runs-dir", tmp_path / "runs", "--preset", "tiny", *args)
    assert result.exit_code != 0 and result.output.count("\n") == 1
    assert "renamed to 'candidate_temperature'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("raw, value", [("yes", True), ("no", False), ("true", True), ("False", False)])
def test_yes_no_settings_are_bools_from_set_and_toml(tmp_path, raw, value):
    from selfreward.cli import _parse_sets

    assert _parse_sets((f"vllm_prefix_caching={raw}",)) == {"vllm_prefix_caching": value}
    toml = tmp_path / "c.toml"
    toml.write_text(f"meta_rewarding = {str(value).lower()}\napi_send_seed = \"{raw}\"\n")
    assert load_toml(toml) == {"meta_rewarding": value, "api_send_seed": value}


@pytest.mark.parametrize("setting, message", [
    ("api_send_seed=maybe", "config key 'api_send_seed' wants yes or no, got 'maybe'"),
    ("promote=sometimes", "config key 'promote' wants one of 'always', 'no-regress', got 'sometimes'"),
    ("train_precision=fp16", "config key 'train_precision' wants one of 'auto', 'fp32', 'bf16'"),
    ("vllm_swap_weights=on", "config key 'vllm_swap_weights' wants one of 'auto', 'yes', 'no'"),
    ("preset=huge", "config key 'preset' wants one of"),
])
def test_a_value_outside_a_field_type_is_one_clear_line(tmp_path, setting, message):
    result = cli_run("iterate", "--runs-dir", tmp_path / "runs", "--set", setting)
    assert result.exit_code != 0 and message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key, value, message", [
    ("meta_rewarding", "yes", "config key 'meta_rewarding' must be a bool, got 'yes'"),
    ("judge_mode", "rubric", "config key 'judge_mode' must be one of 'additive', 'pairwise', 'reference'"),
    ("n_candidates", 2.0, "config key 'n_candidates' must be a int, got 2.0"),
    ("api_timeout", float("nan"), "config key 'api_timeout' must be a finite number"),
    ("api_max_retries", -1, "api_max_retries must be >= 0, got -1"),
    ("vllm_replicas", 0, "vllm_replicas must be positive, got 0"),
    ("train_processes", 0, "train_processes must be at least 1, got 0"),
    ("dpo_label_smoothing", 0.5, "dpo_label_smoothing must lie in [0, 0.5), got 0.5"),
    ("vllm_gpu_memory_utilization", 0.0, "vllm_gpu_memory_utilization must lie in (0, 1], got 0.0"),
])
def test_one_validator_reads_each_field_type_and_bounds(key, value, message):
    # A Config built in code (dataclasses.replace) is checked like one read from a file.
    cfg = dataclasses.replace(resolve({}, {"preset": "tiny"}), **{key: value})
    with pytest.raises(SelfRewardError) as e:
        validate(cfg)
    assert str(e.value).startswith(message)


def test_help_config_is_grouped_and_wrapped():
    groups = grouped()
    assert list(groups) == list(GROUPS) and all(groups.values())
    assert sorted(k for keys in groups.values() for k in keys) == sorted(FIELDS)
    assert {"sampling", "vllm", "training", "judge", "evaluation", "api"} <= set(GROUPS)
    text = help_text()
    for group, keys in groups.items():
        assert f"\n{group}:\n  {keys[0]} = " in f"\n{text}"
    # Only a key = default line whose default is a long path may pass 120 characters; help text wraps.
    long = [line for line in text.splitlines() if len(line) > 120]
    assert all(line.startswith("  ") and " = " in line and "  " not in line.strip() for line in long), long
    assert "promote_metric" in text and "'win_lc_vs_prev'" in text  # a Literal's choices are listed
    assert not [k for k in FIELDS if TYPES[k] is str and FIELDS[k].default in ("yes", "no")]


def test_docs_config_lists_each_group_with_its_keys():
    page = (FIXTURE.parents[2] / "docs" / "config.md").read_text()
    for group, keys in grouped().items():
        listed = page.split(f"\n## {group}\n\n")[1].partition("\n\n")[0]
        assert listed.startswith("Keys: ") and set(re.findall(r"`(\w+)`", listed)) == set(keys), group


def test_literal_choices_match_the_lists_their_readers_use():
    from selfreward.backends.judges import MODES
    from selfreward.config import PRESETS, choices

    assert set(choices("judge_mode")) == set(MODES)
    assert set(choices("preset")) == {"auto", *PRESETS}
