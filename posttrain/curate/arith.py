"""`posttrain data arith`: seeded one-step arithmetic word problems with a `#### N` answer, for RL with
verifiable rewards (a task a 135M model starts low on but not at zero, and visibly learns on a CPU).

Each problem is one addition, subtraction or small multiplication told as a short story, in English
or Chinese. The user turn asks for the final answer on the last line as `#### N`; the assistant turn
is a worked solution ending in `#### N`: the reference that exact-match rewards read, and an SFT
target. Problems come from one seeded stream, deduplicated on their text: the first `test` form
the held-out split and the next `train` the training split, so no question is in both.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from posttrain.curate.stream import AtomicJsonl
from posttrain.errors import DataError

OPS = ("add", "sub", "mul")
LANGS = ("en", "zh")
# (name, pronoun) and countable items; Chinese stories count with 个, which fits every item listed
NAMES = {"en": [("Tom", "He"), ("Anna", "She"), ("Sam", "He"), ("Lily", "She"), ("Ben", "He"), ("Mia", "She"),
                ("Leo", "He"), ("Emma", "She"), ("Noah", "He"), ("Zoe", "She")],
         "zh": [(n, "") for n in ("小明", "小红", "小刚", "小丽", "小华", "小芳", "小军", "小兰")]}
ITEMS = {"en": "apples pencils books cookies stickers marbles oranges eggs balloons shells".split(),
         "zh": "苹果 橘子 鸡蛋 气球 桃子 饺子 包子 梨".split()}
STORIES = {
    ("en", "add"): ["{name} has {a} {item}. {he} buys {b} more. How many {item} does {name} have now?",
                    "There are {a} {item} in a box. {name} puts {b} more {item} in the box. How many {item} are "
                    "in the box now?",
                    "{name} picked {a} {item} in the morning and {b} {item} in the afternoon. How many {item} did "
                    "{name} pick in all?"],
    ("en", "sub"): ["{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} have "
                    "left?",
                    "There were {a} {item} on the table. {name} took {b} of them. How many {item} are on the table "
                    "now?"],
    ("en", "mul"): ["{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have in all?"],
    ("zh", "add"): ["{name}有{a}个{item}，又买了{b}个。{name}现在有多少个{item}？",
                    "盒子里有{a}个{item}，{name}又放进去{b}个。盒子里现在有多少个{item}？"],
    ("zh", "sub"): ["{name}有{a}个{item}，送给朋友{b}个。{name}还剩多少个{item}？",
                    "桌子上有{a}个{item}，{name}拿走了{b}个。桌子上还有多少个{item}？"],
    ("zh", "mul"): ["{name}有{a}袋{item}，每袋{b}个。{name}一共有多少个{item}？"],
}
ASK = {"en": " Give the final answer on the last line as '#### <number>'.",
       "zh": "请在最后一行写出最终答案，格式为 '#### 数字'。"}
SIGN = {"add": "+", "sub": "-", "mul": "x"}


def _numbers(op: str, rng: random.Random, top: int = 20) -> tuple[int, int, int]:
    """(a, b, answer): sums of 2-top and 2-top, differences a - b with min(5, top) <= a <= 1.5 top and 1 <= b < a,
    products 2-6 x 2-9 (top 20: sums of 2-20, differences from up to 30)."""
    if op == "add":
        a, b = rng.randint(2, top), rng.randint(2, top)
        return a, b, a + b
    if op == "sub":
        a = rng.randint(min(5, top), top + top // 2)
        b = rng.randint(1, a - 1)
        return a, b, a - b
    a, b = rng.randint(2, 6), rng.randint(2, 9)
    return a, b, a * b


def make_problem(lang: str, op: str, rng: random.Random, top: int = 20, ask: bool = True) -> dict:
    """One problem as a messages row: user story (+ the answer format request when `ask`), assistant solution
    ending `#### N`; operands up to `top` (see _numbers)."""
    a, b, answer = _numbers(op, rng, top)
    name, he = rng.choice(NAMES[lang])
    story = rng.choice(STORIES[(lang, op)]).format(name=name, he=he, a=a, b=b, item=rng.choice(ITEMS[lang]))
    solution = f"{a} {SIGN[op]} {b} = {answer}\n#### {answer}"
    return {"messages": [{"role": "user", "content": story + (ASK[lang] if ask else "")},
                         {"role": "assistant", "content": solution}]}


def arith(out_dir: str | Path, *, train: int = 1000, test: int = 200, seed: int = 0, langs: list[str] = ("en",),
          ops: list[str] = ("add", "sub"), max_operand: int = 20, ask: bool = True) -> dict:
    """Write out_dir/train.jsonl and out_dir/test.jsonl; returns counts by split, language and operation.
    `max_operand` sets the difficulty (sums of 2..max_operand); `ask=False` leaves the '#### N' request out
    of the question (for rewards that read the reply's last number)."""
    bad = [x for x in langs if x not in LANGS] + [x for x in ops if x not in OPS]
    if bad or not langs or not ops or train < 0 or test < 0 or max_operand < 2:
        raise DataError(f"posttrain data arith: languages from {LANGS}, operations from {OPS}, counts >= 0, "
                        f"max operand >= 2 (got langs={list(langs)}, ops={list(ops)}, train={train}, test={test}, "
                        f"max_operand={max_operand})")
    rng, seen, rows, counts = random.Random(seed), set(), [], Counter()
    attempts = 0
    while len(rows) < train + test:
        attempts += 1
        if attempts > 50 * (train + test) + 1000:
            raise DataError(f"posttrain data arith: only {len(rows)} distinct problems for {train + test} asked")
        lang, op = rng.choice(list(langs)), rng.choice(list(ops))
        row = make_problem(lang, op, rng, max_operand, ask)
        question = row["messages"][0]["content"]
        if question not in seen:
            seen.add(question)
            rows.append(row)
            counts[f"{lang}/{op}"] += 1
    out = Path(out_dir)
    for name, part in (("test", rows[:test]), ("train", rows[test:])):
        with AtomicJsonl(out / f"{name}.jsonl") as writer:
            for row in part:
                writer.write(row)
    return {"train": train, "test": test, "by_language_and_operation": dict(sorted(counts.items())),
            "out": [str(out / "train.jsonl"), str(out / "test.jsonl")]}
