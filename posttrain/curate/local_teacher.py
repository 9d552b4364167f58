"""`data synth --teacher MODEL`: a local model as the Self-Instruct teacher, through the one generation layer.
Its own module, so that synth against an HTTP teacher never loads torch or transformers."""

from __future__ import annotations

from posttrain.models.generate import generate_reply
from posttrain.models.onednn_linear import swap_in
from posttrain.models.run import load_model_for_inference
from posttrain.records import Message


class LocalTeacher:
    """A local model through posttrain's own generation (run dir, model folder or built-in)."""

    def __init__(self, model: str, max_tokens: int | None = None):
        self.model, self.tokenizer, _ = load_model_for_inference(model)
        self.max_tokens = max_tokens
        swap_in(self.model)  # weights that never change: their oneDNN copies made once for the teacher's life

    def complete(self, prompt: str, max_tokens: int = 512, temperature: float = 0.7) -> str:
        max_tokens = min(max_tokens, self.max_tokens or max_tokens)
        return generate_reply(self.model, self.tokenizer, [Message("user", prompt)], system=None,
                              max_new_tokens=max_tokens, temperature=temperature, top_p=1.0)
