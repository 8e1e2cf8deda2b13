"""Lean training on CPU: kernels that skip work TRL, peft and transformers would do (attention,
dropout, lmhead, packing), switched on for one training by `lean`."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from selfreward.backends.models import use_4bit
from selfreward.training.precision import pad_multiple, use_bf16


@contextmanager
def lean(trainer, cfg, generates: bool = False):
    """While `trainer` trains, where cfg.lean_training says (auto: on CPU):

    - TRL's fused LM head scores only the positions that have a label. Off Triton devices it
      scores every position, so that a compiler (Neuron) sees the same tile shapes each batch;
      eager CPU has no such need, and the prompt positions it would score are masked to zero.
      On the demo's SFT data that is 7 positions in 8 (long judge prompts, short judgments). Its
      torch tiles skip identity scalings and fp32 copies (selfreward.training.cpu.lmhead).
    - LoRA dropout masks come from FastDropout, and each adapter's product is added into its
      base layer's output in place, both scales folded in (selfreward.training.cpu.dropout.lean_lora).
    - A right-padded batch goes to the model without its attention mask (causal_only): in a causal
      LM no real token attends to a later position, so the pads at the end change none of the
      real positions' outputs, and attention takes its causal path (half the products of a full
      masked one, and no mask to build). Rows whose mask has a hole or leading pads keep it.
    - Over a bf16 base under autocast the adapters take their inputs as they come, in bf16 (peft
      would copy each to the adapter's fp32 first, for autocast to copy it back). Trainers that
      generate (`generates`: online RL) keep peft's casting, since generation may run outside
      autocast.
    - In bf16, causal attention over up to 768 tokens runs as whole-matrix products
      (selfreward.training.cpu.attention) instead of SDPA's flash kernel: half the time a layer. And a
      right-padded batch of several rows (DPO's chosen and rejected) reaches the decoder packed
      into one row (selfreward.training.cpu.packing): its pads are not computed."""
    import torch

    from selfreward.training.cpu import attention, packing
    from selfreward.training.cpu.dropout import lean_lora
    from selfreward.training.cpu.lmhead import lean_head

    cpu = not torch.cuda.is_available()
    if cfg.lean_training == "no" or (cfg.lean_training == "auto" and not cpu):
        yield
        return
    layers = []
    if cpu and not generates and use_bf16(cfg.train_precision) and not use_4bit(cfg.load_in_4bit):
        layers = [m for m in trainer.model.modules() if getattr(m, "cast_input_dtype_enabled", False)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    config = trainer.model.config
    implementation = config._attn_implementation
    decoder = packing.decoder_of(trainer.model)
    hooks = []
    if cpu and implementation == "sdpa" and use_bf16(cfg.train_precision):
        config._attn_implementation = attention.register()
        if decoder is not None:
            hooks = packing.install(decoder, pad_multiple(cfg), attention.MAX_TOKENS)
    # After packing: a packed call has no mask left to drop.
    hooks.append((decoder or trainer.model).register_forward_pre_hook(causal_only, with_kwargs=True))
    try:
        with lean_lora(trainer.model), (lean_head() if cpu else nullcontext()):
            yield
    finally:
        config._attn_implementation = implementation
        for hook in hooks:
            hook.remove()
        for m in layers:
            m.cast_input_dtype_enabled = True


def causal_only(module, args, kwargs):
    """Forward pre-hook: drops kwargs' attention_mask where every row is right-padded (ones, then
    only zeros) and no position_ids or cache are passed: what the causal mask alone gives the
    real tokens is then exactly what the padding mask added to it gives them."""
    from selfreward.training.cpu.packing import right_padded

    mask = kwargs.get("attention_mask")
    if mask is None or kwargs.get("position_ids") is not None or kwargs.get("past_key_values") is not None \
            or not right_padded(mask):
        return None
    return args, {**kwargs, "attention_mask": None}
