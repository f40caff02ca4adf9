"""Writes the small classification samples in data/ from the real data sets in ../shared/data (see
data/README.md for provenance and licences). Deterministic: `python data/make_classification_samples.py`.

- sst2_sample.tsv (320 records, 160 per class) from SST-2 train_full.tsv, and sst2_dev_sample.tsv (128
  records) from SST-2 dev.tsv: `sentence<TAB>label`. Only phrases of 6 words or more are drawn (train_full
  holds every sub-phrase of the treebank, many of them single words), and none with a `"` (the TSV is
  read without quoting rules).
- pairwise_sample.csv (96 records) in the LMSYS Chatbot Arena layout (prompt, response_a, response_b as
  JSON-encoded lists of turns; winner_model_a / winner_model_b / winner_tie flags) derived from
  LLaMA-Factory's dpo_en_demo.json: single-prompt records only; the chosen and rejected answers are put
  in a seeded random order (the winner flag follows the chosen one); a seeded 1 in 6 are made ties by
  showing the chosen answer as both responses. Prompts are cut to 500 and answers to 700 characters to
  keep the file small. These are NOT arena votes: ties here are identical answers, easier than real ties.
"""
import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def read_tsv(path: Path) -> list[tuple[str, int]]:
    rows = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(s.strip(), int(y)) for s, y in (r.rsplit("\t", 1) for r in rows)]


def usable(sentence: str) -> bool:
    return len(sentence.split()) >= 6 and '"' not in sentence


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows), encoding="utf-8")


def sst2(seed: int = 0) -> None:
    rng = random.Random(seed)
    train = [r for r in read_tsv(SHARED / "sst2" / "train_full.tsv") if usable(r[0])]
    picked = []
    for label in (0, 1):
        picked += rng.sample([r for r in train if r[1] == label], 160)
    rng.shuffle(picked)
    write_tsv(HERE / "sst2_sample.tsv", picked)
    dev = [r for r in read_tsv(SHARED / "sst2" / "dev.tsv") if usable(r[0])]
    write_tsv(HERE / "sst2_dev_sample.tsv", rng.sample(dev, 128))


def pairwise(seed: int = 0, n: int = 96) -> None:
    rng = random.Random(seed)
    records = json.loads((SHARED / "llamafactory_demo" / "dpo_en_demo.json").read_text(encoding="utf-8"))
    single = [r for r in records if [t["from"] for t in r["conversations"]] == ["human"]]
    rows = []
    for i, r in enumerate(rng.sample(single, n)):
        prompt = r["conversations"][0]["value"][:500]
        chosen, rejected = r["chosen"]["value"][:700], r["rejected"]["value"][:700]
        if rng.random() < 1 / 6:
            a, b, winner = chosen, chosen, (0, 0, 1)
        elif rng.random() < 0.5:
            a, b, winner = chosen, rejected, (1, 0, 0)
        else:
            a, b, winner = rejected, chosen, (0, 1, 0)
        rows.append([i, json.dumps([prompt]), json.dumps([a]), json.dumps([b]), *winner])
    with open(HERE / "pairwise_sample.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie"])
        w.writerows(rows)


if __name__ == "__main__":
    sst2()
    pairwise()
