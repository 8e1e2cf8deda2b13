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
    (["--nodes", "0"], "must be positive"),
    (["--engine", "tpu"], "invalid choice: 'tpu'"),
    (["--replica-start-s", "30"], "applies to --engine ray only"),
    (["--internode-efficiency", "1.5"], "must lie in (0, 1]"),
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


# --- a cluster: --nodes of --gpus each, --engine ray ---------------------------------------------------------------

GENERATION = ("self-instruct", "candidates", "judging", "eval (held-out EFT)")


def test_ray_spreads_generation_over_the_nodes_and_pays_a_replica_start_per_job():
    one = plan_json("--model", "70b", "--engine", "ray")
    four = plan_json("--model", "70b", "--engine", "ray", "--nodes", "4")
    assert (one["replicas"], four["replicas"]) == (8 // 4, 4 * 8 // 4)
    assert (four["gpus"], four["gpus_per_node"], four["generation_nodes"]) == (32, 8, 4)
    # The default start: 138 GB of weights at 2 GB/s, vLLM's 60 s warm-up, Ray's 27 s job start.
    assert four["replica_start_s"] == pytest.approx(2 * 69.0e9 / 2e9 + 60 + 27)
    for name in GENERATION:
        a, b = stage(one, name), stage(four, name)
        # The token work spreads over 4x the replicas; the start, once a job, does not shrink.
        assert a["start_s"] == b["start_s"] == b["jobs"] * four["replica_start_s"] > 0
        assert a["wall_s"] - a["start_s"] == pytest.approx(4 * (b["wall_s"] - b["start_s"]))
        assert a["wall_s"] / 4 < b["wall_s"] < a["wall_s"]
        assert b["gpus_busy"] == 32
    # The paper's self judge reads score probabilities: a second job in each judging stage.
    assert [stage(four, name)["jobs"] for name in GENERATION] == [1, 1, 2, 2]
    assert four["jobs"] == 6 and four["total"]["wall_s"] < 0.6 * one["total"]["wall_s"]


def test_on_one_node_the_ray_engine_costs_its_job_starts_over_the_vllm_engine():
    vllm = plan_json("--model", "7b", "--set", "judge_logprobs=no")
    ray = plan_json("--model", "7b", "--set", "judge_logprobs=no", "--engine", "ray")
    for name in GENERATION:
        assert stage(ray, name)["jobs"] == 1 and stage(vllm, name)["jobs"] == 0
        assert stage(ray, name)["wall_s"] == pytest.approx(stage(vllm, name)["wall_s"] + ray["replica_start_s"])
    assert stage(ray, "dpo training")["wall_s"] == stage(vllm, "dpo training")["wall_s"]
    # Checkpoints are committed while generating, not while replicas start: the writer's load is the same.
    assert ray["store"]["peak_demand_per_s"] == pytest.approx(vllm["store"]["peak_demand_per_s"])
    # With judge_logprobs the read is a job of its own whose new engines prefill the judge prompts again.
    reads = plan_json("--model", "7b", "--engine", "ray")
    judging = stage(reads, "judging")
    assert judging["jobs"] == 2 and judging["requests"] == 2 * stage(ray, "judging")["requests"]
    assert judging["prefilled_tokens"] > 3 * stage(ray, "judging")["prefilled_tokens"]
    default = plan_json("--model", "7b")  # the vllm engine's server still holds them: no read charged
    assert stage(default, "judging")["prefilled_tokens"] == stage(vllm, "judging")["prefilled_tokens"]


def test_the_vllm_engine_generates_on_one_node_of_a_cluster_and_says_so():
    one = plan_json("--model", "70b")
    four = plan_json("--model", "70b", "--nodes", "4")
    assert four["replicas"] == one["replicas"] == 2 and four["generation_nodes"] == 1
    for name in GENERATION:
        assert stage(four, name)["wall_s"] == stage(one, name)["wall_s"]
    assert stage(four, "dpo training")["wall_s"] < stage(one, "dpo training")["wall_s"]
    out = plan("--model", "70b", "--nodes", "4").stdout
    assert "on 4 nodes x 8 x H100-80GB-SXM (vllm engine)" in out
    assert "generation on one node of 4" in out and "--engine ray spreads it" in out


def test_training_across_nodes_scales_by_nodes_times_the_internode_efficiency():
    # 4 GPUs a node: 4 nodes make 16 ranks, what dpo_batch_size 16 allows.
    one = stage(plan_json("--model", "7b", "--gpus", "4"), "dpo training")
    four = plan_json("--model", "7b", "--gpus", "4", "--nodes", "4", "--engine", "ray")
    assert four["train_nodes"] == 4 and four["train_ranks"] == 16
    assert one["wall_s"] / stage(four, "dpo training")["wall_s"] == pytest.approx(4 * 0.8)
    slow = stage(plan_json("--model", "7b", "--gpus", "4", "--nodes", "4", "--internode-efficiency", "0.5"),
                 "dpo training")
    assert one["wall_s"] / slow["wall_s"] == pytest.approx(4 * 0.5)
    # 8 GPUs a node: the batch caps the ranks at 16, so training uses 2 of the 4 nodes, and says so.
    capped = plan_json("--model", "7b", "--nodes", "4", "--engine", "ray")
    assert (capped["train_ranks"], capped["train_nodes"]) == (16, 2)
    assert "2 of 4 nodes: dpo_batch_size 16 caps the ranks" in plan("--model", "7b", "--nodes", "4").stdout


def test_a_low_keep_rate_makes_self_instruct_several_jobs_each_paying_a_start():
    # self_instruct asks twice what it still lacks, until it has enough: each ask is a job on the ray engine.
    kept = plan_json("--model", "7b", "--engine", "ray", "--replica-start-s", "30")
    low = plan_json("--model", "7b", "--engine", "ray", "--replica-start-s", "30", "--instruct-keep", "0.3")
    assert stage(kept, "self-instruct")["jobs"] == 1
    jobs = stage(low, "self-instruct")["jobs"]
    assert jobs > 5 and stage(low, "self-instruct")["start_s"] == 30 * jobs
    assert low["replica_start_basis"] == "--replica-start-s"


def test_more_nodes_never_make_a_ray_round_slower(capsys):
    main = load_plan_module().main

    def run(*args):
        main([*args, "--engine", "ray", "--json"])
        return json.loads(capsys.readouterr().out)

    for model, gpus in (("7b", "1"), ("7b", "8"), ("70b", "4")):
        plans = [run("--model", model, "--gpus", gpus, "--nodes", str(n)) for n in range(1, 9)]
        for fewer, more in zip(plans, plans[1:]):
            assert more["total"]["wall_s"] <= fewer["total"]["wall_s"], (model, gpus, more["nodes"])


def test_the_header_names_the_cluster_and_help_has_a_cluster_example():
    out = plan("--model", "70b", "--nodes", "4", "--engine", "ray").stdout
    assert out.startswith("selfreward capacity plan: one round (t >= 2) of Llama-2-70B on 4 nodes x 8 x "
                          "H100-80GB-SXM (ray engine)")
    assert "6 Ray Data jobs a round" in out and "156 s a job" in out and "inter-node efficiency 0.8" in out
    assert "(ray engine)" not in plan("--model", "7b").stdout
    assert "--nodes 4 --engine ray" in plan("--help").stdout
