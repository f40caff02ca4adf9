"""Preference data (qlora/data/preference.py) with sentinel ids, and the DPO / ORPO / SimPO losses
(qlora/preference_loss.py) against independent computations of the published formulas."""
import json
import math

import pytest
import torch

from qlora import preference_loss as pl
from qlora.data.batches import IGNORE
from qlora.data.preference import MIN_PROMPT_TOKENS, build_pair, collate_pairs, fit_pair, layout_of, to_pair


def test_explicit_layout_with_strings_and_messages():
    pair, problem = to_pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert problem is None and pair == ([{"role": "user", "content": "2+2?"}], "4", "5")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    pair, _ = to_pair({"prompt": msgs, "chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "assistant", "content": "5"}]})
    assert pair == (msgs, "4", "5")


def test_conversations_layout_takes_the_shared_turns_as_the_prompt():
    """UltraFeedback-binarized: chosen and rejected are whole conversations."""
    user = {"role": "user", "content": "Name a colour."}
    record = {"chosen": [user, {"role": "assistant", "content": "Blue."}],
              "rejected": [user, {"role": "assistant", "content": "Seven."}], "score_chosen": 8.0}
    assert layout_of(record) == "conversations"
    assert to_pair(record) == (([user], "Blue.", "Seven."), None)
    other = {**record, "rejected": [{"role": "user", "content": "Other."}, {"role": "assistant", "content": "x"}]}
    assert "share the same turns" in to_pair(other)[1]


def test_arena_layout_winner_is_chosen_and_ties_are_dropped():
    base = {"prompt": json.dumps(["Hi", "And then?"]), "response_a": json.dumps(["Hello", "A2"]),
            "response_b": json.dumps(["Hey", "B2"])}
    pair, _ = to_pair({**base, "winner_model_a": 0, "winner_model_b": 1, "winner_tie": 0})
    prompt, chosen, rejected = pair
    assert prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "And then?"}]
    assert (chosen, rejected) == ("B2", "A2")
    assert to_pair({**base, "winner_model_a": 0, "winner_model_b": 0, "winner_tie": 1}) == (None, "tie")
    assert "exactly one 1" in to_pair({**base, "winner_model_a": 1, "winner_model_b": 1, "winner_tie": 0})[1]


@pytest.mark.parametrize("record, problem", [
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "'prompt' is null or missing"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' is 3"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "user", "content": "x"}]}, "does not end with an assistant"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "prompt[0] is not a {role, content}"),
])
def test_bad_records_say_what_is_wrong(record, problem):
    pair, why = to_pair(record)
    assert pair is None and problem in why


def test_pair_masks_the_prompt_in_both_sides():
    ex = build_pair([1, 2, 3], [10, 11], [20, 21, 22], max_length=16)
    assert ex["input_ids"] == [1, 2, 3, 10, 11] and ex["labels"] == [IGNORE] * 3 + [10, 11]
    assert ex["rejected_input_ids"] == [1, 2, 3, 20, 21, 22] and ex["rejected_labels"] == [IGNORE] * 3 + [20, 21, 22]
    assert ex["length"] == 6 and not ex["truncated"] and ex["prompt_cut"] == 0


def test_truncation_cuts_the_prompt_first_then_the_answers():
    prompt = list(range(100, 130))  # 30 tokens
    p, c, r, cut = fit_pair(prompt, [1] * 5, [2] * 10, max_length=24)  # the longer answer fits beside 14 prompt tokens
    assert p == prompt[16:] and c == [1] * 5 and r == [2] * 10 and cut == 16
    p, c, r, cut = fit_pair(prompt, [1] * 40, [2] * 3, max_length=24)  # even an 8-token prompt leaves 16 for answers
    assert p == prompt[-MIN_PROMPT_TOKENS:] and c == [1] * 16 and r == [2] * 3 and cut == 30 - MIN_PROMPT_TOKENS
    ex = build_pair(prompt, [1] * 40, [2] * 3, max_length=24)
    assert ex["truncated"] and ex["trained_tokens_cut"] == 24 and len(ex["input_ids"]) == 24


def test_collate_keeps_each_pair_in_rows_i_and_b_plus_i():
    a, b = build_pair([1], [10], [20, 21], 8), build_pair([2, 3], [30, 31, 32], [40], 8)
    batch = collate_pairs([a, b], pad_id=0)
    assert batch["input_ids"] == [[1, 10, 0, 0, 0], [2, 3, 30, 31, 32], [1, 20, 21, 0, 0], [2, 3, 40, 0, 0]]
    assert batch["labels"][2] == [IGNORE, 20, 21, IGNORE, IGNORE]
    assert batch["attention_mask"][3] == [1, 1, 1, 0, 0]


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE, IGNORE], [IGNORE, 1, 2, 7, 9, 10],
                           [IGNORE, IGNORE, 5, 6, 8, IGNORE], [IGNORE, 1, 2, 3, IGNORE, IGNORE]])
    return logits, labels


def _independent_logps(logits, labels):
    """Sum over labelled positions of log softmax, written as explicit loops over rows and positions."""
    out, counts = [], []
    for row in range(labels.shape[0]):
        total, n = 0.0, 0
        for t in range(1, labels.shape[1]):
            if labels[row, t] != IGNORE:
                z = logits[row, t - 1]
                total = total + z[labels[row, t]] - torch.logsumexp(z, 0)
                n += 1
        out.append(total)
        counts.append(n)
    return torch.stack(out), counts


def test_sequence_logps_equal_a_loop_over_tokens():
    logits, labels = _batch()
    got, counts = pl.sequence_logps(logits, labels)
    want, want_counts = _independent_logps(logits, labels)
    torch.testing.assert_close(got, want.to(got.dtype))
    assert counts.tolist() == want_counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logps_and_gradients_equal_the_full_log_softmax(dtype, monkeypatch):
    """Chunks of 3 positions (a ragged last one per row) over a sliced, non-contiguous view of bf16 or fp32
    logits: values and gradients equal those of one full fp32 log-softmax, and the gradient keeps the logits'
    dtype (no fp32 copy of the batch's logits)."""
    monkeypatch.setattr(pl, "LOGIT_CHUNK", 3 * 50)
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 50, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (4, 9))
    labels[:, :3], labels[1, 5:] = IGNORE, IGNORE
    weights = torch.randn(4)
    got, counts = pl.sequence_logps(logits, labels)
    (got * weights).sum().backward()
    ours, logits.grad = logits.grad, None
    shifted = labels[:, 1:]
    full = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want = (full * (shifted != IGNORE)).sum(-1)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ours.dtype == dtype and counts.tolist() == [6, 2, 6, 6]
    torch.testing.assert_close(ours.float(), logits.grad.float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-3)
    assert ours[:, -1].abs().sum() == 0 and ours[1, 4:].abs().sum() == 0  # unscored positions get no gradient


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_loss_and_gradients_equal_the_published_formula(eps):
    beta = 0.1
    logits, labels = _batch()
    reference = torch.tensor([-3.0, -9.0, -4.0, -6.0], dtype=torch.float64)
    policy, _ = pl.sequence_logps(logits, labels)
    terms = pl.dpo(policy, reference, beta, eps)
    ours = terms.losses.mean()
    (ours_grad,) = torch.autograd.grad(ours, logits)
    # Independent: the probability ratios themselves, sigma(x) = 1 / (1 + e^-x).
    logp, _ = _independent_logps(logits, labels)
    ratio_w, ratio_l = torch.exp(logp[:2] - reference[:2]), torch.exp(logp[2:] - reference[2:])
    m = beta * torch.log(ratio_w / ratio_l)
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    want = (-(1 - eps) * torch.log(sig(m)) - eps * torch.log(sig(-m))).mean()
    (want_grad,) = torch.autograd.grad(want, logits)
    assert ours.item() == pytest.approx(want.item(), rel=1e-6)  # the losses compute in fp32, as on a model's logits
    torch.testing.assert_close(ours_grad, want_grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(terms.chosen_rewards, beta * (logp[:2] - reference[:2]).detach())


def test_orpo_loss_and_gradients_equal_the_published_formula():
    lam = 0.25
    logits, labels = _batch(1)
    policy, counts = pl.sequence_logps(logits, labels)
    ours = pl.orpo(policy, counts, lam).losses.mean()
    (ours_grad,) = torch.autograd.grad(ours, logits)
    logp, n = _independent_logps(logits, labels)
    p = torch.exp(logp / torch.tensor(n, dtype=torch.float64))  # mean per-token probability (geometric)
    odds = p / (1 - p)
    want = (-torch.log(p[:2]) + lam * torch.log(1 + odds[2:] / odds[:2])).mean()  # -log sigma(log(odds_w/odds_l))
    (want_grad,) = torch.autograd.grad(want, logits)
    assert ours.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(ours_grad, want_grad, rtol=1e-4, atol=1e-7)


def test_simpo_loss_equals_the_published_formula():
    beta, gamma = 2.0, 0.5
    logits, labels = _batch(2)
    policy, counts = pl.sequence_logps(logits, labels)
    ours = pl.simpo(policy, counts, beta, gamma).losses
    logp, n = _independent_logps(logits, labels)
    avg = logp / torch.tensor(n, dtype=torch.float64)
    want = torch.log(1 + torch.exp(-(beta * avg[:2] - beta * avg[2:] - gamma)))
    torch.testing.assert_close(ours, want.detach().to(ours.dtype))


def test_pair_metrics_count_pairs_whose_chosen_reward_is_higher():
    terms = pl.PairTerms(torch.zeros(3), torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.0, 0.0, 0.5]))
    m = pl.pair_metrics(terms)
    assert m["reward_accuracy"] == 1 and m["reward_margin"] == pytest.approx(0.0)
    assert math.isclose(m["chosen_reward"], 0.5) and m["rejected_reward"] == 0.5
