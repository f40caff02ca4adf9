"""The preference format (model.task=preference: DPO, ORPO, SimPO): a prompt with a chosen and a rejected
answer. Three record layouts are read:
- prompt / chosen / rejected as strings, or the prompt as chat messages (TRL's "explicit prompt" layout);
- chosen / rejected as whole conversations that contain the prompt (UltraFeedback-binarized: the shared
  leading turns are the prompt, each last assistant turn the answer);
- the LMSYS Chatbot Arena layout (prompt, response_a, response_b, winner_model_a / winner_model_b /
  winner_tie): the winner is chosen, ties carry no preference and are dropped (counted).

A pair becomes one example: prompt + chosen and prompt + rejected token ids, the prompt masked in both labels.
When the longer side does not fit data.max_length the prompt is cut first (its oldest tokens), then the
answers (their ends). Pure functions on plain values, tested with sentinel ids.
"""
from __future__ import annotations

from typing import Optional, Sequence

from qlora.config import DataSection
from qlora.data.batches import IGNORE, collate
from qlora.data.classification import PAIRWISE_COLUMNS, flag, parse_turns
from qlora.data.formats import render_segments
from qlora.errors import DataError

TIE = -2  # the meta `label` of an arena tie: encoded as a pair without answers, dropped and counted
MIN_PROMPT_TOKENS = 8  # a cut prompt keeps at least this many of its last tokens (the turn markers and the question's end)


def layout_of(record: dict) -> str:
    if all(c in record for c in PAIRWISE_COLUMNS):
        return "arena"
    if isinstance(record.get("chosen"), list) and "prompt" not in record:
        return "conversations"
    return "explicit"


def _messages(value, column: str) -> tuple[Optional[list[dict]], Optional[str]]:
    """A column as chat messages: a string is one user turn; a list must be {role, content} string pairs."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}], None
    if not isinstance(value, list) or not value:
        return None, f"'{column}' is {'null or missing' if value is None else repr(value)[:60]}, not a string or messages"
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None, f"{column}[{j}] is not a {{role, content}} message with string values"
    return [{"role": m["role"], "content": m["content"]} for m in value], None


def _answer(value, column: str) -> tuple[Optional[str], Optional[str]]:
    """An answer column: a string, or messages ending in an assistant turn (its content is the answer)."""
    if isinstance(value, str):
        return value, None
    msgs, problem = _messages(value, column)
    if problem:
        return None, problem
    if msgs[-1]["role"] != "assistant":
        return None, f"'{column}' does not end with an assistant message"
    return msgs[-1]["content"], None


def to_pair(record: dict) -> tuple[Optional[tuple[list[dict], str, str]], Optional[str]]:
    """(prompt messages, chosen answer, rejected answer), or (None, why the record is unusable). An arena tie
    gives (None, "tie")."""
    layout = layout_of(record)
    if layout == "arena":
        flags = [flag(record.get(c)) for c in PAIRWISE_COLUMNS[3:]]
        if None in flags or sum(flags) != 1:
            return None, "the winner flags are not exactly one 1 and two 0s"
        if flags[2]:
            return None, "tie"
        turns = [parse_turns(record.get(c)) for c in PAIRWISE_COLUMNS[:3]]
        if None in turns:
            return None, "'prompt', 'response_a' and 'response_b' must be strings"
        # Multi-turn arena records: the prompt's turns interleaved with model A's, the last turn of each compared.
        (prompt, a, b), won = turns, 0 if flags[0] else 1
        history = [m for p, r in zip(prompt[:-1], a[:-1]) for m in ({"role": "user", "content": p},
                                                                     {"role": "assistant", "content": r})]
        pair = (a[-1], b[-1]) if won == 0 else (b[-1], a[-1])
        return (history + [{"role": "user", "content": prompt[-1]}], *pair), None
    if layout == "conversations":
        chosen, problem = _messages(record.get("chosen"), "chosen")
        rejected, problem = (None, problem) if problem else _messages(record.get("rejected"), "rejected")
        if problem:
            return None, problem
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            return None, "'chosen' and 'rejected' must each end with an assistant message"
        if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
            return None, "'chosen' and 'rejected' must share the same turns before their last assistant message"
        return (chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]), None
    prompt, problem = _messages(record.get("prompt"), "prompt")
    if problem:
        return None, problem
    chosen, problem = _answer(record.get("chosen"), "chosen")
    rejected, problem = (None, problem) if problem else _answer(record.get("rejected"), "rejected")
    if problem:
        return None, problem
    return (prompt, chosen, rejected), None


def record_problem(record: dict) -> Optional[str]:
    """Why a record cannot be a pair (None if it can; an arena tie can: it is dropped and counted later)."""
    problem = to_pair(record)[1]
    return None if problem == "tie" else problem


def required_columns(columns: Sequence[str]) -> tuple[str, ...]:
    """The columns a source of this layout needs (the arena columns, else chosen and rejected)."""
    return PAIRWISE_COLUMNS if all(c in columns for c in PAIRWISE_COLUMNS) else ("chosen", "rejected")


RECORD_SHAPE = ("string (or chat-message) prompt, chosen and rejected; or chosen and rejected conversations sharing "
                "every turn before their last assistant message; or the Chatbot Arena columns "
                + ", ".join(PAIRWISE_COLUMNS))


class PairEncoder:
    """Records -> preference examples with one tokenizer: the prompt rendered by the chat template up to its
    generation prompt, each answer as what the template adds for an assistant turn (its end-of-turn marker
    included, so the model learns to stop)."""

    def __init__(self, tokenizer, cfg: DataSection):
        if not tokenizer.chat_template:
            raise DataError("data.format=preference renders chat messages, but the tokenizer has no chat template",
                            "use a chat/instruct model's tokenizer (preference tuning follows instruction tuning)")
        self.tokenizer, self.cfg = tokenizer, cfg

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def texts(self, record: dict) -> tuple[str, str, str, bool]:
        """(prompt, chosen, rejected) as rendered text, and whether the record is a tie."""
        pair, problem = to_pair(record)
        if problem == "tie":
            return "", "", "", True
        prompt, chosen, rejected = pair
        if self.cfg.system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": self.cfg.system_prompt}, *prompt]
        sides = []
        for answer in (chosen, rejected):
            segments = render_segments(prompt + [{"role": "assistant", "content": answer}], self._render)
            sides.append(segments[-1][0] if segments[-1][1] else "")
        return self._render(prompt, True), *sides, False

    def encode_many(self, records: Sequence[dict], held_out: Optional[Sequence[bool]] = None) -> list[dict]:
        held_out = [True] * len(records) if held_out is None else held_out
        rendered = [self.texts(r) for r in records]
        flat = [t for p, c, r, _ in rendered for t in (p, c, r)]
        ids = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        out = []
        for i, ((*_, tie), full) in enumerate(zip(rendered, held_out)):
            prompt, chosen, rejected = ids[3 * i: 3 * i + 3]
            e = build_pair(prompt, chosen, rejected, self.cfg.max_length)
            e["label"] = TIE if tie else -1
            if full:  # what generation needs: the prompt as the model sees it, the chosen answer as the reference
                e["prompt_ids"] = list(prompt[-self.cfg.max_length:])
                e["reference"] = self.tokenizer.decode(chosen, skip_special_tokens=True).strip()
            out.append(e)
        return out


def fit_pair(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int],
             max_length: int) -> tuple[list[int], list[int], list[int], int]:
    """Cut a pair to max_length: the prompt loses its first tokens until the longer answer fits (down to
    MIN_PROMPT_TOKENS), then the answers lose their ends. Returns the three parts and the prompt tokens cut."""
    longest = max(len(chosen), len(rejected))
    keep_prompt = max(min(len(prompt), MIN_PROMPT_TOKENS, max_length - 1), max_length - longest)
    keep_prompt = min(keep_prompt, len(prompt))
    cut = len(prompt) - keep_prompt
    room = max_length - keep_prompt
    return list(prompt[cut:]), list(chosen[:room]), list(rejected[:room]), cut


def build_pair(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], max_length: int) -> dict:
    """One preference example: input_ids/labels (prompt + chosen) and rejected_input_ids/rejected_labels
    (prompt + rejected), the prompt masked; `length` before cutting, `truncated`, and `prompt_cut` tokens."""
    length = len(prompt) + max(len(chosen), len(rejected))
    p, c, r, cut = fit_pair(prompt, chosen, rejected, max_length)
    mask = [IGNORE] * len(p)
    return {"input_ids": p + c, "labels": mask + c, "rejected_input_ids": p + r, "rejected_labels": mask + r,
            "length": length, "truncated": length > max_length, "prompt_cut": cut,
            "trained_tokens_cut": (len(chosen) - len(c)) + (len(rejected) - len(r))}


def collate_pairs(examples: Sequence[dict], pad_id: int) -> dict:
    """A micro-batch of pairs as 2B right-padded rows (batches.collate): the chosen sides first, then the
    rejected sides in the same order, so row i and row B + i are one pair (both always in the same micro-batch)."""
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples] + [
        {"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
    return collate(rows, pad_id)
