"""The `selfreward` command line."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import click

from selfreward import __version__
from selfreward.config import FIELDS, coerce, help_text, load_toml, resolve
from selfreward.errors import SelfRewardError


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight-loading bars; ours stay


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
        kind = FIELDS[key].type if key in FIELDS else "str"
        value = raw if kind == "str" else _number(key, raw)
        out[key] = coerce(key, value)
    return out


def _number(key: str, raw: str):
    try:
        return float(raw) if any(ch in raw for ch in ".eE") else int(raw)
    except ValueError:
        raise SelfRewardError(f"--set {key}: '{raw}' is not a number") from None


@cli.command()
@click.option("--name", default="demo", show_default=True, help="Run name: the folder runs/<name>.")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1), help="Bring the run to M_<rounds>.")
@click.option("--model", help="M0: 'embedded', a hub id, a local folder or a .gguf file.")
@click.option("--ift", type=click.Path(), help="IFT JSONL (instruction, response).")
@click.option("--eft", type=click.Path(), help="EFT JSONL (instruction, response, justification, score).")
@click.option("--eft-eval", type=click.Path(), help="Held-out EFT JSONL for the parse-rate check ('' to skip).")
@click.option("--preset", type=click.Choice(["auto", "demo", "tiny", "paper"]), help="Size preset.")
@click.option("--config", "config_file", type=click.Path(), help="TOML file of config keys.")
@click.option("--engine", type=click.Choice(["transformers", "vllm"]), help="Generation engine.")
@click.option("--judge", type=click.Choice(["self", "api", "pairrm", "reward-model", "scripted"]),
              help="Judge backend.")
@click.option("--judge-mode", type=click.Choice(["additive", "pairwise", "reference"]),
              help="LLM judge mode (self, api).")
@click.option("--judge-model", help="Model for --judge pairrm / reward-model (hub id or folder).")
@click.option("--judge-api-base", help="OpenAI-compatible base URL for --judge api; key from $OPENAI_API_KEY.")
@click.option("--judge-api-model", help="Model name for --judge api.")
@click.option("--judge-script", type=click.Path(), help="JSON list of raw outputs for --judge scripted.")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any config key (repeatable).")
@click.option("--help-config", is_flag=True, help="List every config key with its default and exit.")
def iterate(name, runs_dir, rounds, model, ift, eft, eft_eval, preset, config_file, engine, judge, judge_mode,
            judge_model, judge_api_base, judge_api_model, judge_script, seed, sets, help_config):
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
        selfreward iterate --name ext --judge api --judge-api-base http://127.0.0.1:8000/v1 --judge-api-model qwen
    """
    if help_config:
        click.echo(help_text())
        return
    from selfreward.context import Context
    from selfreward.loop import iterate as run_loop
    from selfreward.store import Run

    flags = {"model": model, "ift": ift, "eft": eft, "eft_eval": eft_eval, "preset": preset, "engine": engine,
             "judge": judge, "judge_mode": judge_mode, "judge_model": judge_model, "judge_api_base": judge_api_base,
             "judge_api_model": judge_api_model, "judge_script": judge_script, "seed": seed}
    cli_values = {k: coerce(k, v) for k, v in flags.items() if v is not None}
    cli_values.update(_parse_sets(sets))
    for key in ("ift", "eft", "eft_eval", "judge_script"):
        if cli_values.get(key):
            cli_values[key] = str(Path(cli_values[key]).resolve())
    toml = load_toml(config_file) if config_file else {}
    path = Path(runs_dir) / name
    if (path / "run.db").is_file():
        run = Run.open(path)
        _check_same_config(run, {**toml, **cli_values})
        cfg = run.config()
    else:
        cfg = resolve(toml, cli_values)
        _check_inputs(cfg)
        run = Run.create(path, cfg)
        click.echo(f"created run {path} (preset {cfg.preset}, model {cfg.model})")
    _quiet_libraries()
    with run.locked():
        done = run_loop(Context(run, cfg), rounds)
    if not done:
        click.echo(f"nothing to do: {path} already has M{rounds} (rounds 1..{rounds} finished)")
    from selfreward.report import COLUMNS, round_summary, table

    click.echo(table(round_summary(run), COLUMNS))


def _check_same_config(run, asked: dict) -> None:
    """Resuming must not silently change what the finished stages were made with."""
    stored = run.config_values()
    preset = asked.pop("preset", None)
    if preset not in (None, "auto", stored.get("preset")):
        raise SelfRewardError(f"run {run.path} uses preset {stored.get('preset')}, not {preset}; "
                              f"use a new --name for a different preset")
    for key, value in asked.items():
        if stored.get(key) != value:
            raise SelfRewardError(f"run {run.path} was made with {key}={stored.get(key)!r}, not {value!r}; "
                                  f"drop the flag to resume, or use a new --name")


def _check_inputs(cfg) -> None:
    """Fail before the run folder exists: bad data or model never leave a half-made run."""
    from selfreward.data import read_eft, read_ift
    from selfreward.engines import ENGINES
    from selfreward.models import resolve_source
    from selfreward.prompts import load_template

    if cfg.engine not in ENGINES:
        raise SelfRewardError(f"unknown engine '{cfg.engine}'; choose one of: {', '.join(ENGINES)}")
    read_ift(cfg.ift)
    read_eft(cfg.eft)
    if cfg.eft_eval:
        read_eft(cfg.eft_eval)
    load_template("additive_judge")
    load_template("self_instruct")
    check_judge(cfg)
    resolve_source(cfg.model)


def check_judge(cfg) -> None:
    """Judge settings that can be checked without loading a model."""
    from selfreward.judges import JUDGES, MODES, build_judge
    from selfreward.prompts import load_template

    if cfg.judge not in JUDGES:
        raise SelfRewardError(f"unknown judge '{cfg.judge}'; choose one of: {', '.join(JUDGES)}")
    if cfg.judge_mode not in MODES:
        raise SelfRewardError(f"unknown judge mode '{cfg.judge_mode}'; choose one of: {', '.join(MODES)}")
    load_template(MODES[cfg.judge_mode])
    if cfg.judge in ("api", "scripted"):
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
    accuracy, mean chosen and rejected length (tokens), wall time.

    \b
    Example:
        selfreward status demo
        selfreward status runs/demo --stages
        selfreward status demo --json | jq '.rounds[].pairs_kept'
    """
    from selfreward.report import COLUMNS, round_summary, stage_summary, table
    from selfreward.store import Run

    r = Run.open(_run_path(run, runs_dir))
    rounds, stages = round_summary(r), stage_summary(r)
    if as_json:
        click.echo(json.dumps({"run": str(r.path), "rounds": rounds, "stages": stages}, indent=2))
        return
    click.echo(table(rounds, COLUMNS) if rounds else "no rounds started yet")
    if by_stage:
        click.echo()
        rows = [{**s, "detail": s["detail"]} for s in stages]
        cols = [("round", "round"), ("stage", "stage"), ("wall_s", "wall"), ("peak_rss_mb", "peak MiB"),
                ("detail", "detail")]
        click.echo(table(rows, cols))


@cli.command()
@click.argument("run")
@click.argument("prompt_id", required=False, type=int)
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
def show(run, prompt_id, runs_dir):
    """One prompt with its candidates and every judge sample's score and rationale.

    Without PROMPT_ID, shows the first prompt that produced a kept pair.

    \b
    Example:
        selfreward show demo
        selfreward show demo 12
    """
    from selfreward.report import show_prompt
    from selfreward.store import Run

    click.echo(show_prompt(Run.open(_run_path(run, runs_dir)), prompt_id), nl=False)


def judge_options(f):
    """The judge flags shared by the eval commands (they override the run's judge for this command only)."""
    options = [
        click.option("--judge", type=click.Choice(["self", "api", "pairrm", "reward-model", "scripted"]),
                     help="Judge backend (default: the run's)."),
        click.option("--judge-mode", type=click.Choice(["additive", "pairwise", "reference"])),
        click.option("--judge-model", help="Model for pairrm / reward-model."),
        click.option("--judge-api-base", help="OpenAI-compatible base URL; key from $OPENAI_API_KEY."),
        click.option("--judge-api-model", help="Model name at the API."),
        click.option("--judge-script", type=click.Path(), help="JSON list of raw outputs (scripted judge)."),
        click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False)),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _judge_overrides(kw: dict) -> dict:
    overrides = {k: coerce(k, v) for k, v in kw.items() if k.startswith("judge") and v is not None}
    if overrides.get("judge_script"):
        overrides["judge_script"] = str(Path(overrides["judge_script"]).resolve())
    return overrides


@cli.group(name="eval", cls=Group)
def eval_group():
    """Measure judges and models; results are stored in run.db (eval_metrics, head2head).

    \b
    Example:
        selfreward eval judge demo
        selfreward eval head2head demo --a M1 --b M3
    """


@eval_group.command(name="judge")
@click.argument("run")
@click.option("--models", help="Comma-separated models of the run to evaluate as self judges (default: all).")
@click.option("--data", "dataset", type=click.Path(), help="Ranked or flat EFT JSONL (default: the run's eft_eval).")
@click.option("--limit", type=int, default=0, help="Use only the first N prompts.")
@click.option("--samples", type=int, default=1, show_default=True, help="Judge samples per response.")
@click.option("--verbosity/--no-verbosity", default=True, show_default=True,
              help="Also run the verbosity probe (padded answers must not score higher).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@judge_options
def eval_judge_cmd(run, models, dataset, limit, samples, verbosity, as_json, runs_dir, **judge_kw):
    """Judge quality against human rankings (the paper's Table 4): pairwise
    accuracy (judge ties shown apart), 5-best %, exact-match %, Spearman and
    Kendall tau per prompt, plus parse rate, position inconsistency (pairwise
    mode), the verbosity probe and judgments per second.

    \b
    Example:
        selfreward eval judge demo                        # every M_t of the run as a self judge
        selfreward eval judge demo --models M0,M1 --limit 20
        selfreward eval judge demo --judge-mode pairwise --models M1
        selfreward eval judge demo --judge api --judge-api-base http://127.0.0.1:8000/v1 --judge-api-model qwen
        selfreward eval judge demo --judge pairrm --judge-model ./PairRM-hf --data oasst/eft_eval.jsonl
    """
    from selfreward.evals import eval_judge
    from selfreward.store import Run

    r = Run.open(_run_path(run, runs_dir))
    overrides = _judge_overrides(judge_kw)
    check_judge(dataclasses.replace(r.config(), **overrides))
    names = models.split(",") if models else [m["name"] for m in r.rows("select name from models order by round")]
    for name in names:
        r.model(name)  # fails clearly on a model the run does not have
    _quiet_libraries()
    rows = eval_judge(r, overrides, names, dataset or r.config().eft_eval, limit, samples, verbosity)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from selfreward.report import EVAL_COLUMNS, table

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
    from selfreward.evals import head2head
    from selfreward.store import Run

    r = Run.open(_run_path(run, runs_dir))
    overrides = _judge_overrides(judge_kw)
    check_judge(dataclasses.replace(r.config(), **overrides))
    for name in (model_a, model_b):
        r.model(name)
    _quiet_libraries()
    result = head2head(r, overrides, model_a, model_b, prompts or str(SEED_DIR / "ift_heldout.jsonl"), limit)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from selfreward.report import H2H_COLUMNS, table

    click.echo(table([result], H2H_COLUMNS))


def main():
    cli()
