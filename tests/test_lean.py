"""Lean CPU training (lean_training, train_precision): FastDropout's masks, the swap of
PEFT's dropouts and back, TRL's fused LM head scoring only labelled positions (same loss and
gradients as scoring all of them), and SFT on a bf16 base following the fp32 loss curve."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from selfreward.config import resolve
from selfreward.training.cpu import lean
from selfreward.training.cpu.dropout import FastDropout, fast_lora_dropout
from selfreward.training.recipes import sft


def test_fast_dropout_drops_p_of_the_elements_and_scales_the_rest():
    drop = FastDropout(0.1).train()
    assert drop.p == pytest.approx(0.1, abs=1 / 32768)
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    out = drop(x)
    dropped = (out == 0).float().mean().item()
    assert dropped == pytest.approx(drop.p, abs=0.002)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - drop.p)))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the backward pass applies the same mask and scale

    torch.manual_seed(0)
    assert torch.equal(drop(torch.ones(1000, 1000)), out.detach())  # same seed, same mask
    assert not torch.equal(drop(torch.ones(1000, 1000)), out.detach())
    x = torch.randn(7, 5)
    assert drop.eval()(x) is x  # eval: no dropout
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        FastDropout(1.0)


def _peft(model_path, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def test_every_lora_dropout_is_swapped_while_training_and_put_back(tiny_model):
    model = _peft(tiny_model, 0.1)
    before = [type(m) for m in model.modules()]
    with fast_lora_dropout(model) as swapped:
        assert swapped == 2 * 7  # two layers, q k v o gate up down
        assert sum(isinstance(m, FastDropout) for m in model.modules()) == swapped
        assert all(m.p == pytest.approx(0.1, abs=1e-4) for m in model.modules() if isinstance(m, FastDropout))
    assert [type(m) for m in model.modules()] == before
    with fast_lora_dropout(_peft(tiny_model, 0.0)) as swapped:
        assert swapped == 0  # p = 0 is PEFT's Identity: nothing to swap


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


def test_right_padded_batches_train_without_their_padding_mask_and_the_same_outputs(tiny_model):
    """lean() drops the attention mask of a right-padded batch (causal attention alone, its fast
    path): every real position's logits are those of the masked forward, and a mask with leading
    pads or a hole is kept. Outside lean() the model sees the mask as given."""
    from selfreward.training.cpu import causal_only

    model = _peft(tiny_model, 0.0).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, 24))
    right = torch.ones(3, 24, dtype=torch.long)
    right[1, 15:] = 0  # right-padded rows of 24, 15 and 9 real tokens
    right[2, 9:] = 0
    seen = []
    decoder = model.get_base_model().model

    def call():
        spy = decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")),
                                                with_kwargs=True)  # after lean()'s hooks: what the decoder gets
        try:
            return model(input_ids=ids, attention_mask=right).logits
        finally:
            spy.remove()

    cfg = resolve({}, {"preset": "tiny", "lean_training": "yes", "train_precision": "fp32"})
    with torch.no_grad():
        masked = call()
        with lean(SimpleNamespace(model=model), cfg):
            causal = call()
        after = call()
    assert seen[0] is not None and seen[1] is None and seen[2] is not None  # dropped inside lean() only
    real = right.bool()
    assert torch.allclose(masked[real], causal[real], atol=1e-5)
    assert torch.equal(masked, after)

    kwargs = {"input_ids": ids}
    assert causal_only(model, (), {**kwargs, "attention_mask": right})[1]["attention_mask"] is None
    left = right.flip(1)  # leading pads: positions differ from the causal default
    hole = right.clone()
    hole[0, 5] = 0
    for mask in (left, hole):
        assert causal_only(model, (), {**kwargs, "attention_mask": mask}) is None
    assert causal_only(model, (), {**kwargs, "attention_mask": right, "position_ids": torch.zeros(3, 24)}) is None
