"""The generation formats (alpaca, messages, sharegpt, text, qa, multiple_choice): what a record must hold,
and how it is rendered (the tokenizer's chat template) into prompt and answer segments, tokenized, capped,
masked and cut at data.max_length. Pure functions on plain values, tested with sentinel ids; `Encoder` wires
them to a real tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from qlora.config import DataSection
from qlora.data.batches import IGNORE
from qlora.errors import DataError

REQUIRED_COLUMNS = {"alpaca": ("instruction", "output"), "messages": ("messages",),
                    "sharegpt": ("conversations",), "text": ("text",), "qa": ("question", "answer"),
                    "multiple_choice": ("question", "choices", "answer")}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
TOOL_ROLES = ("function_call", "observation", "tool", "function")  # LLaMA-Factory / glaive tool-calling turns
# The Alpaca prompt, used when the tokenizer has no chat template.
ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")

Segment = tuple[str, bool]         # (text, trained on)
IdSegment = tuple[list[int], bool]  # (token ids, trained on)


def detect_format(columns: Sequence[str]) -> str:
    for fmt in ("messages", "sharegpt", "alpaca", "multiple_choice", "qa", "text"):
        if all(c in columns for c in REQUIRED_COLUMNS[fmt]):
            return fmt
    raise DataError(f"cannot tell the data format from the columns {sorted(columns)}",
                    "set data.format (alpaca needs instruction+output, messages needs messages, sharegpt needs "
                    "conversations, qa needs question+answer, multiple_choice needs question+choices+answer, "
                    "text needs text)")


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    """A multiple-choice question as one instruction: the question, lettered choices, what to answer."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer with the letter of the correct choice."


def answer_letter(answer, n_choices: int) -> str:
    """The answer of a multiple-choice record as a letter: given as a letter ("B") or a 0-based index (1)."""
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is neither a letter nor an index")
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        index = LETTERS.index(answer.strip().upper())
    else:
        raise ValueError(f"answer {answer!r} is neither a letter nor an index")
    if not 0 <= index < n_choices:
        raise ValueError(f"answer {answer!r} names no choice (there are {n_choices})")
    return LETTERS[index]


def as_alpaca(record: dict, fmt: str) -> dict:
    """qa and multiple_choice records mapped onto alpaca columns (rendered and masked the same way)."""
    if fmt == "qa":
        return {"instruction": record["question"], "input": "", "output": record["answer"]}
    if fmt == "multiple_choice":
        return {"instruction": choice_prompt(record["question"], record["choices"]), "input": "",
                "output": answer_letter(record["answer"], len(record["choices"]))}
    raise ValueError(fmt)


def cap_segments(segments: Sequence[IdSegment], max_source: Optional[int], max_target: Optional[int]) -> list[IdSegment]:
    """QLoRA's source_max_len / target_max_len, per segment: a prompt segment keeps its LAST max_source
    tokens (the end carries the generation prompt next to the answer), an answer segment its FIRST
    max_target tokens. None leaves a kind uncapped."""
    out = []
    for ids, trained in segments:
        cap = max_target if trained else max_source
        if cap is not None and len(ids) > cap:
            ids = ids[:cap] if trained else ids[len(ids) - cap:]
        out.append((list(ids), trained))
    return out


def to_messages(record: dict, fmt: str, system_prompt: Optional[str] = None) -> list[dict]:
    """A record as chat messages [{role, content}] (alpaca, messages and sharegpt formats)."""
    if fmt == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + msgs
    if fmt == "messages":
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if fmt == "sharegpt":
        out = []
        for turn in record["conversations"]:
            role = SHAREGPT_ROLES.get(turn.get("from"))
            if role is None:
                raise DataError(f"sharegpt turn has an unknown 'from': {turn.get('from')!r}",
                                f"use one of {sorted(SHAREGPT_ROLES)}")
            out.append({"role": role, "content": turn["value"]})
        return out
    raise ValueError(fmt)


def render_segments(messages: list[dict], render: Callable[[list[dict], bool], str]) -> list[Segment]:
    """Split a chat rendering into prompt and assistant segments.

    `render(messages, add_generation_prompt)` is the chat template. Each assistant message's text is the
    difference between rendering the conversation through it and rendering up to its generation prompt,
    so whatever the template puts around turns lands in the right segment.
    """
    segments: list[Segment] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[:i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template does not render conversations as growing prefixes",
                            "use a template whose rendering of a longer conversation extends the shorter one")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    if not segments:
        raise DataError("a conversation has no assistant message to learn from",
                        "every record needs at least one assistant (gpt) turn")
    return [(t, trained) for t, trained in segments if t]


def build_example(segments: Sequence[IdSegment], max_length: int, train_on_prompt: bool = False) -> dict:
    """Concatenate id segments, label the trained ones, cut at max_length.

    Returns input_ids, labels (IGNORE where not trained), the untruncated `length` and `truncated`.
    """
    ids: list[int] = []
    labels: list[int] = []
    for seg_ids, trained in segments:
        ids += seg_ids
        labels += seg_ids if (trained or train_on_prompt) else [IGNORE] * len(seg_ids)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "length": len(ids),
            "truncated": len(ids) > max_length,
            # Trained tokens the cut removes (what truncation costs the loss, reported by --dry-run).
            "trained_tokens_cut": sum(t != IGNORE for t in labels[max_length:])}


RECORD_SHAPES = {"alpaca": "string instruction and output (input optional)",
                 "qa": "string question and answer",
                 "multiple_choice": "string question, choices (a list of at least 2 strings) and answer (a letter or "
                                    "a 0-based index of a choice)",
                 "messages": "messages: a list of {role, content} with string values",
                 "sharegpt": "conversations: a list of {from, value} with string values and 'from' one of "
                             + "/".join(SHAREGPT_ROLES),
                 "text": "a string text"}


def record_problem(record: dict, fmt: str) -> Optional[str]:
    """What is wrong with one record's values for `fmt` (None if nothing): nulls and wrong types that
    would otherwise surface as a TypeError deep inside tokenization."""
    def not_str(key, value):
        return f"'{key}' is null or missing" if value is None else f"'{key}' is {type(value).__name__}, not a string"

    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                return not_str(key, record.get(key))
        if record.get("input") is not None and not isinstance(record["input"], str):
            return not_str("input", record["input"])
        return None
    if fmt == "text":
        return None if isinstance(record.get("text"), str) else not_str("text", record.get("text"))
    if fmt == "qa":
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str):
                return not_str(key, record.get(key))
        return None
    if fmt == "multiple_choice":
        choices = record.get("choices")
        if not isinstance(record.get("question"), str):
            return not_str("question", record.get("question"))
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            return f"'choices' is {repr(choices)[:60]}, not a list of at least 2 strings"
        if len(choices) > len(LETTERS):
            return f"'choices' has {len(choices)} entries; at most {len(LETTERS)} can be lettered"
        try:
            answer_letter(record.get("answer"), len(choices))
        except ValueError as e:
            return str(e)
        return None
    column, fields = {"messages": ("messages", ("role", "content")),
                      "sharegpt": ("conversations", ("from", "value"))}[fmt]
    turns = record.get(column)
    if not isinstance(turns, list) or not turns:
        return f"'{column}' is {'null or missing' if turns is None else repr(turns)[:60]}, not a non-empty list"
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"{column}[{j}] is a {type(turn).__name__}, not an object"
        for key in fields:
            if not isinstance(turn.get(key), str):
                return f"{column}[{j}]." + not_str(key, turn.get(key))
        if fmt == "sharegpt" and turn["from"] not in SHAREGPT_ROLES:
            if turn["from"] in TOOL_ROLES:
                # Tool calls need the record's `tools` rendered into the prompt by a tool-aware template and the
                # call/result turns placed as that template expects; guessing would train on a wrong format.
                return (f"{column}[{j}].from is {turn['from']!r}: tool-calling data (function_call/observation "
                        "turns, a `tools` field) is not supported")
            return f"{column}[{j}].from is {turn['from']!r}, not one of {'/'.join(SHAREGPT_ROLES)}"
    return None


@dataclass
class Encoder:
    """Turns records into examples with one tokenizer and format."""
    tokenizer: object
    fmt: str
    cfg: DataSection

    def segments(self, record: dict) -> list[Segment]:
        tok = self.tokenizer
        fmt = self.fmt
        if fmt in ("qa", "multiple_choice"):
            record, fmt = as_alpaca(record, fmt), "alpaca"
        if fmt == "text":
            return [(record["text"] + (tok.eos_token or ""), True)]
        if fmt == "alpaca" and not tok.chat_template:
            ctx = ", paired with an input that provides further context" if record.get("input") else ""
            inp = f"### Input:\n{record['input']}\n\n" if record.get("input") else ""
            prompt = ALPACA_PROMPT.format(ctx=ctx, instruction=record["instruction"], input=inp)
            return [(prompt, False), (record["output"] + (tok.eos_token or ""), True)]
        if not tok.chat_template:
            raise DataError(f"data.format={self.fmt} renders chat messages, but the tokenizer has no chat template",
                            "use a chat/instruct model's tokenizer, or data.format=alpaca / text")
        messages = to_messages(record, fmt, self.cfg.system_prompt)
        return render_segments(messages, lambda m, gen: tok.apply_chat_template(
            m, tokenize=False, add_generation_prompt=gen))

    def encode(self, record: dict) -> dict:
        return self.encode_many([record])[0]

    def encode_many(self, records: Sequence[dict], held_out: Optional[Sequence[bool]] = None) -> list[dict]:
        """Examples of `records`, their segments tokenized in one batched call (the fast tokenizer's batch
        path gives each text the ids encode() gives it). `held_out[i]` false leaves out what only held-out
        examples need (the prompt to generate from, the decoded reference answer): training never reads it."""
        held_out = [True] * len(records) if held_out is None else held_out
        segments = [self.segments(r) for r in records]
        texts = [text for segs in segments for text, _ in segs]
        ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        return [self._example(segs, [(next(ids), trained) for _, trained in segs], full)
                for segs, full in zip(segments, held_out)]

    def _example(self, segs: list[Segment], raw: list[IdSegment], held_out: bool) -> dict:
        ids = cap_segments(raw, self.cfg.max_source_length, self.cfg.max_target_length)
        ex = build_example(ids, self.cfg.max_length, self.cfg.train_on_prompt)
        if held_out:
            # What generation-based evaluation needs: the prompt before the last answer (as the model sees it),
            # and that answer in full (the reference is never cut by max_target_length).
            last = max(i for i, (_, trained) in enumerate(segs) if trained)
            ex["prompt_ids"] = [t for seg_ids, _ in ids[:last] for t in seg_ids][-self.cfg.max_length:]
            ex["reference"] = self.tokenizer.decode(raw[last][0], skip_special_tokens=True).strip()
        return ex
