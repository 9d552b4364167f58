"""Self-Instruct's prompts, reply parsers and heuristic filters, in English and Chinese.

The prompts follow the paper's four kinds: instruction generation (numbered tasks), the
classification check, and instance generation output-first (classification) or input-first.
The Chinese prompts say the same in Chinese; the parsers accept either language's labels and
full-width punctuation, so a teacher that answers in the other language still parses.
Heuristics follow the paper (length, tasks a text model cannot do, programs, odd first
characters); Chinese instructions count characters instead of space-separated words.
"""

from __future__ import annotations

import re

from posttrain.curate.lang import is_cjk, units

PROMPTS = {
    "en": {
        "header": "Come up with a series of tasks:",
        "task": "Task {i}: {text}",
        "is_classification": "Can the following task be regarded as a classification task with finite output "
                             "labels? Answer Yes or No.\n\nTask: {instruction}",
        "output_first": "Given the classification task definition, first write a class label, then an input of "
                        "that class. Reply exactly as\nClass label: <label>\nInput: <input>\n\nTask: {instruction}",
        "input_first": "Come up with one example for the following task. Reply exactly as\nInput: <the input, or "
                       "<noinput> when none is needed>\nOutput: <the output>\n\nTask: {instruction}",
    },
    "zh": {
        "header": "请你想出一系列任务：",
        "task": "任务{i}：{text}",
        "is_classification": "下面的任务能否被视为一个输出标签有限的分类任务？"
                             "请只回答“是”或“否”。\n\n任务：{instruction}",
        "output_first": "根据下面的分类任务定义，先写出一个类别标签，再写出属于该类别的一个输入。"
                        "请严格按以下格式回答：\n类别标签：<标签>\n输入：<输入>\n\n任务：{instruction}",
        "input_first": "请为下面的任务举一个例子。请严格按以下格式回答：\n输入：<任务的输入；不需要输入时写 <无输入>>\n"
                       "输出：<输出>\n\n任务：{instruction}",
    },
}
_NUMBERING = re.compile(r"^\s*(?:Task|任务)?\s*\d+\s*[:：.．)）、]\s*")
_LABEL_INPUT = re.compile(r"(?:Class label|类别标签)\s*[:：]\s*(.+?)\s*\n\s*(?:Input|输入)\s*[:：]\s*(.*)", re.S)
_INPUT_OUTPUT = re.compile(r"(?:Input|输入)\s*[:：]\s*(.*?)\s*\n\s*(?:Output|输出)\s*[:：]\s*(.+)", re.S)
NO_INPUT = ("", "<noinput>", "<无输入>", "无输入", "无")
# a small teacher often copies the reply format back: such a field is no instance at all
PLACEHOLDERS = ("<the input", "<the output>", "<label>", "<input>", "<任务的输入", "<输出>", "<标签>", "<输入>")

BLOCKED = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
           "plot", "go to", "video", "audio", "music", "flowchart", "diagram")  # tasks a text model cannot do
BLOCKED_ZH = ("图片", "图像", "照片", "图表", "流程图", "示意图", "地图", "画出", "画一", "绘制", "视频", "音频",
              "音乐", "文件", "前往")
PROGRAM_ZH = ("写一个程序", "编写一个程序", "编写程序", "写程序", "写一段程序")
LENGTH = {"en": (3, 150), "zh": (5, 300)}  # reject <= min or > max: words, or characters (+ Latin words) in Chinese


def propose_prompt(examples: list[str], lang: str = "en") -> str:
    p = PROMPTS[lang]
    lines = [p["header"]] + [p["task"].format(i=i, text=e) for i, e in enumerate(examples, start=1)]
    return "\n".join(lines + [p["task"].format(i=len(examples) + 1, text="").rstrip()])


def parse_proposals(text: str) -> list[str]:
    """One instruction per line, numbering ("Task 3:", "任务3：", "3.") removed."""
    return [line for line in (_NUMBERING.sub("", raw).strip() for raw in text.splitlines()) if line]


def is_yes(answer: str) -> bool:
    answer = answer.strip().lower()
    return answer.startswith(("yes", "是", "可以", "能"))


def parse_label_input(text: str) -> tuple[str, str] | None:
    """(label, input) from an output-first reply."""
    m = _LABEL_INPUT.search(text)
    if not m or _echoed(m.group(1), m.group(2)):
        return None
    return m.group(1).strip(), m.group(2).strip()


def parse_input_output(text: str) -> tuple[str, str] | None:
    """(input, output) from an input-first reply; a 'no input' marker becomes ''."""
    m = _INPUT_OUTPUT.search(text)
    if not m or _echoed(m.group(1), m.group(2)):
        return None
    inp = m.group(1).strip()
    return ("" if inp.lower() in NO_INPUT else inp), m.group(2).strip()


def _echoed(*fields: str) -> bool:
    return any(f.strip().startswith(PLACEHOLDERS) for f in fields)


def heuristic_reject(instruction: str) -> str | None:
    """The paper's filters (length, blocked keywords, programs, first character); None when it passes.

    Chinese instructions count characters (each CJK character, and each Latin word or number, is one
    unit): '将85华氏度转换为摄氏度。' is 11 units, where a space split sees one word.
    """
    zh = is_cjk(instruction)
    size = len(units(instruction)) if zh else len(instruction.split())
    low, high = LENGTH["zh" if zh else "en"]
    if size <= low or size > high:
        return "length"
    lowered = instruction.lower()
    if any(re.search(rf"\b{re.escape(b)}\b", lowered) for b in BLOCKED) or (zh and any(b in instruction
                                                                                       for b in BLOCKED_ZH)):
        return "blocked keyword"
    if lowered.startswith("write a program") or instruction.startswith(PROGRAM_ZH):
        return "program"
    first = instruction[0]
    if not first.isalnum() or (not zh and not first.isascii()):
        return "first character"
    return None
