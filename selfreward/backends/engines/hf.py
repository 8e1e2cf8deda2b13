"""The transformers engine: batched `generate` in this process (CPU or GPU)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from selfreward.backends.engines.base import Completion, OnDone, Prompt, Sampling, context_ids, failed
from selfreward.backends.models import load_model, load_tokenizer


class TransformersEngine:
    name = "transformers"
    seeds_per_request = False  # one seed per batch: resumes stay identical only in whole chunks

    def __init__(self, model_path: str, batch_size: int = 16, bf16: bool = False):
        self.model_path = model_path
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"  # decoder-only models generate from the right edge
        # bf16 (generation_precision): decoding is matrix products of a few rows by every weight, which
        # a CPU with AMX multiplies in hardware (docs/benchmarks.md, "The transformers engine's judging").
        self.model = load_model(model_path, dtype=torch.bfloat16 if bf16 else None).eval()
        self.context = getattr(self.model.config, "max_position_embeddings", None)

    def render(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, desc: str = "generate",
                 on_done: OnDone | None = None) -> list[list[Completion]]:
        texts = [self.render(p) for p in prompts]
        lengths = [len(self.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
        out: list[list[Completion | None]] = [[None] * n for _ in texts]
        left = [n] * len(texts)
        # A prompt that leaves no room to answer fails as an item; the others go on.
        for i, length in enumerate(lengths):
            if self.context and length + sampling.max_new_tokens > self.context:
                out[i] = [failed(f"prompt is {length} tokens; with {sampling.max_new_tokens} new tokens it "
                                 f"exceeds the model's context of {self.context}")] * n
                left[i] = 0
                if on_done:
                    on_done(i, out[i])
        # One job per (prompt, sample); sorted by length so batches pad little.
        jobs = [(i, j) for i in range(len(texts)) if left[i] for j in range(n)]
        jobs.sort(key=lambda job: -lengths[job[0]])
        eos = self._eos_ids()
        bar = tqdm(total=len(jobs), desc=desc, unit="seq", leave=False)
        for b, start in enumerate(range(0, len(jobs), self.batch_size)):
            batch = jobs[start : start + self.batch_size]
            enc = self.tokenizer([texts[i] for i, _ in batch], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.model.device)
            # A seed per batch keeps a resumed stage's samples identical to the first try.
            torch.manual_seed(sampling.seed * 1_000_003 + b)
            greedy = sampling.temperature == 0
            gen = self.model.generate(
                **enc, max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                top_k=None, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos,
            )
            new = gen[:, enc.input_ids.shape[1] :]
            for (i, j), row in zip(batch, new):
                ids = row.tolist()
                stop = next((k for k, t in enumerate(ids) if t in eos), None)
                kept = ids if stop is None else ids[:stop]
                out[i][j] = Completion(
                    text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                    n_tokens=len(kept), finish_reason="length" if stop is None else "stop",
                )
                left[i] -= 1
                if left[i] == 0 and on_done:
                    on_done(i, out[i])
            bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def choice_probs(self, prompts: list[Prompt], outputs: list[str], cuts: list[int],
                     choices: tuple[str, ...]) -> list[dict[str, float] | None]:
        """One forward pass per item over the prompt and the answer up to the token that holds
        outputs[i][cuts[i]]; the next-token probabilities of each choice's tokens (see Engine)."""
        ids_of = self._choice_ids(choices)
        contexts = [context_ids(self.tokenizer, self.render(p), o, c) for p, o, c in zip(prompts, outputs, cuts)]
        out: list[dict[str, float] | None] = [None] * len(contexts)
        todo = sorted((i for i, c in enumerate(contexts) if c), key=lambda i: -len(contexts[i]))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            width = max(len(contexts[i]) for i in batch)
            # Left padding: every row's last position is its own next-token position.
            ids = torch.tensor([[pad] * (width - len(contexts[i])) + contexts[i] for i in batch])
            mask = torch.tensor([[0] * (width - len(contexts[i])) + [1] * len(contexts[i]) for i in batch])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as if each row were alone
            logits = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                position_ids=positions.to(self.model.device)).logits
            probs = torch.softmax(logits[:, -1].float(), dim=-1).cpu()
            for row, i in zip(probs, batch):
                out[i] = {c: float(row[ids_of[c]].sum()) for c in choices}
        return out

    def _choice_ids(self, choices: tuple[str, ...]) -> dict[str, list[int]]:
        """Token ids per choice: every vocabulary entry that decodes to the choice, spaces aside."""
        if getattr(self, "_choices", (None,))[0] != choices:
            ids = {c: [] for c in choices}
            for token_id in range(len(self.tokenizer)):
                text = self.tokenizer.decode([token_id]).strip()
                if text in ids:
                    ids[text].append(token_id)
            self._choices = (choices, ids)
        return self._choices[1]

    def chunk_prompts(self, n: int) -> int:
        # About four forward batches between checkpoints, in whole batches: a chunk that left
        # one sequence over would generate it alone, at batch size 1.
        unit = self.batch_size // math.gcd(self.batch_size, n)  # fewest prompts that fill whole batches
        return unit * max(1, 4 * self.batch_size // (unit * n))

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
        return sorted(i for i in ids if i is not None)

    def close(self) -> None:
        del self.model
