"""Win rates: raw with ties as half, AlpacaEval 2's length-controlled rate, their bootstrap intervals."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from selfreward.evaluation.winrate import Comparison, combine_orders, preference, win_rate


def _rows(*cells):
    """Comparisons from (len_a, len_b, wins, losses, ties) cells, each comparison its own prompt."""
    out = []
    for len_a, len_b, wins, losses, *ties in cells:
        out += [Comparison(1.0, len_a, len_b)] * wins + [Comparison(0.0, len_a, len_b)] * losses
        out += [Comparison(0.5, len_a, len_b)] * (ties[0] if ties else 0)
    return out


def test_a_preference_explained_by_length_alone_has_an_lc_rate_of_one_half():
    # The longer answer wins 8 of 10 whichever model wrote it; A wrote the longer one in 160 of 200 prompts.
    # Raw: (128 + 8) / 200 = 0.68. The length feature takes two values, +t and -t (no centring), and
    # P(A wins) is 0.8 at one and 0.2 at the other, so the regression's constant is 0 by symmetry:
    # logistic(0) = 0.5 at zero length difference.
    r = win_rate(_rows((600, 400, 128, 32), (400, 600, 8, 32)), n_boot=200)
    assert r["win"] == pytest.approx(0.68)
    assert r["win_lc"] == pytest.approx(0.5, abs=1e-3)
    assert (r["len_a"], r["len_b"]) == (560.0, 440.0)
    assert r["win_lc_lo"] < 0.5 < r["win_lc_hi"] < r["win"]


def test_a_preference_that_ignores_length_has_the_raw_rate_as_its_lc_rate():
    # A wins 7 of 10 whether its answer is longer or shorter: the length coefficient is 0 and the
    # constant is logit(0.7), so LC = raw (up to the L1 penalty, which the cross-validation keeps weak).
    r = win_rate(_rows((600, 400, 70, 30), (400, 600, 70, 30)), n_boot=100)
    assert r["win"] == pytest.approx(0.7)
    assert r["win_lc"] == pytest.approx(0.7, abs=1e-3)
    assert r["win_lc_lo"] < r["win_lc"] < r["win_lc_hi"]


def _alpaca_case(seed, n):
    """Random lengths, a length-driven judge with 15% ties, as in alpaca-eval's own use."""
    rng = np.random.default_rng(seed)
    len_a, len_b = rng.integers(100, 1500, n).astype(float), rng.integers(100, 800, n).astype(float)
    d = (len_b - len_a) / (len_b - len_a).std(ddof=1)
    pref = (rng.random(n) < 1 / (1 + np.exp(1.5 * np.tanh(d) - 0.3))).astype(float)
    pref[rng.random(n) < 0.15] = 0.5
    return [Comparison(float(p), a, b) for p, a, b in zip(pref, len_a, len_b)]


@pytest.mark.parametrize("seed, n, expected", [(0, 30, 0.5898782049980238), (2, 100, 0.5699235766793498)])
def test_the_lc_rate_is_alpaca_evals(seed, n, expected):
    # `expected`: alpaca-eval 0.6.6's make_dmatrix_for_model + fit_LogisticRegressionCV (is_ytrue_proba,
    # 5 splits) on the formula of its length_controlled_minimal GLM, run on the same data.
    assert win_rate(_alpaca_case(seed, n), n_boot=10)["win_lc"] == pytest.approx(expected, abs=1e-6)


def test_ties_are_counted_apart_and_count_half():
    r = win_rate(_rows((500, 500, 3, 1, 4)) + [Comparison(None, 10, 20)], n_boot=50)
    assert (r["n"], r["wins"], r["losses"], r["ties"], r["unscored"]) == (8, 3, 1, 4, 1)
    assert r["win"] == pytest.approx((3 + 4 / 2) / 8)
    assert r["len_b"] == 500.0  # the unscored comparison's lengths are left out too


def test_the_interval_holds_the_estimate_and_shrinks_with_n():
    small = win_rate(_rows((600, 400, 14, 6), (400, 600, 6, 4)), n_boot=300)
    big = win_rate(_rows((600, 400, 14 * 9, 6 * 9), (400, 600, 6 * 9, 4 * 9)), n_boot=300)
    for r in (small, big):
        assert r["win_lo"] <= r["win"] <= r["win_hi"] and r["win_lc_lo"] <= r["win_lc"] <= r["win_lc_hi"]
    assert small["win"] == big["win"] == pytest.approx(20 / 30)
    # Nine times the prompts: a third of the width (about), for both rates.
    for lo, hi in (("win_lo", "win_hi"), ("win_lc_lo", "win_lc_hi")):
        assert 0.2 < (big[hi] - big[lo]) / (small[hi] - small[lo]) < 0.5


def test_the_bootstrap_resamples_prompts_not_comparisons():
    # Each prompt judged twice, A winning one and losing the other: every prompt's mean is 0.5, so a
    # resample of prompts is always 0.5, while a resample of loose comparisons is not.
    rows = [Comparison(p, 500 + k, 400, instruction=f"p{k}") for k in range(20) for p in (1.0, 0.0)]
    grouped = win_rate(rows, n_boot=200)
    assert (grouped["win_lo"], grouped["win"], grouped["win_hi"]) == (0.5, 0.5, 0.5)
    loose = win_rate([Comparison(c.preference, c.len_a, c.len_b) for c in rows], n_boot=200)
    assert loose["win_lo"] < 0.45 and loose["win_hi"] > 0.55


def test_the_bootstrap_is_seeded():
    rows = _alpaca_case(1, 40)
    first, again, other = (win_rate(rows, seed=s, n_boot=50) for s in (3, 3, 4))
    assert first == again
    assert (first["win_lo"], first["win_hi"], first["win_lc_lo"]) != (other["win_lo"], other["win_hi"],
                                                                       other["win_lc_lo"])


def test_all_wins():
    # In a process of its own, to see what reaches the terminal: liblinear writes a warning line per fit
    # when a class has no weight left (here every fit), hundreds of lines under a command's output.
    code = ("import json; from selfreward.evaluation.winrate import Comparison, win_rate; "
            "rows = [Comparison(1.0, 600, 400)] * 10 + [Comparison(1.0, 400, 600)] * 5; "
            "print(json.dumps(win_rate(rows, n_boot=50)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr == ""
    r = json.loads(done.stdout)
    assert (r["win"], r["win_lo"], r["win_hi"], r["wins"]) == (1.0, 1.0, 1.0, 15)
    assert r["win_lc"] > 0.999 and r["win_lc_hi"] <= 1.0


def test_no_comparison_is_nan_everywhere():
    r = win_rate([Comparison(None, 5, 6)])
    assert (r["n"], r["unscored"], r["wins"], r["ties"], r["losses"]) == (0, 1, 0, 0, 0)
    assert all(math.isnan(r[k]) for k in ("win", "win_lo", "win_hi", "win_lc", "win_lc_lo", "win_lc_hi",
                                          "len_a", "len_b"))
    assert win_rate([])["n"] == 0


def test_too_few_comparisons_or_a_constant_length_gap_leave_the_lc_rate_nan():
    one = win_rate([{"preference": 1.0, "len_a": 600, "len_b": 400}], n_boot=20)
    assert (one["win"], one["win_lo"], one["win_hi"], one["len_a"]) == (1.0, 1.0, 1.0, 600.0)
    assert math.isnan(one["win_lc"]) and math.isnan(one["win_lc_lo"]) and math.isnan(one["win_lc_hi"])
    assert math.isnan(win_rate(_rows((600, 400, 3, 1)), n_boot=20)["win_lc"])  # 4 < AlpacaEval's 5 folds
    # A always 200 characters longer: length and model cannot be told apart.
    assert math.isnan(win_rate(_rows((600, 400, 7, 3)), n_boot=20)["win_lc"])
    # No length difference at all: nothing to control for, only the constant is fitted.
    same = win_rate(_rows((500, 500, 70, 30)), n_boot=20)
    assert same["win_lc"] == pytest.approx(0.7, abs=1e-3)


def test_a_preference_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="between 0 and 1"):
        win_rate([Comparison(2.0, 1, 1)])


@pytest.mark.parametrize("a_first, b_first, combined", [
    (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.5, 0.5, 0.5),  # the orders agree
    (1.0, 0.0, 0.5), (0.0, 1.0, 0.5),  # each order prefers the answer in one position: a tie
    (1.0, 0.5, 0.5), (0.5, 0.0, 0.5),  # a tie against a verdict: a tie
    (None, 1.0, None), (1.0, None, None),  # an unscored order leaves the prompt unscored
])
def test_combine_orders(a_first, b_first, combined):
    assert combine_orders(a_first, b_first) == combined


def test_preference_of_an_outcome():
    assert [preference(o) for o in ("a", "b", "tie", "inconsistent", "unparsed")] == [1.0, 0.0, 0.5, 0.5, None]
    assert [preference(o) for o in ("win", "loss", "unscored")] == [1.0, 0.0, None]  # head2head's rows
