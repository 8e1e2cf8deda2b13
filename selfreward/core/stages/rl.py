"""Stage 'rl' (train_method 'grpo' or 'rloo'): online RL in place of the round's
candidates, judging, pairs and DPO.

The policy (M_{t-1} plus a LoRA adapter) samples n_candidates answers to each of
the round's prompts; the configured judge scores every answer (the mean of its
parsed samples; an answer none of whose judgments parse gets no reward, which
TRL turns into a zero advantage, never a score of 0); TRL's GRPO or RLOO
trainer updates the adapter with a KL penalty to M_{t-1} (the adapter switched
off). Every sampled answer is stored as a candidate and every judgment as a
judgment, in the one transaction that also records M_t, so auditors see the
online data like any other round's.
"""

from __future__ import annotations

from selfreward.backends.judges import Group, judge_kind
from selfreward.core.stages.judge import judgment_row, judging_detail
from selfreward.core.stages.train import copy_parent, stage_detail
from selfreward.core.store import now
from selfreward.training.fit import model_kind, model_row
from selfreward.training.recipes import online


class JudgeReward:
    """A TRL reward function backed by the run's judge. It keeps what it saw, for the store."""

    def __init__(self, judge, samples: int, seed: int, model: str, max_tokens: int, expected: bool = False):
        self.judge, self.samples, self.seed, self.model, self.max_tokens = judge, samples, seed, model, max_tokens
        self.expected = expected                # pair_score 'expected': reward by the logprob-weighted score
        self.candidates: list[dict] = []        # candidate rows, without ids yet
        self.verdicts: list[list] = []          # per candidate, its judge samples
        self.__name__ = "judge"                 # TRL logs each reward function by name

    def __call__(self, prompts, completions, prompt_id, instruction, completion_ids=None, trainer_state=None, **_):
        step = trainer_state.global_step if trainer_state is not None else 0
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        # Consecutive completions of one prompt form one group (TRL samples num_generations per prompt).
        spans: list[tuple[int, int]] = []
        for i, pid in enumerate(prompt_id):
            if spans and prompt_id[spans[-1][0]] == pid:
                spans[-1] = (spans[-1][0], i + 1)
            else:
                spans.append((i, i + 1))
        groups = [Group(instruction[a], texts[a:b]) for a, b in spans]
        results = self.judge.judge_groups(groups, self.samples, self.seed + len(self.candidates))
        rewards: list[float | None] = []
        for (a, b), result in zip(spans, results):
            for i, verdicts in zip(range(a, b), result.verdicts):
                scores = [v.expected if self.expected else v.parsed.score for v in verdicts
                          if v.parsed.score is not None and (v.expected is not None or not self.expected)]
                rewards.append(sum(scores) / len(scores) if scores else None)
                n = len(completion_ids[i]) if completion_ids is not None else None
                self.candidates.append({"prompt_id": prompt_id[i], "text": texts[i], "model": f"{self.model}@{step}",
                                        "n_tokens": n,
                                        "finish_reason": None if n is None else
                                        "length" if n >= self.max_tokens else "stop"})
                self.verdicts.append(verdicts)
        return rewards


def run(ctx, t: int) -> None:
    if ctx.run.stage_done(t, "rl"):
        return
    cfg = ctx.cfg
    prompts = ctx.run.rows("select id, text from prompts where round = ? order by id", [t])
    parent = ctx.run.model(ctx.parent(t))
    name = f"M{t}"
    with ctx.stage(t, "rl") as commit:
        if not prompts:
            return copy_parent(ctx.run, commit, t, parent, "prompts")
        if not judge_kind(cfg).uses_policy:
            ctx.release()  # self-instruct's engine is not needed by any other judge: free it for training
        judge = ctx.judge(parent["name"])  # the self judge is M_{t-1}, served beside the trainer
        seed = ctx.seed(t, "rl")
        reward = JudgeReward(judge, cfg.judge_samples, seed, f"{parent['name']}+{cfg.train_method}",
                             cfg.candidate_max_new_tokens, expected=cfg.pair_score == "expected")
        out = ctx.run.path / "models" / name
        logs, adapter, info = online(ctx.run.model_path(parent["name"]), prompts, reward, cfg, out, t)
        info["label"] = cfg.train_method
        stamp, provenance = now(), ctx.judge_provenance(parent["name"], seed)
        counts: dict[int, int] = {}

        def write(db):
            rows = []
            for cand, verdicts in zip(reward.candidates, reward.verdicts):
                idx = counts[cand["prompt_id"]] = counts.get(cand["prompt_id"], -1) + 1
                cid = db["candidates"].insert({"round": t, "prompt_id": cand["prompt_id"], "idx": idx,
                                               "text": cand["text"], "n_tokens": cand["n_tokens"],
                                               "finish_reason": cand["finish_reason"],
                                               "model": cand["model"]}).last_pk
                rows += [judgment_row(t, cid, k, judge, v, stamp, provenance) for k, v in enumerate(verdicts)]
            db["judgments"].insert_all(rows)

        commit.add(write)
        commit.insert_all("training_steps", logs)
        commit.insert_all("models", [model_row(ctx.run, name, t, model_kind(info), parent["name"], out, adapter,
                                               f"{cfg.train_method} on {len(prompts)} prompts x "
                                               f"{cfg.n_candidates} samples", info)])
        scored = sum(any(v.parsed.score is not None for v in vs) for vs in reward.verdicts)
        commit.detail = {"prompts": len(prompts), "samples": len(reward.candidates), "rewarded": scored,
                         **judging_detail([{"score": v.parsed.score, "reason": v.parsed.reason, "retries": v.retries,
                                            "expected_score": v.expected} for vs in reward.verdicts for v in vs],
                                          []),
                         **stage_detail(info)}
