"""vLLM generation (CUDA only), in a child process of its own.

vLLM does not reliably give GPU memory back, and training runs in the parent,
so each generate call starts a worker process that loads the model, generates
everything, writes JSON and exits. The model path is always full 16-bit weights
(a merged M_t), never a 4-bit base. Needs the `gpu` extra.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict

from selfreward.backends.engines import Completion, Prompt, Sampling
from selfreward.errors import SelfRewardError


class VLLMEngine:
    def __init__(self, model_path: str):
        self.model_path = model_path

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, desc: str = "generate") -> list[list[Completion]]:
        with tempfile.TemporaryDirectory(prefix="selfreward-vllm-") as tmp:
            job, result = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
            with open(job, "w") as fh:
                json.dump({"model": self.model_path, "prompts": prompts, "n": n, "sampling": asdict(sampling),
                           "desc": desc}, fh)
            proc = subprocess.run([sys.executable, "-m", "selfreward.backends.engines.vllm", job, result])
            if proc.returncode != 0:
                raise SelfRewardError(f"vllm worker failed (exit {proc.returncode}); see its output above")
            with open(result) as fh:
                rows = json.load(fh)
        return [[Completion(**c) for c in per_prompt] for per_prompt in rows]

    def chunk_prompts(self, n: int) -> int:
        # Each call starts a worker that loads the model: checkpoint seldom.
        return 4096

    def close(self) -> None:
        pass


def _worker(job_path: str, out_path: str) -> None:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        sys.exit("vllm is not installed: pip install -e '.[gpu]' (needs CUDA)")
    with open(job_path) as fh:
        job = json.load(fh)
    s = job["sampling"]
    llm = LLM(model=job["model"], seed=s["seed"], enable_prefix_caching=True)
    params = SamplingParams(n=job["n"], temperature=s["temperature"], top_p=s["top_p"],
                            max_tokens=s["max_new_tokens"], seed=s["seed"])
    prompts = job["prompts"]
    # Chat prompts go through the model's chat template; raw strings are completions.
    chats = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    raws = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    outputs: list = [None] * len(prompts)
    if chats:
        for i, o in zip(chats, llm.chat([prompts[i] for i in chats], params, use_tqdm=True)):
            outputs[i] = o
    if raws:
        for i, o in zip(raws, llm.generate([prompts[i] for i in raws], params, use_tqdm=True)):
            outputs[i] = o
    rows = [[{"text": c.text.strip(), "n_tokens": len(c.token_ids),
              "finish_reason": "length" if c.finish_reason == "length" else "stop"} for c in o.outputs]
            for o in outputs]
    with open(out_path, "w") as fh:
        json.dump(rows, fh)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
