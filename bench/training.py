"""Training cost of SFT and DPO steps per setting on this machine, as ratios against
the demo's settings before the performance work (fp32, no lean training,
micro-batch 1) measured in the same run, on the embedded SmolLM2-135M-Instruct.

    .venv/bin/python bench/training.py                 # 32 examples a variant (about 20 min on 2 CPU cores)
    .venv/bin/python bench/training.py --quick         # 8 examples a variant: checks that everything runs
    .venv/bin/python bench/training.py --json out.json --variants dpo-fp32-mb1,dpo-qlora-mb1

Each variant trains in its own process (so one's memory cannot hide another's),
from the embedded model, one epoch, on the same data: SFT on the demo's mix of IFT
examples and rendered EFT judgments, DPO on pairs from the seed EFT file
(per instruction its best- against its worst-scored response); batch 4. Measured:
seconds per training sequence (the first step, which pays for lazy
initialisation, is left out), the peak resident memory while training (sampled)
and of the whole process (ru_maxrss, merge included), the losses, and the merge
gap on held-out pairs (how much merging the adapter into full-precision weights
moved the held-out log-probabilities; for QLoRA it includes the 4-bit rounding of
the base).

Variants: fp32 or a bf16 base under bf16 autocast (train_precision; today's
default on CPUs with AMX or AVX-512 BF16), lean training or not (lean_training:
TRL's fused head over labelled positions only in leaner CPU tiles; "plain" is
without), LoRA dropout 0.1 or the demo's 0 ("nodrop"), SDPA or eager attention, micro-batch 1 or 4 (reached batch sizes stay
the same), QLoRA (nf4 base, bitsandbytes' CPU kernel), the reference-free SimPO
and IPO beside DPO, and a second seed of the baseline: the noise that a loss
difference is measured against.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> (stage, config overrides). Each stage's first entry is its baseline: the demo's settings
# before the performance work (fp32, micro-batch 1, no lean training, LoRA dropout 0.1); NOW is
# today's CPU default (bf16 base, lean training, the demo preset's LoRA dropout 0).
BEFORE = {"train_precision": "fp32", "lean_training": "no", "micro_batch_size": 1, "lora_dropout": 0.1}
NOW = {"train_precision": "bf16", "lean_training": "yes", "micro_batch_size": 1}
PLAIN = {**NOW, "lean_training": "no"}
ATTN = "attn_implementation"  # not a config key: the bench sets it on the model it loads
WITHOUT = "without"  # not a config key: the lean kernel the bench switches off (without_kernel)


def without_kernel(kernel: str) -> None:
    """Lean training in this process without its kernel: head (the fused LM head's CPU tiles)."""
    from contextlib import nullcontext

    from selfreward.training.cpu import lmhead

    if kernel == "head":
        lmhead.lean_head = nullcontext


VARIANTS = {
    "sft-fp32-mb1": ("sft", BEFORE),
    "sft-fp32-lean": ("sft", {**BEFORE, "lean_training": "yes"}),
    "sft-bf16-plain": ("sft", {**PLAIN, "lora_dropout": 0.1}),
    "sft-bf16-lean": ("sft", NOW),
    "sft-bf16-lean-mb4": ("sft", {**NOW, "micro_batch_size": 4}),
    "sft-fp32-seed1": ("sft", {**BEFORE, "seed": 1}),
    "sft-qlora-mb1": ("sft", {**BEFORE, "load_in_4bit": "yes"}),
    "dpo-fp32-mb1": ("dpo", BEFORE),
    "dpo-bf16-plain": ("dpo", PLAIN),
    "dpo-bf16-lean": ("dpo", NOW),
    "dpo-bf16-lean-mb4": ("dpo", {**NOW, "micro_batch_size": 4}),
    "dpo-fp32-seed1": ("dpo", {**BEFORE, "seed": 1}),
    "dpo-qlora-mb1": ("dpo", {**BEFORE, "load_in_4bit": "yes"}),
    "dpo-qlora-bf16-mb1": ("dpo", {**BEFORE, "train_precision": "bf16", "load_in_4bit": "yes"}),
    "simpo-bf16-lean": ("dpo", {**NOW, "train_method": "simpo"}),
    "ipo-bf16-lean": ("dpo", {**NOW, "dpo_loss_type": "ipo"}),
    # The settings a library offers, beside the kernels (issue 20): no LoRA dropout, and
    # transformers' eager attention in place of SDPA (set on the loaded model: ATTN).
    "sft-bf16-plain-nodrop": ("sft", PLAIN),
    "sft-bf16-plain-eager-nodrop": ("sft", {**PLAIN, ATTN: "eager"}),
    "dpo-bf16-plain-eager": ("dpo", {**PLAIN, ATTN: "eager"}),
    # Lean training without one of its kernels: what that kernel alone buys.
    "sft-bf16-lean-no-head": ("sft", {**NOW, WITHOUT: "head"}),
    "dpo-bf16-lean-no-head": ("dpo", {**NOW, WITHOUT: "head"}),
}


def seed_pairs() -> list[dict]:
    from selfreward.config import SEED_DIR
    from selfreward.data import read_eft
    from selfreward.evaluation.judge_quality import groups_from_eft
    from selfreward.training.fit import best_worst

    # Per seed EFT instruction, its best- against its worst-scored response (distinct scores).
    return best_worst(groups_from_eft(read_eft(SEED_DIR / "eft_train.jsonl")))


def sft_data(n: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """The demo's SFT data (IFT and rendered EFT, as the sft stage builds it), n examples in all."""
    from selfreward.config import SEED_DIR
    from selfreward.data import eft_target, read_eft, read_ift
    from selfreward.prompts import load_template

    template = load_template("additive_judge")
    ift = read_ift(SEED_DIR / "ift_train.jsonl")[: n // 4]
    eft = [(template.render(instruction=r["instruction"], response=r["response"]), eft_target(r))
           for r in read_eft(SEED_DIR / "eft_train.jsonl")[: n - len(ift)]]
    return ift, eft


def child(variant: str, n: int, out: str) -> None:
    """One variant in this process: prints one JSON line."""
    from transformers import TrainerCallback

    from selfreward.backends.models import resolve_source
    from selfreward.config import resolve
    from selfreward.training import fit, recipes

    from selfreward.core.store import PeakMemory

    stamps: list[float] = []
    memory = PeakMemory(0.05)
    train_peak = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            memory.peak = memory._proc.memory_info().rss  # the steps' peak, not the load's

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            train_peak["rss"] = memory.peak  # before the merge reloads the base at full precision

    real_quiet = fit.quiet
    fit.quiet = lambda trainer: real_quiet(trainer).add_callback(Clock()) or trainer
    stage, overrides = VARIANTS[variant]
    overrides = dict(overrides)
    attn = overrides.pop(ATTN, None)
    if WITHOUT in overrides:
        without_kernel(overrides.pop(WITHOUT))
    if attn:
        real_load = fit._load_for_training

        def load(*a, **k):
            model = real_load(*a, **k)
            model.set_attn_implementation(attn)
            return model
        fit._load_for_training = load
    # Batch 4 for both (the demo's SFT uses 8): more measured steps from the same examples.
    cfg = resolve({}, {"preset": "demo", "seed": 0, "sft_epochs": 1.0, "dpo_epochs": 1.0, "sft_batch_size": 4,
                       "dpo_batch_size": 4, **overrides})
    base = resolve_source("embedded")
    target = Path(out) / "runs" / "b" / "models" / "M2"
    t0 = time.perf_counter()
    with memory:
        if stage == "sft":
            rows, _, info = recipes.sft(base, *sft_data(n), cfg, target)
        else:
            rows, _, info = recipes.preference(base, seed_pairs()[:n], cfg, target, round=2)
    total = time.perf_counter() - t0
    batch = cfg.sft_batch_size if stage == "sft" else cfg.dpo_batch_size
    # DPO: the merge scored the merged model against its base on the trained pairs, in fp32.
    exact = {k: info[f"fit_{k}"] for k in ("loss", "margin", "accuracy")} if "fit_loss" in info else None
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    losses = [r["loss"] for r in rows]
    print(json.dumps({"variant": variant, "stage": stage, "steps": len(stamps), "batch": batch,
                      "s_per_seq": sum(steps) / len(steps) / batch if steps else None,
                      "losses": losses,
                      "total_s": total, "train_peak_mib": train_peak["rss"] / 2**20,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "merge_gap": info.get("merge_gap"), "exact": exact,
                      "four_bit": info["four_bit"]}))


def run_variant(name: str, n: int) -> dict:
    print(f"training {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--examples", str(n)],
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        sys.exit(f"error: {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reruns(a: str, b: str) -> bool:
    """Whether variants a and b train the same way apart from the seed (the same work)."""
    def plain(name):
        stage, overrides = VARIANTS[name]
        return stage, {k: v for k, v in overrides.items() if k != "seed"}
    return plain(a) == plain(b)


def add_speed(results: list[dict]) -> None:
    """Each result's speed x: the speed baseline's s/seq over its own. The baseline is the mean of
    the stage's first variant and of its reruns at another seed (fp32 seed 1): on a shared 2-core
    machine the same variant's s/seq moves by 10-20% between runs a minute apart, and the mean of
    two samples carries less of that than one."""
    for stage in ("sft", "dpo"):
        rows = [r for r in results if r["stage"] == stage]
        if rows:
            same = [r["s_per_seq"] for r in rows if reruns(rows[0]["variant"], r["variant"])]
            base = sum(same) / len(same)
            for r in rows:
                r["speed_x"], r["speed_baseline_runs"] = base / r["s_per_seq"], len(same)


def table(results: list[dict]) -> str:
    """One block per stage; ratios against the stage's first variant (its baseline; for speed,
    with its reruns at other seeds: add_speed)."""
    lines = [f"{'variant':20} {'steps':>5} {'s/seq':>6} {'speed x':>8} {'train MiB':>10} {'memory x':>9} "
             f"{'process MiB':>12} {'mean loss':>10} {'last loss':>10} {'merge gap':>10} {'fp32 loss':>10} "
             f"{'fp32 margin':>12}"]
    for stage in ("sft", "dpo"):
        rows = [r for r in results if r["stage"] == stage]
        if not rows:
            continue
        base = rows[0]
        for r in rows:
            speed = r["speed_x"]
            gap = "-" if r["merge_gap"] is None else f"{r['merge_gap']:.4f}"
            exact = r.get("exact") or {}
            loss, margin = (f"{exact[k]:.4f}" if k in exact else "-" for k in ("loss", "margin"))
            lines.append(f"{r['variant']:20} {r['steps']:5d} {r['s_per_seq']:6.2f} {speed:8.2f} "
                         f"{r['train_peak_mib']:10.0f} {r['train_peak_mib'] / base['train_peak_mib']:9.2f} "
                         f"{r['peak_rss_mib']:12.0f} {sum(r['losses']) / len(r['losses']):10.3f} "
                         f"{r['losses'][-1]:10.3f} {gap:>10} {loss:>10} {margin:>12}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 examples a variant: checks that everything runs")
    ap.add_argument("--examples", type=int, help="examples a variant (default 32, --quick 8)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = args.examples or (8 if args.quick else 32)
    if n < 8:  # batch 4: the first step is left out of s/seq, so a variant needs two steps at least
        sys.exit(f"error: --examples {n}: at least 8 (two steps of 4, the first of which is not timed)")
    if args.child:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as out:  # a merged model: 0.5 GB
            child(args.child, n, out)
        return
    names = [m.strip() for m in args.variants.split(",") if m.strip()]
    unknown = [m for m in names if m not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    results = [run_variant(name, n) for name in names]
    add_speed(results)
    print(f"\ntraining on the embedded SmolLM2-135M, {n} examples a variant (batch 4 SFT examples or DPO "
          f"pairs), one epoch, LoRA r16; {platform.machine()}, {os.cpu_count()} cores, "
          f"{datetime.date.today()}\n")
    print(table(results))
    print("\ns/seq: seconds per training sequence (SFT example or DPO pair), first step left out. train MiB: peak "
          "resident memory from the first to the last step (sampled every 50 ms); process MiB: the whole process, "
          "merge included (the merge reloads the base at full precision). speed x, memory x: against the first "
          "variant of the stage, measured in this run; for speed, the mean of it and of its reruns at another seed "
          "(the same work: one run's s/seq moves by 10-20% with the machine); speed above 1 is faster. Same data, "
          "seed and learning rate in every variant of a stage, so the losses compare. fp32 loss, fp32 margin (DPO): the trained, merged "
          "model against its base on the pairs it trained on, DPO's loss and mean reward margin computed in fp32 "
          "whatever the training's arithmetic: the logged losses of a bf16 step carry rounding noise in the "
          "log-ratios.")
    if args.json:
        Path(args.json).write_text(json.dumps({"when": datetime.datetime.now().isoformat(timespec="seconds"),
                                               "examples": n, "results": results}, indent=2))


if __name__ == "__main__":
    main()
