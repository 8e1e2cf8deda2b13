"""Lean training's two kernels against the libraries' own code: right-padded rows packed into
one row (selfreward.training.cpu.packing) against the padded batch, and the fused LM head's CPU
tiles (selfreward.training.cpu.lmhead) against TRL's."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import torch

from selfreward.config import resolve
from selfreward.training.cpu import lean, packing
from selfreward.training.cpu.lmhead import addmm_fp32, lean_head


def _peft(model_path, dtype=torch.float32, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # a trained-looking adapter, not PEFT's zeros
    return model


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, 15:] = 0  # right-padded rows of 24, 15 and 9 real tokens
    mask[2, 9:] = 0
    return ids, mask


def test_right_padded_rows_packed_into_one_row_give_the_padded_batchs_outputs_and_grads(tiny_model):
    """In fp32 on SDPA, so that only the packing can differ: the same logits at every real
    position, the same adapter gradients; zeros at the pads; the packed row's length is a
    multiple of 8 (its pad a segment of its own); the plan is gone after the call."""
    model = _peft(tiny_model).train()
    decoder = packing.decoder_of(model)
    ids, mask = _batch()
    real = mask.bool()
    seen = []
    results = []
    for packed in (False, True):
        hooks = packing.install(decoder, 8, None) if packed else []
        hooks.append(decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape),
                                                      with_kwargs=True))
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[real].logsumexp(-1).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        for hook in hooks:
            hook.remove()
    assert seen == [(3, 24), (1, 48)]  # 48 real tokens: a multiple of 8 already
    (padded, grads), (packed, packed_grads) = results
    assert torch.allclose(padded[real], packed[real], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, packed_grads))
    assert packing.PLAN not in decoder.__dict__

    kwargs = {"input_ids": ids, "attention_mask": mask}
    _, call = packing.pack(decoder, (), kwargs, multiple=64)
    assert call["input_ids"].shape == (1, 64) and call["attention_mask"] is None and call["use_cache"] is False
    assert call["position_ids"][0, :24].tolist() == list(range(24))
    assert call["position_ids"][0, 24:39].tolist() == list(range(15))
    assert call["position_ids"][0, 48:].tolist() == list(range(16))  # the pad segment
    decoder.__dict__.pop(packing.PLAN)
    assert packing.pack(decoder, (), kwargs, multiple=64, limit=48) is None  # 64 tokens would pass the limit
    for bad in (mask.flip(1), mask[:1]):  # leading pads; a single row
        assert packing.pack(decoder, (), {"input_ids": ids[: len(bad)], "attention_mask": bad}) is None



def test_lean_bf16_training_packs_as_the_padded_batch_does(tiny_model):
    """lean() in bf16 on SDPA: the decoder gets one packed row; real positions' log-probabilities
    stay within bf16 rounding of the padded forward; zeros at the pads; nothing left after."""
    model = _peft(tiny_model, torch.bfloat16).train()
    ids, mask = _batch()
    real = mask.bool()
    cfg = resolve({}, {"preset": "tiny", "lean_training": "yes", "train_precision": "bf16"})
    calls = []
    decoder = packing.decoder_of(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        padded = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        with lean(SimpleNamespace(model=model), cfg):
            spy = decoder.register_forward_pre_hook(
                lambda m, a, kw: calls.append((kw["input_ids"].shape, kw["attention_mask"])), with_kwargs=True)
            packed = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            spy.remove()
        after = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    assert calls == [((1, 64), None)]
    assert (packed[real] - padded[real]).abs().max() < 0.05
    assert torch.equal(packed[~real], torch.zeros_like(packed[~real]).log_softmax(-1))  # zeros at the pads
    assert torch.equal(after, padded)  # the hooks are gone

    fp32 = resolve({}, {"preset": "tiny", "lean_training": "yes", "train_precision": "fp32"})
    with lean(SimpleNamespace(model=model), fp32):
        assert not decoder._forward_pre_hooks  # packing only over a bf16 base


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
