"""DedupePool against the brute-force ROUGE-L rule: the same decision on every input, not just close."""

import math
import random

from hypothesis import given, settings, strategies as st

from selfreward.core.stages.self_instruct import DedupePool, _lcs_length, _tokens, reject_reason, rouge_l

KW = dict(min_words=4, max_words=150)


class BrutePool:
    """The rule as the stage had it: score every pooled instruction."""

    def __init__(self, pool_tokens=()):
        self.tokens = list(pool_tokens)

    def add(self, toks):
        self.tokens.append(toks)

    def near_duplicate(self, toks, threshold):
        return any(rouge_l(toks, other) > threshold for other in self.tokens)


def lcs_dp(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def masks(a):
    out = {}
    for k, x in enumerate(a):
        out[x] = out.get(x, 0) | (1 << k)
    return out


# A small vocabulary makes shared tokens, reorderings and exact ties common.
tokens = st.lists(st.sampled_from("abcde"), max_size=12)
# Fractions k/n are where F = 2 LCS / (|a| + |b|) lands exactly on the threshold, where float
# rounding decides; the other values cover the range, outside [0, 1] and NaN included.
ties = st.builds(lambda k, n: k / n, st.integers(0, 24), st.integers(1, 24))
thresholds = st.one_of(ties, st.floats(-0.5, 1.5), st.sampled_from([0.0, -0.0, 0.7, 1.0, float("nan")]))


@given(tokens.filter(bool), tokens)
def test_bit_parallel_lcs_is_exact(a, b):
    assert _lcs_length(masks(a), len(a), b) == lcs_dp(a, b)


@settings(max_examples=400)
@given(st.lists(tokens, max_size=12), tokens, thresholds)
def test_same_decision_as_brute_force(pool, toks, threshold):
    assert DedupePool(pool).near_duplicate(toks, threshold) == BrutePool(pool).near_duplicate(toks, threshold)


@settings(max_examples=200)
@given(st.lists(tokens, max_size=30), thresholds)
def test_same_kept_stream_as_brute_force(stream, threshold):
    # As the stage does: what is kept joins the pool that later instructions are checked against.
    fast, brute, kept_fast, kept_brute = DedupePool(), BrutePool(), [], []
    for toks in stream:
        for pool, kept in ((fast, kept_fast), (brute, kept_brute)):
            if not pool.near_duplicate(toks, threshold):
                kept.append(toks)
                pool.add(toks)
    assert kept_fast == kept_brute


def test_exact_ties():
    # Every L, |a|, |b| up to 20 with the bag overlap equal to the LCS, at theta = 2L/(|a|+|b|) and its
    # float neighbours: rouge_l's float 2*p*r/(p+r) lands on either side of theta (1 and 5 tokens
    # sharing one: 0.33333333333333337 > 1/3), and the prefilter must leave that to the exact check.
    for la in range(1, 21):
        for lb in range(1, 21):
            for lcs in range(1, min(la, lb) + 1):
                shared = [f"s{k}" for k in range(lcs)]
                a = shared + [f"a{k}" for k in range(la - lcs)]
                b = shared + [f"b{k}" for k in range(lb - lcs)]
                pool, brute = DedupePool([b]), BrutePool([b])
                tie = 2 * lcs / (la + lb)
                for threshold in (math.nextafter(tie, 0), tie, math.nextafter(tie, 1)):
                    assert pool.near_duplicate(a, threshold) == brute.near_duplicate(a, threshold), \
                        (la, lb, lcs, threshold)


WORDS = ("write explain describe list summarize compare create suggest give translate outline rewrite "
         "a the of to for in and on with about how what why your my that is short brief funny formal "
         "poem story email letter essay plan recipe summary tweet speech ocean rain climate history "
         "python cats coffee travel budget garden music school friend city winter three five simple").split()


def synthetic(n: int, seed: int) -> list[str]:
    """Instructions of 2-16 words, one in three a perturbed copy of an earlier one."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 1 / 3:
            words = rng.choice(out).split()
            for _ in range(rng.randint(1, 3)):
                k = rng.randrange(len(words))
                op = rng.choice("sid")
                if op == "s":
                    words[k] = rng.choice(WORDS)
                elif op == "i":
                    words.insert(k, rng.choice(WORDS))
                elif len(words) > 1:
                    del words[k]
        else:
            words = [rng.choice(WORDS[:12])] + rng.choices(WORDS, k=rng.randint(1, 15))
        out.append(" ".join(words).capitalize())
    return out


def test_fixed_sample_same_kept_set_and_reasons():
    sample = synthetic(400, seed=1234)
    seed_pool = [_tokens(t) for t in synthetic(100, seed=99)]
    results = {}
    for name, pool in (("fast", DedupePool(seed_pool)), ("brute", BrutePool(seed_pool))):
        reasons, kept = [], []
        for task in sample:
            reason = reject_reason(task, pool, threshold=0.7, **KW)
            reasons.append(reason)
            if reason is None:
                kept.append(task)
                pool.add(_tokens(task))
        results[name] = reasons, kept
    assert results["fast"] == results["brute"]
    reasons, kept = results["fast"]
    # The sample exercises the rule both ways.
    assert reasons.count("near_duplicate") >= 50 and len(kept) >= 50
