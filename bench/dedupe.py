"""Self-instruct's ROUGE-L dedupe at the paper's scale: `DedupePool` (inverted index, bag-overlap
prefilter, bit-parallel LCS) against the brute-force rule it replaced (`rouge_l` against every pooled
instruction), as ratios against brute force measured in the same run, on synthetic instructions.

    .venv/bin/python bench/dedupe.py                   # 20,000 pool, 500 new, brute force on 20 (about a minute)
    .venv/bin/python bench/dedupe.py --quick           # 2,000 pool, 100 new, brute force on 10: a smoke run
    .venv/bin/python bench/dedupe.py --json dedupe.json

Data: a seeded generator over a word list written below. An instruction is a verb and then 3-39
words drawn Zipf-like from the list (function words most often, so their postings are long, as in
real text). One in six pooled instructions, and one in three new ones (a model few-shot with pooled
tasks often writes one of them again), is an earlier instruction perturbed by a few substitutions,
insertions, deletions and swaps, so that near duplicates on both sides of the threshold are common.
The small vocabulary (about 400 words) makes shared tokens more common than in real instructions,
which makes the prefilter's work harder, not easier. Tokens are made once, outside the timings.

Blocks (progress goes to stderr, the table to stdout):
- dedupe: new instructions against the pool as the stage checks them (threshold 0.7; a kept one
  joins the pool before the next is checked). Brute force runs on the first few only; its cost
  for all of them is extrapolated from its cost per instruction and labelled so. DedupePool runs
  on the same few (the ratio) and on all of them. The kept sets are compared where both ran.
- build: as many instructions as the pool holds streamed through an empty DedupePool, each
  checked against all before it and then added whatever the verdict (every one joins: the largest
  pool, the worst case). Brute force is extrapolated from its cost per pair in the dedupe block
  times the pairs that the instructions it would keep need (a lower bound).
- index: DedupePool(...) over the pool without checks, as the stage does at the start of a round.

Targets: the build of a 20,000 pool in 60 s or less, and the same kept set as brute force where
both ran. They are set for the full sizes; --quick only checks that everything runs.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from common import machine, publish, verdict  # noqa: E402  (bench/common.py)
from selfreward.core.stages.self_instruct import DedupePool, _tokens, rouge_l  # noqa: E402

THRESHOLD = 0.7  # the config's rouge_threshold default
TARGETS = {"build_s": 60.0}

VERBS = """write explain describe list summarize compare create suggest give translate generate outline
rewrite classify identify name design propose draft compose evaluate analyze convert find tell recommend
provide plan brainstorm edit calculate predict rank sort solve define argue imagine answer correct""".split()
# Most frequent first: the generator's weights fall with the rank.
WORDS = """the a of to and in for on with about is how what that your an as from by this it be are or
its their you can should would which who when more most some each into without between than using
based at one two three five ten new short brief simple detailed funny formal friendly personal
professional creative clear persuasive positive negative main key important different common best
first last small large old young happy sad poem story email letter essay list plan recipe summary
tweet speech report review paragraph sentence title slogan joke riddle question answer argument
description dialogue song haiku limerick headline caption bio resume proposal agenda itinerary
checklist guide tutorial outline table timeline quiz interview survey ocean rain climate history
python cats dogs coffee travel budget garden music school friend city winter summer spring autumn
mountain river forest desert island space planet moon sun star robot computer phone internet
software data science math physics chemistry biology medicine health diet exercise sleep stress
work job career team manager customer product company market price sale money bank tax law court
vote election government policy war peace country language culture art film book novel author
painting museum theater game sport football tennis chess movie actor hero villain dragon wizard
king queen castle village farm animal bird fish tree flower fruit apple bread cheese soup pizza
chocolate tea water fire wind snow storm weather energy solar car train bike road bridge house
room kitchen door window chair table bed child parent teacher student doctor nurse chef artist
writer engineer scientist farmer pilot driver neighbor stranger family wedding birthday holiday
party gift vacation beach hotel airport museum library park zoo hospital office shop restaurant
cafe morning evening night week month year day hour minute future past present problem solution
idea reason cause effect benefit risk advantage disadvantage difference similarity example fact
opinion feeling emotion memory dream goal habit skill lesson mistake success failure change
growth safety privacy security freedom justice kindness honesty patience courage fear love
friendship trust respect responsibility teamwork leadership communication creativity curiosity
technology innovation education environment pollution recycling plastic waste electricity
transportation agriculture economy inflation unemployment poverty wealth population migration
democracy social media online remote digital mobile app website video""".split()
# Zipf-Mandelbrot weights over WORDS.
CUM = list(itertools.accumulate(1 / (rank + 2.7) for rank in range(len(WORDS))))


@dataclass(frozen=True)
class Sizes:
    pool: int
    new: int
    brute: int


FULL = Sizes(pool=20_000, new=500, brute=20)
QUICK = Sizes(pool=2_000, new=100, brute=10)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the data ---

def perturb(words: list[str], rng: random.Random) -> list[str]:
    words = list(words)
    for _ in range(max(1, round(len(words) * rng.uniform(0.05, 0.3)))):
        k = rng.randrange(len(words))
        op = rng.choice(("substitute", "insert", "delete", "swap"))
        if op == "substitute":
            words[k] = rng.choices(WORDS, cum_weights=CUM)[0]
        elif op == "insert":
            words.insert(k, rng.choices(WORDS, cum_weights=CUM)[0])
        elif op == "delete" and len(words) > 4:
            del words[k]
        elif op == "swap" and k + 1 < len(words):
            words[k], words[k + 1] = words[k + 1], words[k]
    return words


def instructions(n: int, rng: random.Random, earlier: list[list[str]], copies: float) -> list[list[str]]:
    """n instructions as token lists (4-40 words; a share `copies` perturbs an earlier one, here or in `earlier`)."""
    out: list[list[str]] = []
    for _ in range(n):
        sources = len(earlier) + len(out)
        if sources and rng.random() < copies:
            k = rng.randrange(sources)
            out.append(perturb(earlier[k] if k < len(earlier) else out[k - len(earlier)], rng))
        else:
            out.append([rng.choice(VERBS)] + rng.choices(WORDS, cum_weights=CUM, k=rng.randint(3, 39)))
    # Through the stage's tokenizer, as the stage sees them.
    return [_tokens(" ".join(words).capitalize()) for words in out]


# --- what is measured ---

def brute_stream(pool_tokens: list[list[str]], stream: list[list[str]]) -> dict:
    """The rule as the stage had it; also counts the pairs it scored (any() stops at the first match)."""
    pool = list(pool_tokens)
    decisions, pairs = [], 0
    t0 = time.perf_counter()
    for toks in stream:
        duplicate = False
        for other in pool:
            pairs += 1
            if rouge_l(toks, other) > THRESHOLD:
                duplicate = True
                break
        decisions.append(duplicate)
        if not duplicate:
            pool.append(toks)
    return {"seconds": time.perf_counter() - t0, "decisions": decisions, "pairs": pairs}


def fast_stream(pool: DedupePool, stream: list[list[str]], join_all: bool = False) -> dict:
    decisions = []
    t0 = time.perf_counter()
    for toks in stream:
        duplicate = pool.near_duplicate(toks, THRESHOLD)
        decisions.append(duplicate)
        if join_all or not duplicate:
            pool.add(toks)
    return {"seconds": time.perf_counter() - t0, "decisions": decisions}


def run(sizes: Sizes) -> dict:
    rng = random.Random(20240118)
    pool_tokens = instructions(sizes.pool, rng, [], copies=1 / 6)
    stream = instructions(sizes.new, rng, pool_tokens, copies=1 / 3)
    build_stream = instructions(sizes.pool, random.Random(7), [], copies=1 / 6)
    log(f"pool {len(pool_tokens)} instructions, {sum(map(len, pool_tokens)) / len(pool_tokens):.1f} tokens on "
        f"average; {len(stream)} new")

    t0 = time.perf_counter()
    indexed = DedupePool(pool_tokens)
    index_s = time.perf_counter() - t0

    log(f"brute force: the first {sizes.brute} new instructions against {len(pool_tokens)}")
    brute = brute_stream(pool_tokens, stream[: sizes.brute])
    log(f"DedupePool: the same {sizes.brute}, then all {len(stream)}")
    fast_few = fast_stream(DedupePool(pool_tokens), stream[: sizes.brute])
    fast_all = fast_stream(indexed, stream)
    per_brute = brute["seconds"] / sizes.brute
    rows = [
        {"name": "brute force rouge_l (baseline)", "count": sizes.brute, "seconds": brute["seconds"]},
        {"name": f"brute force, all {len(stream)} (extrapolated)", "count": len(stream),
         "seconds": per_brute * len(stream), "extrapolated": True},
        {"name": f"DedupePool, the same {sizes.brute}", "count": sizes.brute, "seconds": fast_few["seconds"]},
        {"name": f"DedupePool, all {len(stream)}", "count": len(stream), "seconds": fast_all["seconds"]},
    ]
    for row in rows:
        row["ms_per"] = 1000 * row["seconds"] / row["count"]
        row["ratio"] = per_brute * 1000 / row["ms_per"]
    agree = brute["decisions"] == fast_few["decisions"] == fast_all["decisions"][: sizes.brute]

    log(f"build: {len(build_stream)} instructions through an empty DedupePool, every one joins")
    build = fast_stream(DedupePool(), build_stream, join_all=True)
    per_pair = brute["seconds"] / brute["pairs"]
    # A kept instruction makes brute force score every pair before it; a flagged one stops earlier.
    kept_pairs = sum(i for i, duplicate in enumerate(build["decisions"]) if not duplicate)
    return {
        "sizes": asdict(sizes), "threshold": THRESHOLD, "vocabulary": len(set(VERBS) | set(WORDS)),
        "mean_tokens": sum(map(len, pool_tokens)) / len(pool_tokens),
        "dedupe": rows, "brute_pairs": brute["pairs"], "brute_per_pair_us": 1e6 * per_pair,
        "agree": agree, "brute_kept": brute["decisions"].count(False),
        "fast_kept_all": fast_all["decisions"].count(False),
        "build": {"count": len(build_stream), "seconds": build["seconds"],
                  "flagged": build["decisions"].count(True),
                  "brute_lower_bound_s": per_pair * kept_pairs, "target_s": TARGETS["build_s"]},
        "index_s": index_s, "targets": TARGETS,
    }


# --- where and with what ---

# --- the table ---

def table(report: dict) -> str:
    s, m, b = report["sizes"], report["machine"], report["build"]
    quick = "  (--quick: sizes too small for the targets)" if report["quick"] else ""
    lines = [f"selfreward dedupe benchmark, {report['date']}{quick}",
             f"machine: {m['cores']} cores ({m['usable_cores']} usable), {m['cpu']}; nice {m['niceness']}, "
             f"load average {m['load_average_at_start']} at start",
             f"versions: python {report['versions']['python']}, numpy {report['versions']['numpy']}",
             f"data: synthetic, {report['vocabulary']} words, {report['mean_tokens']:.1f} tokens per instruction "
             f"on average; ROUGE-L threshold {report['threshold']:g}", ""]
    lines.append(f"dedupe: {s['new']} new instructions against a {s['pool']:,} pool (a kept one joins the pool)")
    lines.append(f"  {'':40} {'instr':>6} {'s':>9} {'ms/instr':>10} {'ratio':>9}")
    for i, row in enumerate(report["dedupe"]):
        note = "baseline" if i == 0 else "extrapolated" if row.get("extrapolated") else ""
        lines.append(f"  {row['name']:40} {row['count']:6d} {row['seconds']:9.2f} {row['ms_per']:10.2f} "
                     f"{row['ratio']:8.1f}x  {note}".rstrip())
    lines.append(f"  kept sets on the first {s['brute']}, where both ran: "
                 f"{'identical' if report['agree'] else 'DIFFERENT'} ({report['brute_kept']} kept, "
                 f"{s['brute'] - report['brute_kept']} dropped as near duplicates; target identical: "
                 f"{verdict(report['agree'])})")
    lines.append(f"  DedupePool kept {report['fast_kept_all']} of all {s['new']}")
    lines.append(f"  brute force scored {report['brute_pairs']:,} pairs, {report['brute_per_pair_us']:.1f} us a pair")
    lines.append("")
    lines.append(f"build: {b['count']:,} instructions streamed through an empty DedupePool, each checked against "
                 f"all before it ({b['flagged']:,} flagged)")
    lines.append(f"  {'DedupePool':40} {b['seconds']:9.2f} s  {1000 * b['seconds'] / b['count']:8.2f} ms/instr  "
                 f"target <= {b['target_s']:g} s: {verdict(b['seconds'] <= b['target_s'])}")
    lines.append(f"  {'brute force (extrapolated, lower bound)':40} {b['brute_lower_bound_s']:9.0f} s  "
                 f"{b['brute_lower_bound_s'] / b['seconds']:8.0f}x DedupePool's time")
    lines.append("")
    lines.append(f"index: DedupePool over the {s['pool']:,} pool, no checks: {report['index_s']:.2f} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke-run sizes: a {QUICK.pool:,} pool, {QUICK.new} new instructions, brute force on "
                         f"{QUICK.brute}")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args()
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "quick": args.quick,
              "machine": machine(), "versions": {"python": platform.python_version(), "numpy": np.__version__}}
    report.update(run(QUICK if args.quick else FULL))
    publish(table(report), report, args.json)


if __name__ == "__main__":
    main()
