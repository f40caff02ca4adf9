"""Build the small GSM8K and SST-2 samples in data/ from the workplace's shared copies (run once; the
project never reads ../shared at run time). Deterministic: records are taken in file order.

    python data/make_qa_samples.py [SHARED_DATA_DIR]   # default ../shared/data
"""
import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[1] / "shared" / "data")
MAX_CHARS = 420  # short records keep CPU runs in seconds
SENTIMENT = "What is the sentiment of this movie review?\n\"{}\""


def gsm8k(src: Path, n: int) -> list[dict]:
    out = []
    for line in src.read_text().splitlines():
        r = json.loads(line)
        if len(r["question"]) + len(r["answer"]) <= MAX_CHARS:
            out.append({"question": r["question"], "answer": r["answer"]})
        if len(out) == n:
            return out
    raise SystemExit(f"{src}: fewer than {n} short records")


def sst2_choices(src: Path, per_label: int) -> list[dict]:
    """SST-2 sentences as 2-way multiple choice (A. negative, B. positive), balanced, in file order."""
    taken = {0: [], 1: []}
    with open(src, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            label, sentence = int(row["label"]), row["sentence"].strip()
            if 6 <= len(sentence.split()) <= 30 and len(taken[label]) < per_label:
                taken[label].append({"question": SENTIMENT.format(sentence), "choices": ["negative", "positive"],
                                     "answer": label})
    pairs = [r for pair in zip(taken[0], taken[1]) for r in pair]  # alternate labels
    if len(pairs) != 2 * per_label:
        raise SystemExit(f"{src}: fewer than {per_label} usable sentences per label")
    return pairs


def write(name: str, records: list[dict]) -> None:
    path = HERE / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{path.name}: {len(records)} records, {path.stat().st_size} bytes")


if __name__ == "__main__":
    write("gsm8k_train.jsonl", gsm8k(SHARED / "gsm8k" / "train.jsonl", 160))
    write("gsm8k_test.jsonl", gsm8k(SHARED / "gsm8k" / "test.jsonl", 40))
    write("sst2_mc_train.jsonl", sst2_choices(SHARED / "sst2" / "train_full.tsv", 80))
    write("sst2_mc_eval.jsonl", sst2_choices(SHARED / "sst2" / "dev.tsv", 50))
