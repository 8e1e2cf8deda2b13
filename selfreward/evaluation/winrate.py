"""Win rates of a model A against a baseline B, from one judge preference per comparison.

- `win_rate`: the raw win rate (ties count half) and AlpacaEval 2's length-controlled win rate,
  each with a 95% bootstrap interval, the win/tie/loss counts and both sides' mean length.
- `combine_orders` and `preference`: one preference per prompt from a pairwise judge that
  compared the two answers in both orders.

The length-controlled (LC) win rate follows `alpaca_eval.metrics.glm_winrate` (alpaca-eval 0.6.6):
a logistic regression of the preference on tanh(len_diff / std(len_diff)) and a constant, both
penalised (L1, liblinear, no separate intercept), its strength chosen by 5-fold cross-validation of
the log loss over prompts; the LC win rate is its prediction at zero length difference. A tie (0.5)
is a soft target, as AlpacaEval fits it: each comparison enters once as "A wins" with weight p and
once as "B wins" with weight 1 - p. AlpacaEval's default GLM also has an instruction-difficulty term
and a pull towards its "gamed" baselines, both estimated from GPT-4 annotations of its own 805
instructions and downloaded from the hub at run time. Neither exists for other prompts, so this is
its `length_controlled_minimal` GLM, fitted offline. alpaca-eval itself is not imported: its
package runs `load_dotenv()` on import (a .env in the working directory would reach this
process's environment, API keys included) and needs the hub for the GLM's features.

Small sets pull the LC rate to exactly 0.5, in AlpacaEval's fit as in this one: the penalty falls
on the constant too, and the cross-validation often picks a strong one. Measured on a model that
wins 70% with no length effect, in 20 draws per size: LC = 0.5 in 12 draws of 16 comparisons
(mean LC 0.61), in 5 of 32 (0.66), 3 of 64 (0.67), 1 of 128 (0.68).

The length unit is whatever the caller gives: AlpacaEval counts characters, and the fit does not
depend on the unit (the difference is divided by its own standard deviation).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from selfreward.backends.judges.llm import outcome_preference, pair_outcome

LC_FOLDS = 5  # AlpacaEval's cross-validation folds: fewer scored comparisons leave the LC rate NaN
LC_CS = 10  # LogisticRegressionCV's default grid of penalty strengths, as AlpacaEval leaves it
SEED = 123  # AlpacaEval's random_state for the fit


@dataclass(frozen=True)
class Comparison:
    preference: float | None  # A over B: 1 A wins, 0 B wins, 0.5 tie, None unscored (left out, counted)
    len_a: float  # A's answer length (characters, as AlpacaEval counts)
    len_b: float
    instruction: object = None  # the prompt's id: the bootstrap resamples prompts, with all their comparisons


def preference(outcome: str) -> float | None:
    """A judge outcome as A's preference (see backends.judges.llm.outcome_preference, which verify reads too)."""
    return outcome_preference(outcome)


def combine_orders(a_first: float | None, b_first: float | None) -> float | None:
    """One preference for A from the two orders a pairwise judge saw, each given from A's side
    (1 A wins, 0 B wins, 0.5 tie): the same verdict in both orders is that verdict; any
    disagreement (a win against a loss, or a tie against either) is a tie, since a verdict that
    follows the position tells nothing about the answers; an order that was not scored leaves the
    prompt unscored (None). The rule is the judges' own (`pair_outcome`)."""
    if a_first is None or b_first is None:
        return None
    # pair_outcome takes each order's "the first shown is better": in the second order that is B.
    return preference(pair_outcome(a_first, 1.0 - b_first))


def win_rate(comparisons, seed: int = 0, n_boot: int = 1000) -> dict:
    """The raw and length-controlled win rates of A against B with 95% bootstrap intervals.

    `comparisons`: `Comparison`s or dicts with the same keys. Returns a plain dict:
    n (scored comparisons), unscored, wins, ties, losses (a win is a preference above 0.5);
    win, win_lo, win_hi (the raw rate, ties as half, and its interval); win_lc, win_lc_lo,
    win_lc_hi (the LC rate); len_a, len_b (mean lengths over the scored comparisons).
    Rates are fractions in [0, 1]. With no scored comparison every rate and length is NaN;
    with fewer than 5 the LC rate and its interval are NaN (AlpacaEval's 5-fold
    cross-validation needs five), as they are when the length difference is the same nonzero
    value everywhere (the length effect cannot be told from the models' difference then).

    The bootstrap resamples prompts (comparisons sharing an `instruction` go together; without
    ids, each comparison is its own prompt) `n_boot` times with numpy's generator at `seed`, and
    takes the 2.5th and 97.5th percentiles. Each resample refits the LC regression at the
    penalty strength cross-validated on all the data: a cross-validation per resample costs 50
    fits, not one, and moved the interval little where measured (30 comparisons: [0.21, 0.80] at
    the fixed strength, [0.25, 0.79] cross-validating each resample; 80: [0.44, 0.65], [0.43, 0.65]).
    """
    rows = [c if isinstance(c, Comparison) else Comparison(**c) for c in comparisons]
    scored = [c for c in rows if c.preference is not None]
    for c in scored:
        if not 0 <= c.preference <= 1:
            raise ValueError(f"a preference is between 0 and 1 (1 A wins, 0 B wins, 0.5 tie), not {c.preference}")
    pref = np.array([c.preference for c in scored], dtype=float)
    len_a = np.array([c.len_a for c in scored], dtype=float)
    len_b = np.array([c.len_b for c in scored], dtype=float)
    out = {"n": len(scored), "unscored": len(rows) - len(scored), "wins": int((pref > 0.5).sum()),
           "ties": int((pref == 0.5).sum()), "losses": int((pref < 0.5).sum())}
    nan = math.nan
    if not scored:
        return {**out, "win": nan, "win_lo": nan, "win_hi": nan, "win_lc": nan, "win_lc_lo": nan,
                "win_lc_hi": nan, "len_a": nan, "len_b": nan}
    fit = _lc_fit(pref, len_a, len_b)
    samples = _resamples(scored, np.random.default_rng(seed), n_boot)
    raw_boot = np.array([pref[i].mean() for i in samples])
    lc_boot = np.array([_lc_fit(pref[i], len_a[i], len_b[i], fit[1])[0] for i in samples]) if fit[1] else []
    lc_lo, lc_hi = _interval(lc_boot)
    raw_lo, raw_hi = _interval(raw_boot)
    return {**out, "win": float(pref.mean()), "win_lo": raw_lo, "win_hi": raw_hi, "win_lc": fit[0],
            "win_lc_lo": lc_lo, "win_lc_hi": lc_hi, "len_a": float(len_a.mean()), "len_b": float(len_b.mean())}


def _resamples(scored: list[Comparison], rng, n_boot: int) -> list[np.ndarray]:
    """n_boot index arrays, each drawing as many prompts as there are, with replacement."""
    prompts: dict = {}
    for i, c in enumerate(scored):
        key = ("row", i) if c.instruction is None else ("id", c.instruction)
        prompts.setdefault(key, []).append(i)
    groups = [np.array(ix) for ix in prompts.values()]
    draws = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    return [np.concatenate([groups[g] for g in draw]) for draw in draws]


def _interval(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _lc_fit(pref: np.ndarray, len_a: np.ndarray, len_b: np.ndarray, C: float | None = None) -> tuple[float, float]:
    """(LC win rate, the penalty strength C used) for one set of comparisons; C None = cross-validate it.

    (nan, None) when the regression cannot be fitted: too few comparisons, or a length
    difference that is the same nonzero value everywhere."""
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.metrics import get_scorer
    from sklearn.model_selection import GroupKFold

    n = len(pref)
    if n < LC_FOLDS:
        return math.nan, None
    # AlpacaEval's sign: output_1 is the baseline, so its feature is len(B) - len(A).
    delta = len_b - len_a
    std = delta.std(ddof=1)  # pandas' default, as AlpacaEval computes it
    if std > 0:
        length = np.tanh(delta / std)
    elif not delta.any():
        length = np.zeros(n)  # no length difference anywhere: only the constant is fitted
    else:
        return math.nan, None
    x = np.column_stack([length, np.ones(n)])  # patsy's column order for AlpacaEval's formula
    # Soft targets as AlpacaEval fits them: every comparison as "A wins" weighted p and "B wins" weighted 1 - p.
    xx, yy, ww = np.vstack([x, x]), np.r_[np.ones(n), np.zeros(n)], np.r_[pref, 1 - pref]
    # liblinear drops rows of weight 0, then writes a warning line when a class has none left
    # (all wins, or a fold without a loss); a weight too small to move the fit keeps every class present.
    ww = np.maximum(ww, 1e-12)
    common = dict(solver="liblinear", fit_intercept=False, random_state=SEED)
    # liblinear stops at AlpacaEval's iteration limit (100) on nearly separable data with a weak
    # penalty, and warns each time; that limit is part of the numbers AlpacaEval reports, so it stays.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if C is not None:
            model = LogisticRegression(C=C, l1_ratio=1.0, **common).fit(xx, yy, sample_weight=ww)
        else:
            # Metadata routing, scoped, carries the weights to the scorer: the weighted log loss of
            # the duplicated rows is AlpacaEval's log loss against the soft target.
            with sklearn.config_context(enable_metadata_routing=True):
                scoring = get_scorer("neg_log_loss").set_score_request(sample_weight=True)
                model = LogisticRegressionCV(Cs=LC_CS, l1_ratios=(1.0,), cv=GroupKFold(n_splits=LC_FOLDS),
                                             scoring=scoring, use_legacy_attributes=False, **common)
                model.set_fit_request(sample_weight=True)
                model.fit(xx, yy, sample_weight=ww, groups=np.r_[np.arange(n), np.arange(n)])
            C = float(model.C_)
    return float(model.predict_proba([[0.0, 1.0]])[0, 1]), C
