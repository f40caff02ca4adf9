"""What a task (model.task) decides, behind one interface: the transformers class and peft task type, what a
loaded base needs from the tokenizer, the training loss, the held-out metrics, the --dry-run data lines, and
what an adapter predicts. Everything else (data pipeline, strategies, checkpoints, tracking) is task-free and
asks `for_config(cfg)`.
"""
from __future__ import annotations

from typing import Callable

from qlora import batching, classification, evaluation, mfu, multiple_choice, preference
from qlora.config import JobConfig
from qlora.data import IGNORE, Encoder, batched, sample_segments
from qlora.data import classification as class_formats
from qlora.data.preference import collate_pairs
from qlora.errors import ConfigError


class CausalLM:
    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    can_generate = True
    loss: Callable = staticmethod(evaluation.token_losses)  # (summed loss, count) of a batch's logits, labels

    def auto_class(self, cfg: JobConfig):
        """The transformers Auto class and the extra from_pretrained / from_config kwargs."""
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM, {}

    def fit_base(self, model, pad_token_id: int | None) -> None:
        """What a loaded base needs from the tokenizer."""

    def train_batch(self, items: list[dict], pad_id: int, cfg: JobConfig) -> dict:
        """A training micro-batch as lists (batching.train_batch: padded examples or packed rows)."""
        return batching.train_batch(items, pad_id, cfg.data.packing, cfg.data.max_length)

    def forward_loss(self, model, inputs: dict, labels, cfg: JobConfig):
        """(summed training loss, what it is averaged over) of one micro-batch, from the model's logits
        (train.fused_cross_entropy computes it from hidden states instead: kernels.forward_loss)."""
        return self.loss(model(**inputs).logits, labels)

    def count_flops(self, flops: mfu.FlopCounter, items: list[dict], cfg: JobConfig) -> None:
        """One micro-batch's useful FLOPs: a forward and backward pass per example (attention is per example)."""
        flops.add([n for e in items for n in mfu.example_lengths(e)])

    def check_data(self, cfg: JobConfig, fmt: str, meta: dict, where: dict) -> None:
        """What the config asks of the prepared data, checked before it is written to the cache (`meta`: each
        split's per-example numbers, `where`: each split's source)."""
        if fmt == "text" and cfg.evaluation.generate:
            raise ConfigError(f"data.format is text{' (detected from the columns)' if cfg.data.format == 'auto' else ''}"
                              ": a text record has no prompt/answer split, so evaluation.generate has nothing to score",
                              "set evaluation.generate=false (the held-out loss and perplexity are the metrics)")

    def resolve(self, cfg: JobConfig, data) -> JobConfig:
        """`cfg` with what the prepared data decides (a classifier's number of classes)."""
        return cfg

    def with_adapter(self, cfg: JobConfig, adapter_cfg: JobConfig) -> JobConfig:
        """`cfg` (an evaluate / generate job's own config) with what the trained adapter fixes."""
        return cfg

    def evaluate(self, model, examples: list[dict], tokenizer, cfg: JobConfig, ctx, mc_items: list | None = None,
                 predictions: list | None = None, state: dict | None = None) -> dict:
        """Held-out metrics over all ranks: loss, greedy answers' exact match, multiple-choice accuracy. `state`:
        a dict the caller keeps for one run's evaluations of one held-out set, for what a task can reuse between
        them (the preference task: the reference policy's log-probabilities)."""
        metrics = evaluation.eval_loss(model, examples, tokenizer.pad_token_id, cfg.evaluation.batch_size, ctx)
        if cfg.evaluation.generate:
            metrics.update(evaluation.exact_match(model, examples, tokenizer, cfg.evaluation, ctx, predictions))
        if mc_items:
            metrics.update(multiple_choice.accuracy(model, mc_items, tokenizer.pad_token_id,
                                                    cfg.evaluation.batch_size, ctx))
        return metrics

    def describe_evaluation(self, cfg: JobConfig, n_examples: int, n_choice_items: int = 0) -> str:
        """What evaluate() will compute, in words (the progress line before it runs)."""
        what = f"loss on {n_examples} examples"
        if cfg.evaluation.generate:
            what += f", greedy answers to {min(n_examples, cfg.evaluation.num_generate)}"
        return what + (f", {n_choice_items} multiple-choice questions" if n_choice_items else "")

    def describe_prediction(self, p: dict) -> str:
        """One record of predictions.jsonl for the console (ray_jobs.evaluate shows the first few)."""
        return f"  prompt: {p['prompt'][-120:]!r}\n  answer: {p['answer']!r}\n  reference: {p['reference']!r}"

    def data_lines(self, cfg: JobConfig, fmt: str, n_eval: int, s: dict) -> list[str]:
        """--dry-run's lines about the prepared data (`s`: its stats)."""
        lost = f"; {s['dropped_no_labels']} examples dropped (no trained token left)" if s["dropped_no_labels"] else ""
        return [_data_line(fmt, n_eval, s) + f" masked labels={s['masked_label_fraction']:.1%}",
                f"truncation at data.max_length={cfg.data.max_length}: {s['truncated_examples']} of {s['records']} "
                f"examples cut ({s['truncated_fraction']:.1%}); {s['trained_tokens_cut']:,} of "
                f"{s['trained_tokens'] + s['trained_tokens_cut']:,} trained tokens lost "
                f"({s['trained_tokens_cut_fraction']:.1%})" + lost]

    def example_report(self, cfg: JobConfig, data, tokenizer) -> tuple[list[str], dict]:
        """--dry-run's look at one training example, and the task's numbers for its JSON line."""
        s, first = data.stats, data.train[0]
        sample = sample_segments(data.examples[0], tokenizer)
        lines = ["one training example ([[...]] is trained on, the rest is masked out of the loss):",
                 "".join(f"[[{t}]]" if trained and not cfg.data.train_on_prompt else t for t, trained in sample),
                 f"  {'first packed row: ' if cfg.data.packing else ''}tokens={len(first['input_ids'])} "
                 f"trained={sum(t != IGNORE for t in first['labels'])}"]
        keys = ("masked_label_fraction", "truncated_examples", "trained_tokens", "trained_tokens_cut",
                "trained_tokens_cut_fraction")
        return lines, {**{k: s[k] for k in keys}, "packed_rows": s.get("packed_rows")}

    def predict(self, model, tokenizer, cfg: JobConfig, inputs: list, max_new_tokens: int) -> list[str]:
        """Greedy completions of prompts (plain texts), rendered as training rendered prompts."""
        device = next(model.parameters()).device
        out: list[str] = []
        for batch in batched([prompt_ids(tokenizer, cfg, p) for p in inputs], cfg.evaluation.batch_size):
            out += evaluation.generate(model, batch, tokenizer, max_new_tokens, device)
        return out


class SequenceClassifier(CausalLM):
    name = "sequence_classification"
    peft_task_type = "SEQ_CLS"
    can_generate = False
    loss = staticmethod(classification.losses)

    def auto_class(self, cfg: JobConfig):
        from transformers import AutoModelForSequenceClassification
        # num_labels is resolved from the data (resolve) before any model is built.
        return AutoModelForSequenceClassification, {"num_labels": cfg.model.num_labels or 2}

    def fit_base(self, model, pad_token_id: int | None) -> None:
        if pad_token_id is None:
            raise ValueError("load_base_model: a sequence_classification model needs the tokenizer's pad_token_id")
        model.config.pad_token_id = pad_token_id  # it pools the last token that is not padding

    def check_data(self, cfg, fmt, meta, where) -> None:
        classification.num_labels(cfg, meta, where)  # every label fits model.num_labels

    def resolve(self, cfg: JobConfig, data) -> JobConfig:
        """model.num_labels set (the largest label + 1 when unset), after checking every label fits it; saved
        with checkpoints, so the adapter knows its classes."""
        n = classification.num_labels(cfg, data.meta, data.where)
        return cfg.with_changes({"model.num_labels": n})

    def with_adapter(self, cfg, adapter_cfg):
        # The head's size is fixed by the adapter, not by the labels of the data evaluated now.
        return cfg if cfg.model.num_labels else cfg.with_changes({"model.num_labels": adapter_cfg.model.num_labels})

    def evaluate(self, model, examples, tokenizer, cfg, ctx, mc_items=None, predictions=None, state=None) -> dict:
        """Accuracy, log loss and eval_loss over all ranks; nothing to generate."""
        return classification.evaluate(model, examples, tokenizer.pad_token_id, cfg.evaluation.batch_size, ctx,
                                       predictions, cfg.data.eval_path or cfg.data.path)

    def describe_evaluation(self, cfg, n_examples, n_choice_items=0) -> str:
        return f"accuracy and log loss on {n_examples} examples" + (
            f", {n_choice_items} multiple-choice questions" if n_choice_items else "")

    def describe_prediction(self, p: dict) -> str:
        return f"  record {p['record']}: label {p['label']}, predicted {p['predicted']} (p={max(p['probabilities']):.3f})"

    def data_lines(self, cfg, fmt, n_eval, s) -> list[str]:
        # One label per example: truncation cuts text, never a trained token.
        return [_data_line(fmt, n_eval, s),
                f"truncation at data.max_length={cfg.data.max_length}: {s['truncated_examples']} of {s['records']} "
                f"inputs cut ({s['truncated_fraction']:.1%})"]

    def example_report(self, cfg, data, tokenizer) -> tuple[list[str], dict]:
        s, first = data.stats, data.train[0]
        sample = sample_segments(data.examples[0], tokenizer)
        return ([f"classes: {cfg.model.num_labels}; training labels: {s['label_counts']}",
                 f"one training example (label {first['label']}, {len(first['input_ids'])} tokens; the head reads "
                 f"the last one):\n{sample[0][0]}"],
                {"num_labels": cfg.model.num_labels, "label_counts": s["label_counts"]})

    def predict(self, model, tokenizer, cfg, inputs, max_new_tokens=0) -> list[dict]:
        """Predicted class and class probabilities. An input is a dict with the training data's input columns
        (data.text_column, or prompt/response_a/response_b), or a plain text."""
        records = [r if isinstance(r, dict) else {cfg.data.text_column: r} for r in inputs]
        for i, r in enumerate(records):
            problem = class_formats.record_problem({**r, cfg.data.label_column: 0, "winner_model_a": 1,
                                                    "winner_model_b": 0, "winner_tie": 0}, cfg.data.format, cfg.data)
            if problem:
                raise ConfigError(f"input {i + 1}: {problem}", "pass the columns the adapter was trained on")
        examples = [class_formats.encode_input(r, cfg.data.format, cfg.data, tokenizer) for r in records]
        probs = classification.probabilities(model, examples, tokenizer.pad_token_id, cfg.evaluation.batch_size,
                                             next(model.parameters()).device)
        return [{"predicted": max(range(len(p)), key=p.__getitem__), "probabilities": p} for p in probs]


class Preference(CausalLM):
    """Preference pairs (DPO, ORPO, SimPO): a causal LM trained on each pair's chosen and rejected answers."""
    name = "preference"

    def train_batch(self, items, pad_id, cfg) -> dict:
        batch = collate_pairs(items, pad_id)  # rows i and B + i are one pair
        batch["token_mask"] = batch["attention_mask"]
        return batch

    def forward_loss(self, model, inputs, labels, cfg):
        return preference.forward_loss(model, inputs, labels, cfg.preference)

    def count_flops(self, flops, items, cfg) -> None:
        sides = [len(e[k]) for e in items for k in ("input_ids", "rejected_input_ids")]
        flops.add(sides)
        if cfg.preference.loss in preference.NEEDS_REFERENCE:
            flops.add(sides, forward_only=True)  # the reference pass

    def evaluate(self, model, examples, tokenizer, cfg, ctx, mc_items=None, predictions=None, state=None) -> dict:
        """Reward accuracy, margin, rewards and log-probabilities of the held-out pairs; greedy answers to
        their prompts, scored against the chosen answers (exact_match). `state` keeps the reference policy's
        log-probabilities of the held-out pairs for the run's later evaluations."""
        metrics = preference.evaluate(model, examples, tokenizer.pad_token_id, cfg, ctx,
                                      None if state is None else state.setdefault("reference_logps", {}))
        if cfg.evaluation.generate:
            metrics.update(evaluation.exact_match(model, examples, tokenizer, cfg.evaluation, ctx, predictions))
        return metrics

    def describe_evaluation(self, cfg, n_examples, n_choice_items=0) -> str:
        what = f"{cfg.preference.loss} loss and rewards on {n_examples} pairs"
        if cfg.evaluation.generate:
            what += f", greedy answers to {min(n_examples, cfg.evaluation.num_generate)} prompts"
        return what

    def data_lines(self, cfg, fmt, n_eval, s) -> list[str]:
        ties = f"; {s['ties_dropped']} ties dropped (no preference)" if s.get("ties_dropped") else ""
        lost = f"; {s['dropped_no_labels']} pairs dropped (an answer lost every token)" if s["dropped_no_labels"] else ""
        return [_data_line(fmt, n_eval, s, "pair tokens (prompt + longer answer)") + ties,
                f"truncation at data.max_length={cfg.data.max_length}, prompt first: {s['truncated_examples']} of "
                f"{s['records']} pairs cut ({s['truncated_fraction']:.1%}); {s['trained_tokens_cut']:,} answer tokens "
                f"lost ({s['trained_tokens_cut_fraction']:.1%})" + lost]

    def example_report(self, cfg, data, tokenizer) -> tuple[list[str], dict]:
        s, first = data.stats, data.train[0]
        chosen = sample_segments(first, tokenizer)
        rejected = sample_segments({"input_ids": first["rejected_input_ids"], "labels": first["rejected_labels"]},
                                   tokenizer)
        lines = [f"one training pair ({cfg.preference.loss}; [[...]] is scored, the prompt is masked):",
                 "chosen:   " + "".join(f"[[{t}]]" if trained else t for t, trained in chosen),
                 "rejected: " + "".join(f"[[{t}]]" if trained else t for t, trained in rejected[-1:]),
                 f"  tokens: chosen {len(first['input_ids'])}, rejected {len(first['rejected_input_ids'])}; "
                 f"prompt tokens cut {first['prompt_cut']}"]
        keys = ("truncated_examples", "trained_tokens", "trained_tokens_cut", "trained_tokens_cut_fraction")
        return lines, {**{k: s[k] for k in keys}, "ties_dropped": s.get("ties_dropped", 0),
                       "loss": cfg.preference.loss, "beta": cfg.preference.beta}


TASKS = {t.name: t for t in (CausalLM(), SequenceClassifier(), Preference())}


def for_config(cfg: JobConfig) -> CausalLM:
    return TASKS[cfg.model.task]


def prompt_ids(tokenizer, cfg: JobConfig, text: str) -> list[int]:
    """Token ids of `text` as a user turn, rendered exactly as training rendered prompts."""
    if cfg.data.format == "text":
        return tokenizer.encode(text, add_special_tokens=False)
    record = {"instruction": text, "input": "", "output": "x"}
    prompt = Encoder(tokenizer, "alpaca", cfg.data).segments(record)[0][0]
    return tokenizer.encode(prompt, add_special_tokens=False)


def _data_line(fmt: str, n_eval: int, s: dict, tokens: str = "tokens") -> str:
    return (f"data: format={fmt} train={s['records']} eval={n_eval} {tokens} p50={s['token_length_p50']} "
            f"p95={s['token_length_p95']} max={s['token_length_max']} truncated={s['truncated_fraction']:.1%}")
