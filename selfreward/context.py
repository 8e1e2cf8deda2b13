"""What every stage gets: the run, its config, and the loaded engines and judges."""

from __future__ import annotations

import zlib

from selfreward.config import Config
from selfreward.engines import Engine, Sampling, make_engine
from selfreward.errors import SelfRewardError
from selfreward.judges import Judge, ScriptedJudge, SelfJudge
from selfreward.prompts import Template, load_template
from selfreward.store import Run


class Context:
    def __init__(self, run: Run, cfg: Config):
        self.run, self.cfg = run, cfg
        self._engine: Engine | None = None
        self._scripted: ScriptedJudge | None = None

    def seed(self, round: int, stage: str) -> int:
        """A stable seed per (run seed, round, stage): a resumed stage samples the same way."""
        return zlib.crc32(f"{self.cfg.seed}:{round}:{stage}".encode()) % (2**31)

    def template(self, name: str) -> Template:
        return load_template(name)

    def engine(self, model: str) -> Engine:
        path = self.run.model(model)["path"]
        if self._engine is None or self._engine.model_path != path:
            self.release()
            self._engine = make_engine(self.cfg.engine, path, self.cfg.gen_batch_size)
        return self._engine

    def judge(self, model: str) -> Judge:
        cfg = self.cfg
        template = self.template(cfg.judge_template)
        if cfg.judge == "self":
            sampling = Sampling(cfg.judge_temperature, cfg.judge_top_p, cfg.judge_max_new_tokens, 0)
            return SelfJudge(self.engine(model), template, sampling, label=model)
        if cfg.judge == "scripted":
            if self._scripted is None:
                self._scripted = ScriptedJudge.from_file(cfg.judge_script, template)
            return self._scripted
        raise SelfRewardError(f"unknown judge '{cfg.judge}'; choose 'self' or 'scripted'")

    def release(self) -> None:
        """Free the loaded engine (before training, which needs the memory)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            import gc

            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
