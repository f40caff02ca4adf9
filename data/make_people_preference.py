"""Writes data/people_preference.jsonl: preference pairs for the quickstart's task (a person's name, age and
city as one strict JSON line). Each record holds the prompt (instruction and text, as the alpaca format
renders them), the chosen answer (the exact JSON line) and a rejected answer of one of the kinds an instruct
model gives before tuning: prose, a fenced code block, loose JSON (single quotes, the age as a string) or a
wrong value. Synthetic, deterministic (seed 1, other records than people_json.jsonl's seed 0):
`python data/make_people_preference.py`.
"""
import json
import random
from pathlib import Path

from make_people_json import CITIES, make


def rejected(row: dict, rng: random.Random) -> str:
    person = json.loads(row["output"])
    name, age, city = person["name"], person["age"], person["city"]
    kind = rng.randrange(5)
    if kind == 0:
        return f"{name} is {age} years old and lives in {city}."
    if kind == 1:
        return f"```json\n{row['output']}\n```"
    if kind == 2:
        return str(person)  # Python's repr: single quotes
    if kind == 3:
        return json.dumps({"name": name, "age": str(age), "city": city})
    wrong = {"age": age + rng.choice([-3, -1, 1, 2, 10])} if rng.random() < 0.5 else {
        "city": rng.choice([c for c in CITIES if c != city])}
    return json.dumps({**person, **wrong})


def make_pairs(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"{r['instruction']}\n\n{r['input']}", "chosen": r["output"], "rejected": rejected(r, rng)}
            for r in make(n, seed)]


if __name__ == "__main__":
    out = Path(__file__).with_name("people_preference.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(400)))
    print(f"wrote {out}")
