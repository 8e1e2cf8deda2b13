"""`selfreward eval harness`: lm-evaluation-harness (`lm_eval.simple_evaluate`) on the run's own models.

Each model is loaded in this process by lm-eval's `hf` model type (transformers) from its folder in the run. The run's
vLLM servers are not used: they listen on Unix sockets, and lm-eval's API models post to an HTTP `base_url` (requests
and aiohttp's TCP connector) with no way to pass another transport.

Nothing here reaches the network: the hub is set offline before lm-eval loads, so a stock task whose data is not
already in the local datasets cache fails, by name, before any model loads. Tasks defined from local files (a task
YAML with `dataset_path: json` and `dataset_kwargs: {data_files: ...}`) come in through `include_path`.

Every (task, metric) of a model goes into `eval_metrics` (kind 'harness', judge 'lm-eval', dataset = the task),
one eval_id per model and command.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from pathlib import Path

from selfreward.core.store import Run
from selfreward.errors import SelfRewardError

KIND, JUDGE = "harness", "lm-eval"
# lm-eval's default of 100000 resamples takes minutes per metric on CPU; means have a closed form anyway.
BOOTSTRAP_ITERS = 1000


def _offline() -> None:
    # Read by huggingface_hub and datasets when they are imported; set on their modules too in case they already were.
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    # lm-eval logs every request builder and metric at INFO; the command prints its own table.
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


def task_manager(include_path: str | None = None):
    """lm-eval's task index: its stock tasks plus the task YAMLs under `include_path`."""
    if include_path and not Path(include_path).is_dir():
        raise SelfRewardError(f"--include-path {include_path}: not a folder of task YAMLs")
    _offline()
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SelfRewardError("eval harness needs lm-eval: pip install 'selfreward[harness]'") from None

    return TaskManager(include_path=str(Path(include_path).resolve()) if include_path else None)


def check_tasks(tasks: list[str], manager) -> None:
    """Every task known and its data loadable offline, or one SelfRewardError saying which and what to do."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SelfRewardError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
                              "(list them with `lm-eval ls tasks [--include_path DIR]`; define your own in a task "
                              "YAML under --include-path DIR)")
    for name in tasks:
        try:
            manager.load(name)  # builds the task, which loads its data
        except Exception as e:  # noqa: BLE001 - lm-eval, datasets and the hub raise many kinds; all mean the same
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise SelfRewardError(
                f"lm-eval task '{name}' cannot load its data offline ({detail}); it needs its data locally: "
                "define it from a local file (dataset_path: json, dataset_kwargs: {data_files: ...}) in a task "
                "YAML under --include-path DIR") from None


def metrics_of(results: dict) -> dict[str, dict[str, float]]:
    """Task -> {metric: value} from simple_evaluate's results. lm-eval names each value `metric,filter`; the
    filter 'none' is dropped (`exact_match,none` -> `exact_match`), others are kept (`exact_match,strict-match`).
    `n` is the number of documents scored (lm-eval's `sample_len`). Values that are not finite numbers (a stderr
    of 'N/A') are left out."""
    out = {}
    for task, values in results["results"].items():
        row = {}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            row["n" if key == "sample_len" else key.removesuffix(",none")] = float(value)
        out[task] = row
    return out


def eval_harness(run: Run, models: list[str], tasks: list[str], manager, limit: int = 0,
                 chat_template: bool = True, batch_size: int = 8) -> list[dict]:
    """Each model on each task (its first `limit` documents; 0 = all), stored and returned as rows of
    {eval_id, model, task, metric, value}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from selfreward.backends.models import device, free_memory
    from selfreward.evaluation.judge_commands import store_metrics

    out = []
    for model in models:
        lm = HFLM(pretrained=run.model_path(model), device=device(),
                  dtype="float32" if device() == "cpu" else "auto", batch_size=batch_size)
        try:
            results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit or None,
                                      apply_chat_template=chat_template, bootstrap_iters=BOOTSTRAP_ITERS,
                                      log_samples=False)
        finally:
            del lm
            free_memory()
        eval_id = uuid.uuid4().hex[:12]
        for task, values in metrics_of(results).items():
            store_metrics(run, KIND, JUDGE, model, task, values, eval_id)
            out += [{"eval_id": eval_id, "model": model, "task": task, "metric": k, "value": v}
                    for k, v in sorted(values.items())]
    return out


def by_model(rows: list[dict], models: list[str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """eval_harness's rows as a table: one line per (task, metric), one column per model."""
    lines: dict[tuple[str, str], dict] = {}
    for r in rows:
        line = lines.setdefault((r["task"], r["metric"]), {"task": r["task"], "metric": r["metric"]})
        line[r["model"]] = f"{r['value']:.4g}"
    return list(lines.values()), [("task", "task"), ("metric", "metric")] + [(m, m) for m in models]
