"""bench/plan.py: the capacity plan of one paper-scale round, run as users run it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"self-instruct", "candidates", "judging", "dpo training", "eval (held-out EFT)", "model loads, merge, save"}


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "plan.py"), *args], capture_output=True, text=True,
                          timeout=60)


def plan_json(*args: str) -> dict:
    proc = plan(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def load_plan_module():
    spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "bench" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_plan"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def stage(result: dict, name: str) -> dict:
    return next(s for s in result["stages"] if s["stage"] == name)


@pytest.mark.parametrize("model", ["7b", "70b"])
def test_the_plan_prints_a_table_per_stage_with_its_sources(model):
    proc = plan("--model", model)
    assert proc.returncode == 0, proc.stderr
    for name in STAGES | {"total", "run.db writes a round", "https://"}:
        assert name in proc.stdout
    result = plan_json("--model", model)
    assert {s["stage"] for s in result["stages"]} == STAGES
    assert all(s["wall_s"] > 0 and s["gpu_hours"] > 0 for s in result["stages"])
    assert result["total"]["wall_s"] == pytest.approx(sum(s["wall_s"] for s in result["stages"])
                                                      + result["store"]["commit_s"])
    # The paper's sizes: 4,000 prompts x N=4 x K=3 judgments, every row counted.
    rows = result["store"]["rows"]
    assert (rows["prompts"], rows["candidates"], rows["judgments"]) == (4000, 16000, 48000)
    assert all(s["url"].startswith("https://") and s["date"] for s in result["sources"])
    # make bench's measured write rate by default: the newest dated run in bench/results/
    assert result["figures"]["source"].startswith("bench/results/")


def dated_run(folder: Path, name: str, date: str, parts: dict, quick: bool = False) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps({"date": date, "command": "bench/all.py", "quick": quick, "rows": [],
                                           "parts": parts}))


def test_each_measured_figure_comes_from_the_newest_run_that_has_it(tmp_path):
    results = tmp_path / "results"
    dated_run(results, "a.json", "2026-11-22", {"engines": {"overhead_pct": 20.0},
                                                 "store": {"run_db_per_s": 1000.0, "bare_per_s": 5000.0}})
    # Named so that it sorts first: the date inside the file orders the runs, not the file name.
    dated_run(results, "0-newer.json", "2026-12-05T05:36+00:00",
              {"store": {"run_db_per_s": 2000.0, "bare_per_s": 6000.0}, "engines": {"overhead_pct": None}})
    dated_run(results, "quick.json", "2026-12-06T01:00+00:00", {"store": {"run_db_per_s": 9.0, "bare_per_s": 9.0}},
              quick=True)  # a smoke run's figures are not measurements
    result = plan_json("--model", "7b", "--results", str(results))
    assert result["store"]["rows_per_s"] == 2000.0
    assert result["assumptions"]["engine_overhead_pct"] == 20.0
    assert result["figures"]["source"] == f"{results / '0-newer.json'}; engine overhead from {results / 'a.json'}"
    default = plan_json("--model", "7b")
    assert result["rates"]["decode_tokens_per_s_per_replica"] == pytest.approx(
        default["rates"]["decode_tokens_per_s_per_replica"] / 1.2)


def test_the_repository_results_give_the_plan_its_figures():
    import glob

    runs = [json.loads(Path(p).read_text()) for p in glob.glob(str(ROOT / "bench" / "results" / "*.json"))]
    assert runs and all(isinstance(r["date"], str) and isinstance(r["parts"], dict) for r in runs)
    newest = max((r for r in runs if (r["parts"].get("store") or {}).get("run_db_per_s")), key=lambda r: r["date"])
    assert plan_json("--model", "7b")["store"]["rows_per_s"] == newest["parts"]["store"]["run_db_per_s"]


def test_more_gpus_never_make_the_round_slower(capsys):
    main = load_plan_module().main  # in-process: dozens of plans, the same code path as the script

    def run(*args):
        main([*args, "--json"])
        return json.loads(capsys.readouterr().out)

    for model, counts in (("7b", range(1, 21)), ("70b", range(4, 41))):
        plans = [run("--model", model, "--gpus", str(n)) for n in counts]
        for fewer, more in zip(plans, plans[1:]):
            assert more["total"]["wall_s"] <= fewer["total"]["wall_s"]
            for a, b in zip(fewer["stages"], more["stages"]):
                assert b["wall_s"] <= a["wall_s"], (model, b["stage"], fewer["gpus"], more["gpus"])
        assert plans[-1]["total"]["wall_s"] < plans[0]["total"]["wall_s"] / 4


def test_judging_time_grows_in_proportion_to_n_and_k():
    base = stage(plan_json("--model", "7b"), "judging")
    double_n = stage(plan_json("--model", "7b", "--set", "n_candidates=8"), "judging")
    double_k = stage(plan_json("--model", "7b", "--set", "judge_samples=6"), "judging")
    both = stage(plan_json("--model", "7b", "--set", "n_candidates=8", "--set", "judge_samples=6"), "judging")
    assert double_n["wall_s"] == pytest.approx(2 * base["wall_s"])
    assert double_k["wall_s"] == pytest.approx(2 * base["wall_s"])
    assert both["wall_s"] == pytest.approx(4 * base["wall_s"])
    assert double_n["requests"] == double_k["requests"] == 2 * base["requests"]


def test_prefix_caching_off_prefills_every_judge_prompt_in_full():
    on = stage(plan_json("--model", "70b"), "judging")
    off = stage(plan_json("--model", "70b", "--set", "vllm_prefix_caching=no"), "judging")
    assert off["prefilled_tokens"] == off["prompt_tokens"] == on["prompt_tokens"]
    assert on["prefilled_tokens"] < on["prompt_tokens"] / 4
    assert off["wall_s"] > 1.5 * on["wall_s"]


def test_measured_figures_come_from_a_json(tmp_path):
    store = tmp_path / "store.json"  # what `bench/store.py --json` writes
    store.write_text(json.dumps({"judgments": 48000, "bare_per_s": 90000.0, "run_db_per_s": 1000.0}))
    result = plan_json("--model", "7b", "--figures", str(store))
    assert result["store"]["rows_per_s"] == 1000.0
    assert result["store"]["commit_s"] == pytest.approx(result["store"]["rows_total"] / 1000.0)
    flat = tmp_path / "gpu.json"  # a throughput measured on the user's own GPU replaces the published one
    flat.write_text(json.dumps({"store_judgments_per_s": 20000, "decode_tokens_per_s": 4044.175}))
    slower = plan_json("--model", "7b", "--figures", str(flat))
    default = plan_json("--model", "7b")
    assert "measured" in slower["rates"]["decode_basis"]
    assert stage(slower, "candidates")["wall_s"] > 1.9 * stage(default, "candidates")["wall_s"]
    parts = tmp_path / "bench.json"  # what `bench/all.py --json` writes: the vllm engine's measured overhead counts
    parts.write_text(json.dumps({"store": {"run_db_per_s": 20000.0, "bare_per_s": 90000.0},
                                 "engines": {"overhead_pct": 25.0}, "dedupe": {"agree": True}}))
    taxed = plan_json("--model", "7b", "--figures", str(parts))
    assert taxed["rates"]["decode_tokens_per_s_per_replica"] == pytest.approx(
        default["rates"]["decode_tokens_per_s_per_replica"] / 1.25)


@pytest.mark.parametrize("args, message", [
    (["--model", "30b"], "invalid choice: '30b'"),
    (["--gpus", "0"], "must be positive"),
    (["--model", "70b", "--gpus", "2"], "70b needs at least 4 GPUs"),
    (["--set", "n_candidates=x"], "not an integer"),
    (["--set", "no_such_key=1"], "unknown config key"),
    (["--figures", "MALFORMED"], "is not valid JSON"),
    (["--figures", "LIST"], "must hold a JSON object"),
    (["--figures", "NEGATIVE"], "must be a positive number"),
    (["--figures", "MISSING"], "figures file not found"),
    (["--results", "EMPTY"], "no run in"),
    (["--results", "BADRUN"], "is not valid JSON"),
    (["--results", "UNDATED"], "a dated run needs a 'date' string"),
])
def test_bad_input_is_one_error_line_and_a_nonzero_exit(tmp_path, args, message):
    files = {"MALFORMED": '{"store": ', "LIST": "[1, 2]", "NEGATIVE": '{"store_judgments_per_s": -3}'}
    folders = {"EMPTY": None, "BADRUN": '{"date": ', "UNDATED": '{"parts": {}}'}
    args = [str(tmp_path / a) if a in files or a in folders or a == "MISSING" else a for a in args]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for name, text in folders.items():
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "run.json").write_text(text)
    proc = plan(*args)
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert message in proc.stderr


def test_help_has_examples():
    proc = plan("--help")
    assert proc.returncode == 0 and "--model 7b --gpus 1" in proc.stdout and "--figures" in proc.stdout
