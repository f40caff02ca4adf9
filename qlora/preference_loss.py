"""Preference losses over a micro-batch of pairs (rows 0..B-1 chosen, B..2B-1 rejected: data.preference's
collate_pairs), as published:

- DPO (Rafailov et al. 2023, eq. 7; label smoothing as in Mitchell's cDPO note and TRL's "sigmoid" loss):
    m = beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))
    loss = -(1 - eps) log sigmoid(m) - eps log sigmoid(-m)
- ORPO (Hong et al. 2024, eq. 6-7): no reference model; on mean per-token log-probabilities a_w, a_l,
    log odds(y|x) = a - log(1 - exp(a)),  loss = NLL(y_w) - lambda * log sigmoid(log odds_w - log odds_l)
- SimPO (Meng et al. 2024, eq. 6): no reference model; loss = -log sigmoid(beta * (a_w - a_l) - gamma).

The reward of an answer (what reward accuracy and margin compare) is the implicit reward beta * (log pi - log ref)
for DPO, beta * a for SimPO, and the mean log-probability a itself for ORPO (it has no beta).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qlora.data.batches import IGNORE


LOGIT_CHUNK = 2**25  # logits upcast to fp32 at a time (128 MiB), never the whole batch's


def _chunks(logits: torch.Tensor):
    """(row, positions) slices of [rows, positions, vocab] logits of about LOGIT_CHUNK elements each: views,
    so a sliced (non-contiguous) logits tensor is never copied whole."""
    step = max(1, LOGIT_CHUNK // max(1, logits.shape[-1]))
    for row in range(logits.shape[0]):
        for start in range(0, logits.shape[1], step):
            yield row, slice(start, start + step)


class _TokenLogps(torch.autograd.Function):
    """log p(label) = logit[label] - logsumexp(logits) per position, in chunks. Keeps only the logits (as the
    model returned them, bf16 under autocast) and one fp32 logsumexp per position for the backward, which
    recomputes the softmax chunk by chunk: a full fp32 log-softmax of 2 x batch_size rows over the whole
    vocabulary (Llama-3: 128k) is what made the preference step's peak 2-3x TRL's."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        for row, at in _chunks(logits):
            lse[row, at] = torch.logsumexp(logits[row, at].float(), -1)
        ctx.save_for_backward(logits, labels, lse)
        return logits.gather(2, labels.unsqueeze(-1)).squeeze(-1).float() - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        g = grad.float()
        for row, at in _chunks(logits):
            chunk = torch.exp(logits[row, at].float() - lse[row, at, None]).mul_(-g[row, at, None])  # -softmax * g
            chunk.scatter_add_(1, labels[row, at, None], g[row, at, None])  # + g at the label
            out[row, at] = chunk
        return out, None


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens (position t predicts label t+1), and how
    many there are."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE
    token = _TokenLogps.apply(logits[:, :-1], shifted.clamp(min=0))
    return (token * mask).sum(-1), mask.sum(-1)


@dataclass(frozen=True)
class PairTerms:
    """One micro-batch's per-pair numbers: losses and rewards of the chosen and rejected answers."""
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo(policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> PairTerms:
    """`policy`, `reference`: summed log-probabilities of the 2B rows (chosen first)."""
    n = policy.shape[0] // 2
    chosen, rejected = beta * (policy[:n] - reference[:n]), beta * (policy[n:] - reference[n:])
    margin = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return PairTerms(losses, chosen.detach(), rejected.detach())


def orpo(policy: torch.Tensor, counts: torch.Tensor, lam: float) -> PairTerms:
    """`policy`: summed log-probabilities of the 2B rows, `counts` their labelled tokens."""
    n = policy.shape[0] // 2
    mean = policy / counts.clamp(min=1)
    # log(1 - exp(a)) for a < 0, computed stably (log1p(-exp(a)) loses precision as a -> 0).
    log_odds = mean - torch.log(-torch.expm1(mean.clamp(max=-1e-6)))
    ratio = F.logsigmoid(log_odds[:n] - log_odds[n:])
    nll = -mean[:n]
    return PairTerms(nll - lam * ratio, mean[:n].detach(), mean[n:].detach())


def simpo(policy: torch.Tensor, counts: torch.Tensor, beta: float, gamma: float) -> PairTerms:
    n = policy.shape[0] // 2
    mean = policy / counts.clamp(min=1)
    chosen, rejected = beta * mean[:n], beta * mean[n:]
    return PairTerms(-F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach())


def pair_metrics(terms: PairTerms) -> dict[str, float]:
    """Sums over the micro-batch's pairs (divide by their count over all ranks): reward accuracy (the chosen
    answer's reward above the rejected one's), the reward margin and each side's reward."""
    margin = terms.chosen_rewards - terms.rejected_rewards
    return {"reward_accuracy": (margin > 0).float().sum().item(), "reward_margin": margin.sum().item(),
            "chosen_reward": terms.chosen_rewards.sum().item(), "rejected_reward": terms.rejected_rewards.sum().item()}
