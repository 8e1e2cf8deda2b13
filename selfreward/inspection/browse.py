"""`selfreward browse`: the run in Datasette, with every table and column
described and canned queries for the questions auditors ask."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
from pathlib import Path

from selfreward.errors import SelfRewardError
from selfreward.core.store import Run
from selfreward.procs import python_module

TABLES = {
    "config": ("The run's resolved configuration (secrets are never stored).",
               {"key": "Config key", "value": "JSON value"}),
    "rounds": ("One row per round t: M_{t-1} -> M_t.",
               {"model_in": "Model the round starts from", "model_out": "Model the round makes",
                "wall_s": "Sum of the round's stage times, seconds"}),
    "stages": ("A row per finished stage; written in the same transaction as the stage's outputs.",
               {"peak_rss_mb": "Peak resident memory of the process during the stage, MiB",
                "detail": "JSON counts (kept, dropped by filter, parse counts, ...)"}),
    "models": ("Every model M_t: base, SFT or DPO LoRA (merged), or a copy when a round had no pairs; and every "
               "reward model `train-rm` made (kind reward-model, parent the M_t it started from).",
               {"path": "Merged full-precision weights", "adapter_path": "The LoRA adapter",
                "sha256": "Hash of the weight files (provenance of self-judgments)"}),
    "prompts": ("Prompts each round's model wrote by self-instruction.", {"source": "How it was made, by which model"}),
    "candidates": ("Sampled responses, N per prompt. Append-only.",
                   {"idx": "Sample index within the prompt", "n_tokens": "Response length in tokens",
                    "finish_reason": "stop (end of sequence) or length (hit the token limit)"}),
    "judgments": ("Every judge sample, K per candidate. Append-only: triggers refuse UPDATE and DELETE.",
                  {"score": "Parsed score; NULL when the output could not be read (never 0 in its place)",
                   "reason": "Why score is NULL", "rationale": "The judge's justification (text before the score)",
                   "raw": "The judge's whole output", "template_sha": "Hash of the prompt template",
                   "judge_model_sha": "Hash of the judge's weights", "sampling": "Judge sampling parameters and seed",
                   "version": "selfreward version that wrote the row",
                   "expected_score": "Logprob-weighted score: the expected value of the score tokens 0..5 read where "
                                     "the judge wrote its score (NULL when the parsed score is)",
                   "score_probs": "JSON: the probability of each score token 0..5 at that position"}),
    "pairs": ("One row per prompt: the preference pair, or why the prompt was dropped. Append-only.",
              {"status": "kept, tie (best and worst scored alike) or unscored (< 2 candidates with a score)",
               "rule": "Pairing rule used (verify recomputes pairs with it)",
               "score_kind": "Which score built it: parsed or expected (logprob-weighted)",
               "consistency": "CREAM: C = (Kendall tau + 1) / 2 between this round's and the previous round's "
                              "judge on the prompt's candidates; weights the pair's DPO loss"}),
    "pair_texts": ("View: each pair with its prompt, chosen and rejected texts and lengths (kept pairs only: "
                   "the others have no chosen or rejected).", {}),
    "model_judgments": ("View: the judgments the loop made (pairs, status and the report read these), without the "
                        "human labels of import-labels.", {}),
    "human_judgments": ("View: the human labels import-labels brought in (judge human:<annotator>).", {}),
    "candidate_scores": ("View: each candidate as the model judged it: samples, parsed, mean and spread.",
                         {"mean": "Mean of the parsed scores (what pairs ranks by)"}),
    "meta_judgments": ("Meta-Rewarding: a meta-judge (M_{t-1}) compares two judgments of one candidate, asked in "
                       "both orders. Append-only.",
                       {"a_id": "The judgment shown as A", "b_id": "The judgment shown as B",
                        "winner": "a, b or tie; NULL when the output could not be read (see reason)"}),
    "judge_pairs": ("Meta-Rewarding: per candidate whose judgments varied most, its best against its worst "
                    "judgment by Elo over the meta-judgments; kept pairs train the judge in the DPO step. "
                    "Append-only.",
                    {"chosen_id": "The better judgment (judgments.id)", "rejected_id": "The worse judgment",
                     "score_spread": "Variance of the candidate's parsed judgment scores"}),
    "consistency_judgments": ("CREAM: the round's candidates judged again by the previous round's judge. "
                              "Append-only.", {}),
    "comparisons": ("Pairwise judgments asked in both orders (pairwise mode, PairRM). Append-only.",
                    {"outcome": "a, b, tie, inconsistent (orders disagree) or unparsed"}),
    "training_steps": ("Logged SFT, DPO and reward-model steps.",
                       {"rewards_margin": "DPO: chosen minus rejected implicit reward; reward: chosen minus "
                                          "rejected logit",
                        "rewards_accuracy": "DPO, reward: share of pairs with chosen reward > rejected",
                        "model": "The reward model a 'reward' step trained (NULL for the loop's M_<round>)"}),
    "eft_eval": ("Held-out EFT examples judged by each new model (parse-rate check).", {}),
    "metrics": ("Per-model metrics after each round: the judge on held-out EFT (eft_*, bias_*), the actor on "
                "verifiable instructions (if_*) and its win rates by the eval judge (win_*, with _lo/_hi: 95% "
                "intervals).", {}),
    "eval_metrics": ("Results of `selfreward eval judge`, `eval head2head` and `eval instruct`.", {}),
    "eval_answers": ("Each model's greedy answer to each held-out prompt, once per model: dataset 'if' "
                     "(verifiable instructions), 'win' (the win-rate set) or 'if:<eval_id>' (`eval instruct`). "
                     "Append-only.", {"key": "The prompt's key in its file"}),
    "if_checks": ("Every constraint of a verifiable answer, checked by the IFEval/IFBench checkers. Append-only.",
                  {"strict": "1 passed, 0 failed, NULL unchecked", "loose": "The same after IFEval's relaxations",
                   "unchecked": "Why the constraint could not be checked (never counted as a pass or a fail)",
                   "kwargs": "The instruction's arguments (JSON)", "checker": "The checker library and version"}),
    "eval_comparisons": ("M_t against a baseline (its parent, M1) by the independent eval judge. Append-only.",
                         {"preference": "1 M_t wins, 0.5 tie or orders that disagree, 0 loss, NULL unscored",
                          "outcome": "a (M_t), b (the baseline), tie, inconsistent, or unscored",
                          "ab_raw": "The judge's text with M_t shown first", "ba_raw": "... with the baseline first"}),
    "promotions": ("The promotion gate: whether M_t became the next round's parent, and why. Append-only.",
                   {"metric": "promote_metric; value, lo, hi: its difference or win rate with the 95% interval"}),
    "head2head": ("Answers of two models to held-out prompts and the judge's verdict.", {}),
}

QUERIES = {
    "judge_pairs_with_meta": {
        "title": "Meta-Rewarding: judge pairs with the meta-judge's reasons",
        "description": "Each kept judge pair: the response, the chosen and the rejected judgment, and every "
                       "meta-judgment that compared the candidate's judgments.",
        "sql": """
select x.id as judge_pair, x.round, p.text as prompt, c.text as response,
       jc.raw as chosen_judgment, round(x.chosen_elo) as chosen_elo,
       jr.raw as rejected_judgment, round(x.rejected_elo) as rejected_elo,
       (select group_concat(m.a_id || ' vs ' || m.b_id || ': ' || coalesce(m.winner, 'NULL') || ' - '
                            || coalesce(m.rationale, m.reason), char(10))
          from meta_judgments m where m.candidate_id = x.candidate_id) as meta_judgments
from judge_pairs x join candidates c on c.id = x.candidate_id join prompts p on p.id = c.prompt_id
join judgments jc on jc.id = x.chosen_id join judgments jr on jr.id = x.rejected_id
where x.status = 'kept' order by x.round, x.id""",
    },
    "pairs_with_rationales": {
        "title": "Pairs with both sides' rationales",
        "description": "Each kept pair: the prompt, the chosen and rejected responses, and every judge sample "
                       "of each side with its score and rationale.",
        "sql": """
select x.pair_id as pair, x.round, x.prompt,
       x.chosen, round(x.chosen_score, 2) as chosen_score,
       (select group_concat('[' || coalesce(j.score, 'NULL') || '] ' || coalesce(j.rationale, j.reason), char(10))
          from judgments j where j.candidate_id = x.chosen_id) as chosen_rationales,
       x.rejected, round(x.rejected_score, 2) as rejected_score,
       (select group_concat('[' || coalesce(j.score, 'NULL') || '] ' || coalesce(j.rationale, j.reason), char(10))
          from judgments j where j.candidate_id = x.rejected_id) as rejected_rationales
from pair_texts x
where x.status = 'kept' order by x.round, x.pair_id""",
    },
    "low_agreement": {
        "title": "Low-agreement judgments",
        "description": "Candidates whose K judge samples disagree by at least :min_spread points (human labels "
                       "aside).",
        "sql": """
select c.id as candidate, c.round, p.text as prompt, c.text as response,
       group_concat(coalesce(j.score, 'NULL'), ', ') as scores, max(j.score) - min(j.score) as spread,
       group_concat('[' || coalesce(j.score, 'NULL') || '] ' || coalesce(j.rationale, j.reason), char(10)) as rationales
from judgments j join candidates c on c.id = j.candidate_id join prompts p on p.id = c.prompt_id
where j.judge not like 'human:%'
group by c.id having spread >= cast(:min_spread as real) order by spread desc""",
    },
    "human_vs_model": {
        "title": "Human labels next to the model's scores",
        "description": "Each human label (import-labels) of a candidate, with the model's mean score of the same "
                       "candidate and how many of its samples parsed.",
        "sql": """
select h.candidate_id as candidate, h.round, h.judge, h.score as human_score, round(s.mean, 2) as model_mean,
       s.parsed || ' of ' || s.samples as model_parsed, c.text as response
from human_judgments h join candidates c on c.id = h.candidate_id
left join candidate_scores s on s.candidate_id = h.candidate_id
order by h.round, h.candidate_id, h.judge""",
    },
    "parse_failures": {
        "title": "Parse failures",
        "description": "Judge outputs that yielded no score, with the reason and the raw text.",
        "sql": """
select j.id as judgment, j.round, j.candidate_id, j.judge, j.reason, j.raw
from judgments j where j.score is null order by j.round, j.id""",
    },
    "score_distribution": {
        "title": "Score distribution by round",
        "description": "How many judge samples gave each score, per round (NULL = unparsed; human labels aside).",
        "sql": """
select round, score, count(*) as n from judgments where judge not like 'human:%'
group by round, score order by round, score""",
    },
}


def metadata(db_name: str = "run") -> dict:
    return {
        "title": "selfreward run",
        "description": "Every prompt, candidate, judgment (with rationale) and pair of a Self-Rewarding run.",
        "databases": {db_name: {
            "tables": {name: {"description": desc, "columns": cols} for name, (desc, cols) in TABLES.items()},
            "queries": QUERIES,
        }},
    }


def command(run: Run, host: str, port: int, metadata_path: Path) -> list[str]:
    """`datasette serve` on run.db, with long rationales shown whole.

    Not immutable mode (-i): that skips SQLite's locking and can show half-written data while
    `iterate` commits. Datasette opens a mutable file read-only (mode=ro), with normal
    locking, and writes nothing; WAL lets it read while a stage commits."""
    db = str(run.path / "run.db")
    return [*python_module("datasette"), "serve", db, "--host", host, "--port", str(port),
            "-m", str(metadata_path), "--setting", "truncate_cells_html", "0"]


def write_metadata(directory: Path) -> Path:
    path = Path(directory) / "metadata.json"
    path.write_text(json.dumps(metadata(), indent=2))
    return path


def loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def serve(run: Run, host: str, port: int, public: bool = False) -> None:
    import importlib.util

    # Datasette runs any read-only SQL it is sent, with no login: on another address that is the whole run
    # (prompts, responses, config) for anyone who can reach the port.
    if not loopback(host):
        if not public:
            raise SelfRewardError(f"browse --host {host} would let anyone who reaches port {port} read the whole run "
                                  f"and run any SQL on it, with no login; keep the default 127.0.0.1 (tunnel with "
                                  f"ssh -L), or pass --public to serve it anyway")
        print(f"warning: serving {run.path} on {host}:{port} with no login: anyone who reaches it can read the "
              f"whole run and run any SQL on it")
    if importlib.util.find_spec("datasette") is None:
        raise SelfRewardError("browse needs Datasette: pip install -e '.[browse]'")
    with tempfile.TemporaryDirectory(prefix="selfreward-browse-") as tmp:
        cmd = command(run, host, port, write_metadata(Path(tmp)))
        print(f"serving {run.path / 'run.db'} at http://{host}:{port}/run (Ctrl-C stops)")
        proc = subprocess.Popen(cmd)
        # A SIGTERM to browse (kill, a service manager) ends Datasette too: it never serves the run on
        # alone. Ctrl-C reaches both, as they share the terminal's process group.
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
