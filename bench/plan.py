"""Capacity plan: the wall time of one round (t >= 2) of the Self-Rewarding loop at
paper scale, on a given number of GPUs, without a GPU.

    .venv/bin/python bench/plan.py                                  # Llama-2-70B, 8 x H100, the paper preset
    .venv/bin/python bench/plan.py --model 7b --gpus 1
    .venv/bin/python bench/plan.py --model 13b --gpus 4 --gpu a100 --json
    .venv/bin/python bench/plan.py --model 7b --gpus 8 --set n_candidates=8 --set judge_samples=5
    .venv/bin/python bench/plan.py --figures bench.json              # measured figures from `bench/all.py --json`
    .venv/bin/python bench/plan.py --results my-results/             # dated runs elsewhere than bench/results/
    .venv/bin/python bench/plan.py --nodes 4 --engine ray             # a cluster: 4 nodes x 8 x H100, the ray engine

The round's sizes come from selfreward's config (the `paper` preset: 4,000 prompts,
N = 4 candidates, K = 3 judgments, the token limits, DPO epochs and batch);
`--set key=value` changes any of them as it does for `selfreward iterate`.
Throughputs come from published figures (PUBLISHED and TRAINING below, each with
its URL and date; the ones extrapolated say how). What this machine measured
supplies what transfers from a 2-core CPU to a GPU host: the run.db write rate
and the vllm engine's overhead over bare vLLM (`make bench`: each read from the
newest dated run in bench/results/ that measured it, or from --figures), and the
checkpoint commit rate (measured once; see docs/scaling.md). A throughput
measured on your own GPU replaces the published one through --figures
(decode_tokens_per_s, train_tflops_per_gpu).
A cluster is --nodes N of --gpus each: only the ray engine spreads generation over the nodes (one
Ray Data job per engine call, each starting its replicas: --replica-start-s); training spans them with
accelerate (num_machines) at --internode-efficiency.
docs/scaling.md states every assumption and what the estimate leaves out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selfreward.backends.judges import read_logprobs  # noqa: E402
from selfreward.config import PROMPTS_DIR, TYPES, coerce, resolve  # noqa: E402
from selfreward.errors import SelfRewardError  # noqa: E402

SOURCES = {
    "lambda": ("Lambda, 'LLMs inference benchmarks, using vLLM, on Lambda Cloud' (vLLM 0.5.4/0.6.0, "
               "A100/H100-80GB-SXM, ShareGPT prompts)",
               "https://github.com/LambdaLabsML/vllm-benchmark/blob/main/benchmark_v0.md", "2024-09"),
    "vllm060": ("vLLM blog, 'vLLM v0.6.0: 2.7x Throughput Improvement and 5x Latency Reduction': Llama 8B on "
                "1 x H100 and 70B on 4 x H100, ShareGPT", "https://blog.vllm.ai/2024/09/05/perf-update.html",
                "2024-09-05"),
    "sharegpt": ("vLLM issue #7567: benchmark_serving on ShareGPT, 1,000 requests = 215,196 input and "
                 "178,793 output tokens", "https://github.com/vllm-project/vllm/issues/7567", "2024-08-22"),
    "llama2": ("Touvron et al., 'Llama 2', Table 2: A100-80GB GPU-hours 184,320 (7B), 368,640 (13B), "
               "1,720,320 (70B), 2.0T tokens each", "https://arxiv.org/abs/2307.09288", "2023-07-18"),
    "llama3": ("Meta Llama 3 model card: H100-80GB GPU-hours 1.3M (8B), 6.4M (70B), over 15T tokens",
               "https://github.com/meta-llama/llama3/blob/main/MODEL_CARD.md", "2024-04-18"),
    "h100": ("NVIDIA H100 datasheet: 989 dense BF16 TFLOPS (SXM)", "https://www.nvidia.com/en-us/data-center/h100/",
             "2022"),
    "a100": ("NVIDIA A100 datasheet: 312 dense BF16 TFLOPS", "https://www.nvidia.com/en-us/data-center/a100/",
             "2020"),
}


@dataclass(frozen=True)
class Model:
    name: str
    params: float
    tp: int  # GPUs per vLLM replica (tensor parallel); also the fewest GPUs a round can run on


# Llama 2, the paper's family. 70B in bf16 is 138 GB of weights: Lambda served Llama 3.1 70B with tp 4 on 80 GB GPUs.
MODELS = {"7b": Model("Llama-2-7B", 6.74e9, 1), "13b": Model("Llama-2-13B", 13.0e9, 1),
          "70b": Model("Llama-2-70B", 69.0e9, 4)}
GPUS = {"h100": ("H100-80GB-SXM", 989e12), "a100": ("A100-80GB-SXM", 312e12)}

# Output tokens/s of ONE vLLM replica (model.tp GPUs) on ShareGPT, from Lambda's report.
# H100: its vLLM 0.6.0 table (num-scheduler-steps 10, 5,000 prompts, max-num-seqs 256): Llama 3.1 8B tp 1,
# Llama 3.1 70B tp 4. That table names no GPU; the report's scripts default to H100-80GB-SXM, and vLLM's own
# 0.6.0 announcement [vllm060] measured the same two set-ups on H100. A100: no 0.6.0 figure, so the H100 figure
# times the A100/H100 ratio of the same report's 0.5.4 table at 320 prompts (8B: 1517.54 / 3400.4; 70B on
# 4 GPUs: 956.53 / 2242.99).
H100_8B, H100_70B = 8088.35, 3542.88
A100_RATIO_8B, A100_RATIO_70B = 1517.54 / 3400.4, 956.53 / 2242.99
PUBLISHED = {
    ("h100", "7b"): (H100_8B, "Llama 3.1 8B as published; not scaled up for 6.7B, since Llama-2-7B has no GQA "
                              "(4x the KV cache per token, so fewer sequences in a batch)"),
    ("h100", "13b"): (H100_8B * 8.03 / 13.0, "extrapolated: Llama 3.1 8B x 8.03/13.0 (parameter count)"),
    ("h100", "70b"): (H100_70B, "Llama 3.1 70B, tp 4, as published"),
    ("a100", "7b"): (H100_8B * A100_RATIO_8B, "extrapolated: H100 8B figure x A100/H100 ratio 0.446"),
    ("a100", "13b"): (H100_8B * 8.03 / 13.0 * A100_RATIO_8B,
                      "extrapolated: H100 8B x 8.03/13.0 x A100/H100 ratio 0.446"),
    ("a100", "70b"): (H100_70B * A100_RATIO_70B, "extrapolated: H100 70B figure x A100/H100 ratio 0.426"),
}
# ShareGPT's input/output token ratio: the published rates already paid for this much prefill per output token.
SHAREGPT_IN_PER_OUT = 215196 / 178793


def achieved_tflops(params: float, tokens: float, gpu_hours: float) -> float:
    """Training FLOP rate per GPU that a published pretraining run achieved, every overhead included."""
    return 6 * params * tokens / (gpu_hours * 3600) / 1e12


TRAINING = {  # (TFLOPS per GPU, how it was got)
    ("a100", "7b"): (achieved_tflops(6.74e9, 2.0e12, 184320), "Llama 2 7B pretraining"),
    ("a100", "13b"): (achieved_tflops(13.0e9, 2.0e12, 368640), "Llama 2 13B pretraining"),
    ("a100", "70b"): (achieved_tflops(69.0e9, 2.0e12, 1720320), "Llama 2 70B pretraining"),
    ("h100", "7b"): (achieved_tflops(8.03e9, 15e12, 1.3e6), "Llama 3 8B pretraining"),
    ("h100", "13b"): (achieved_tflops(8.03e9, 15e12, 1.3e6), "extrapolated: the Llama 3 8B rate (no 13B run)"),
    ("h100", "70b"): (achieved_tflops(70.6e9, 15e12, 6.4e6), "Llama 3 70B pretraining"),
}

# Typical lengths, each capped by its config limit. Self-instruct has no stop string (self_instruct.py),
# so it is charged its whole instruct_max_new_tokens.
INSTRUCTION_TOKENS = 40  # a kept instruction (4-150 words)
ANSWER_TOKENS = 350  # a candidate answer (--answer-tokens: answers grow every round, as the paper notes)
JUDGMENT_TOKENS = 150  # a justification of up to 100 words and "Score: N"
CHARS_PER_TOKEN = 4.0  # English text with a Llama tokenizer, for the judge rubric's length
VLLM_START_S = 60.0  # engine start beyond reading weights: CUDA graphs and warm-up
QUALITY_METRICS = 10  # metrics rows an eval stage writes (parse rate, pairwise accuracy, ...)
# Measured here on 2026-11-22 (docs/scaling.md has the snippet): a Checkpoint.put_many of one judged answer
# (3 rows) per transaction into a real run.db, WAL, synchronous FULL. --figures may replace it.
CHECKPOINT_COMMITS_PER_S = 4574.0
# The ray engine: every engine call is a Ray Data job that starts its replicas on the model (in parallel), so each
# job pays one replica start: the weights read at --disk-gbps, VLLM_START_S of warm-up, and this much for Ray's
# side (actor and placement group, vLLM imported in the actor), from the job start that bench/ray_engine.py
# measured on this 2-core CPU with the 135M model (docs/engines.md, 2026-12-05; no GPU figure yet).
RAY_JOB_START_S = 27.0
# Training past one node (accelerate num_machines, DDP/FSDP over the network) against the same ranks in one node:
# an assumption, not a measurement (--internode-efficiency).
INTERNODE_EFFICIENCY = 0.8
ENGINES = ("vllm", "ray")


class PlanError(Exception):
    pass


# --- measured figures: the newest of bench/results/*.json, or a JSON --------------------------------------------

RESULTS = ROOT / "bench" / "results"


def figures_from_results(folder: Path) -> dict:
    """The run.db write rates and the vllm engine's overhead from the dated runs in `folder` (what `make bench`
    writes there): each figure from the newest full-size run that measured it."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("date"), str) \
                or not isinstance(data.get("parts"), dict):
            raise PlanError(f"{path}: a dated run needs a 'date' string and a 'parts' object")
        if not data.get("quick"):
            runs.append((data["date"], path, data["parts"]))
    runs.sort(key=lambda run: run[:2])

    def newest(part: str, key: str):
        for date, path, parts in reversed(runs):
            value = (parts.get(part) or {}).get(key)
            if value is not None:
                return value, str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        return None, None

    store, source = newest("store", "run_db_per_s")
    bare, _ = newest("store", "bare_per_s")
    if store is None or bare is None:
        raise PlanError(f"no run in {folder} measured the store (run `make bench`), or pass --figures FILE")
    overhead, overhead_source = newest("engines", "overhead_pct")
    if overhead_source and overhead_source != source:
        source += f"; engine overhead from {overhead_source}"
    return {"store_judgments_per_s": float(store), "store_bare_per_s": float(bare),
            "engine_overhead_pct": float(overhead) if overhead is not None else 0.0, "source": source}


FLAT_KEYS = {"store_judgments_per_s", "store_bare_per_s", "engine_overhead_pct", "checkpoint_commits_per_s",
             "decode_tokens_per_s", "train_tflops_per_gpu"}


def figures_from_json(path: Path, base: dict) -> dict:
    """`bench/all.py --json` output (parts `store`, `engines`), `bench/store.py --json` output, or a flat object
    of FLAT_KEYS."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"figures file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"figures file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise PlanError(f"figures file {path} must hold a JSON object")
    out = {**base, "source": path.name}
    if "run_db_per_s" in data:
        data = {"store": data}
    if "store" in data or "engines" in data:
        store, engines = data.get("store") or {}, data.get("engines") or {}
        pairs = {"store_judgments_per_s": store.get("run_db_per_s"), "store_bare_per_s": store.get("bare_per_s"),
                 "engine_overhead_pct": engines.get("overhead_pct")}
        data = {k: v for k, v in pairs.items() if v is not None}
    unknown = sorted(set(data) - FLAT_KEYS)
    if unknown:
        raise PlanError(f"figures file {path}: unknown key {', '.join(unknown)}; known: {', '.join(sorted(FLAT_KEYS))}")
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                key != "engine_overhead_pct" and value <= 0):
            raise PlanError(f"figures file {path}: {key} must be a positive number, got {value!r}")
        out[key] = float(value)
    return out


# --- the plan ---------------------------------------------------------------------------------------------------

def rubric_tokens() -> int:
    """The additive judge prompt's fixed text, shared by every judge request."""
    body = (PROMPTS_DIR / "additive_judge.txt").read_text().partition("\n---\n")[2]
    return round(len(body.replace("{instruction}", "").replace("{response}", "")) / CHARS_PER_TOKEN)


def generation(name, requests, prompt_tokens, prefilled, output_tokens, decode, prefill, tp, replicas) -> dict:
    """One vLLM stage: decode at the published rate; prompt tokens beyond what ShareGPT's mix already paid for
    are prefilled at the compute-bound rate. Requests spread evenly over the replicas."""
    extra = max(0.0, prefilled - SHAREGPT_IN_PER_OUT * output_tokens)
    replica_s = output_tokens / decode + extra / prefill
    return {"stage": name, "requests": requests, "prompt_tokens": prompt_tokens, "prefilled_tokens": prefilled,
            "output_tokens": output_tokens, "gpu_hours": replica_s * tp / 3600, "wall_s": replica_s / replicas,
            "gpus_busy": replicas * tp}


def with_reads(st: dict, reads: dict) -> dict:
    """A judging stage and the second job that reads its score probabilities, as one row."""
    return {**st, **{key: st[key] + reads[key] for key in ("requests", "prompt_tokens", "prefilled_tokens",
                                                            "output_tokens", "gpu_hours", "wall_s")}}


def self_instruct_jobs(want: int, keep: float, budget: int) -> int:
    """Engine calls of self_instruct's loop (stages/self_instruct.py) at the expected keep rate: it asks twice
    what it still lacks (at least 4) until it has `want` or spent `budget`."""
    kept = generated = jobs = 0
    while kept < want and generated < budget:
        k = min(budget - generated, max(2 * (want - kept), 4))
        generated, kept, jobs = generated + k, kept + math.floor(k * keep), jobs + 1
    return jobs


def plan(cfg, model_key: str, gpu: str, gpus: int, figures: dict, instruct_keep: float, pair_rate: float,
         eval_examples: int, train_efficiency: float, prefill_mfu: float, disk_gbps: float,
         answer_tokens: int = ANSWER_TOKENS, nodes: int = 1, engine: str = "vllm",
         replica_start_s: float | None = None, internode_efficiency: float = INTERNODE_EFFICIENCY) -> dict:
    """One round on `nodes` nodes of `gpus` GPUs each."""
    model = MODELS[model_key]
    if engine not in ENGINES:
        raise PlanError(f"unknown engine '{engine}'; choose one of: {', '.join(ENGINES)}")
    if replica_start_s is not None and engine != "ray":
        raise PlanError("--replica-start-s applies to --engine ray only (the vllm engine starts its server once)")
    if gpus < model.tp:
        raise PlanError(f"{model_key} needs at least {model.tp} GPUs: bf16 weights of {2 * model.params / 1e9:.0f} GB "
                        f"and a KV cache on 80 GB GPUs (vLLM tensor parallel {model.tp})")
    if cfg.judge_mode != "additive" or cfg.train_method not in ("dpo", "simpo"):
        raise PlanError("the plan models the additive judge with dpo or simpo training only")
    gpu_name, peak = GPUS[gpu]
    decode, decode_note = PUBLISHED[(gpu, model_key)]
    if "decode_tokens_per_s" in figures:
        decode, decode_note = figures["decode_tokens_per_s"], f"measured ({figures['source']})"
    # The vllm engine's client and server cost this much over bare vLLM, as measured here; never credited below 0.
    decode /= 1 + max(0.0, figures["engine_overhead_pct"]) / 100
    prefill = prefill_mfu * peak * model.tp / (2 * model.params)
    # The vllm engine serves from the coordinating node; the ray engine places replicas on every node.
    ray = engine == "ray"
    total_gpus = gpus * nodes
    replicas = (total_gpus if ray else gpus) // model.tp
    weights_s = 2 * model.params / (disk_gbps * 1e9)
    start_basis = "--replica-start-s"
    if ray and replica_start_s is None:
        replica_start_s = weights_s + VLLM_START_S + RAY_JOB_START_S
        start_basis = (f"{weights_s:.0f} s reading weights at {disk_gbps:g} GB/s + {VLLM_START_S:.0f} s vLLM warm-up + "
                       f"{RAY_JOB_START_S:.0f} s Ray job start measured on CPU; --replica-start-s to change")
    logprobs = read_logprobs(cfg)

    instr = min(INSTRUCTION_TOKENS, cfg.instruct_max_new_tokens)
    answer = min(answer_tokens, cfg.candidate_max_new_tokens)
    judgment = min(JUDGMENT_TOKENS, cfg.judge_max_new_tokens)
    rubric = rubric_tokens()
    prompts, n, k = cfg.prompts_per_round, cfg.n_candidates, cfg.judge_samples
    caching = cfg.vllm_prefix_caching

    # Self-instruct: one task per generation from a random 8-shot list (no shared prefix to reuse).
    attempts = min(math.ceil(prompts / instruct_keep), prompts * cfg.instruct_max_attempts)
    shots = cfg.fewshot_ift + cfg.fewshot_generated
    si_prompt = 12 + (shots + 1) * (instr + 3)
    si = generation("self-instruct", attempts, attempts * si_prompt, attempts * si_prompt,
                    attempts * cfg.instruct_max_new_tokens, decode, prefill, model.tp, replicas)
    # Candidates: the engine sends one request per sample; the prefix cache prefills their shared prompt once.
    cand = generation("candidates", prompts * n, prompts * n * instr, prompts * instr * (1 if caching else n),
                      prompts * n * answer, decode, prefill, model.tp, replicas)
    # Judging: the rubric is the same in every request and the K samples of one answer share the whole prompt,
    # so with prefix caching only the instruction and the answer are prefilled, once per answer.
    judge_prompt = rubric + instr + answer
    answers = prompts * n
    judging = generation("judging", answers * k, answers * k * judge_prompt,
                         answers * (instr + answer) + rubric if caching else answers * k * judge_prompt,
                         answers * k * judgment, decode, prefill, model.tp, replicas)
    # (Pair building is a pure function over rows: 0.17 s for 16,000 candidates on this machine's CPU; left out.)
    evaluation = generation("eval (held-out EFT)", eval_examples, eval_examples * judge_prompt,
                            eval_examples * (instr + answer) + rubric if caching else eval_examples * judge_prompt,
                            eval_examples * judgment, decode, prefill, model.tp, replicas)

    def reads(judged: int, samples: int) -> dict:
        """The ray engine's score-probability read (judge_logprobs): a second job, one token per judgment, on
        the judge prompt and the judgment up to its score. A new job's prefix cache starts empty, so those are
        prefilled again (the vllm engine's server still holds them: left out there, as before)."""
        full = judge_prompt + judgment
        return generation("", judged * samples, judged * samples * full,
                          judged * (instr + answer + samples * judgment) + rubric if caching
                          else judged * samples * full, judged * samples, decode, prefill, model.tp, replicas)

    judge_jobs = 1
    if ray and logprobs:
        judging, evaluation, judge_jobs = with_reads(judging, reads(answers, k)), \
            with_reads(evaluation, reads(eval_examples, 1)), 2
    # The ray engine: every engine call is a job, the jobs run one at a time, and each first starts its replicas
    # (in parallel, so one start a job). The vllm engine starts its server once, in the loads below.
    jobs = {"self-instruct": self_instruct_jobs(prompts, instruct_keep, prompts * cfg.instruct_max_attempts),
            "candidates": 1, "judging": judge_jobs, "eval (held-out EFT)": judge_jobs}
    for st in (si, cand, judging, evaluation):
        st["jobs"] = jobs[st["stage"]] if ray else 0
        st["start_s"] = st["jobs"] * replica_start_s if ray else 0.0
        st["wall_s"] += st["start_s"]
        st["gpu_hours"] += st["start_s"] * st["gpus_busy"] / 3600

    # DPO with LoRA, a token of chosen or rejected: the policy's forward, its forward again (train.py recomputes
    # activations on CUDA) and its backward through frozen weights (activation gradients only), 2P each; and the
    # reference's forward (2P; the adapter switched off). SimPO has no reference.
    pairs = round(prompts * pair_rate)
    seq = min(instr + answer, cfg.max_length)
    train_tokens = pairs * cfg.dpo_epochs * 2 * seq
    flops = train_tokens * (8 if cfg.train_method == "dpo" else 6) * model.params
    tflops, train_note = TRAINING[(gpu, model_key)]
    if "train_tflops_per_gpu" in figures:
        tflops, train_note = figures["train_tflops_per_gpu"], f"measured ({figures['source']})"
    per_gpu = tflops * 1e12 * train_efficiency
    # Every rank needs at least one pair of a step: dpo_batch_size caps data parallelism, and so the nodes used.
    ranks = min(total_gpus, cfg.dpo_batch_size)
    train_nodes = math.ceil(ranks / gpus)
    per_node = math.ceil(ranks / train_nodes)
    scaling = 1.0 if per_node == 1 else 0.9 if per_node <= 8 else 0.8
    if train_nodes > 1:
        scaling *= internode_efficiency
    train_s = flops / (per_gpu * ranks * scaling)
    steps = math.ceil(pairs * cfg.dpo_epochs / cfg.dpo_batch_size)
    training = {"stage": f"{cfg.train_method} training", "requests": pairs, "prompt_tokens": train_tokens,
                "prefilled_tokens": 0, "output_tokens": 0, "gpu_hours": train_s * ranks / 3600,
                "wall_s": train_s, "gpus_busy": ranks, "steps": steps, "nodes": train_nodes}
    # Weights read or written once each a round: the vLLM start (on the ray engine, in each job's start instead),
    # the trainer's load, the merge's reload and the merged save. Each node reads from its own disk, in parallel.
    load_s = 3 * weights_s if ray else 4 * weights_s + VLLM_START_S
    loads = {"stage": "model loads, merge, save", "requests": 0, "prompt_tokens": 0, "prefilled_tokens": 0,
             "output_tokens": 0, "gpu_hours": load_s * total_gpus / 3600, "wall_s": load_s, "gpus_busy": total_gpus}
    stages = [si, cand, judging, training, evaluation, loads]

    # --- run.db: rows each stage commits, and the checkpoint commits while generating
    rows = {"prompts": prompts, "candidates": answers, "judgments": answers * k, "pairs": prompts,
            "training_steps": steps, "eft_eval": eval_examples, "metrics": QUALITY_METRICS, "stages": 6,
            "models": 1, "rounds": 1}
    commits = {"self-instruct": attempts, "candidates": prompts, "judging": answers,
               "eval (held-out EFT)": eval_examples}
    # Checkpoints are committed while a stage generates, not while its replicas start.
    demand = {s["stage"]: commits[s["stage"]] / (s["wall_s"] - s["start_s"]) for s in stages if s["stage"] in commits}
    commit_rate = figures.get("checkpoint_commits_per_s", CHECKPOINT_COMMITS_PER_S)
    peak_stage = max(demand, key=demand.get)
    store = {"rows": rows, "rows_total": sum(rows.values()), "rows_per_s": figures["store_judgments_per_s"],
             "commit_s": sum(rows.values()) / figures["store_judgments_per_s"],
             "checkpoint_commits": sum(commits.values()), "checkpoint_s": sum(commits.values()) / commit_rate,
             "checkpoint_commits_per_s": commit_rate, "peak_demand_per_s": demand[peak_stage],
             "peak_stage": peak_stage, "headroom": commit_rate / demand[peak_stage],
             # Commit demand grows with the number of replicas; the single writer saturates near this GPU count.
             "writer_limit_gpus": replicas * model.tp * commit_rate / demand[peak_stage]}
    wall = sum(s["wall_s"] for s in stages) + store["commit_s"]
    return {"model": model.name, "model_key": model_key, "gpu": gpu_name, "gpus": total_gpus, "nodes": nodes,
            "gpus_per_node": gpus, "engine": engine, "generation_nodes": nodes if ray else 1, "replicas": replicas,
            "tensor_parallel": model.tp, "train_ranks": ranks, "train_nodes": train_nodes,
            "replica_start_s": replica_start_s, "replica_start_basis": start_basis if ray else None,
            "jobs": sum(jobs.values()) if ray else 0, "judge_logprobs": logprobs,
            "sizes": {"prompts": prompts, "n_candidates": n, "judge_samples": k, "pairs": pairs,
                      "self_instruct_generations": attempts, "eval_examples": eval_examples,
                      "instruct_max_new_tokens": cfg.instruct_max_new_tokens, "answer_tokens": answer,
                      "judgment_tokens": judgment, "instruction_tokens": instr, "rubric_tokens": rubric,
                      "prefix_caching": caching, "dpo_epochs": cfg.dpo_epochs, "dpo_batch_size": cfg.dpo_batch_size},
            "stages": stages, "store": store,
            "total": {"wall_s": wall, "gpu_hours": sum(s["gpu_hours"] for s in stages),
                      "gpu_hours_held": wall * total_gpus / 3600},
            "rates": {"decode_tokens_per_s_per_replica": decode, "decode_basis": decode_note,
                      "prefill_tokens_per_s_per_replica": prefill, "train_tflops_per_gpu": tflops,
                      "train_basis": train_note},
            "assumptions": {"instruct_keep": instruct_keep, "pair_rate": pair_rate,
                            "train_efficiency": train_efficiency, "internode_efficiency": internode_efficiency,
                            "prefill_mfu": prefill_mfu, "disk_gbps": disk_gbps,
                            "sharegpt_input_per_output": SHAREGPT_IN_PER_OUT,
                            "engine_overhead_pct": figures["engine_overhead_pct"]},
            "figures": figures,
            "sources": [{"key": key, "what": what, "url": url, "date": date}
                        for key, (what, url, date) in SOURCES.items()]}


# --- output -----------------------------------------------------------------------------------------------------

def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def tokens(n: float) -> str:
    return "-" if not n else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,.0f}"


def count(n: int) -> str:
    return f"{n:,}" if n else "-"


def render(p: dict) -> str:
    s = p["sizes"]
    where = f"{p['gpus_per_node']} x {p['gpu']}"
    if p["nodes"] > 1:
        where = f"{p['nodes']} nodes x {where}"
    if p["engine"] != "vllm" or p["nodes"] > 1:
        where += f" ({p['engine']} engine)"
    rates = p["rates"]
    serving = (f"generation: {p['replicas']} vLLM replica(s) x tensor parallel {p['tensor_parallel']}, "
                  f"{rates['decode_tokens_per_s_per_replica']:,.0f} output tok/s each ({rates['decode_basis']})")
    if p["engine"] == "ray":
        judges = "; judging and eval are 2 jobs each: the score-probability read (judge_logprobs) is a job of its " \
                 "own, its prompts prefilled again" if p["judge_logprobs"] else ""
        serving += (f"\n  ray engine: replicas on {p['generation_nodes']} node(s); {p['jobs']} Ray Data jobs a "
                       f"round, one at a time, each starting its replicas first: {p['replica_start_s']:.0f} s a job "
                       f"({p['replica_start_basis']}){judges}")
    elif p["nodes"] > 1:
        serving += (f"\n  vllm engine: generation on one node of {p['nodes']} (the vllm engine serves from one "
                       f"node; --engine ray spreads it over all of them)")
    training = (f"training: {p['train_ranks']} rank(s), {rates['train_tflops_per_gpu']:.0f} TFLOPS/GPU achieved "
                f"({rates['train_basis']}) x fine-tuning efficiency {p['assumptions']['train_efficiency']:g}")
    if p["train_nodes"] > 1:
        training += (f", on {p['train_nodes']} nodes (accelerate num_machines) x inter-node efficiency "
                     f"{p['assumptions']['internode_efficiency']:g}")
    if p["train_nodes"] < p["nodes"]:
        training += (f"; {p['train_nodes']} of {p['nodes']} nodes: dpo_batch_size {s['dpo_batch_size']} caps the "
                     f"ranks (a pair per rank a step)")
    lines = [f"selfreward capacity plan: one round (t >= 2) of {p['model']} on {where}",
             f"sizes: {s['prompts']:,} prompts, N = {s['n_candidates']}, K = {s['judge_samples']}, {s['pairs']:,} "
             f"pairs, {s['eval_examples']} eval examples; tokens: instruction {s['instruction_tokens']}, answer "
             f"{s['answer_tokens']}, judgment {s['judgment_tokens']}, rubric {s['rubric_tokens']}; prefix caching "
             f"{'on' if s['prefix_caching'] else 'off'}",
             serving, training, "",
             f"{'stage':26} {'requests':>9} {'prompt tok':>10} {'prefilled':>10} {'output tok':>10} {'GPUs':>5} "
             f"{'GPU-h':>7} {'wall':>9}"]
    for st in p["stages"]:
        lines.append(f"{st['stage']:26} {count(st['requests']):>9} {tokens(st['prompt_tokens']):>10} "
                     f"{tokens(st['prefilled_tokens']):>10} {tokens(st['output_tokens']):>10} "
                     f"{st['gpus_busy'] or '-':>5} {st['gpu_hours']:7.2f} {duration(st['wall_s']):>9}")
    store, total = p["store"], p["total"]
    lines.append(f"{'run.db stage commits':26} {'':>9} {'':>10} {'':>10} {'':>10} {'':>5} {'':>7} "
                 f"{duration(store['commit_s']):>9}")
    lines.append(f"{'total':26} {'':>9} {'':>10} {'':>10} {'':>10} {p['gpus']:>5} {total['gpu_hours']:7.1f} "
                 f"{duration(total['wall_s']):>9}")
    lines += ["", f"(training 'prompt tok' = tokens trained on: chosen and rejected, prompt + answer; GPU-h counts "
                  f"busy GPUs, {total['gpu_hours_held']:.1f} GPU-h held for the round's wall time)", "",
              f"run.db writes a round ({p['figures']['source']}):"]
    lines.append("  " + ", ".join(f"{t} {n:,}" for t, n in store["rows"].items())
                 + f" = {store['rows_total']:,} rows; at {store['rows_per_s']:,.0f} rows/s (run.db with FTS5 "
                   f"triggers) {store['commit_s']:.1f} s of stage commits")
    lines.append(f"  checkpoint transactions while generating: {store['checkpoint_commits']:,} "
                 f"({store['checkpoint_s']:.1f} s at {store['checkpoint_commits_per_s']:,.0f} commits/s); busiest "
                 f"stage {store['peak_stage']} needs {store['peak_demand_per_s']:,.0f}/s, headroom "
                 f"{store['headroom']:,.0f}x: the single writer keeps up to about {store['writer_limit_gpus']:,.0f} "
                 f"GPUs of this model")
    lines += ["", "sources:"] + [f"  [{x['key']}] {x['what']}, {x['url']} ({x['date']})" for x in p["sources"]]
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------------------------

def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise PlanError(f"--set wants key=value, got '{item}'")
        key = key.strip().replace("-", "_")
        kind = TYPES.get(key, str)
        try:
            value = float(raw) if kind is float else int(raw) if kind is int else raw
        except ValueError:
            raise PlanError(f"--set {key}: '{raw}' is not {'an integer' if kind is int else 'a number'}") from None
        out[key] = coerce(key, value)
    return out


def positive(kind):
    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return check


def fraction(text: str) -> float:
    value = positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> None:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="70b", choices=list(MODELS), help="Llama 2 size (default 70b, the paper's)")
    ap.add_argument("--gpus", type=positive(int), default=8, metavar="N",
                    help="GPUs for the round, per node with --nodes (default 8)")
    ap.add_argument("--nodes", type=positive(int), default=1, metavar="N",
                    help="nodes of --gpus GPUs each (default 1); training spans them with accelerate, generation "
                         "only with --engine ray")
    ap.add_argument("--engine", default="vllm", choices=ENGINES,
                    help="policy engine (default vllm: one server on one node; ray: one Ray Data job per engine "
                         "call, replicas on every node)")
    ap.add_argument("--replica-start-s", type=positive(float), metavar="S",
                    help="--engine ray: seconds a job takes to start its replicas (default: the weights read at "
                         f"--disk-gbps + {VLLM_START_S:.0f} s vLLM warm-up + {RAY_JOB_START_S:.0f} s Ray job start)")
    ap.add_argument("--internode-efficiency", type=fraction, metavar="F", default=INTERNODE_EFFICIENCY,
                    help="training rate across nodes as a share of the same ranks within one node "
                         f"(default {INTERNODE_EFFICIENCY:g}, an assumption)")
    ap.add_argument("--gpu", default="h100", choices=list(GPUS), help="80 GB SXM GPU kind (default h100)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="any selfreward config key, over the paper preset (repeatable)")
    ap.add_argument("--figures", type=Path, metavar="FILE",
                    help="measured figures JSON: `bench/all.py --json` or `bench/store.py --json` output, or an object "
                    f"with any of {', '.join(sorted(FLAT_KEYS))}; it overrides --results figure by figure")
    ap.add_argument("--results", type=Path, metavar="DIR", default=RESULTS,
                    help="dated benchmark runs (default bench/results/, where `make bench` writes): each measured "
                         "figure from the newest run that has it")
    ap.add_argument("--instruct-keep", type=fraction, metavar="F", default=0.5,
                    help="share of self-instruct generations that pass the filters (default 0.5)")
    ap.add_argument("--pair-rate", type=fraction, metavar="F", default=0.9,
                    help="share of prompts that give a pair, not a tie (default 0.9)")
    ap.add_argument("--eval-examples", type=positive(int), metavar="N", default=541,
                    help="held-out EFT answers judged by the eval stage (default 541, the paper's EFT eval split)")
    ap.add_argument("--answer-tokens", type=positive(int), metavar="N", default=ANSWER_TOKENS,
                    help=f"mean tokens of a candidate answer, capped by candidate_max_new_tokens "
                         f"(default {ANSWER_TOKENS})")
    ap.add_argument("--train-efficiency", type=fraction, metavar="F", default=0.5,
                    help="fine-tuning FLOP rate as a share of the pretraining rate it is based on (default 0.5)")
    ap.add_argument("--prefill-mfu", type=fraction, metavar="F", default=0.5,
                    help="share of peak BF16 FLOPS that prompt prefill reaches (default 0.5)")
    ap.add_argument("--disk-gbps", type=positive(float), metavar="GB_S", default=2.0,
                    help="GB/s for reading and writing model weights (default 2)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    try:
        try:
            figures = figures_from_results(args.results)
        except PlanError:
            if args.figures is None:
                raise
            figures = {}
        if args.figures is not None:
            figures = figures_from_json(args.figures, figures)
        if "store_judgments_per_s" not in figures:
            raise PlanError("no run.db write rate: give store_judgments_per_s in --figures")
        figures.setdefault("engine_overhead_pct", 0.0)
        cfg = resolve({}, {"preset": "paper", **parse_sets(args.sets)})
        result = plan(cfg, args.model, args.gpu, args.gpus, figures, args.instruct_keep, args.pair_rate,
                      args.eval_examples, args.train_efficiency, args.prefill_mfu, args.disk_gbps, args.answer_tokens,
                      args.nodes, args.engine, args.replica_start_s, args.internode_efficiency)
    except (PlanError, SelfRewardError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
