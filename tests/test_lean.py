"""Lean CPU training (lean_training, train_precision): TRL's fused LM head scoring only
labelled positions (same loss and gradients as scoring all of them), SFT on a bf16 base
following the fp32 loss curve, and the check of the private names the kernels patch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from selfreward.config import resolve
from selfreward.training.cpu import lean
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
        assert not model.get_base_model().model._forward_pre_hooks  # no packing
    assert "lean training off" in caplog.text
    assert "_addmm_fp32 takes (acc, a, b, out_dtype), not (acc, a, b)" in caplog.text
