"""Right-padded rows packed into one row for the decoder, and unpacked after it.

A DPO micro-batch is a chosen and a rejected sequence of the same prompt, right-padded to the
longer of the two (and then to a multiple of 64 on CPU): on the seed pairs 40% of the
positions the decoder computes are pads. Packed, the real tokens of every row stand in one
row, each sequence's positions starting again at 0, and the decoder's attention keeps each
sequence to itself: transformers turns restarting position_ids into a block-diagonal causal
mask (masking_utils.find_packed_sequence_indices), which SDPA takes as its
boolean mask. Every real token then sees exactly the tokens and positions it saw in its
padded row. After the decoder, its hidden states go back to the padded (rows, length) layout,
zeros at the pads, which have no labels, so the LM head and the trainer's loss see the batch
they built.

The packed row is itself padded to `multiple` (a last segment of its own), so that its length
repeats across steps (see train.pad_multiple).
"""

from __future__ import annotations

import torch

PLAN = "_selfreward_packing"
# The longest packed row: SDPA computes the whole block-diagonal score matrix, masked blocks
# included, so the packed row's attention costs (sum of lengths)^2 against sum(length^2).
MAX_TOKENS = 768


def right_padded(mask: torch.Tensor) -> bool:
    """Whether every row of a 2-D 0/1 mask is ones, then only zeros, starting with a one."""
    if mask.dim() != 2 or not mask[:, 0].all():
        return False
    return mask.shape[1] < 2 or bool((mask[:, :-1] >= mask[:, 1:]).all())


def pack(module, args, kwargs, multiple: int | None = None, limit: int | None = None):
    """Forward pre-hook (with_kwargs) of a decoder: packs a right-padded batch of two or more
    rows of input_ids into one row with restarting position_ids and no mask, where the packed
    row, padded to `multiple`, has at most `limit` tokens."""
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if args or ids is None or mask is None or ids.dim() != 2 or ids.shape[0] < 2 \
            or any(kwargs.get(k) is not None for k in ("position_ids", "past_key_values", "inputs_embeds")) \
            or not right_padded(mask):
        return None
    rows, length = ids.shape
    keep = mask.bool().reshape(-1)
    tokens = ids.reshape(-1)[keep]
    positions = torch.arange(length, device=ids.device).expand(rows, length).reshape(-1)[keep]
    extra = (-tokens.numel()) % multiple if multiple else 0
    if limit and tokens.numel() + extra > limit:
        return None
    if extra:  # a segment of its own, positions from 0 again; its outputs are dropped
        tokens = torch.cat([tokens, tokens.new_zeros(extra)])
        positions = torch.cat([positions, torch.arange(extra, device=ids.device)])
    module.__dict__[PLAN] = (rows, length, keep)
    # No cache: transformers reads packed sequences from position_ids only without one.
    return args, {**kwargs, "input_ids": tokens[None], "attention_mask": None, "position_ids": positions[None],
                  "use_cache": False}


def unpack(module, args, kwargs, output):
    """Forward hook (with_kwargs) of the same decoder: last_hidden_state back to (rows, length,
    hidden), zeros at the pads."""
    plan = module.__dict__.pop(PLAN, None)
    if plan is None:
        return None
    rows, length, keep = plan
    hidden = output.last_hidden_state[0]
    real = int(keep.sum())
    full = hidden.new_zeros(rows * length, hidden.shape[-1]).masked_scatter(keep[:, None], hidden[:real])
    output.last_hidden_state = full.view(rows, length, -1)
    return output


def install(decoder, multiple: int | None, limit: int | None) -> list:
    """Packs every right-padded multi-row batch `decoder` is called with (see pack); returns the
    hooks' handles. Pre-hooks registered after these see the packed call."""
    from functools import partial

    return [decoder.register_forward_pre_hook(partial(pack, multiple=multiple, limit=limit), with_kwargs=True),
            decoder.register_forward_hook(unpack, with_kwargs=True)]


def decoder_of(model):
    """The decoder stack (transformers' get_decoder) under a PEFT or causal-LM wrapper, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(base, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if decoder is not None and decoder is not base else None
