"""Judging throughput of each backend on this machine, as ratios against a
baseline measured in the same run: the self judge with the transformers engine
at batch size 1 (one prompt at a time, as several public loops do).

    .venv/bin/python bench/judges.py [--n 16] [--model embedded]

Backends, all on the same held-out EFT responses:
- self, batched (the loop's setting);
- api against a loopback OpenAI-compatible stub with a fixed 50 ms latency,
  at concurrency 1 and 8 (what the client's pool buys when the server is the
  bottleneck; the model's own speed is the server's business);
- reward-model: SmolLM2-135M with a one-logit head (real size, random head);
- pairrm: a PairRM-sized DeBERTa-v2 (24 layers, hidden 1024; random weights,
  since the hub's weights cannot be fetched here) over groups of 4 candidates,
  so 12 ordered pair passes per prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selfreward.config import SEED_DIR  # noqa: E402
from selfreward.data import read_eft  # noqa: E402
from selfreward.backends.engines import Sampling  # noqa: E402
from selfreward.backends.engines.hf import TransformersEngine  # noqa: E402
from selfreward.backends.engines.openai import OpenAIEngine  # noqa: E402
from selfreward.backends.judges import Group  # noqa: E402
from selfreward.backends.judges.llm import LLMJudge  # noqa: E402
from selfreward.backends.models import resolve_source  # noqa: E402


def timed(judge, groups, samples=1) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = judge.judge_groups(groups, samples, seed=0)
    elapsed = time.perf_counter() - t0
    n = sum(len(v) for r in results for v in r.verdicts)
    return elapsed, n


class Stub(BaseHTTPRequestHandler):
    latency = 0.05

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.latency)
        body = json.dumps({"id": "b", "object": "chat.completion", "created": 0, "model": "stub",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "Relevant. Score: 3"}}],
                           "usage": {"prompt_tokens": 400, "completion_tokens": 5, "total_tokens": 405}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def reward_model_folder(base: str, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(base, num_labels=1)
    tok = AutoTokenizer.from_pretrained(base)
    model.config.pad_token_id = tok.pad_token_id or tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pairrm_folder(base: str, out: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, DebertaV2Config

    from selfreward.backends.judges.pairrm import PREFIXES, build_module

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": list(PREFIXES.values())})
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in PREFIXES.items()}
    # PairRM-hf's config, with this tokenizer's vocabulary.
    config = DebertaV2Config(vocab_size=len(tok), hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096, max_position_embeddings=512, relative_attention=True,
                             pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
                             position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0,
                             pad_token_id=tok.pad_token_id or 0, n_tasks=1, drop_out=0.05, **ids)
    torch.manual_seed(0)
    model = build_module(config)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    tok.save_pretrained(out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="responses judged per backend")
    ap.add_argument("--model", default="embedded", help="model for the self judge (and the reward model's body)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()

    rows = read_eft(SEED_DIR / "eft_heldout.jsonl")[: args.n]
    groups = [Group(r["instruction"], [r["response"]]) for r in rows]
    path = resolve_source(args.model)
    sampling = Sampling(0.7, 0.9, args.max_new_tokens, 0)
    results = []

    def record(name, elapsed, n):
        results.append((name, n / elapsed))
        print(f"{name:44} {n:4d} judgments  {elapsed:7.1f} s  {n / elapsed:7.3f} /s", flush=True)

    print(f"judging {len(rows)} held-out EFT responses; model {path}")
    for batch in (1, 16):
        engine = TransformersEngine(path, batch)
        record(f"self, transformers, batch {batch}", *timed(LLMJudge(engine, sampling, "additive", "self:M"), groups))
        engine.close()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    for concurrency in (1, 8):
        engine = OpenAIEngine(url, "stub", concurrency=concurrency, timeout=10, max_retries=0)
        judge = LLMJudge(engine, sampling, "additive", "api:stub")
        record(f"api, loopback stub 50 ms, concurrency {concurrency}", *timed(judge, groups * 4))
        engine.close()
    server.shutdown()

    from selfreward.backends.judges.pairrm import PairRMJudge
    from selfreward.backends.judges.reward_model import RewardModelJudge

    with tempfile.TemporaryDirectory() as tmp:
        rm = reward_model_folder(path, Path(tmp) / "rm")
        record("reward-model, SmolLM2-135M body", *timed(RewardModelJudge(str(rm)), groups))
        prm = pairrm_folder(path, Path(tmp) / "pairrm")
        by_instruction: dict[str, list[str]] = {}
        for r in read_eft(SEED_DIR / "eft_heldout.jsonl"):
            by_instruction.setdefault(r["instruction"], []).append(r["response"])
        quads = [Group(i, rs[:3] + [rs[0] + " In short, that is the answer."]) for i, rs in by_instruction.items()]
        record("pairrm, PairRM-size DeBERTa, 4 per prompt", *timed(PairRMJudge(str(prm)), quads[: max(1, args.n // 4)]))

    base = results[0][1]
    print("\nratio to the baseline (self, batch 1):")
    for name, rate in results:
        print(f"  {name:44} {rate / base:6.2f}x")


if __name__ == "__main__":
    main()
