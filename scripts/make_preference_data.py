"""Write examples/data/prefs_{train,test}.jsonl: preference pairs written for posttrain (Apache-2.0).

Chosen style: one short sentence that starts with "Answer:". Rejected: the same fact buried in
filler and hedging. Deterministic; rerun to regenerate. The test file holds different questions.
"""

import json
from pathlib import Path

QA = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What gas do plants take in for photosynthesis?", "Plants take in carbon dioxide."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest."),
    ("What language is mostly spoken in Brazil?", "Most people in Brazil speak Portuguese."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("What do bees make?", "Bees make honey."),
    ("How many minutes are in an hour?", "An hour has 60 minutes."),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain."),
    ("What is the main language of Japan?", "The main language of Japan is Japanese."),
    ("What is H2O?", "H2O is water."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the capital of Italy?", "Rome is the capital of Italy."),
    ("Which animal is the largest mammal?", "The blue whale is the largest mammal."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How many colors are in a rainbow?", "A rainbow has seven colors."),
    ("What is 15 plus 27?", "15 plus 27 is 42."),
    ("What instrument has 88 keys?", "A standard piano has 88 keys."),
    ("What is the capital of Japan?", "Tokyo is the capital of Japan."),
    ("What star is closest to Earth?", "The Sun is the closest star to Earth."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which metal is liquid at room temperature?", "Mercury is liquid at room temperature."),
    ("What is the capital of Spain?", "Madrid is the capital of Spain."),
    ("How many weeks are in a year?", "A year has 52 weeks."),
    ("What organ pumps blood through the body?", "The heart pumps blood."),
    ("What is 100 divided by 4?", "100 divided by 4 is 25."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("Which bird is a symbol of peace?", "The dove is a symbol of peace."),
    ("What is the capital of Germany?", "Berlin is the capital of Germany."),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings."),
]

FILLERS = [
    ("Well, that is a really interesting question, and there are many ways one could think about it. "
     "Before answering, it is worth noting that knowledge changes and sources differ. That said, ",
     " I hope this helps, but please double-check with other sources, since I might be wrong."),
    ("Great question! Many people wonder about this, and honestly it depends on how you look at it. "
     "Let me think about it step by step and consider several perspectives. In the end, most would say that ",
     " Of course, there is always more to learn about this topic, so feel free to ask more."),
]


def pairs(items):
    for q, a in items:
        for head, tail in FILLERS:
            yield {"prompt": q, "chosen": f"Answer: {a}", "rejected": head + a + tail}


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "examples" / "data"
    for name, items in (("prefs_train.jsonl", QA[:32]), ("prefs_test.jsonl", QA[32:])):
        rows = list(pairs(items))
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(name, len(rows))


if __name__ == "__main__":
    main()
