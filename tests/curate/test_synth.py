"""Self-Instruct synth against a fake OpenAI-compatible server on 127.0.0.1 (English, Chinese and mixed
seeds), the heuristics in both languages, and ROUGE-L by hand."""

import json
import threading
from pathlib import Path

import pytest

from posttrain.curate import synth
from posttrain.curate.synth_prompts import parse_input_output, parse_label_input, parse_proposals
from posttrain.errors import PosttrainError

PROPOSALS = [
    "Classify the sentiment of this movie review as positive or negative.",
    "Draw a map of the old town of Lyon.",  # heuristic filter: needs an image
    "Give three tips for staying healthy.",  # a seed: ROUGE-L 1.0
    "Explain how a refrigerator keeps food cold to a curious teenager.",
    "List the planets of the solar system ordered by their distance from the sun.",
    "Suggest a name for a bakery that sells only sourdough bread.",
    "Convert the temperature given in Celsius into Fahrenheit and show your working.",
    "Rewrite the sentence so that it sounds more polite when sent to a manager.",
]
PROPOSALS_ZH = [
    "判断下面这条影评的情感是正面还是负面。",
    "绘制一张公司组织结构的流程图。",  # heuristic: needs an image
    "写诗。",  # heuristic: too short
    "给出三条保持健康的建议。",  # a seed: ROUGE-L 1.0
    "将85华氏度转换为摄氏度。",
    "用通俗的语言向中学生解释冰箱为什么能让食物保持低温。",
    "为一家只卖酸面包的面包店想一个店名。",
    "把下面这句话改写得更礼貌一些，以便发给经理。",
]


class FakeTeacher:
    """Answers Self-Instruct's three prompt kinds in English and Chinese; fails the first request with HTTP 500
    (retries)."""

    def __init__(self):
        self.calls, self.proposals, self.lock = 0, PROPOSALS, threading.Lock()
        self.seen: list[tuple[str, str, str]] = []  # (prompt kind, language of the prompt, language of the task)

    def __call__(self, body, headers):
        prompt = body["messages"][0]["content"]
        with self.lock:
            self.calls += 1
            if self.calls == 1:
                return 500
        chinese = prompt.startswith("请你想出") or "任务：" in prompt  # the prompt's own language, not its examples
        return self.reply_zh(prompt) if chinese else self.reply_en(prompt)

    def reply_en(self, prompt):
        if prompt.startswith("Come up with a series of tasks"):
            self.seen.append(("propose", "en", "en"))
            n = prompt.count("\nTask ")
            return "\n".join(f"Task {n + i}: {p}" for i, p in enumerate(self.proposals))
        task = prompt.rsplit("Task: ", 1)[-1]
        if "classification task with finite output labels" in prompt:
            self.seen.append(("classify", "en", "en" if task.isascii() else "zh"))
            return "Yes" if "sentiment" in prompt else "No"
        if "Class label:" in prompt:
            return "Class label: positive\nInput: A joyful film with a great cast."
        return "Input: <noinput>\nOutput: Here is an answer."

    def reply_zh(self, prompt):
        if prompt.startswith("请你想出一系列任务"):
            self.seen.append(("propose", "zh", "zh"))
            n = prompt.count("\n任务")
            return "\n".join(f"任务{n + i}：{p}" for i, p in enumerate(PROPOSALS_ZH))
        task = prompt.rsplit("任务：", 1)[-1]
        if "输出标签有限的分类任务" in prompt:
            self.seen.append(("classify", "zh", "en" if task.isascii() else "zh"))
            return "是" if "情感" in task else "否"
        if "类别标签：" in prompt:
            return "类别标签：正面\n输入：这部电影的演员阵容很强，看得很开心。"
        return "输入：<无输入>\n输出：这是一个回答。"


@pytest.fixture
def fake_teacher():
    return FakeTeacher()


@pytest.fixture
def teacher(fake_openai, fake_teacher):
    return synth.OpenAITeacher(fake_openai(fake_teacher), backoff=0.01)


@pytest.fixture
def seeds(tmp_path):
    path = tmp_path / "seeds.jsonl"
    tasks = ["Give three tips for staying healthy.", "Write a short poem about autumn leaves falling.",
             "Find the odd one out among the given words."]
    path.write_text("".join(json.dumps({"instruction": t, "instances": []}) + "\n" for t in tasks))
    return path


SEEDS_ZH = ["给出三条保持健康的建议。", "写一首关于秋天落叶的短诗。", "找出下列词语中不属于同一类的那个。"]


def _seed_file(path, tasks):
    path.write_text("".join(json.dumps({"instruction": t, "instances": []}, ensure_ascii=False) + "\n"
                            for t in tasks), encoding="utf-8")
    return path


def test_heuristics_count_chinese_characters():
    assert synth.heuristic_reject("将85华氏度转换为摄氏度。") is None  # 11 units, though one "word" by spaces
    assert synth.heuristic_reject("给出三条保持健康的建议。") is None
    assert synth.heuristic_reject("写诗。") == "length"
    assert synth.heuristic_reject("绘制一张公司组织结构的流程图。") == "blocked keyword"
    assert synth.heuristic_reject("编写一个程序计算斐波那契数列。") == "program"
    assert synth.heuristic_reject("“翻译”下面这句话成英文。") == "first character"
    assert synth.heuristic_reject("Give three tips for staying healthy.") is None
    assert synth.heuristic_reject("Write a poem") == "length" and synth.heuristic_reject("¿Qué hora es ahora?")


def test_instance_parsers_both_languages_and_echoes():
    assert parse_input_output("输入：<无输入>\n输出：这是一个回答。") == ("", "这是一个回答。")
    assert parse_input_output("Input: 2+2\nOutput: 4") == ("2+2", "4")
    assert parse_label_input("类别标签：正面\n输入：很好看。") == ("正面", "很好看。")
    # the reply format copied back (what SmolLM2-135M did with the Chinese prompt) is no instance
    assert parse_input_output("输入：<任务的输入；不需要输入时写 <无输入>\n输出：<输出>") is None
    assert parse_label_input("Class label: <label>\nInput: <input>") is None
    assert parse_proposals("任务7：写一首诗。\n8. Name a fruit.\n任务 9： 列出三种颜色。") == [
        "写一首诗。", "Name a fruit.", "列出三种颜色。"]


def test_rouge_l_on_chinese_characters():
    # 11 tokens each ('85' and '100' are one token each), LCS 将华氏度转换为摄氏度 = 10: F1 = 10/11
    assert synth.rouge_l("将85华氏度转换为摄氏度。", "将100华氏度转换为摄氏度。") == pytest.approx(10 / 11)
    assert synth.rouge_l("给出三条保持健康的建议。", "写一首关于秋天落叶的短诗。") < 0.2


def test_synth_chinese_seeds_chinese_prompts(teacher, fake_teacher, tmp_path):
    seeds = _seed_file(tmp_path / "seeds.jsonl", SEEDS_ZH)
    report = synth.synth(seeds, tmp_path / "zh.jsonl", teacher, 5, concurrency=1, max_rounds=5, log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "zh.jsonl").read_text().splitlines()]
    assert report["prompts"] == {"zh": report["rounds"]} and {lang for _, lang, _ in fake_teacher.seen} == {"zh"}
    assert report["heuristic_reasons"] == {"blocked keyword": 1, "length": 1} and report["similar"] >= 1
    assert rows[0] == {"instruction": PROPOSALS_ZH[0], "input": "这部电影的演员阵容很强，看得很开心。",
                       "output": "正面", "is_classification": True}
    assert rows[1] == {"instruction": "将85华氏度转换为摄氏度。", "input": "", "output": "这是一个回答。",
                       "is_classification": False}
    counted = sum(report[k] for k in ("kept", "similar", "heuristic", "no_instance", "surplus"))
    assert counted == report["proposed"]  # every proposal accounted for


def test_synth_mixed_seeds_each_language_its_own_prompts(teacher, fake_teacher, seeds, tmp_path):
    mixed = _seed_file(tmp_path / "mixed.jsonl", SEEDS_ZH + [json.loads(line)["instruction"]
                                                              for line in seeds.read_text().splitlines()])
    report = synth.synth(mixed, tmp_path / "m.jsonl", teacher, 10, concurrency=2, seed=1, max_rounds=10,
                         log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert set(report["prompts"]) == {"en", "zh"}
    assert {r["instruction"].isascii() for r in rows} == {True, False}
    checks = [(asked, task) for kind, asked, task in fake_teacher.seen if kind == "classify"]
    assert {asked for asked, _ in checks} == {"en", "zh"}
    assert all(asked == task for asked, task in checks)  # each asked in its instruction's own language
    fake_teacher.seen.clear()
    forced = synth.synth(mixed, tmp_path / "f.jsonl", teacher, 3, concurrency=1, lang="zh", max_rounds=5,
                         log=lambda m: None)
    assert {asked for _, asked, _ in fake_teacher.seen} == {"zh"}  # English instructions checked in Chinese too
    assert forced["prompts"] == {"zh": forced["rounds"]}


def test_rouge_l_hand_values():
    assert synth.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert synth.rouge_l("a b c d", "a c e d") == pytest.approx(0.75)  # LCS a c d: P = R = 3/4
    assert synth.rouge_l("same words", "Same, words!") == 1.0 and synth.rouge_l("x", "y") == 0.0


def test_synth_filters_and_generates(teacher, seeds, tmp_path):
    out = tmp_path / "new" / "synth.jsonl"  # a folder that does not exist yet is created
    report = synth.synth(seeds, out, teacher, 5, concurrency=2, log=lambda m: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and report["heuristic"] >= 1 and report["similar"] >= 1
    assert "Draw a map of the old town of Lyon." not in {r["instruction"] for r in rows}
    cls = rows[0]
    assert cls["is_classification"] and cls["output"] == "positive" and cls["input"].startswith("A joyful")
    assert rows[1] == {"instruction": PROPOSALS[3], "input": "", "output": "Here is an answer.",
                       "is_classification": False}
    assert not (tmp_path / "new" / "synth.partial.jsonl").exists()
    for i, a in enumerate(rows):
        assert all(synth.rouge_l(a["instruction"], b["instruction"]) < 0.7 for b in rows[i + 1:])


def test_synth_resumes_from_partial(teacher, seeds, tmp_path):
    out = tmp_path / "synth.jsonl"
    done = {"instruction": "Name a fruit that is yellow and curved.", "input": "", "output": "Banana",
            "is_classification": False}
    (tmp_path / "synth.partial.jsonl").write_text(json.dumps(done) + "\n")
    report = synth.synth(seeds, out, teacher, 3, concurrency=1, log=lambda m: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["resumed"] == 1 and rows[0] == done and len(rows) == 3


def test_synth_gives_up_but_keeps_progress(teacher, fake_teacher, seeds, tmp_path):
    fake_teacher.proposals = ["Give three tips for staying healthy."]  # never novel
    with pytest.raises(PosttrainError, match=r"0/2 rows after 2 rounds"):
        synth.synth(seeds, tmp_path / "s.jsonl", teacher, 2, concurrency=1, max_rounds=2, log=lambda m: None)
    assert (tmp_path / "s.partial.jsonl").exists() and not (tmp_path / "s.jsonl").exists()


def test_teacher_refusal_is_one_error(seeds, tmp_path):
    with pytest.raises(PosttrainError, match="failed 2 times"):
        synth.OpenAITeacher("http://127.0.0.1:9/v1", retries=1, backoff=0.01, timeout=2).complete("hi")
    with pytest.raises(Exception, match="field 'instruction' is missing"):
        bad = Path(tmp_path / "bad.jsonl")
        bad.write_text('{"name": "x"}\n')
        synth.load_seeds(bad)
