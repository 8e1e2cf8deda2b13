"""CUDA-only paths (vLLM generation, 4-bit QLoRA). Skipped with the reason on CPU;
run them on a GPU machine with `pytest -m gpu`."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (vLLM, bitsandbytes)")]


def test_vllm_engine_generates_and_gives_the_gpu_back(tmp_path):
    pytest.importorskip("vllm", reason="the gpu extra is not installed: pip install -e '.[gpu]'")
    from selfreward.backends.engines import Sampling, make_engine
    from selfreward.backends.models import resolve_source
    from selfreward.config import resolve

    free_before = torch.cuda.mem_get_info()[0]
    engine = make_engine(resolve({}, {"engine": "vllm", "vllm_gpu_memory_utilization": 0.3}),
                         resolve_source("embedded"), tmp_path)
    outs = engine.generate([[{"role": "user", "content": "hi"}], "1. a\n2."], 2, Sampling(0.7, 0.9, 8, 0))
    assert [len(o) for o in outs] == [2, 2]
    assert all(c.error is None and c.n_tokens <= 8 for o in outs for c in o)
    engine.close()  # waits until the GPU has its memory back, or raises
    assert torch.cuda.mem_get_info()[0] >= free_before - 2**30


def test_qlora_dpo_merges_into_16bit(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes", reason="the gpu extra is not installed: pip install -e '.[gpu]'")
    from selfreward.config import resolve
    from selfreward.backends.models import load_model
    from selfreward.training.recipes import preference

    cfg = resolve({}, {"preset": "tiny", "load_in_4bit": "yes"})
    pairs = [{"prompt": "say hi", "chosen": "hi there", "rejected": "bad"}] * 2
    rows, adapter, info = preference(str(tiny_model), pairs, cfg, tmp_path / "M2", round=2)
    assert rows and adapter.is_dir()
    merged = load_model(str(tmp_path / "M2"))
    assert merged.dtype == torch.bfloat16  # merged into 16-bit weights, not a 4-bit base


def test_grpo_generates_with_trls_colocated_vllm_on_cuda(tiny_model, tmp_path):
    """With the vllm engine on CUDA, online RL samples through TRL's colocated vLLM."""
    pytest.importorskip("vllm", reason="the gpu extra is not installed: pip install -e '.[gpu]'")
    from selfreward.config import resolve
    from selfreward.core.stages import rl as rl_stage
    from selfreward.training.recipes import online
    from selfreward.backends.judges import GroupResult, Verdict
    from selfreward.prompts import Parsed

    class Judge:
        name, template_sha = "fake", None

        def judge_groups(self, groups, samples, seed):
            return [GroupResult([[Verdict("Score: 3", Parsed(3.0, "", None))] for _ in g.responses])
                    for g in groups]

    cfg = resolve({}, {"preset": "tiny", "train_method": "grpo", "engine": "vllm", "eft_eval": ""})
    reward = rl_stage.JudgeReward(Judge(), 1, 0, "M1+grpo", cfg.candidate_max_new_tokens)
    prompts = [{"id": 1, "text": "say hi"}, {"id": 2, "text": "name a colour"}]
    rows, adapter, info = online(str(tiny_model), prompts, reward, cfg, tmp_path / "r" / "models" / "M2", 2)
    assert rows and adapter.is_dir() and len(reward.candidates) == 2 * cfg.n_candidates
