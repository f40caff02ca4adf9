"""Preference tuning, the model side: each pair's answers scored by the policy (the adapted model) and, for DPO,
by the reference policy, which is the same 4-bit base with every LoRA layer turned off (peft's adapter toggle)
rather than a second copy of the model; then the objective of the preference section
(qlora/preference_loss.py) and the held-out reward metrics.

The reference pass runs without gradients and before the policy's forward pass, so its activations are freed
before the policy's are kept: it costs one forward pass per micro-batch and no memory at the peak.
"""
from __future__ import annotations

import contextlib

import torch

from qlora import distributed, evaluation, preference_loss
from qlora.config import JobConfig, PreferenceSection
from qlora.data import batched, to_tensors
from qlora.data.preference import collate_pairs

NEEDS_REFERENCE = ("dpo",)


@contextlib.contextmanager
def reference_policy(model):
    """The model without its adapter: every peft tuner layer's adapters turned off (BaseTunerLayer.enable_adapters,
    what PeftModel.disable_adapter does), reached through any DDP / FSDP wrapper, with every parameter's
    requires_grad put back afterwards (peft's toggle sets them). Compiled layers run eagerly meanwhile: the
    adapters' switch and the missing gradients would compile another graph."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for p, wanted in flags:
                p.requires_grad_(wanted)


def pair_logps(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens of each row (chosen rows first), and their counts."""
    return preference_loss.sequence_logps(model(**inputs).logits, labels)


def terms(p: PreferenceSection, policy: torch.Tensor, counts: torch.Tensor,
          reference: torch.Tensor | None) -> preference_loss.PairTerms:
    if p.loss == "dpo":
        return preference_loss.dpo(policy, reference, p.beta, p.label_smoothing)
    if p.loss == "orpo":
        return preference_loss.orpo(policy, counts, p.orpo_lambda)
    return preference_loss.simpo(policy, counts, p.beta, p.simpo_gamma)


def reference_logps(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """The reference policy's summed log-probabilities of each row (the reference pass)."""
    with reference_policy(model):
        return pair_logps(model, inputs, labels)[0]


def pair_terms(model, inputs: dict, labels: torch.Tensor, p: PreferenceSection,
               reference: torch.Tensor | None = None) -> tuple[preference_loss.PairTerms, torch.Tensor]:
    """The objective's per-pair terms of a micro-batch of pairs, and the policy's summed log-probabilities of
    its rows: the reference pass first (DPO; skipped when `reference` holds its result), then the policy's."""
    if reference is None and p.loss in NEEDS_REFERENCE:
        reference = reference_logps(model, inputs, labels)
    policy, counts = pair_logps(model, inputs, labels)
    return terms(p, policy, counts, reference), policy


def forward_loss(model, inputs: dict, labels: torch.Tensor, p: PreferenceSection) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss over the micro-batch's pairs, number of pairs): the training loss."""
    t = pair_terms(model, inputs, labels, p)[0]
    return t.losses.sum(), labels.new_tensor(t.losses.numel())


METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps")


@torch.no_grad()
def evaluate(model, examples: list[dict], pad_id: int, cfg: JobConfig, ctx,
             reference_cache: dict | None = None) -> dict:
    """Held-out pairs over all ranks: the preference loss (eval_loss), reward accuracy (the share of pairs whose
    chosen answer has the higher reward), the mean reward margin and rewards, and the mean summed
    log-probabilities of the chosen and rejected answers under the policy. `reference_cache` (one dict per run
    and held-out set, kept by the caller between evaluations): the reference policy's log-probabilities of each
    batch (by its first example's place in this rank's share), computed by the first evaluation and reused by
    the later ones (the base is frozen: they never change), which halves the cost of a DPO run's later
    evaluations."""
    model.eval()
    mine, real = distributed.lockstep_share(examples, ctx)
    sums = dict.fromkeys(("eval_loss", *METRICS), 0.0)
    pairs = 0
    # Pairs per forward pass: both rows' logits within the evaluation budget, sized alike on every rank.
    longest = max((len(e[k]) for e in examples for k in ("input_ids", "rejected_input_ids")), default=1)
    vocab = model.get_output_embeddings().weight.shape[0]
    size = max(1, evaluation.rows_per_forward(2 * cfg.evaluation.batch_size, longest, vocab) // 2)
    for start, batch in zip(range(0, len(mine), size), batched(mine, size)):
        counted = max(0, min(len(batch), real - start))  # lockstep padding examples are run, not counted
        t = to_tensors(collate_pairs(batch, pad_id), ctx.device)
        inputs = {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}
        reference = None
        if reference_cache is not None and cfg.preference.loss in NEEDS_REFERENCE:
            if start not in reference_cache:
                reference_cache[start] = reference_logps(model, inputs, t["labels"])
            reference = reference_cache[start]
        found_terms, policy = pair_terms(model, inputs, t["labels"], cfg.preference, reference)
        n = len(batch)
        kept = preference_loss.PairTerms(*(x[:counted] for x in (found_terms.losses, found_terms.chosen_rewards,
                                                                  found_terms.rejected_rewards)))
        found = preference_loss.pair_metrics(kept)
        found.update(eval_loss=kept.losses.sum().item(), chosen_logps=policy[:counted].sum().item(),
                     rejected_logps=policy[n:n + counted].sum().item())
        for k in sums:
            sums[k] += found[k]
        pairs += counted
    totals = distributed.all_sum([sums[k] for k in sums] + [pairs], ctx)
    return {k: v / max(totals[-1], 1) for k, v in zip(sums, totals)}
