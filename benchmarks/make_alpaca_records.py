"""Generate N alpaca records (instruction / input / output) of realistic size for the data-preparation benchmark:
about 190 SmolLM2 tokens and 740 bytes each, so 200,000 records make a 147 MB jsonl of about 38M tokens. The
words are drawn (seeded) from the English text of the repository's data files, so the tokenizer sees ordinary
words, and every record differs.

    python benchmarks/make_alpaca_records.py --records 200000 --out /tmp/alpaca-200k.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def vocabulary() -> list[str]:
    words: list[str] = []
    for name in ("gsm8k_train.jsonl", "guanaco_text_demo.jsonl", "chat_messages_demo.jsonl"):
        words += re.findall(r"[A-Za-z][a-z']{1,14}", (DATA / name).read_text())
    return words


def sentence(rng: random.Random, words: list[str], n: int) -> str:
    text = " ".join(rng.choice(words) for _ in range(n))
    return text[0].upper() + text[1:] + rng.choice(".?!")


def record(rng: random.Random, words: list[str]) -> dict:
    instruction = sentence(rng, words, rng.randint(8, 22))
    context = sentence(rng, words, rng.randint(6, 30)) if rng.random() < 0.4 else ""
    output = " ".join(sentence(rng, words, rng.randint(10, 25)) for _ in range(rng.randint(4, 7)))
    return {"instruction": instruction, "input": context, "output": output}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng, words = random.Random(args.seed), vocabulary()
    with open(args.out, "w") as f:
        for _ in range(args.records):
            f.write(json.dumps(record(rng, words)) + "\n")
    print(json.dumps({"out": args.out, "records": args.records, "bytes": Path(args.out).stat().st_size}))


if __name__ == "__main__":
    main()
