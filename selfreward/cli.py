"""The `selfreward` command line."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import sqlite3
import sys
from pathlib import Path

import click

from selfreward import __version__
from selfreward.backends.engines import POLICY_ENGINES
from selfreward.backends.judges import JUDGES, MODES, pin_judge_models
from selfreward.config import coerce, from_text, help_text, launched, load_toml, resolve
from selfreward.errors import SelfRewardError
from selfreward.training.methods import train_methods


# bitsandbytes on CPU looks for a faster 4-bit kernel on the hub (the `kernels` package) and says so on every
# import when it cannot have it; its own kernel is used instead, which is what the README's figures measure.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight-loading bars; ours stay
    import warnings

    # TRL's GRPO/RLOO check vLLM's version on import even where they generate without it (CPU).
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")


class Registered(click.Choice):
    """A choice among a registry's names (JUDGES, METHODS), read each time it is used: an entry
    registered after this module was imported is offered in --help and accepted too."""

    def __init__(self, names):
        self.names = names
        super().__init__(list(names()))

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.names())

    @choices.setter
    def choices(self, value) -> None:
        pass  # click.Choice sets them once; they are the registry's


def _run_path(run: str, runs_dir: str) -> Path:
    path = Path(run)
    return path if (path / "run.db").is_file() else Path(runs_dir) / run


class Group(click.Group):
    """Turns SelfRewardError into one clear line and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SelfRewardError as e:
            raise click.ClickException(str(e)) from None
        except sqlite3.DatabaseError as e:
            name = getattr(e, "sqlite_errorname", "")
            if name == "SQLITE_FULL":
                raise click.ClickException(f"the disk is full ({e}): free space and run the command again "
                                           f"(what finished before is saved)") from None
            if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise click.ClickException(f"a run database is damaged ({e}); restore its run.db from a copy") \
                    from None
            raise
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise click.ClickException(f"no space left on device{' for ' + str(e.filename) if e.filename else ''}: "
                                       f"free space and run the command again (what finished before is saved)") \
                from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished stages are saved; run the same command again to resume", err=True)
            sys.exit(130)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="selfreward")
def cli():
    """Self-Rewarding Language Models: the model writes prompts, answers them,
    judges its answers, and trains on its own preferences (Yuan et al. 2024).

    Every run lives in runs/<name>/ with one SQLite file, run.db.

    \b
    Example:
        selfreward iterate --rounds 3
        selfreward status demo
        selfreward show demo
    """


def _parse_sets(values: tuple[str, ...]) -> dict:
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SelfRewardError(f"--set wants key=value, got '{item}'")
        key = key.strip().replace("-", "_")
        out[key] = from_text(key, raw)
    return out


@cli.command()
@click.option("--name", default="demo", show_default=True, help="Run name: the folder runs/<name>.")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1), help="Bring the run to M_<rounds>.")
@click.option("--model", help="M0: 'embedded', a hub id, a local folder or a .gguf file.")
@click.option("--ift", type=click.Path(), help="IFT JSONL (instruction, response).")
@click.option("--eft", type=click.Path(), help="EFT JSONL (instruction, response, justification, score).")
@click.option("--eft-eval", type=click.Path(), help="Held-out set for each round's judge quality: flat EFT JSONL or a "
                                                    "ranked JSONL such as a `data import-oasst` file ('' to skip).")
@click.option("--preset", type=click.Choice(["auto", "demo", "tiny", "paper"]), help="Size preset.")
@click.option("--config", "config_file", type=click.Path(), help="TOML file of config keys.")
@click.option("--engine", type=click.Choice(["auto", *POLICY_ENGINES]),
              help="Policy engine: vllm (a long-lived server per model), transformers (in-process) or ray "
                   "(Ray Data jobs on vLLM replicas; ray_address names a cluster).")
@click.option("--judge", type=Registered(lambda: JUDGES), help="Judge backend.")
@click.option("--judge-mode", type=click.Choice(list(MODES)), help="LLM judge mode (self, api).")
@click.option("--judge-model", help="Model for --judge pairrm / reward-model (hub id or folder).")
@click.option("--api-base", "--judge-api-base", "api_base",
              help="OpenAI-compatible base URL for --judge api (comma-separated for replicas); key from "
                   "$OPENAI_API_KEY (see api_key_env).")
@click.option("--api-model", "--judge-api-model", "api_model", help="Model name at the server, for --judge api.")
@click.option("--judge-script", type=click.Path(), help="JSON list of raw outputs for --judge scripted.")
@click.option("--train-method", type=Registered(train_methods),
              help="How M_t (t >= 2) is trained: dpo (loss from dpo_loss_type) or simpo (reference-free).")
@click.option("--train-processes", type=click.IntRange(1),
              help="Processes that train SFT/DPO/SimPO under `accelerate launch` (1 = in this process).")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any config key (repeatable).")
@click.option("--help-config", is_flag=True, help="List every config key with its default and exit.")
def iterate(name, runs_dir, rounds, model, ift, eft, eft_eval, preset, config_file, engine, judge, judge_mode,
            judge_model, api_base, api_model, judge_script, train_method, train_processes, seed, sets, help_config):
    """Run the loop until the run has M_<rounds>; resume it if it stopped.

    Round 1 trains M1 = SFT(M0) on the seed IFT+EFT data. Each later round t
    uses M_{t-1} to write prompts, answer them N times, judge every answer K
    times, build best-vs-worst pairs, and DPO M_{t-1} into M_t.

    Config precedence: defaults (the paper's), then the preset, then --config
    TOML, then flags. A finished run says there is nothing to do; an
    interrupted one picks up at the first unfinished stage.

    \b
    Example:
        selfreward iterate --rounds 3
        selfreward iterate --name mine --model ./my-model --ift ift.jsonl --eft eft.jsonl
        selfreward iterate --name t --preset tiny --set n_candidates=2 --set judge_samples=1
        selfreward iterate --name ext --judge api --api-base http://127.0.0.1:8000/v1 --api-model qwen
        selfreward iterate --name q --set load_in_4bit=yes --set dpo_loss_type=ipo    # QLoRA, IPO
        selfreward iterate --name s --train-method simpo --set report_to=tensorboard
        selfreward iterate --name d --train-processes 2      # SFT and DPO under accelerate, 2 processes
        selfreward iterate --name r --engine ray             # generation on a local Ray cluster
        selfreward iterate --name c --engine ray --set ray_address=10.0.0.5:6379 --set ray_replicas=8
    """
    if help_config:
        click.echo(help_text())
        return
    _run_name(name)
    from selfreward.core.context import Context
    from selfreward.core.loop import iterate as run_loop
    from selfreward.core.store import Run

    flags = {"model": model, "ift": ift, "eft": eft, "eft_eval": eft_eval, "preset": preset, "engine": engine,
             "judge": judge, "judge_mode": judge_mode, "judge_model": judge_model, "api_base": api_base,
             "api_model": api_model, "judge_script": judge_script, "train_method": train_method,
             "train_processes": train_processes, "seed": seed}
    cli_values = {k: coerce(k, v) for k, v in flags.items() if v is not None}
    cli_values.update(_parse_sets(sets))
    for key in ("ift", "eft", "eft_eval", "judge_script", "accelerate_config"):
        if cli_values.get(key):
            cli_values[key] = str(Path(cli_values[key]).resolve())
    toml = load_toml(config_file) if config_file else {}
    path = Path(runs_dir) / name
    if (path / "run.db").is_file():
        run = Run.open(path, writer=True)  # the lock first: a second iterate stops here, with one line
        try:
            _check_same_config(run, {**toml, **cli_values})
        except SelfRewardError:
            run.close()
            raise
        cfg = run.config()
    else:
        cfg = resolve(toml, cli_values)
        _check_inputs(cfg)
        cfg = pin_judge_models(cfg)
        run = Run.create(path, cfg)
        click.echo(f"created run {path} (preset {cfg.preset}, model {cfg.model})")
    _quiet_libraries()
    with run:
        ctx = Context(run, cfg, checkpoint=True)
        try:
            done = run_loop(ctx, rounds)
        finally:
            ctx.close()  # a vLLM server's process group ends on every way out
    if ctx.stopped:
        click.echo(ctx.stopped)
    elif not done:
        click.echo(f"nothing to do: {path} already has M{rounds} (rounds 1..{rounds} finished)")
    from selfreward.inspection.status import COLUMNS, round_summary, table
    from selfreward.inspection.trend import actor_text, trend_text

    with Run.open(path) as run:
        click.echo(table(round_summary(run), COLUMNS))
        click.echo()
        click.echo(trend_text(run))
        click.echo()
        click.echo(actor_text(run))


RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def _run_name(name: str) -> str:
    """A run name is one folder under --runs-dir: no separators, no '..', no hidden or odd names."""
    if not RUN_NAME.fullmatch(name):
        raise SelfRewardError(f"bad run name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
                              "not starting with '.'")
    return name


# Where and how to reach the API judge may change between attempts (a server moved,
# a rate limit tightened); what it is and how it samples may not.
OPERATIONAL_KEYS = {"api_base", "api_key_env", "api_concurrency", "api_timeout", "api_max_retries", "api_backoff",
                    "api_replica_cooldown", "vllm_replicas", "vllm_distributed_executor_backend",
                    "vllm_start_timeout", "vllm_cpu_kvcache_gb", "vllm_cpu_threads", "vllm_gpu_memory_utilization",
                    "ray_address", "ray_replicas", "ray_cpus_per_replica", "ray_batch_size", "ray_start_timeout"}


def _check_same_config(run, asked: dict) -> None:
    """Resuming must not silently change what the finished stages were made with."""
    from selfreward.backends.models import pinned_from

    stored = run.config_values()
    operational = {k: asked.pop(k) for k in OPERATIONAL_KEYS & asked.keys()}
    preset = asked.pop("preset", None)
    if asked.get("engine") == "auto":
        asked.pop("engine")
    if preset not in (None, "auto", stored.get("preset")):
        raise SelfRewardError(f"run {run.path} uses preset {stored.get('preset')}, not {preset}; "
                              f"use a new --name for a different preset")
    for key, value in asked.items():
        if key in ("judge_model", "eval_judge_model") and pinned_from(stored.get(key)) == value:
            continue  # the hub id that creation pinned to this snapshot
        if stored.get(key) != value:
            raise SelfRewardError(f"run {run.path} was made with {key}={stored.get(key)!r}, not {value!r}; "
                                  f"drop the flag to resume, or use a new --name")
    # Only once the rest is known to match and the new values are valid, so a refused resume changes nothing.
    from selfreward.config import validate

    validate(dataclasses.replace(run.config(), **operational))
    for key, value in operational.items():
        if stored.get(key) != value:
            run.set_config(key, value)


def _check_inputs(cfg) -> None:
    """Fail before the run folder exists: bad data or model never leave a half-made run."""
    from selfreward.data import read_eft, read_ift
    from selfreward.backends.models import resolve_policy
    from selfreward.prompts import load_template

    read_ift(cfg.ift)
    read_eft(cfg.eft)
    if cfg.eft_eval:
        from selfreward.evaluation.judge_quality import load_eval_set

        load_eval_set(cfg.eft_eval)  # flat EFT or ranked: checked line by line before a run exists
    if cfg.if_eval:
        from selfreward.evaluation.instruct import load_if_eval

        load_if_eval(cfg.if_eval)  # a malformed line is one error naming the file and line
    if cfg.eval_judge != "none":
        read_ift(cfg.win_eval)
    load_template("additive_judge")
    load_template("self_instruct")
    check_judge(cfg)
    resolve_policy(cfg.model)
    if cfg.engine == "ray" and cfg.ray_address:
        from selfreward.backends.engines.ray_data import reach

        reach(cfg)  # a cluster that is not there; the engine checks it is Ray, with the resources asked


def check_judge(cfg) -> None:
    """Judge settings that can be checked without loading a model."""
    from selfreward.backends.judges import build_judge, judge_kind
    from selfreward.prompts import load_template

    kind = judge_kind(cfg)
    if cfg.judge_mode not in kind.modes:
        raise SelfRewardError(f"unknown judge mode '{cfg.judge_mode}'; choose one of: {', '.join(kind.modes)}")
    load_template(MODES[cfg.judge_mode])
    if kind.built_at_check:
        build_judge(cfg, None, "check")  # builds the client or reads the script; sends nothing
    if cfg.judge_model and cfg.judge_model.startswith((".", "/", "~")) and not Path(cfg.judge_model).exists():
        raise SelfRewardError(f"judge model not found: {cfg.judge_model}")


@cli.command()
@click.argument("run")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--stages", "by_stage", is_flag=True, help="Also list every stage's wall time and peak memory.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(run, runs_dir, by_stage, as_json):
    """Per-round summary of a run: prompts, candidates, judgments, parse rate,
    mean score, pairs kept and dropped, training loss, DPO reward margin and
    accuracy, mean chosen and rejected length (tokens), wall time; then judge
    quality across rounds (a line per metric, a column per model) and, in
    words, whether the newest judge got worse than the one before.

    \b
    Example:
        selfreward status demo
        selfreward status runs/demo --stages
        selfreward status demo --json | jq '.rounds[].pairs_kept'
    """
    from selfreward.inspection.status import COLUMNS, round_summary, stage_summary, table
    from selfreward.inspection.trend import actor_text, actor_trend, judge_trend, trend_text
    from selfreward.core.store import Run

    r = Run.open(_run_path(run, runs_dir))
    rounds, stages = round_summary(r), stage_summary(r)
    if as_json:
        click.echo(json.dumps({"run": str(r.path), "rounds": rounds, "stages": stages, "judge": judge_trend(r),
                               "actor": actor_trend(r)}, indent=2))
        return
    click.echo(table(rounds, COLUMNS) if rounds else "no rounds started yet")
    if rounds:
        click.echo()
        click.echo(trend_text(r))
        click.echo()
        click.echo(actor_text(r))
    if by_stage:
        click.echo()
        cols = [("round", "round"), ("stage", "stage"), ("wall_s", "wall"), ("peak_rss_mb", "peak MiB"),
                ("detail", "detail")]
        click.echo(table(stages, cols, free_last=True))


@cli.command()
@click.argument("run")
@click.argument("prompt_id", required=False, type=int)
@click.option("--pair", "pair_id", type=int, help="Show one pair: chosen vs rejected with every judge sample.")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def show(run, prompt_id, pair_id, runs_dir):
    """One prompt with its candidates and every judge sample's score and
    rationale, or (with --pair) one preference pair.

    Without PROMPT_ID, shows the first prompt that produced a kept pair.

    \b
    Example:
        selfreward show demo
        selfreward show demo 12
        selfreward show demo --pair 3
    """
    from selfreward.inspection.status import show_pair, show_prompt
    from selfreward.core.store import Run

    r = Run.open(_run_path(run, runs_dir))
    click.echo(show_pair(r, pair_id) if pair_id is not None else show_prompt(r, prompt_id), nl=False)


def judge_options(f):
    """The judge flags shared by the eval commands (they override the run's judge for this command only)."""
    options = [
        click.option("--judge", type=Registered(lambda: JUDGES), help="Judge backend (default: the run's)."),
        click.option("--judge-mode", type=click.Choice(list(MODES))),
        click.option("--judge-model", help="Model for pairrm / reward-model."),
        click.option("--api-base", "--judge-api-base", "api_base",
                     help="OpenAI-compatible base URL for --judge api (comma-separated for replicas); "
                          "key from $OPENAI_API_KEY."),
        click.option("--api-model", "--judge-api-model", "api_model", help="Model name at the server."),
        click.option("--judge-script", type=click.Path(), help="JSON list of raw outputs (scripted judge)."),
        click.option("--judge-logprobs", type=click.Choice(["auto", "yes", "no"]),
                     help="Also read each score's token probabilities and report the metrics of the expected "
                          "(logprob-weighted) scores beside the parsed ones (E columns)."),
        click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False)),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _judge_overrides(kw: dict) -> dict:
    overrides = {k: coerce(k, v) for k, v in kw.items() if v is not None and k != "runs_dir"}
    if overrides.get("judge_script"):
        overrides["judge_script"] = str(Path(overrides["judge_script"]).resolve())
    return overrides


def _policy(run, name: str) -> dict:
    """A policy model of the run (M_t); a reward model is named as such, with how to use it."""
    model = run.model(name)
    if model["kind"] == "reward-model":
        raise SelfRewardError(f"{name} is a reward model, not a policy; use it as a judge: "
                              f"--judge reward-model --judge-model {model['path']}")
    return model


def _policies(run, models: str | None) -> list[str]:
    """The policy models named by a --models list (default: every one of the run), each checked."""
    names = models.split(",") if models else [m["name"] for m in run.rows(
        "select name from models where kind != 'reward-model' order by round")]
    for name in names:
        _policy(run, name)  # fails clearly on a model the run does not have
    return names


@cli.group(name="eval", cls=Group)
def eval_group():
    """Measure judges and models; results are stored in run.db (eval_metrics, head2head).

    \b
    Example:
        selfreward eval judge demo
        selfreward eval head2head demo --a M1 --b M3
        selfreward eval instruct demo --data ifeval.jsonl
        selfreward eval harness demo --tasks mytask --include-path tasks/
    """


@eval_group.command(name="judge")
@click.argument("run")
@click.option("--models", help="Comma-separated models of the run to evaluate as self judges (default: all).")
@click.option("--data", "dataset", type=click.Path(), help="Ranked or flat EFT JSONL (default: the run's eft_eval).")
@click.option("--limit", type=int, default=0, help="Use only the first N prompts.")
@click.option("--samples", type=int, default=1, show_default=True, help="Judge samples per response.")
@click.option("--verbosity/--no-verbosity", default=True, show_default=True,
              help="Also run the verbosity probe (padded answers must not score higher).")
@click.option("--canaries/--no-canaries", default=True, show_default=True,
              help="Also run the injection probe: answers carrying 'Score: 5', a closing tag or 'ignore the "
                   "rubric' must not move their score, and no score may be read from an answer's text.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@judge_options
def eval_judge_cmd(run, models, dataset, limit, samples, verbosity, canaries, as_json, runs_dir, **judge_kw):
    """Judge quality against human rankings (the paper's Table 4): pairwise
    accuracy (judge ties shown apart), 5-best %, exact-match %, Spearman and
    Kendall tau per prompt, plus parse rate, position inconsistency (pairwise
    mode), the verbosity probe and judgments per second. Where the judge reads
    score probabilities (judge_logprobs), the E columns give pairwise accuracy,
    ties and Spearman of the expected (logprob-weighted) scores side by side.

    \b
    Example:
        selfreward eval judge demo                        # every M_t of the run as a self judge
        selfreward eval judge demo --models M0,M1 --limit 20
        selfreward eval judge demo --judge-mode pairwise --models M1
        selfreward eval judge demo --judge api --api-base http://127.0.0.1:8000/v1 --api-model qwen
        selfreward eval judge demo --judge pairrm --judge-model ./PairRM-hf --data oasst/eft_eval.jsonl
    """
    from selfreward.evaluation.judge_commands import eval_judge
    from selfreward.core.store import Run

    with Run.open(_run_path(run, runs_dir), writer=True) as r:
        overrides = _judge_overrides(judge_kw)
        check_judge(dataclasses.replace(r.config(), **overrides))
        names = _policies(r, models)
        if not dataset:
            r.check_inputs(("eft_eval",))  # the run's own eval set, as it was when the run began
        _quiet_libraries()
        rows = eval_judge(r, overrides, names, dataset or r.config().eft_eval, limit, samples, verbosity, canaries)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from selfreward.inspection.status import EVAL_COLUMNS, table

    click.echo(table(rows, EVAL_COLUMNS))


@eval_group.command(name="head2head")
@click.argument("run")
@click.option("--a", "model_a", required=True, help="Model of the run, e.g. M1.")
@click.option("--b", "model_b", required=True, help="Model of the run, e.g. M3.")
@click.option("--prompts", type=click.Path(), help="IFT-format JSONL of prompts (default: held-out IFT seed split).")
@click.option("--limit", type=int, default=16, show_default=True, help="Number of prompts (0 = all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@judge_options
def head2head_cmd(run, model_a, model_b, prompts, limit, as_json, runs_dir, **judge_kw):
    """M_a vs M_b on held-out prompts: both answer each prompt, the judge
    compares the answers in both orders (LLM judges switch to pairwise mode),
    and the result is win / tie / loss from A's side with each side's mean
    answer length.

    \b
    Example:
        selfreward eval head2head demo --a M1 --b M3
        selfreward eval head2head demo --a M0 --b M3 --judge pairrm --judge-model ./PairRM-hf
    """
    from selfreward.config import SEED_DIR
    from selfreward.evaluation.judge_commands import head2head
    from selfreward.core.store import Run

    with Run.open(_run_path(run, runs_dir), writer=True) as r:
        overrides = _judge_overrides(judge_kw)
        check_judge(dataclasses.replace(r.config(), **overrides))
        for name in (model_a, model_b):
            _policy(r, name)
        _quiet_libraries()
        result = head2head(r, overrides, model_a, model_b, prompts or str(SEED_DIR / "ift_heldout.jsonl"), limit)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from selfreward.inspection.status import H2H_COLUMNS, table

    click.echo(table([result], H2H_COLUMNS))


@eval_group.command(name="instruct")
@click.argument("run")
@click.option("--data", "dataset", type=click.Path(), help="IFEval-format JSONL: key, prompt, instruction_id_list, "
                                                           "kwargs (default: the run's if_eval).")
@click.option("--models", help="Comma-separated models of the run (default: every policy model).")
@click.option("--limit", type=click.IntRange(0), default=0, help="Use only the first N prompts (0 = all).")
@click.option("--max-new-tokens", type=click.IntRange(1), help="Answer length limit (default: eval_max_new_tokens).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def eval_instruct_cmd(run, dataset, models, limit, max_new_tokens, as_json, runs_dir):
    """Verifiable instruction following: each model answers the prompts
    greedily, and every constraint is checked by the IFEval/IFBench checkers
    (if-verifiable). Prompt-level scores count fully checked prompts only; a
    constraint whose checker cannot run (missing NLTK data, an id newer than
    the checkers) is unchecked, never a pass or a fail. The fixed-answer floor
    (every prompt answered with one short sentence) is shown beside.

    \b
    Example:
        selfreward eval instruct demo                          # the run's if_eval, every model
        selfreward eval instruct demo --data ifeval.jsonl --models M1,M3 --limit 100
        selfreward eval instruct demo --json | jq '.[].if_prompt_strict'
    """
    from selfreward.core.store import Run
    from selfreward.evaluation.commands import eval_instruct
    from selfreward.evaluation.instruct import load_if_eval

    with Run.open(_run_path(run, runs_dir), writer=True) as r:
        data = dataset or r.config().if_eval
        if not data:
            raise SelfRewardError("this run has no if_eval set; give one with --data FILE")
        load_if_eval(data)  # a malformed line is one error line, before any model loads
        names = _policies(r, models)
        _quiet_libraries()
        rows = eval_instruct(r, names, data, limit, max_new_tokens)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from selfreward.inspection.status import IF_COLUMNS, table

    click.echo(table(rows, IF_COLUMNS))


@eval_group.command(name="harness")
@click.argument("run")
@click.option("--tasks", required=True, help="Comma-separated lm-eval tasks or groups, e.g. ifeval,gsm8k.")
@click.option("--models", help="Comma-separated models of the run (default: every policy model).")
@click.option("--limit", type=click.IntRange(0), default=0, help="Use only the first N documents of each task "
                                                                 "(0 = all).")
@click.option("--include-path", type=click.Path(), help="A folder of your own lm-eval task YAMLs.")
@click.option("--chat-template/--no-chat-template", default=True, show_default=True,
              help="Wrap each request in the model's chat template (the run's models are chat models).")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def eval_harness_cmd(run, tasks, models, limit, include_path, chat_template, batch_size, as_json, runs_dir):
    """lm-evaluation-harness tasks on the run's own models: each model is
    loaded from its folder by lm-eval's `hf` model type (transformers, in this
    process) and every task's metrics are stored in eval_metrics (kind
    'harness', dataset = the task). Nothing is downloaded: a stock task runs
    only if its data is already in the local datasets cache; otherwise define
    the task from a local file (a task YAML with `dataset_path: json`) in a
    folder given with --include-path.

    \b
    Example:
        selfreward eval harness demo --tasks mytask --include-path tasks/
        selfreward eval harness demo --tasks ifeval,gsm8k --models M1,M3 --limit 100
        selfreward eval harness demo --tasks mytask --include-path tasks/ --json | jq '.[].value'
    """
    from selfreward.core.store import Run
    from selfreward.evaluation.harness import check_tasks, eval_harness, task_manager

    names_of_tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names_of_tasks:
        raise SelfRewardError("--tasks names no task")
    with Run.open(_run_path(run, runs_dir), writer=True) as r:
        names = _policies(r, models)
        _quiet_libraries()
        manager = task_manager(include_path)
        check_tasks(names_of_tasks, manager)  # unknown or offline-unloadable: one error line, before any model loads
        rows = eval_harness(r, names, names_of_tasks, manager, limit, chat_template, batch_size)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from selfreward.evaluation.harness import by_model
    from selfreward.inspection.status import table

    click.echo(table(*by_model(rows, names)))


@cli.command(name="train-rm")
@click.argument("run")
@click.option("--from", "source", default="pairs", show_default=True, metavar="pairs|FILE",
              help="'pairs': the run's kept preference pairs (every round); or a ranked or flat EFT JSONL file: "
                   "every better/worse pair within each prompt.")
@click.option("--base", help="Model of the run whose body the reward model starts from (default: the newest M_t).")
@click.option("--name", help="Name of the new model (default: RM<t> after its base M_t).")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), help="Passes over the pairs (default: the run's "
              "dpo_epochs).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True,
              help="Peak learning rate (cosine decay to a tenth of it).")
@click.option("--batch-size", type=click.IntRange(1),
              help="Pairs per optimiser step (default: the run's dpo_batch_size).")
@click.option("--held-out", type=click.Path(), help="Ranked or flat EFT JSONL to measure it on as a judge "
              "(default: the run's eft_eval, where it exists).")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def train_rm_cmd(run, source, base, name, epochs, lr, batch_size, held_out, runs_dir):
    """Train a Bradley-Terry reward model from a run: the policy's body (the
    newest M_t unless --base) under a fresh one-logit head, with a LoRA
    adapter, by TRL's RewardTrainer, on the run's kept pairs or on the
    better/worse pairs of a ranked file. The merged model is saved as
    runs/<run>/models/<name>/ and recorded in the models table (kind
    reward-model) with its training steps; its Table-4 judge metrics on
    held-out data are printed and stored in eval_metrics. It is a judge at
    once: --judge reward-model --judge-model runs/<run>/models/<name>.

    \b
    Example:
        selfreward train-rm demo                              # -> runs/demo/models/RM3
        selfreward train-rm demo --from data/oasst/eft_eval.jsonl --name RM-oasst --epochs 1
        selfreward train-rm demo --base M1 --lr 5e-5 --held-out data/oasst/eft_eval.jsonl
        selfreward eval judge demo --judge reward-model --judge-model runs/demo/models/RM3
    """
    from selfreward.training.train_rm import train_rm
    from selfreward.core.store import Run

    with Run.open(_run_path(run, runs_dir), writer=True) as r:
        if held_out is None:
            r.check_inputs(("eft_eval",))
        _quiet_libraries()
        if launched(r.config()):
            click.echo("note: train-rm trains in this one process; the run's train_processes and "
                       "accelerate_config apply to SFT, DPO and SimPO", err=True)
        result = train_rm(r, source, base=base, name=name, epochs=epochs, lr=lr, batch=batch_size,
                          held_out=held_out)
    evaluated = result["eval"]
    if evaluated:
        from selfreward.inspection.status import EVAL_COLUMNS, table

        click.echo(table([evaluated], EVAL_COLUMNS))
    held = (f"held-out pairwise accuracy {_percent(evaluated.get('pairwise_accuracy'))} "
            f"on {Path(result['held_out']).name}") if evaluated else "no held-out data"
    if evaluated and source != "pairs" and Path(source).resolve() == Path(result["held_out"]).resolve():
        held += " (the training file itself: not held out)"
    click.echo(f"{result['name']} (from {result['base']}): {result['pairs']} pairs, {result['steps']} steps, "
               f"final loss {result['final_loss']:.3f}, train accuracy {_percent(result['train_accuracy'])}, "
               f"{held} -> {result['path']}")


@cli.command(name="join-training")
@click.argument("run")
@click.option("--machine-rank", required=True, type=click.IntRange(1),
              help="This machine's rank, 1 to num_machines - 1 (machine 0 runs `selfreward iterate`).")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def join_training(run, machine_rank, runs_dir):
    """Be one more machine in each SFT, DPO and SimPO training of a run whose
    accelerate_config has num_machines > 1. `selfreward iterate` runs on
    machine 0 (the config's main_process_ip); before each training it writes
    the stage's spec into the run folder, which every machine must see (a
    shared filesystem), and waits for the others. This command waits for
    that spec, runs the same `accelerate launch` with its own machine rank,
    and then waits for the next training, until interrupted. It may start
    before or after `iterate`; it never opens run.db. Each training's output
    is in runs/<run>/logs/train-<model>-machine<rank>.log.

    \b
    Example:
        selfreward join-training big --machine-rank 1
        srun --nodes 1 --relative 1 selfreward join-training big --machine-rank 1   # under Slurm
    """
    from selfreward.training.launch import join

    for line in join(_run_path(run, runs_dir), machine_rank):
        click.echo(line)


def _percent(value) -> str:
    from selfreward.inspection.status import fmt

    return fmt("pairwise_accuracy", value)


# --- data ---

@cli.group(cls=Group)
def data():
    """Bring data in: OpenAssistant exports, EFT targets built by a judge.

    \b
    Example:
        selfreward data import-oasst oasst1.parquet --out data/oasst
        selfreward data make-eft data/oasst/eft_eval.jsonl --out data/oasst/eft_train.jsonl --model runs/demo/models/M1
    """


@data.command(name="import-oasst")
@click.argument("path", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for ift.jsonl and eft_eval.jsonl.")
@click.option("--lang", default="en", show_default=True, help="Comma-separated languages to keep ('all' keeps every one).")
@click.option("--keep-deleted", is_flag=True, help="Keep messages marked deleted.")
@click.option("--keep-unreviewed", is_flag=True, help="Keep messages that failed review.")
def import_oasst_cmd(path, out_dir, lang, keep_deleted, keep_unreviewed):
    """Read an OpenAssistant export (tree JSONL, or flat messages as JSONL or
    Parquet, as on the hub) and write IFT (first-turn prompt + its rank-0
    reply) and a ranked EFT evaluation set (prompts with >= 2 ranked replies).

    \b
    Example:
        selfreward data import-oasst 2023-04-12_oasst_ready.trees.jsonl.gz --out data/oasst
        selfreward data import-oasst oasst1-train.parquet --out data/oasst --lang en,de
    """
    from selfreward.inspection.export import refuse_run_folder
    from selfreward.oasst import import_oasst

    refuse_run_folder(out_dir, "write")
    langs = None if lang == "all" else tuple(x.strip() for x in lang.split(",") if x.strip())
    counts = import_oasst(path, out_dir, lang=langs, drop_deleted=not keep_deleted,
                          require_review=not keep_unreviewed)
    dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items() if v) or "none"
    click.echo(f"read {counts['prompts_read']} prompts, kept {counts['prompts_kept']} (dropped: {dropped})")
    click.echo(f"wrote {counts['ift_rows']} IFT rows to {Path(out_dir) / 'ift.jsonl'}")
    click.echo(f"wrote {counts['eft_rows']} ranked EFT rows to {Path(out_dir) / 'eft_eval.jsonl'}")


@data.command(name="make-eft")
@click.argument("ranked", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="EFT JSONL to write.")
@click.option("--model", default="embedded", show_default=True,
              help="For the self judge: the model that writes the judgments (the paper used the SFT baseline).")
@click.option("--samples", default=1, show_default=True, type=click.IntRange(1), help="Judge samples per reply.")
@click.option("--max-share", default=0.4, show_default=True, type=float,
              help="Downsample so no score holds more than this share of the rows.")
@click.option("--limit", type=int, default=0, help="Use only the first N prompts.")
@judge_options
def make_eft_cmd(ranked, out, model, samples, max_share, limit, runs_dir, **judge_kw):
    """Build EFT training targets as the paper did: a judge writes a
    justification and score for every ranked reply, a prompt's rows are kept
    only where the judge's order agrees with the human order, and the dominant
    score is downsampled.

    \b
    Example:
        selfreward data make-eft data/oasst/eft_eval.jsonl --out eft_train.jsonl --model runs/demo/models/M1
        selfreward data make-eft ranked.jsonl --out eft.jsonl --judge api --api-base http://127.0.0.1:8000/v1 --api-model qwen
    """
    from selfreward.config import resolve
    from selfreward.backends.engines import make_engine
    from selfreward.backends.judges import build_judge, default_engines
    from selfreward.backends.models import resolve_source
    from selfreward.inspection.export import refuse_run_folder
    from selfreward.oasst import make_eft, write_eft

    refuse_run_folder(out, "write")  # before any judging
    cfg = resolve({}, _judge_overrides(judge_kw))
    check_judge(cfg)
    from selfreward.data import iter_jsonl

    groups = []
    for where, row in iter_jsonl(ranked, "ranked EFT file"):
        if not isinstance(row.get("responses"), list) or "instruction" not in row:
            raise SelfRewardError(f"{where}: expected {{'instruction', 'responses': [{{'text', 'rank'}}]}}")
        groups.append(row)
    groups = groups[: limit or None]
    _quiet_libraries()
    import tempfile

    policy = []  # the engine, once the self judge asks for it, so it can be closed on every way out
    workdir = Path(tempfile.mkdtemp(prefix="selfreward-make-eft-"))

    def engine():
        policy.append(make_engine(cfg, resolve_source(model), workdir))
        return policy[-1]

    try:
        judge = build_judge(cfg, default_engines(cfg, engine), model)
        rows, stats = make_eft(groups, judge, samples=samples, seed=cfg.seed, max_share=max_share)
    finally:
        for e in policy:
            e.close()
    if not rows:
        raise SelfRewardError(f"no prompt's judge order agreed with the human order "
                              f"({stats['disagreeing']} disagreed, {stats['unscored']} unscored); nothing written")
    write_eft(out, rows)
    click.echo(f"judged {stats['prompts_judged']} prompts: {stats['agreeing']} agree with humans, "
               f"{stats['disagreeing']} disagree, {stats['unscored']} unscored")
    click.echo(f"wrote {len(rows)} EFT rows to {out} (scores {stats['scores_after']})")


# --- auditing ---

@cli.command()
@click.argument("run")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def verify(run, runs_dir):
    """Recompute every pair from the stored scores and the stored pairing rule,
    and re-read every stored score from its stored raw judge output (judgments,
    CREAM's consistency judgments, pairwise comparisons and the scores they
    give); check the append-only triggers and every model folder's hash. Lists
    each mismatch and exits 1 if there is any. Opens the run read-only.

    \b
    Example:
        selfreward verify demo
    """
    from selfreward.inspection.audit import verify as verify_run
    from selfreward.core.store import Run

    r = Run.open(_run_path(run, runs_dir))
    counts: dict = {}
    problems = verify_run(r, counts)
    for p in problems:
        click.echo(p)
    # What could not be re-read is said, with its count: "ok" covers only what was checked.
    unchecked = []
    if counts["judgments_without_raw"]:
        unchecked.append(f"{counts['judgments_without_raw']} without raw judge text (PairRM, reward models, "
                         f"failed requests, human labels)")
    if counts["judgments_unknown_template"]:
        unchecked.append(f"{counts['judgments_unknown_template']} made with a template this version does not have")
    if unchecked:
        click.echo(f"not re-read: {'; '.join(unchecked)}")
    if problems:
        raise click.ClickException(f"{len(problems)} mismatch(es) in {r.path}")
    also = "".join(f", {counts[key]} {what}" for key, what in (("comparisons_checked", "pairwise comparisons"),
                                                                ("consistency_checked", "consistency judgments"),
                                                                ("eval_comparisons_checked", "eval-judge comparisons"))
                   if counts[key])
    click.echo(f"ok: {counts['pairs']} pairs and {counts['judgments_checked']} of {counts['judgments']} judgments"
               f"{also} match their stored inputs")


@cli.command(name="rationales")
@click.argument("run")
@click.option("--round", "round_", type=int, help="Only this round.")
@click.option("--min-score", type=float, help="Judge score at least this.")
@click.option("--max-score", type=float, help="Judge score at most this.")
@click.option("--spread", type=float, help="Candidates whose K judge samples differ by at least this (max - min).")
@click.option("--failures", is_flag=True, help="Only judgments that did not parse (score NULL).")
@click.option("--margin", type=float, help="Only candidates of kept pairs whose score margin is at least this.")
@click.option("--search", help="Full-text search in rationales and responses (SQLite FTS5 syntax).")
@click.option("--meta", is_flag=True, help="List the meta-judgments instead (Meta-Rewarding: which of two judgments "
                                           "of a response is better, and the judge pair it made).")
@click.option("--limit", type=int, default=0, help="At most N rows.")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]), default="table", show_default=True)
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def rationales_cmd(run, round_, min_score, max_score, spread, failures, margin, search, meta, limit, fmt, runs_dir):
    """List judge rationales with the responses they judged, filtered; or,
    with --meta, the meta-judges' rationales (Meta-Rewarding).

    \b
    Example:
        selfreward rationales demo --round 2 --spread 2
        selfreward rationales demo --failures --format jsonl
        selfreward rationales demo --search "incorrect OR wrong" --format csv > wrong.csv
        selfreward rationales demo --min-score 5 --margin 3
        selfreward rationales demo --meta --round 2
    """
    from selfreward.inspection.audit import META_COLUMNS, meta_rationales, rationales, render
    from selfreward.core.store import Run

    if meta:
        if any(x is not None for x in (min_score, max_score, spread, margin)) or failures:
            raise SelfRewardError("--meta takes --round, --search and --limit only")
        rows = meta_rationales(Run.open(_run_path(run, runs_dir)), round=round_, search=search, limit=limit)
        click.echo(render(rows, fmt, columns=META_COLUMNS), nl=False)
        return

    rows = rationales(Run.open(_run_path(run, runs_dir)), round=round_, min_score=min_score, max_score=max_score,
                      min_spread=spread, failures=failures, min_margin=margin, search=search, limit=limit)
    click.echo(render(rows, fmt), nl=False)


@cli.command()
@click.argument("run")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8001, show_default=True, type=int)
@click.option("--public", is_flag=True, help="Allow a --host other than loopback: anyone who reaches it can read "
                                             "the whole run and run any SQL on it, with no login.")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def browse(run, host, port, public, runs_dir):
    """Open the run in Datasette (install with: pip install -e '.[browse]'),
    with descriptions of every table and column and canned queries: pairs with
    both sides' rationales, low-agreement judgments, parse failures, and the
    score distribution by round.

    \b
    Example:
        selfreward browse demo
        selfreward browse demo --port 8765
    """
    from selfreward.inspection.browse import serve
    from selfreward.core.store import Run

    serve(Run.open(_run_path(run, runs_dir)), host, port, public)


@cli.command()
@click.argument("run")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder (default: runs/<name>/report).")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def report(run, out_dir, runs_dir):
    """Write a self-contained HTML report with PNG charts per round: score
    histogram, mean score and parse rate; pairs kept and dropped; chosen and
    rejected length (length drift is the known reward-hacking signal); DPO
    loss, margin and accuracy; judge-quality metrics.

    \b
    Example:
        selfreward report demo
        selfreward report demo --out /tmp/demo-report
    """
    from selfreward.inspection.report import build_report
    from selfreward.core.store import Run

    r = Run.open(_run_path(run, runs_dir))
    if out_dir and Path(out_dir).resolve() != (r.path / "report").resolve():
        from selfreward.inspection.export import refuse_run_folder

        refuse_run_folder(out_dir, "write the report")  # only the default runs/<name>/report lies in a run
    click.echo(f"wrote {build_report(r, Path(out_dir) if out_dir else r.path / 'report')}")


@cli.command()
@click.argument("run")
@click.option("--round", "round_", type=int,
              help="The round whose pairs (or candidates, for label-studio) to export; not for alpaca-eval.")
@click.option("--out", required=True, type=click.Path(),
              help="File (jsonl, parquet) or folder (datasets, label-studio, alpaca-eval).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet", "datasets", "label-studio", "alpaca-eval"]),
              default="jsonl", show_default=True)
@click.option("--force", is_flag=True,
              help="Write into an existing --out: overwrite the files this export writes, leave the rest.")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def export(run, round_, out, fmt, force, runs_dir):
    """Export a round's kept pairs as TRL preference data (prompt / chosen /
    rejected, conversational, with judge scores and judgment ids), or its
    candidates as Label Studio ranking tasks with a labeling config; or, with
    --format alpaca-eval, each model's answers to held-out prompts (the eval
    stage's and `eval head2head`'s) as AlpacaEval model outputs, one <model>.json per model,
    for `alpaca_eval --model_outputs OUT/M3.json --reference_outputs OUT/M1.json`.

    An existing --out is refused unless --force is given; a path inside a
    run folder is always refused.

    \b
    Example:
        selfreward export demo --round 2 --out pairs.jsonl
        selfreward export demo --round 2 --format parquet --out pairs.parquet
        selfreward export demo --round 2 --format datasets --out pairs_ds
        selfreward export demo --round 2 --format label-studio --out ls_round2
        selfreward export demo --round 3 --out pairs.jsonl --force
        selfreward export demo --format alpaca-eval --out alpaca_demo
    """
    from selfreward.inspection.export import export_alpaca_eval, export_label_studio, export_pairs
    from selfreward.core.store import Run

    if (fmt == "alpaca-eval") != (round_ is None):
        raise click.ClickException("--round does not apply to --format alpaca-eval: it exports every model's answers"
                                   if round_ is not None else f"--format {fmt} needs --round: the round to export")
    with Run.open(_run_path(run, runs_dir)) as r:
        if fmt == "alpaca-eval":
            counts = export_alpaca_eval(r, out, force=force)
        elif fmt == "label-studio":
            n = export_label_studio(r, round_, out, force=force)
        else:
            n = export_pairs(r, round_, out, fmt, force=force)
    if fmt == "alpaca-eval":
        what = ", ".join(f"{model}.json ({n} answers)" for model, n in counts.items())
    else:
        what = f"{n} Label Studio tasks and labeling_config.xml" if fmt == "label-studio" else f"{n} pairs"
    click.echo(f"wrote {what} to {out}")


@cli.command(name="import-labels")
@click.argument("run")
@click.argument("export_file", type=click.Path())
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def import_labels_cmd(run, export_file, runs_dir):
    """Read a Label Studio JSON export of ranking tasks back into run.db as
    `human` judgments (best = 5 down to worst = 0).

    \b
    Example:
        selfreward import-labels demo ls_export.json
    """
    from selfreward.data.labels import import_labels
    from selfreward.core.store import Run

    with Run.open(_run_path(run, runs_dir), writer=True) as r:
        counts = import_labels(r, export_file)
    click.echo(", ".join(f"{k} {v}" for k, v in counts.items()))


def main():
    cli()
