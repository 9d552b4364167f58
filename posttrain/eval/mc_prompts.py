"""Multiple-choice prompts and their token ids, for the two prompt formulations.

  letter  header, k solved examples, then the question with its lettered options, ending at the
          answer cue ("答案：" / "Answer:"); the option letters are scored as the next token.
  cloze   header, k solved examples, then "Question: <question>\\nAnswer:" with no options listed;
          each option's text is scored as the continuation (the formulation of lighteval's
          `mmlu_cloze_prompt`, used for the published SmolLM2 MMLU figures).
"""

from __future__ import annotations

import re

from posttrain.records import Message
from posttrain.errors import TemplateError
from posttrain.eval.mc_data import LETTERS, MCItem
from posttrain.templates.render import encode_prompt

HEADERS = {
    "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。",
    "en": "The following are multiple choice questions (with answers) about {subject}.",
}
CLOZE_HEADERS = {"zh": "以下是中国关于{subject}考试的问题。", "en": "The following are questions about {subject}."}
QUESTION_LABELS = {"zh": "问题：", "en": "Question: "}  # cloze only: the letter format has no label
CUES = {"zh": "答案：", "en": "Answer:"}
_CJK = re.compile(r"[\u4e00-\u9fff]")


def pick_language(items: list[MCItem], setting: str) -> str:
    if setting != "auto":
        return setting
    return "zh" if any(_CJK.search(it.question) for it in items[:20]) else "en"


def letter_text(cue: str, text: str) -> str:
    """A letter or option text as it follows the cue: ' A' after an ASCII cue ('Answer:'), 'A' after '答案：'."""
    return (" " if cue and cue[-1].isascii() and not cue[-1].isspace() else "") + text


def question_block(item: MCItem, cue: str) -> str:
    options = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(item.options))
    return f"{item.question}\n{options}\n{cue}"


def build_prompt(item: MCItem, shots: list[MCItem], header: str, cue: str) -> str:
    """Header line, k solved examples, then the question ending at the answer cue."""
    parts = [header.format(subject=item.subject.replace("_", " ")) + "\n\n"] if header else []
    parts += [question_block(s, cue) + letter_text(cue, s.answer) + "\n\n" for s in shots]
    parts.append(question_block(item, cue))
    return "".join(parts)


def answer_text(item: MCItem) -> str:
    return item.options[LETTERS.index(item.answer)]


def build_cloze_prompt(item: MCItem, shots: list[MCItem], header: str, label: str, cue: str) -> str:
    """Header line, k examples answered with the right option's text, then the question ending at the cue."""
    parts = [header.format(subject=item.subject.replace("_", " ")) + "\n"] if header else []
    parts += [f"{label}{s.question}\n{cue}{letter_text(cue, answer_text(s))}\n\n" for s in shots]
    parts.append(f"{label}{item.question}\n{cue}")
    return "".join(parts)


def letter_token_ids(tokenizer, context: str, letters: str) -> tuple[list[int], list[int]]:
    """(shared ids, letter ids): the tokens every letter adds after `context` in common (a lone space
    in some tokenizers, usually none), which go into the prompt, then each letter's first own token."""
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    fulls = []
    for letter in letters:
        full = tokenizer(context + letter_text(context, letter), add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) == len(base):
            raise TemplateError(f"the tokenizer merges option letter {letter!r} into the answer cue {context!r}; "
                                "set eval.mc.answer_cue to one ending in a separator")
        fulls.append(full[len(base):])
    shared = 0
    while all(len(f) > shared + 1 and f[shared] == fulls[0][shared] for f in fulls):
        shared += 1
    ids = [f[shared] for f in fulls]
    if len(set(ids)) != len(ids):
        raise TemplateError(f"option letters {letters} share a first token after {context!r}")
    return fulls[0][:shared], ids


def option_token_ids(tokenizer, item: MCItem, cue: str) -> list[list[int]]:
    """Each option's text as it follows the cue, tokenized on its own (a leading space stays attached
    to the first word, as byte-level BPE splits it in running text)."""
    return [tokenizer(letter_text(cue, text), add_special_tokens=False)["input_ids"] if text else []
            for text in item.options]


def encode_text(text: str, cue: str, tokenizer, chat: bool) -> list[int]:
    """Ids of a prompt text that ends with the cue: plain text, or the question as the user turn of the
    chat template with the reply starting at the cue."""
    if chat:
        ids = encode_prompt([Message("user", text[: -len(cue)].rstrip())], tokenizer)
        return ids + tokenizer(cue, add_special_tokens=False)["input_ids"]
    return tokenizer(text, add_special_tokens=True)["input_ids"]  # special tokens on: a base model gets its BOS


def encode_item(item: MCItem, shots: list[MCItem], tokenizer, mc_cfg, build, cue: str, shared: list[int] = (),
                reserve: int = 0) -> list[int]:
    """Prompt ids (+ the letters' shared tokens), dropping shots from the end until they and `reserve`
    tokens after them (the longest option, in cloze) fit mc_cfg.max_length; build(item, shots) -> text."""
    shots, room = list(shots), max(mc_cfg.max_length - reserve, 1)
    while True:
        ids = list(encode_text(build(item, shots), cue, tokenizer, mc_cfg.prompt == "chat")) + list(shared)
        if len(ids) <= room or not shots:
            return ids[-room:]
        shots.pop()
