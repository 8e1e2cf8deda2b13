"""Stage: self-instruction creation with M_{t-1} (table `prompts`): few-shot the model with a numbered task list and
keep the new tasks that pass the filters (length, blacklist, ROUGE-L dedupe)."""

from __future__ import annotations

import random
import re

from selfreward.data import read_ift
from selfreward.backends.engines import Engine, Sampling
from selfreward.prompts import Template
from selfreward.core.store import now

# Tasks a text-only model cannot do, after Self-Instruct's keyword filter.
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram", "photo", "url",
             "link", "website")


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F-measure of two token lists (longest common subsequence)."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def parse_instruction(continuation: str) -> str:
    """The new task is the text up to the next numbered item or blank line."""
    text = re.split(r"\n\s*\d+\s*[.)]|\n\s*\n", continuation, maxsplit=1)[0]
    return " ".join(text.split()).strip()


def reject_reason(task: str, pool_tokens: list[list[str]], min_words: int, max_words: int,
                  threshold: float) -> str | None:
    words = task.split()
    if len(words) < min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    lowered = f" {' '.join(_tokens(task))} "
    if any(f" {w} " in lowered for w in BLACKLIST):
        return "blacklist"
    if not task[0].isalnum():
        return "bad_start"
    toks = _tokens(task)
    if any(rouge_l(toks, other) > threshold for other in pool_tokens):
        return "near_duplicate"
    return None


def fewshot_prompt(template: Template, ift: list[str], generated: list[str], n_ift: int, n_gen: int,
                   rng: random.Random) -> str:
    have_gen = min(n_gen, len(generated))
    # IFT fills the places of generated examples that do not exist yet.
    shots = rng.sample(ift, min(len(ift), n_ift + n_gen - have_gen))
    shots += rng.sample(generated, have_gen)
    rng.shuffle(shots)
    tasks = "\n".join(f"{k}. {' '.join(s.split())}" for k, s in enumerate(shots, 1))
    return template.render(tasks=tasks, next=str(len(shots) + 1))


def self_instruct(engine: Engine, template: Template, ift: list[str], generated: list[str], want: int,
                  sampling: Sampling, cfg) -> tuple[list[str], dict]:
    """Up to `want` new tasks, and counts of what each filter dropped."""
    rng = random.Random(sampling.seed)
    pool_tokens = [_tokens(t) for t in ift + generated]
    kept: list[str] = []
    counts: dict[str, int] = {"generated": 0}
    budget = want * cfg.instruct_max_attempts
    batch = 0
    while len(kept) < want and counts["generated"] < budget:
        # Ask for a few more than needed: the filters drop many.
        k = min(budget - counts["generated"], max(2 * (want - len(kept)), 4))
        prompts = [fewshot_prompt(template, ift, generated + kept, cfg.fewshot_ift, cfg.fewshot_generated, rng)
                   for _ in range(k)]
        outs = engine.generate(prompts, 1, Sampling(sampling.temperature, sampling.top_p,
                                                    sampling.max_new_tokens, sampling.seed + batch),
                               desc="self-instruct")
        batch += 1
        for (completion,) in outs:
            counts["generated"] += 1
            if completion.error:
                counts["failed"] = counts.get("failed", 0) + 1
                continue
            task = parse_instruction(completion.text)
            reason = reject_reason(task, pool_tokens, cfg.min_words, cfg.max_words, cfg.rouge_threshold)
            if reason is None and len(kept) < want:
                kept.append(task)
                pool_tokens.append(_tokens(task))
            else:
                counts[reason or "surplus"] = counts.get(reason or "surplus", 0) + 1
    counts["kept"] = len(kept)
    return kept, counts


def run(ctx, t: int) -> None:
    if ctx.run.stage_done(t, "self_instruct"):
        return
    cfg = ctx.cfg
    ift = [r["instruction"] for r in read_ift(cfg.ift)]
    earlier = [r["text"] for r in ctx.run.rows("select text from prompts where round < ? order by id", [t])]
    with ctx.stage(t, "self_instruct") as commit:
        sampling = Sampling(cfg.instruct_temperature, cfg.instruct_top_p, cfg.instruct_max_new_tokens,
                            ctx.seed(t, "self_instruct"))
        kept, counts = self_instruct(ctx.engine(f"M{t - 1}"), ctx.template("self_instruct"), ift, earlier,
                                     cfg.prompts_per_round, sampling, cfg)
        stamp = now()
        commit.insert_all("prompts", [{"round": t, "text": k, "source": f"self_instruct:M{t - 1}",
                                       "created_at": stamp} for k in kept])
        commit.detail = counts
