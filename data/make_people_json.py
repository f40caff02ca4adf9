"""Writes data/people_json.jsonl: the quickstart task, extracting a person's name, age and city as
one strict JSON line. SmolLM2-135M-Instruct answers in prose or loose JSON before training; a few
dozen LoRA steps teach it the exact format. Deterministic: `python data/make_people_json.py`.
"""
import json
import random
from pathlib import Path

NAMES = ["Maria", "John", "Aiko", "Lars", "Fatima", "Diego", "Chen", "Olga", "Kwame", "Sofia", "Ravi", "Emma",
         "Tomasz", "Leila", "Hugo", "Ingrid", "Mateo", "Yuki", "Amara", "Pierre", "Nadia", "Oscar", "Priya",
         "Felix", "Zara", "Ibrahim", "Clara", "Kenji", "Lucia", "Anders", "Mei", "Samuel", "Elif", "Jonas",
         "Ana", "Viktor", "Hana", "Marco", "Rosa", "Tariq"]
CITIES = ["Lisbon", "Chicago", "Osaka", "Oslo", "Cairo", "Lima", "Shanghai", "Kyiv", "Accra", "Madrid",
          "Mumbai", "Dublin", "Krakow", "Tunis", "Lyon", "Bergen", "Bogota", "Sapporo", "Lagos", "Quebec",
          "Beirut", "Malmo", "Chennai", "Vienna", "Nairobi", "Istanbul", "Munich", "Kyoto", "Seville", "Helsinki"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "Living in {city}, {name} just turned {age}.",
    "{name} ({age}) moved to {city} last year.",
    "At {age}, {name} calls {city} home.",
    "Our new colleague {name} is {age} and is based in {city}.",
    "Born {age} years ago, {name} now works in {city}.",
    "The form says: name {name}, age {age}, residence {city}.",
]
INSTRUCTION = "Extract the person's name, age and city from the text. Reply with JSON only."


def make(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 85)
        text = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
        answer = json.dumps({"name": name, "age": age, "city": city})
        rows.append({"instruction": INSTRUCTION, "input": text, "output": answer})
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("people_json.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in make(800)))
    print(f"wrote {out}")
