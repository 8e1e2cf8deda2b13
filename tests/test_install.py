"""A non-editable install finds its prompt templates and seed data from any working directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import sys
from pathlib import Path

import selfreward
from selfreward.config import PROMPTS_DIR, SEED_DIR
from selfreward.data import read_ift
from selfreward.prompts import load_template

site = Path(sys.argv[1]).resolve()
assert Path(selfreward.__file__).resolve().is_relative_to(site), selfreward.__file__
assert PROMPTS_DIR.is_relative_to(site) and SEED_DIR.is_relative_to(site), (PROMPTS_DIR, SEED_DIR)
assert not any(Path(p or ".").resolve() == Path(sys.argv[2]) for p in sys.path), sys.path
load_template("additive_judge")
assert read_ift(SEED_DIR / "ift_train.jsonl")
from selfreward.evaluation.instruct import DEFAULT_SET, default_if_eval
assert DEFAULT_SET.is_relative_to(site) and default_if_eval(limit=1)
print("ok")
"""


def test_installed_copy_finds_templates_and_seed_data(tmp_path):
    # Build from a copy of the project, so no build/ or stale build output of the source tree gets in.
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "selfreward", src / "selfreward", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--target", str(site), str(src)], check=True, cwd=elsewhere)
    shutil.rmtree(src)  # nothing may still point at the copy it was built from

    # The venv's python for the dependencies; the installed copy first on the path; run from elsewhere.
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("PYTHONSAFEPATH", None)

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True)

    check = run("-c", CHECK, str(site), str(ROOT))
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr
    help_config = run("-m", "selfreward", "iterate", "--help-config")
    assert help_config.returncode == 0, help_config.stderr
    assert str(site / "selfreward" / "seed" / "ift_train.jsonl") in help_config.stdout
    # iterate reads the seed data and templates before the model: it gets as far as the (missing) model.
    iterate = run("-m", "selfreward", "iterate", "--runs-dir", str(elsewhere / "runs"), "--preset", "tiny",
                  "--model", str(tmp_path / "no-model"))
    assert iterate.returncode != 0 and "model not found" in iterate.stderr, iterate.stderr
    assert list(elsewhere.iterdir()) == []
