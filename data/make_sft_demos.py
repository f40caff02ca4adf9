"""Writes the small SFT demo files of the CPU config variants from the shared public data (see
data/README.md for provenance and licences). Run once by a maintainer; jobs never read the shared folder:

    python data/make_sft_demos.py /path/to/shared/data

- guanaco_text_demo.jsonl: 200 alpaca_en_demo records in Guanaco's single-`text` layout
  ("### Human: ... ### Assistant: ..."), the format of timdettmers/openassistant-guanaco.
- chat_messages_demo.jsonl: the glaive_toolcall_en_demo conversations that make no tool call
  (human/gpt turns only) and are at most 3,500 bytes, as `messages` [{role, content}]; the `tools`
  field is dropped.
- sharegpt_zh_demo.jsonl: sharegpt_zh_1K conversations of at most 4 turns and 1,200 bytes, unchanged.
"""
import json
import sys
from pathlib import Path


def guanaco_text(src: Path) -> list[dict]:
    out = []
    for r in json.loads((src / "llamafactory_demo" / "alpaca_en_demo.json").read_text())[:200]:
        human = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        out.append({"text": f"### Human: {human} ### Assistant: {r['output']}"})
    return out


def chat_messages(src: Path) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    out = []
    for r in json.loads((src / "llamafactory_demo" / "glaive_toolcall_en_demo.json").read_text()):
        if all(t["from"] in roles for t in r["conversations"]):
            record = {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]}
            if len(json.dumps(record).encode()) <= 3500:  # keeps the file small (a few long chats dropped)
                out.append(record)
    return out


def sharegpt_zh(src: Path) -> list[dict]:
    lines = (src / "sharegpt_zh_1k" / "sharegpt_zh_1K_format.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    short = [r for r in records
             if len(r["conversations"]) <= 4 and {t["from"] for t in r["conversations"]} == {"human", "gpt"}
             and len(json.dumps(r, ensure_ascii=False).encode()) <= 1200]
    return short[:150]


def main(src: Path) -> None:
    here = Path(__file__).parent
    for name, records in (("guanaco_text_demo.jsonl", guanaco_text(src)), ("chat_messages_demo.jsonl", chat_messages(src)),
                          ("sharegpt_zh_demo.jsonl", sharegpt_zh(src))):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (here / name).write_text(text)
        print(f"{name}: {len(records)} records, {len(text.encode())} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
