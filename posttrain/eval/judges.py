"""Judges that pick the better of two answers: a reward model, an LLM behind an OpenAI-compatible
API, or closeness to the prompt's reference answer.

Each returns {"winner": "model_a" | "model_b" | "tie", ...} for (conversation, answer_a, answer_b,
reference), the vote format ratings.py reads, and has an `id` naming the judge itself (which
reward model, which LLM and its settings), so cached votes from another judge are never mixed in.
The LLM judge asks twice with the answers swapped and keeps only a verdict that survives the swap
(else a tie), which cancels its position bias. An LLM reply with no "[[A]]"/"[[B]]"/"[[C]]" in it
is recorded as "unparsed" and its vote's winner is None: the vote is kept and counted (compare
reports it as no_verdict), never quietly turned into a tie.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request

import torch

from posttrain.records import Conversation, Message
from posttrain.errors import DataError, ModelSourceError, PosttrainError, http_error_text
from posttrain.eval.metrics import rouge_l
from posttrain.models.load import load_tokenizer, reward_offset
from posttrain.models.run import model_stamp
from posttrain.templates.render import apply_template, encode_conversation

DEFAULT_JUDGE_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. Choose the assistant that follows the user's "
    "instructions and answers the question better, considering helpfulness, relevance, accuracy and "
    "detail. Do not let the order of the responses, their length or the assistants' names influence "
    "you. After a short explanation, output your final verdict strictly in this format: \"[[A]]\" if "
    "assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.\n\n"
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]"
)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
UNPARSED = "unparsed"  # a judge reply without a verdict


def question_text(messages: list[Message]) -> str:
    """The conversation shown to a judge: the last user turn, with earlier turns above it."""
    if len(messages) == 1:
        return messages[0].content
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


class RewardModelJudge:
    """Higher scalar reward wins; |r_a - r_b| <= epsilon is a tie.

    Loads a transformers sequence-classification folder with num_labels=1 (what the reward-model
    stage saves) and scores each (prompt, answer) rendered by the folder tokenizer's chat template.
    """

    name = "reward_model"

    def __init__(self, path: str, epsilon: float = 0.0, device: str | None = None, template: str = "auto"):
        from transformers import AutoModelForSequenceClassification  # heavy: transformers, ~3 s

        self.id = f"reward_model:{model_stamp(path)}" + (f":epsilon={epsilon}" if epsilon else "")  # path#weights
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        except OSError as err:
            raise ModelSourceError(f"could not load a reward model from {path}: {err}") from None
        if self.model.config.num_labels != 1:
            labels = self.model.config.num_labels
            raise ModelSourceError(f"{path}: a reward model has num_labels=1, this one has {labels}")
        self.model.to(device or "cpu").eval()
        self.tokenizer = load_tokenizer(path)
        apply_template(self.tokenizer, template)
        if self.model.config.pad_token_id is None:  # batch-free scoring still reads it to find the last token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        self.epsilon = epsilon

    @torch.no_grad()
    def reward(self, messages: list[Message], answer: str) -> float:
        conv = Conversation(messages=[*messages, Message("assistant", answer)])
        ids = encode_conversation(conv, self.tokenizer, mask="full")[0].input_ids
        device = next(self.model.parameters()).device
        return float(self.model(input_ids=torch.tensor([ids], device=device)).logits[0, 0]) - reward_offset(self.model)

    def compare(self, messages: list[Message], answer_a: str, answer_b: str, reference: str | None = None) -> dict:
        r_a, r_b = self.reward(messages, answer_a), self.reward(messages, answer_b)
        winner = "tie" if abs(r_a - r_b) <= self.epsilon else ("model_a" if r_a > r_b else "model_b")
        return {"winner": winner, "reward_a": r_a, "reward_b": r_b}


class OpenAIJudge:
    """An LLM judge through any OpenAI-compatible /v1/chat/completions endpoint (stdlib HTTP only)."""

    name = "llm"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, prompt: str = DEFAULT_JUDGE_PROMPT,
                 timeout: float = 120.0, swap: bool = True, max_tokens: int | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        prompt_hash = hashlib.sha256(prompt.encode()).hexdigest()[:8]
        self.id = (f"llm:{model}@{self.url}:prompt={prompt_hash}" + ("" if swap else ":no-swap")
                   + ("" if max_tokens is None else f":max_tokens={max_tokens}"))  # a cap can cut verdicts off
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.prompt = prompt
        self.timeout = timeout
        self.swap = swap
        self.max_tokens = max_tokens  # None: the endpoint's default reply length

    def _ask(self, question: str, first: str, second: str) -> str | None:
        """'A', 'B', 'C' (tie) or None when the reply holds no verdict."""
        body = {"model": self.model, "temperature": 0.0, "messages": [
            {"role": "user", "content": self.prompt.format(question=question, answer_a=first, answer_b=second)}]}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise PosttrainError(f"judge endpoint {self.url} refused the request: {http_error_text(err)}") from None
        except (urllib.error.URLError, TimeoutError) as err:
            raise PosttrainError(f"judge endpoint {self.url} failed: {err}") from None
        text = reply["choices"][0]["message"]["content"] or ""
        found = _VERDICT.findall(text)
        return found[-1] if found else None

    def compare(self, messages: list[Message], answer_a: str, answer_b: str, reference: str | None = None) -> dict:
        """{"winner", "verdicts"}; winner None when any reply had no verdict (see the module docstring)."""
        question = question_text(messages)
        votes = [{"A": "model_a", "B": "model_b", "C": "tie"}.get(self._ask(question, answer_a, answer_b), UNPARSED)]
        if self.swap:  # B shown first: its "A" means model_b
            second = self._ask(question, answer_b, answer_a)
            votes.append({"A": "model_b", "B": "model_a", "C": "tie"}.get(second, UNPARSED))
        if UNPARSED in votes:
            winner = None
        else:
            winner = votes[0] if all(v == votes[0] for v in votes) else "tie"
        return {"winner": winner, "verdicts": votes}


class ReferenceJudge:
    """The answer closer to the prompt's reference answer wins: ROUGE-L F1 (0-1, rouge-score) on words, CJK
    text by character or jieba word; |s_a - s_b| <= epsilon is a tie. Cheap, offline and deterministic, and it
    measures one thing only: how close each answer comes to the behaviour the reference spells out."""

    name = "reference"

    def __init__(self, epsilon: float = 0.0, segment: str = "auto"):
        self.epsilon, self.segment = epsilon, segment
        self.id = f"reference:rouge-score-L:{segment}" + (f":epsilon={epsilon}" if epsilon else "")

    def score(self, answer: str, reference: str) -> float:
        return rouge_l(answer, reference, self.segment)

    def compare(self, messages: list[Message], answer_a: str, answer_b: str, reference: str | None = None) -> dict:
        if not reference:
            raise DataError(f"the reference judge needs a reference answer for every prompt; none for "
                            f"{question_text(messages)[:60]!r}")
        s_a, s_b = self.score(answer_a, reference), self.score(answer_b, reference)
        winner = "tie" if abs(s_a - s_b) <= self.epsilon else ("model_a" if s_a > s_b else "model_b")
        return {"winner": winner, "score_a": s_a, "score_b": s_b}
