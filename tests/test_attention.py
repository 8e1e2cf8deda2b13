"""Lean training's kernels: whole-matrix causal attention (selfreward.training.cpu.attention) against
SDPA in float64, right-padded rows packed into one row (selfreward.training.cpu.packing) against the
padded batch, the in-place LoRA forward (dropout.lean_lora) against PEFT's, and the fused LM
head's CPU tiles (selfreward.training.cpu.lmhead) against TRL's own."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from selfreward.config import resolve
from selfreward.training.cpu import attention, lean, packing
from selfreward.training.cpu.dropout import lean_lora
from selfreward.training.cpu.lmhead import addmm_fp32, lean_head


def _qkv(length: int, heads: int = 6, kv: int = 2, dim: int = 16, rows: int = 1):
    torch.manual_seed(0)
    q = (torch.randn(rows, heads, length, dim) * 2).to(torch.bfloat16).requires_grad_()
    k = (torch.randn(rows, kv, length, dim) * 2).to(torch.bfloat16).requires_grad_()
    v = torch.randn(rows, kv, length, dim).to(torch.bfloat16).requires_grad_()
    return q, k, v


def _reference(q, k, v, mask=None):
    """SDPA in float64, keys and values repeated per query head: output and grads."""
    groups = q.shape[1] // k.shape[1]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q64, k64.repeat_interleave(groups, 1), v64.repeat_interleave(groups, 1),
                                         attn_mask=mask, is_causal=mask is None)
    return out, q64, k64, v64


def _errors(q, k, v, mask=None):
    """Relative errors of the output and of each grad, whole-matrix path and bf16 SDPA (flash)
    alike, against float64."""
    torch.manual_seed(1)
    grad = torch.randn(q.shape)
    ref, *ref_inputs = _reference(q, k, v, mask)
    ref.backward(grad.double())
    bias = attention.attention_bias(mask, q.shape[2], q.shape[1] // k.shape[1], q.dtype, q.device)
    errors = {}
    for name, fn in {
        "ours": lambda: attention.CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5, bias),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                       enable_gqa=True),
    }.items():
        for x in (q, k, v):
            x.grad = None
        out = fn()
        out.backward(grad.to(out.dtype))
        errors[name] = [((a.double() - b).norm() / b.norm()).item()
                        for a, b in zip((out, q.grad, k.grad, v.grad), (ref, *(x.grad for x in ref_inputs)))]
    return errors


@pytest.mark.parametrize("length", [2, 37, 128])
def test_whole_matrix_causal_attention_is_as_close_to_float64_as_bf16_sdpa(length):
    errors = _errors(*_qkv(length))
    for ours, sdpa in zip(errors["ours"], errors["sdpa"]):
        assert ours < max(4 * sdpa, 1e-2)  # bf16 rounding of the scores: the order of flash's


def test_a_packed_block_diagonal_mask_keeps_each_sequence_to_itself():
    q, k, v = _qkv(24)
    allowed = torch.ones(24, 24).tril().bool()
    allowed[10:, :10] = False  # two sequences: 0-9 and 10-23
    mask = allowed[None, None]
    errors = _errors(q, k, v, mask)
    for ours, sdpa in zip(errors["ours"], errors["sdpa"]):
        assert ours < max(4 * sdpa, 1e-2)
    bias = attention.attention_bias(mask, 24, 3, torch.bfloat16, q.device)
    first = attention.CausalAttention.apply(q[:, :, :10], k[:, :, :10], v[:, :, :10], 0.25,
                                            attention.attention_bias(None, 10, 3, torch.bfloat16, q.device))
    packed = attention.CausalAttention.apply(q, k, v, 0.25, bias)
    assert torch.equal(packed[:, :, :10], first)  # the first sequence never sees the second


def test_attention_falls_back_to_sdpa_where_it_does_not_apply():
    module = SimpleNamespace(is_causal=True, num_key_value_groups=3)
    q, k, v = _qkv(16)
    padded = torch.ones(2, 1, 16, 16, dtype=torch.bool).tril()
    cases = [(q.float(), k.float(), v.float(), None, 0.0),  # fp32
             (q, k, v, padded[:1].expand(1, 1, 16, 16).clone().float(), 0.0),  # an additive float mask
             (q, k, v, None, 0.1)]  # attention dropout
    for query, key, value, mask, dropout in cases:
        assert not attention.applies(query, key, mask, dropout, True)
    long = torch.zeros(1, 2, attention.MAX_TOKENS + 1, 8, dtype=torch.bfloat16)
    assert not attention.applies(long, long, None, 0.0, True)
    assert attention.applies(q, k, None, 0.0, True) and not attention.applies(q, k, None, 0.0, False)
    torch.manual_seed(0)
    out, _ = attention.attention_forward(module, q.float(), k.float(), v.float(), None)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert torch.equal(out, sdpa_attention_forward(module, q.float(), k.float(), v.float(), None)[0])


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


def test_lean_bf16_training_packs_and_attends_as_the_padded_batch_does(tiny_model):
    """lean() in bf16: the decoder gets one packed row and the whole-matrix attention; real
    positions' log-probabilities stay within bf16 rounding of the padded SDPA forward."""
    model = _peft(tiny_model, torch.bfloat16).train()
    ids, mask = _batch()
    real = mask.bool()
    cfg = resolve({}, {"preset": "tiny", "lean_training": "yes", "train_precision": "bf16"})
    calls = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        padded = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        with lean(SimpleNamespace(model=model), cfg):
            assert model.config._attn_implementation == attention.NAME
            spy = packing.decoder_of(model).register_forward_pre_hook(
                lambda m, a, kw: calls.append((kw["input_ids"].shape, kw["attention_mask"])), with_kwargs=True)
            packed = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            spy.remove()
    assert model.config._attn_implementation == "sdpa"
    assert calls == [((1, 64), None)]
    assert (packed[real] - padded[real]).abs().max() < 0.05
    assert torch.equal(packed[~real], torch.zeros_like(packed[~real]).log_softmax(-1))  # zeros at the pads


def test_the_in_place_lora_forward_is_peft_s_and_puts_peft_s_back(tiny_model):
    model = _peft(tiny_model).train()
    ids, mask = _batch()
    results = []
    for use_lean in (False, True):
        model.zero_grad()
        with lean_lora(model) if use_lean else nullcontext():
            logits = model(input_ids=ids, attention_mask=mask).logits
            with model.disable_adapter():  # DPO's reference: PEFT's own forward
                base = model(input_ids=ids, attention_mask=mask).logits
        logits.logsumexp(-1).mean().backward()
        results.append((logits.detach(), base, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, base_a, grads_a), (b, base_b, grads_b) = results
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(base_a, base_b)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(grads_a, grads_b))
    assert not any("forward" in m.__dict__ for m in model.modules())

    dropped = _peft(tiny_model, dropout=0.5).train()
    with lean_lora(dropped):
        torch.manual_seed(0)
        one = dropped(input_ids=ids).logits
        two = dropped(input_ids=ids).logits
        dropped.eval()
        quiet = dropped(input_ids=ids).logits
        dropped.train()
    assert not torch.equal(one, two)  # fresh masks each call
    with torch.no_grad():
        assert torch.allclose(quiet, dropped.eval()(input_ids=ids).logits, atol=1e-5)  # eval: no dropout


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
