"""Each round's evaluation (the model as a judge and as an actor) sent to the experiment trackers
of `report_to`, through accelerate's tracker classes, with the round as the step. Trainers send
their own logs through TRL; run.db stays the record."""

from __future__ import annotations

from pathlib import Path

from selfreward.config import trackers


def report(cfg, run_path: Path, t: int, metrics: dict) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    values = {f"eval/{name}": value for name, value in metrics.items() if value is not None and value == value}
    for name in trackers(cfg):
        cls = LOGGER_TYPE_TO_CLASS.get(name)
        if cls is None or not values:  # a tracker transformers knows and accelerate does not (codecarbon, ...)
            continue
        kwargs = {"logging_dir": str(run_path / "tensorboard")} if cls.requires_logging_directory else {}
        tracker = cls(f"{run_path.name}-eval", **kwargs)
        tracker.start()
        tracker.log(values, step=t)
        tracker.finish()
