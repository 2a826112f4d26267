"""Greedy generation agreement: does the quantized model continue a prompt the way its reference does?

Perplexity and routing agreement are measured with both models reading the *same* ids (teacher forcing). In
generation each model reads its own previous tokens, so one changed token (from a changed expert choice, say)
changes every later context: errors compound over decoding, which is where the VSRAQ paper finds its largest
gains. Per prompt, both models decode greedily for ``new_tokens`` steps from the same prompt; the report gives

- ``matched``: how many generated tokens agree before the first divergence (``new_tokens`` when none),
- ``first_divergence``: the index of the first differing generated token, or ``None``,
- ``positional_agreement``: the fraction of the ``new_tokens`` positions with equal tokens (after a divergence the
  contexts differ, so this mixes agreement and re-convergence),
- ``teacher_forced_top1``: the quantized model fed the *reference's* continuation: the fraction of steps where
  its greedy token equals the reference's (one step's disagreement, without compounding).

Decoding uses each model's KV cache; ties in the argmax go to the lowest token id in both models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import InputError

__all__ = ["GenerationAgreement", "greedy_continuations", "generation_agreement"]


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``[P, new_tokens]`` greedy continuations of ``prompts`` (``[P, L]`` token ids, no padding)."""
    device = next(model.parameters()).device
    ids = prompts.to(device)
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    token = out.logits[:, -1].float().argmax(-1)
    generated = [token]
    for _ in range(new_tokens - 1):
        out = model(input_ids=token[:, None], past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].float().argmax(-1)
        generated.append(token)
    return torch.stack(generated, dim=1).cpu()


@torch.no_grad()
def _teacher_forced_argmax(model: torch.nn.Module, prompts: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """``model``'s greedy token at each of ``continuation``'s positions, given the prompt and the continuation's
    earlier tokens: ``[P, new_tokens]``."""
    device = next(model.parameters()).device
    ids = torch.cat([prompts, continuation[:, :-1]], dim=1).to(device)
    logits = model(input_ids=ids).logits[:, prompts.shape[1] - 1 :]
    return logits.float().argmax(-1).cpu()


@dataclass
class GenerationAgreement:
    """Per-prompt greedy continuations of both models and their agreement."""

    reference: torch.Tensor  # [P, N] token ids
    quantized: torch.Tensor  # [P, N]
    teacher_forced: torch.Tensor  # [P, N]: the quantized model's greedy token on the reference's continuation

    @property
    def new_tokens(self) -> int:
        return int(self.reference.shape[1])

    def first_divergence(self) -> list[int | None]:
        differ = self.reference != self.quantized
        return [int(row.nonzero()[0]) if bool(row.any()) else None for row in differ]

    def matched(self) -> list[int]:
        return [self.new_tokens if d is None else d for d in self.first_divergence()]

    def survival(self) -> list[float]:
        """Fraction of prompts whose continuations still agree after ``t`` generated tokens, ``t = 0..N``."""
        matched = torch.tensor(self.matched(), dtype=torch.float64)
        return [float((matched >= t).double().mean()) for t in range(self.new_tokens + 1)]

    def summary(self) -> dict:
        matched = self.matched()
        return {
            "prompts": int(self.reference.shape[0]),
            "new_tokens": self.new_tokens,
            "mean_matched": sum(matched) / len(matched),
            "fully_matched": sum(m == self.new_tokens for m in matched) / len(matched),
            "positional_agreement": float((self.reference == self.quantized).double().mean()),
            "teacher_forced_top1": float((self.teacher_forced == self.reference).double().mean()),
            "survival": self.survival(),
            "per_prompt": [{"matched": m, "first_divergence": d} for m, d in zip(matched, self.first_divergence())],
        }


def generation_agreement(reference: torch.nn.Module, quantized: torch.nn.Module, prompts: torch.Tensor,
                         new_tokens: int, batch_size: int = 4, progress: bool = True) -> GenerationAgreement:
    """Greedy continuations of ``prompts`` (``[P, L]``) by both models, ``new_tokens`` each, and the quantized
    model's greedy tokens on the reference's continuation."""
    if prompts.ndim != 2 or prompts.shape[1] < 1 or prompts.shape[0] < 1:
        raise InputError(f"prompts must be [prompts >= 1, prompt_len >= 1], got shape {tuple(prompts.shape)}")
    if new_tokens < 1:
        raise InputError(f"new_tokens must be at least 1, got {new_tokens}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    ref, quant, forced = [], [], []
    for chunk in tqdm(torch.split(prompts, batch_size), desc="routealign generate", unit="batch",
                      disable=not progress):
        r = greedy_continuations(reference, chunk, new_tokens)
        ref.append(r)
        quant.append(greedy_continuations(quantized, chunk, new_tokens))
        forced.append(_teacher_forced_argmax(quantized, chunk, r))
    return GenerationAgreement(torch.cat(ref), torch.cat(quant), torch.cat(forced))
