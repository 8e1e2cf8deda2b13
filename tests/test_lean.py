"""Lean CPU training (lean_training, train_precision): TRL's fused LM head scoring only
labelled positions (same loss and gradients as scoring all of them), SFT on a bf16 base
following the fp32 loss curve, and the check of the private names the kernels patch."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from selfreward.config import resolve
from selfreward.training.cpu import lean
from selfreward.training.cpu.lmhead import addmm_fp32, lean_head
from selfreward.training.recipes import sft


def _peft(model_path, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def _fused_loss_and_grads(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.log_probs.detach(), grads


def test_the_lm_head_scores_only_labelled_positions_with_the_same_loss_and_gradients(tiny_model):
    """lean() lets TRL's fused head skip positions without a label on CPU: nothing the loss or the
    gradients see may change (the skipped positions were masked to zero)."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    model = _peft(tiny_model, 0.0)
    add_fused_lm_head(model.get_base_model())
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 40))
    labels = ids.clone()
    labels[0, :30] = -100  # a long prompt, a short completion
    labels[1, :12] = -100
    plain = _fused_loss_and_grads(model, ids, labels)
    original = trl_utils._use_triton
    cfg = resolve({}, {"preset": "tiny", "lean_training": "yes", "train_precision": "fp32"})
    with lean(SimpleNamespace(model=model), cfg):
        assert trl_utils._use_triton(torch.device("cpu")) is True  # compact: labelled positions only
        compact = _fused_loss_and_grads(model, ids, labels)
    assert trl_utils._use_triton is original
    assert torch.allclose(plain[0], compact[0], atol=1e-6)
    assert torch.allclose(plain[1], compact[1], atol=1e-6)
    assert plain[2].keys() == compact[2].keys() and plain[2]
    for name, grad in plain[2].items():
        assert torch.allclose(grad, compact[2][name], atol=1e-6), name


def test_sft_on_a_bf16_base_follows_the_fp32_loss_curve(tiny_model, tmp_path):
    ift = [{"instruction": f"Name a colour, number {i}.", "response": f"Colour number {i} is blue."}
           for i in range(8)]
    eft = [(f"Judge this answer {i}: it is fine.", f"It answers. Score: {i % 6}") for i in range(8)]
    losses = {}
    for name, settings in {"fp32": {"train_precision": "fp32", "lean_training": "no"},
                           "bf16": {"train_precision": "bf16", "lean_training": "yes"}}.items():
        cfg = resolve({}, {"preset": "tiny", "eft_eval": "", "sft_batch_size": 4, "sft_epochs": 2.0,
                           "lora_dropout": 0.0, **settings})
        rows, adapter, info = sft(str(tiny_model), ift, eft, cfg, tmp_path / "runs" / name / "models" / "M1")
        losses[name] = [r["loss"] for r in rows]
        assert (adapter / "adapter_model.safetensors").is_file()
    assert len(losses["fp32"]) == len(losses["bf16"]) == 8  # 16 examples, batch 4, two epochs
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert b == pytest.approx(a, rel=0.02)


def test_the_private_apis_the_kernels_patch_are_the_ones_they_were_written_against():
    """Fails when TRL or transformers moves or changes a name the kernels patch or call: check
    the kernel against the new code, then update PATCHED (or delete the kernel)."""
    from selfreward.training.cpu import unsupported

    assert unsupported() == []


def test_a_changed_private_api_turns_lean_training_off_with_its_reason(tiny_model, monkeypatch, caplog):
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(kernel, "_addmm_fp32", lambda acc, a, b, out_dtype=None: None)  # a new parameter
    model = _peft(tiny_model, 0.0)
    original = trl_utils._use_triton
    cfg = resolve({}, {"preset": "tiny", "lean_training": "yes", "train_precision": "bf16"})
    with caplog.at_level("WARNING", logger="selfreward.training.cpu"), lean(SimpleNamespace(model=model), cfg):
        assert trl_utils._use_triton is original  # no head kernel in place
    assert "lean training off" in caplog.text
    assert "_addmm_fp32 takes (acc, a, b, out_dtype), not (acc, a, b)" in caplog.text


def test_the_lm_heads_cpu_tiles_give_trl_s_log_probabilities_and_gradients():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    torch.manual_seed(0)
    hidden = (torch.randn(40, 64) * 0.5).to(torch.bfloat16)
    weight = (torch.randn(3000, 64) * 0.2).to(torch.bfloat16)
    targets = torch.randint(0, 3000, (40,))
    grad = torch.randn(40)
    results = []
    for use_lean in (False, True):
        h = hidden.clone().requires_grad_()
        with lean_head(compact=False) if use_lean else nullcontext():
            logps = ChunkedLogProbFunction.apply(h, weight, None, targets, 1.0, 1024, None, 1.0, ("entropy",))[0]
            (logps * grad).sum().backward()
        results.append((logps.detach(), h.grad.float()))
    (a, grad_a), (b, grad_b) = results
    assert torch.equal(a, b)
    assert ((grad_a - grad_b).norm() / grad_a.norm()) < 1e-3
    exact = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert (b.double() - exact).abs().max() < 1e-2

    a16, b16 = (torch.randn(30, 2000) * 1e-2).to(torch.bfloat16), torch.randn(2000, 64).to(torch.bfloat16)
    acc = torch.ones(30, 64)
    addmm_fp32(acc, a16, b16, fallback=None)
    exact = 1 + a16.double() @ b16.double()
    assert ((acc.double() - exact).norm() / exact.norm()) < 1e-5  # fp32-accurate from bf16 products
    calls = []
    addmm_fp32(torch.zeros(2, 2), torch.ones(2, 3), torch.ones(3, 2), fallback=lambda *a: calls.append(a))
    assert len(calls) == 1  # fp32 factors: TRL's own
