"""A small but complete three-round run, written with the real store API.

Round 1 is SFT only (as in the loop); rounds 2 and 3 have prompts, candidates,
judgments (some unparsed), pairs of every status, DPO steps and EFT metrics;
one `selfreward eval judge` result sits in eval_metrics. Round 3's answers are
longer than round 2's, so the length-drift chart has something to show.
"""

from __future__ import annotations

from pathlib import Path

from selfreward.config import resolve
from selfreward.core.stages.pairs import build_pairs
from selfreward.core.store import Run

STAMP = "2025-01-01T00:00:00+00:00"
# Per prompt, per candidate: the judge samples' scores (None = did not parse).
SCORES = [
    [[5, 4], [2, 3], [1, None]],          # kept
    [[3, 3], [4, 5], [0, 1]],             # kept
    [[2, 2], [2, 2], [None, 2]],          # tie
    [[None, None], [None, None], [None, None]],  # unscored
]
EVAL_DATASET = "data/<held-out> & ranked.jsonl"


def build_fixture_run(path: Path) -> Run:
    run = Run.create(path, resolve({}, {"preset": "tiny"}))
    db = run.db
    db["rounds"].insert_all(
        {"round": t, "model_in": f"M{t - 1}", "model_out": f"M{t}", "started_at": STAMP, "finished_at": STAMP,
         "wall_s": 60.0 * t} for t in (1, 2, 3))
    db["models"].insert_all(
        [{"name": "M0", "round": 0, "kind": "base", "parent": None, "path": "base", "adapter_path": None,
          "note": None, "created_at": STAMP}]
        + [{"name": f"M{t}", "round": t, "kind": "sft-lora" if t == 1 else "dpo-lora", "parent": f"M{t - 1}",
            "path": "base", "adapter_path": f"models/M{t}", "note": None, "created_at": STAMP} for t in (1, 2, 3)])
    db["training_steps"].insert_all(
        {"round": 1, "kind": "sft", "step": s, "epoch": s / 5, "loss": 2.5 - 0.3 * s, "learning_rate": 1e-4,
         "grad_norm": 1.0, "rewards_margin": None, "rewards_accuracy": None, "rewards_chosen": None,
         "rewards_rejected": None} for s in range(1, 6))
    judgment_id = 0
    for t in (2, 3):
        for p, per_candidate in enumerate(SCORES):
            prompt_id = t * 100 + p
            db["prompts"].insert({"id": prompt_id, "round": t, "text": f"Round {t} prompt {p}: explain <tags> & co",
                                  "source": "self_instruct", "created_at": STAMP})
            for idx, samples in enumerate(per_candidate):
                candidate_id = prompt_id * 10 + idx
                db["candidates"].insert({
                    "id": candidate_id, "round": t, "prompt_id": prompt_id, "idx": idx,
                    "text": f"Answer {idx} to prompt {prompt_id}.\nSecond line.",
                    "n_tokens": 20 * t + 10 * idx, "finish_reason": "stop", "model": f"M{t - 1}"})
                for k, score in enumerate(samples):
                    judgment_id += 1
                    db["judgments"].insert({
                        "id": judgment_id, "round": t, "candidate_id": candidate_id, "sample": k,
                        "judge": f"self:M{t - 1}", "score": score,
                        "reason": None if score is not None else "no score found",
                        "rationale": f"Looks fine. Score: {score}", "raw": f"Score: {score}", "n_tokens": 12,
                        "template_sha": "abc123", "created_at": STAMP, "prompt_tokens": None,
                        "completion_tokens": None})
        cands = run.rows("select id, prompt_id, text from candidates where round=?", [t])
        judgments = run.rows("select candidate_id, score from judgments where round=?", [t])
        db["pairs"].insert_all({"round": t, **row} for row in build_pairs(cands, judgments))
        db["training_steps"].insert_all(
            {"round": t, "kind": "dpo", "step": s, "epoch": s / 4, "loss": 0.69 - 0.05 * s * t / 2,
             "learning_rate": 5e-6, "grad_norm": 0.5, "rewards_margin": 0.1 * s * t, "rewards_accuracy": 0.25 * s,
             "rewards_chosen": 0.05 * s, "rewards_rejected": -0.05 * s} for s in range(1, 5))
    eft = {"M0": (0.6, 0.3, 0.5, 1.4), "M1": (0.9, 0.5, 0.65, 0.9), "M2": (0.95, 0.55, 0.7, 0.8),
           "M3": (1.0, 0.6, 0.72, 0.7)}
    db["metrics"].insert_all(
        {"round": max(1, int(model[1:])), "model": model, "name": name, "value": value}
        for model, values in eft.items()
        for name, value in zip(("eft_parse_rate", "eft_exact_match", "eft_pairwise_accuracy", "eft_mae"), values))
    db["metrics"].insert_all({"round": max(1, int(m[1:])), "model": m, "name": "eft_n", "value": 12.0} for m in eft)
    eval_values = {"n_prompts": 10.0, "n_responses": 40.0, "parse_rate": 0.975, "pairwise_accuracy": 0.61,
                   "pairwise_ties": 0.1, "five_best": 0.4, "exact_match": 0.3, "spearman": 0.35, "kendall_tau": 0.28,
                   "judgments_per_s": 3.2}
    db["eval_metrics"].insert_all(
        {"eval_id": "e1f2a3b4c5d6", "kind": "judge", "judge": "self:M3", "model": "M3", "dataset": EVAL_DATASET,
         "name": name, "value": value, "created_at": STAMP} for name, value in eval_values.items())
    return run


def kept_pairs(run: Run, t: int) -> list[dict]:
    return run.rows("select * from pairs where round=? and status='kept' order by id", [t])
