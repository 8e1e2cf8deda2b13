"""CUDA-only paths (vLLM generation, 4-bit QLoRA). Skipped with the reason on CPU;
run them on a GPU machine with `pytest -m gpu`."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (vLLM, bitsandbytes)")]


def test_vllm_engine_generates(tiny_model):
    pytest.importorskip("vllm", reason="the gpu extra is not installed: pip install -e '.[gpu]'")
    from selfreward.backends.engines import Sampling
    from selfreward.backends.engines.vllm import VLLMEngine

    outs = VLLMEngine(str(tiny_model)).generate([[{"role": "user", "content": "hi"}], "1. a\n2."], 2,
                                                 Sampling(0.7, 0.9, 8, 0))
    assert [len(o) for o in outs] == [2, 2]
    assert all(c.n_tokens <= 8 for o in outs for c in o)


def test_qlora_dpo_merges_into_16bit(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes", reason="the gpu extra is not installed: pip install -e '.[gpu]'")
    from selfreward.config import resolve
    from selfreward.backends.models import load_model
    from selfreward.core.stages.train import dpo

    cfg = resolve({}, {"preset": "tiny", "load_in_4bit": "yes"})
    pairs = [{"prompt": "say hi", "chosen": "hi there", "rejected": "bad"}] * 2
    rows, adapter = dpo(str(tiny_model), pairs, cfg, tmp_path / "M2", round=2)
    assert rows and adapter.is_dir()
    merged = load_model(str(tmp_path / "M2"))
    assert merged.dtype == torch.bfloat16  # merged into 16-bit weights, not a 4-bit base
