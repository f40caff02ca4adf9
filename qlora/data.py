"""Records -> token ids with loss masks.

The pure core (`build_example`, `collate`, `pack_examples`, `collate_packed`, `length_grouped_order`,
`render_segments`, `to_messages`, `nested_subset`) works on plain lists so it is tested with sentinel ids;
`prepare` wires it to files and a real tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from qlora.config import CLASSIFICATION_FORMATS, DataSection
from qlora.errors import DataError

IGNORE = -100
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


# --- pure functions ----------------------------------------------------------------------------------

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


def collate(examples: Sequence[dict], pad_id: int, pad_left: bool = False) -> dict:
    """Pad a batch to its longest example. Returns plain lists (torch tensors are made by the caller)."""
    width = max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": [], "labels": [], "attention_mask": []}
    for e in examples:
        n = len(e["input_ids"])
        pad = width - n
        for key, value, fill in (("input_ids", e["input_ids"], pad_id), ("labels", e.get("labels", []), IGNORE),
                                 ("attention_mask", [1] * n, 0)):
            out[key].append([fill] * pad + list(value) if pad_left else list(value) + [fill] * pad)
    if not any(e.get("labels") for e in examples):
        del out["labels"]
    if all("label" in e for e in examples):  # sequence classification: one class per example
        out["labels"] = [e["label"] for e in examples]
    return out


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Pack tokenized examples into rows of at most max_length tokens (best-fit decreasing: longest
    first, each into the fullest row it still fits; ties by position, so the result is deterministic).

    A row concatenates whole examples. `position_ids` restart at 0 for every example, which is how the
    model's attention mask keeps examples apart (transformers builds a block-diagonal causal mask from
    restarting positions when no attention_mask is given). Each example's first label is masked: that
    token would otherwise be predicted from the previous example's last token; unpacked, it is never
    predicted either, so a packed row has exactly the loss terms of its examples run alone.
    """
    import bisect
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []          # example indices per row
    free: list[tuple[int, int]] = []    # (free tokens, row), sorted: the first fit is the fullest row
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, row = free.pop(j)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (room - n, row))
    out = []
    for members in rows:
        members.sort()  # examples in dataset order inside a row
        row = {"input_ids": [], "labels": [], "position_ids": [], "example_lengths": []}
        for i in members:
            e = examples[i]
            n = len(e["input_ids"])
            row["input_ids"] += e["input_ids"]
            row["labels"] += [IGNORE] + list(e["labels"][1:])
            row["position_ids"] += list(range(n))
            row["example_lengths"].append(n)
        out.append(row)
    return out


def collate_packed(rows: Sequence[dict], pad_id: int, width: Optional[int] = None) -> dict:
    """Right-pad packed rows to the longest, or to `width` (compiled layers: one shape every step, no
    recompiling). No attention_mask on purpose: the model must see only position_ids to detect the packed
    examples. Padding gets its own positions from 0, so it is one more separate sequence that no real token
    attends to; `token_mask` marks real tokens (for counting)."""
    longest = max(len(r["input_ids"]) for r in rows)
    if width is not None and width < longest:
        raise ValueError(f"a packed row of {longest} tokens does not fit width {width}")
    width = width or longest
    out = {"input_ids": [], "labels": [], "position_ids": [], "token_mask": []}
    for r in rows:
        n = len(r["input_ids"])
        pad = width - n
        out["input_ids"].append(list(r["input_ids"]) + [pad_id] * pad)
        out["labels"].append(list(r["labels"]) + [IGNORE] * pad)
        out["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
        out["token_mask"].append([1] * n + [0] * pad)
    return out


def length_grouped_order(lengths: Sequence[int], seed: int, group: int) -> list[int]:
    """A seeded shuffle, then each run of `group` indices sorted longest first: consecutive batches cut
    from it hold examples of similar length. With `group` a multiple of the batch size times the world
    size, every micro-batch (on every rank) comes from one sorted run."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    out: list[int] = []
    for start in range(0, len(order), group):
        out += sorted(order[start:start + group], key=lambda i: -lengths[i])
    return out


def padding_efficiency(batches: Sequence[Sequence[int]]) -> float:
    """Fraction of real (non-pad) tokens when each batch of lengths is padded to its longest."""
    real = sum(sum(b) for b in batches)
    total = sum(max(b) * len(b) for b in batches if b)
    return real / max(total, 1)


def nested_subset(n: int, seed: int, fraction: float = 1.0, max_samples: Optional[int] = None) -> list[int]:
    """Indices of a seeded subset; with one seed, a smaller subset is a prefix of (inside) a larger one."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = max(1, round(n * fraction)) if n else 0
    if max_samples is not None:
        k = min(k, max_samples)
    return order[:k]


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices: a seeded shuffle, the first ceil-ish fraction held out (at least 1)."""
    order = list(range(n))
    random.Random(seed ^ 0x5EED).shuffle(order)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


# --- files and tokenizer -----------------------------------------------------------------------------

def read_records(path: str, key: str = "data.path") -> list[dict]:
    """Rows of a local json/jsonl/csv/parquet file, through `datasets`. `key` names the config key in errors."""
    import datasets
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{key}: data file {path} does not exist", f"check {key} (relative paths start at the "
                        "folder the job runs in)")
    kind = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}.get(p.suffix)
    if kind is None:
        raise DataError(f"data file {path} has an unknown extension {p.suffix!r}",
                        "use a .json, .jsonl, .csv, .tsv or .parquet file")
    size = p.stat().st_size
    if size == 0 or (size < 1 << 20 and not p.read_bytes().strip()):
        raise DataError(f"{key}: data file {path} is empty" + (" (only blank lines)" if size else ""),
                        f"point {key} at a file with records")
    kwargs = {"delimiter": "\t"} if p.suffix == ".tsv" else {}
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors in several exception types
        cause = e.__cause__ or e
        raise DataError(f"data file {path} could not be parsed as {kind}: {type(cause).__name__}: {cause}",
                        f"fix the file so it is valid {kind} (one record per line for .jsonl)") from None
    if len(ds) == 0:
        raise DataError(f"{key}: data file {path} holds no records", f"point {key} at a file with records")
    return ds.to_list()


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


def check_records(records: list[dict], fmt: str, path: str) -> None:
    bad = [(i, p) for i, r in enumerate(records) if (p := record_problem(r, fmt))]
    if bad:
        i, problem = bad[0]
        more = f" (and {len(bad) - 1} more records)" if len(bad) > 1 else ""
        tools = (" (tool-calling data: keep only records whose turns are human/gpt/system, or convert them)"
                 if "tool-calling" in problem else "")
        raise DataError(f"data file {path}, record {i + 1}: {problem}{more}",
                        f"fix or drop the record(s): every {fmt} record needs {RECORD_SHAPES[fmt]}{tools}")


def check_columns(records: list[dict], fmt: str, path: str) -> None:
    need = REQUIRED_COLUMNS[fmt]
    missing = [c for c in need if c not in records[0]]
    if missing:
        raise DataError(f"data file {path} lacks column(s) {missing} needed by data.format={fmt} "
                        f"(it has {sorted(records[0])})", f"rename the columns, or set data.format to match the file")


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
        segs = self.segments(record)
        raw = [(self.tokenizer.encode(text, add_special_tokens=False), trained) for text, trained in segs]
        ids = cap_segments(raw, self.cfg.max_source_length, self.cfg.max_target_length)
        ex = build_example(ids, self.cfg.max_length, self.cfg.train_on_prompt)
        # What generation-based evaluation needs: the prompt before the last answer (as the model sees it),
        # and that answer in full (the reference is never cut by max_target_length).
        last = max(i for i, (_, trained) in enumerate(segs) if trained)
        ex["prompt_ids"] = [t for seg_ids, _ in ids[:last] for t in seg_ids][-self.cfg.max_length:]
        ex["reference"] = self.tokenizer.decode(raw[last][0], skip_special_tokens=True).strip()
        return ex


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    fmt: str
    stats: dict = field(default_factory=dict)
    data_hash: str = ""
    sample_segments: list[Segment] = field(default_factory=list)


def prepare(cfg: DataSection, tokenizer) -> PreparedData:
    """Read, split, subset, encode. Raises DataError for anything a user must fix."""
    if cfg.format in CLASSIFICATION_FORMATS:
        from qlora import classification
        return classification.prepare(cfg, tokenizer)
    records = read_records(cfg.path)
    fmt = cfg.format if cfg.format != "auto" else detect_format(list(records[0]))
    check_columns(records, fmt, cfg.path)
    check_records(records, fmt, cfg.path)
    if cfg.eval_path:
        if Path(cfg.eval_path).is_file() and Path(cfg.eval_path).samefile(cfg.path):
            raise DataError(f"data.eval_path is the training file itself ({cfg.path}): held-out metrics would be "
                            "measured on examples the model trains on",
                            "point data.eval_path at a separate file, or unset it to hold out data.eval_fraction "
                            "of data.path")
        eval_records = read_records(cfg.eval_path, "data.eval_path")
        check_columns(eval_records, fmt, cfg.eval_path)
        check_records(eval_records, fmt, cfg.eval_path)
        train_records = records
    else:
        if len(records) < 2:
            raise DataError(f"data file {cfg.path} has {len(records)} record: too few to hold some out",
                            "add records or set data.eval_path")
        if cfg.kfold:
            from qlora.classification import kfold_indices
            tr, ev = kfold_indices([0] * len(records), cfg.kfold.folds, cfg.kfold.fold, cfg.seed)
        else:
            tr, ev = split_indices(len(records), cfg.eval_fraction, cfg.seed)
        train_records, eval_records = [records[i] for i in tr], [records[i] for i in ev]
    if round(len(train_records) * cfg.fraction) == 0:
        raise DataError(f"data.fraction={cfg.fraction:g} of the {len(train_records)} training records is 0 records",
                        f"raise data.fraction to at least {1 / len(train_records):.3g}, or add records")
    train_records = [train_records[i] for i in nested_subset(len(train_records), cfg.seed, cfg.fraction, cfg.max_samples)]
    if cfg.eval_max_samples:
        eval_records = eval_records[:cfg.eval_max_samples]
    enc = Encoder(tokenizer, fmt, cfg)
    train = [enc.encode(r) for r in train_records]
    evals = [enc.encode(r) for r in eval_records]
    stats = example_stats(train)
    kept = [e for e in train if any(t != IGNORE for t in e["labels"])]
    if not kept:
        raise DataError(f"all {len(train)} training examples lose every answer token to truncation at "
                        f"data.max_length={cfg.max_length}", "raise data.max_length (see the token-length percentiles)")
    stats["dropped_no_labels"] = len(train) - len(kept)
    if cfg.packing:
        n_tokens = sum(len(e["input_ids"]) for e in kept)
        kept = pack_examples(kept, cfg.max_length)
        stats["packed_rows"] = len(kept)
        stats["packed_row_fill"] = n_tokens / (len(kept) * cfg.max_length)  # real tokens / row capacity
    evals = [e for e in evals if any(t != IGNORE for t in e["labels"])]
    if not evals:
        raise DataError("no held-out example keeps an answer token after truncation",
                        "raise data.max_length or check data.eval_path")
    digest = hashlib.sha256(json.dumps([train_records, eval_records], sort_keys=True, default=str).encode())
    return PreparedData(kept, evals, fmt, stats, digest.hexdigest()[:16], enc.segments(train_records[0]))


def example_stats(examples: list[dict]) -> dict:
    lengths = sorted(e["length"] for e in examples)  # before truncation: shows what max_length cuts
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    masked = sum(1 for e in examples for t in e["labels"] if t == IGNORE)

    def pct(q):
        return lengths[min(len(lengths) - 1, int(q * len(lengths)))]

    truncated = sum(e["truncated"] for e in examples)
    trained = n_tokens - masked
    cut = sum(e.get("trained_tokens_cut", 0) for e in examples)
    return {"records": len(examples), "token_length_p50": pct(0.5), "token_length_p95": pct(0.95),
            "token_length_max": lengths[-1], "truncated_fraction": truncated / len(examples),
            "truncated_examples": truncated, "trained_tokens_cut": cut,
            "trained_tokens_cut_fraction": cut / max(1, trained + cut),
            "masked_label_fraction": masked / max(1, n_tokens), "tokens": n_tokens, "trained_tokens": trained}
