"""Next-token choice from logits: greedy, or temperature with top-k / top-p, per request, seedable."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.constraint import mask_disallowed
from server.engine.request import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [len(seqs), vocab] float32. A constrained request's grammar consumes its token here, once
    every row's token is chosen (so a failure before that leaves every grammar as it was)."""
    constrained = [i for i, s in enumerate(seqs) if s.constraint is not None]
    if constrained:
        logits = mask_disallowed(logits, constrained, [seqs[i].constraint for i in constrained])
    if any(s.params.reshapes_logits for s in seqs):
        logits = apply_penalties(logits, seqs)
    greedy = logits.argmax(dim=-1).tolist()
    tokens = greedy if all(s.params.greedy for s in seqs) else \
        [greedy[i] if s.params.greedy else _sample_row(logits[i], s) for i, s in enumerate(seqs)]
    for i in constrained:
        seqs[i].constraint.consume(tokens[i])
    return tokens


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """A copy of `logits` with each asking row's penalties and logit bias applied, as OpenAI (presence,
    frequency: over generated tokens) and vLLM (repetition: over prompt and generated tokens) define them."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.reshapes_logits:
            continue
        row = logits[i]
        if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
            counts = torch.bincount(torch.tensor(seq.output_ids, device=row.device), minlength=vocab)[:vocab]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)), device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        for token, bias in p.logit_bias:
            row[token] += bias
    return logits


def _sample_row(logits: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)  # the top token always stays
        probs = probs / probs.sum()
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        drop[0] = False  # a top_p that rounds to 0 in float32 would otherwise drop every token
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=seq.generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=seq.generator))


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # (token id, logprob), most likely first


def logprobs_of(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
    """Log-probabilities of the chosen tokens under the unmodified distribution (before temperature),
    only for the sequences that asked for them."""
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(seqs)
    if not wanted:
        return result
    logp = torch.log_softmax(logits[wanted], dim=-1)
    for row, i in enumerate(wanted):
        k = seqs[i].params.logprobs
        top = torch.topk(logp[row], k) if k else None
        pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
        result[i] = TokenLogprob(tokens[i], float(logp[row, tokens[i]]), pairs)
    return result
