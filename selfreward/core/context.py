"""What every stage gets: the run, its config, and the loaded engines and judges."""

from __future__ import annotations

import zlib

from selfreward.core.checkpoint import Checkpoint, CheckpointedEngine
from selfreward.config import Config
from selfreward.backends.engines import Engine, make_engine
from selfreward.backends.judges import Judge, build_judge
from selfreward.prompts import Template, load_template
from selfreward.core.store import Run


class Context:
    def __init__(self, run: Run, cfg: Config, checkpoint: bool = False):
        """checkpoint: keep each finished chunk of generations while a stage runs (the loop does)."""
        self.run, self.cfg = run, cfg
        self.checkpoint = Checkpoint(run.db) if checkpoint else None
        self._engine: Engine | None = None
        self._judges: dict[str, Judge] = {}

    def seed(self, round: int, stage: str) -> int:
        """A stable seed per (run seed, round, stage): a resumed stage samples the same way."""
        return zlib.crc32(f"{self.cfg.seed}:{round}:{stage}".encode()) % (2**31)

    def template(self, name: str) -> Template:
        return load_template(name)

    def engine(self, model: str) -> Engine:
        path = self.run.model(model)["path"]
        if self._engine is None or self._engine.model_path != path:
            self.release()
            engine = make_engine(self.cfg.engine, path, self.cfg.gen_batch_size)
            self._engine = CheckpointedEngine(engine, self.checkpoint) if self.checkpoint else engine
        return self._engine

    def judge(self, model: str) -> Judge:
        """The configured judge; for the self judge, `model` (M_t) is the one judging."""
        if self.cfg.judge != "self":
            model = "-"  # one instance serves every round (a scripted judge keeps its place)
        if model not in self._judges:
            self._judges[model] = build_judge(self.cfg, lambda: self.engine(model), model, self.checkpoint)
        return self._judges[model]

    def judge_provenance(self, model: str, seed: int) -> dict:
        """What an auditor needs to reproduce a judgment: the weights' hash, sampling and seed, version."""
        import json
        from pathlib import Path

        from selfreward import __version__
        from selfreward.backends.models import weights_sha

        cfg, sha = self.cfg, None
        if cfg.judge == "self":
            sha = self.run.model(model)["sha256"]
        elif cfg.judge in ("pairrm", "reward-model") and Path(cfg.judge_model).is_dir():
            sha = weights_sha(Path(cfg.judge_model))
        elif cfg.judge == "scripted":
            import hashlib

            sha = hashlib.sha256(Path(cfg.judge_script).read_bytes()).hexdigest()[:16]
        sampling = None
        if cfg.judge in ("self", "api", "scripted"):
            sampling = json.dumps({"temperature": cfg.judge_temperature, "top_p": cfg.judge_top_p,
                                   "max_new_tokens": cfg.judge_max_new_tokens, "seed": seed,
                                   "mode": cfg.judge_mode})
        return {"judge_model_sha": sha, "sampling": sampling, "version": __version__}

    def release(self) -> None:
        """Free the loaded engine and model-backed judges (before training, which needs the memory)."""
        # A scripted judge holds no model and keeps its place in its script.
        if self.cfg.judge != "scripted":
            self._judges = {}
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            import gc

            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
