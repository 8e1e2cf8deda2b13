"""Stage: self-instruction creation with M_{t-1} (table `prompts`): few-shot the model with a numbered task list and
keep the new tasks that pass the filters (length, blacklist, ROUGE-L dedupe)."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np

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
    """ROUGE-L F-measure of two token lists (longest common subsequence). The reference for `DedupePool`."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return _f_measure(prev[-1], len(a), len(b))


def _f_measure(lcs: int, len_a: int, len_b: int) -> float:
    # Shared by rouge_l and DedupePool so that both compare the very same float with the threshold.
    if lcs == 0:
        return 0.0
    p, r = lcs / len_a, lcs / len_b
    return 2 * p * r / (p + r)


def _lcs_length(masks: dict[str, int], m: int, b: list[str]) -> int:
    """LCS length of a (m tokens, given as masks: token -> bit i set where a[i] is that token) and b,
    bit-parallel (Allison & Dix 1986; Crochemore et al. 2001): one big-int step per token of b."""
    full = (1 << m) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


class _Postings:
    """The pool entries that hold one token, with how often they hold it, in arrays that grow by doubling."""

    __slots__ = ("ids", "counts", "n")

    def __init__(self):
        self.ids, self.counts, self.n = np.empty(4, np.int32), np.empty(4, np.int32), 0

    def append(self, i: int, count: int) -> None:
        if self.n == len(self.ids):
            self.ids, self.counts = np.resize(self.ids, 2 * self.n), np.resize(self.counts, 2 * self.n)
        self.ids[self.n], self.counts[self.n] = i, count
        self.n += 1


class DedupePool:
    """The pooled instructions' tokens, indexed so that `near_duplicate(toks, threshold)` gives exactly
    `any(rouge_l(toks, other) > threshold for other in pool)` without scoring every pair.

    Why the prefilter can never drop a true match. With L = LCS(a, b), rouge_l's F (beta 1) is
    2PR/(P+R) with P = L/|a|, R = L/|b|, which is 2L/(|a|+|b|). A common subsequence pairs equal
    tokens one to one, so L <= c = sum over tokens t of min(count of t in a, count in b), the bag
    overlap, and c <= min(|a|, |b|). Hence F > theta implies
      (i)  2 min(|a|,|b|)/(|a|+|b|) > theta, i.e. theta |a|/(2-theta) < |b| < (2-theta) |a|/theta
           for 0 < theta < 2: only entries of about the same length can match; and
      (ii) 2c/(|a|+|b|) > theta, which implies (i).
    For theta >= 0 a match needs L >= 1, so c >= 1: the entries sharing no token with a (never in
    the inverted index's postings of a's tokens) cannot match. The stage compares the float
    2*p*r/(p+r), which is within a relative 1e-15 of 2L/(|a|+|b|) (a few roundings); the prefilter
    keeps every entry with 2c/(|a|+|b|) > theta - 1e-9, so a float rounding at an exact tie (L = 7,
    |a|+|b| = 20, theta = 0.7) still reaches the exact check, which computes L exactly (bit-parallel
    LCS) and the same float as rouge_l. A negative threshold matches any entry (F >= 0.0 > theta);
    a NaN one matches none, on both paths.
    """

    def __init__(self, pool_tokens=()):
        self.tokens: list[list[str]] = []
        self._lens = np.empty(64, np.int32)
        self._postings: dict[str, _Postings] = {}
        for toks in pool_tokens:
            self.add(toks)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, toks: list[str]) -> None:
        i = len(self.tokens)
        if i == len(self._lens):
            self._lens = np.resize(self._lens, 2 * i)
        self._lens[i] = len(toks)
        self.tokens.append(toks)
        for t, count in Counter(toks).items():
            postings = self._postings.get(t)
            if postings is None:
                postings = self._postings[t] = _Postings()
            postings.append(i, count)

    def near_duplicate(self, toks: list[str], threshold: float) -> bool:
        n = len(self.tokens)
        if threshold < 0:
            return n > 0
        if not toks or not n:
            return False
        # Bag overlap c with every entry that shares a token: once per entry for a token that a holds
        # once, min(count in a, count in entry) for the others.
        single, overlap = [], None
        for t, q in Counter(toks).items():
            postings = self._postings.get(t)
            if postings is None:
                continue
            if q == 1:
                single.append(postings.ids[:postings.n])
                continue
            if overlap is None:
                overlap = np.zeros(n, np.int64)
            overlap[postings.ids[:postings.n]] += np.minimum(postings.counts[:postings.n], q)
        if single:
            counted = np.bincount(np.concatenate(single), minlength=n)
            overlap = counted if overlap is None else overlap + counted
        if overlap is None:
            return False
        la = len(toks)
        sums = la + self._lens[:n]
        candidates = np.flatnonzero((overlap > 0) & (2 * overlap > (threshold - 1e-9) * sums))
        if not len(candidates):
            return False
        # Highest bound first: a true duplicate usually ends the search at once.
        candidates = candidates[np.argsort(-(overlap[candidates] / sums[candidates]), kind="stable")]
        masks: dict[str, int] = {}
        for k, x in enumerate(toks):
            masks[x] = masks.get(x, 0) | (1 << k)
        for i in candidates.tolist():
            other = self.tokens[i]
            if _f_measure(_lcs_length(masks, la, other), la, len(other)) > threshold:
                return True
        return False


def parse_instruction(continuation: str) -> str:
    """The new task is the text up to the next numbered item or blank line."""
    text = re.split(r"\n\s*\d+\s*[.)]|\n\s*\n", continuation, maxsplit=1)[0]
    return " ".join(text.split()).strip()


def reject_reason(task: str, pool: DedupePool, min_words: int, max_words: int, threshold: float) -> str | None:
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
    if pool.near_duplicate(_tokens(task), threshold):
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
    pool = DedupePool(_tokens(t) for t in ift + generated)
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
            reason = reject_reason(task, pool, cfg.min_words, cfg.max_words, cfg.rouge_threshold)
            if reason is None and len(kept) < want:
                kept.append(task)
                pool.add(_tokens(task))
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
        kept, counts = self_instruct(ctx.engine(ctx.parent(t)), ctx.template("self_instruct"), ift, earlier,
                                     cfg.prompts_per_round, sampling, cfg)
        stamp = now()
        commit.insert_all("prompts", [{"round": t, "text": k, "source": f"self_instruct:{ctx.parent(t)}",
                                       "created_at": stamp} for k in kept])
        commit.detail = counts
