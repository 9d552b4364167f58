"""Reward models: the scalar score of a sequence, its stored offset, and a text scorer.

A reward model is transformers' `*ForSequenceClassification` with one label (a linear `score` head on
the last non-pad token), or a PEFT adapter on one. The offset is InstructGPT's bias step (Ouyang et
al. 2022, sec. 3.5): shift the rewards so that a reference set (the demonstrations) scores 0 on
average. transformers' head has no bias, and a Llama-style final RMSNorm leaves no constant feature
to fold one into, so the offset is stored in the model's config.json as `reward_offset`;
`posttrain score`, the PPO reward-model source and `posttrain serve` subtract it, plain transformers
returns the raw score.
"""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.models.config import ModelConfig
from posttrain.data.collate import collate
from posttrain.errors import ConfigError
from posttrain.models.anatomy import is_prompt_learning, unwrap
from posttrain.models.load import load_reward_model, reward_offset
from posttrain.records import Conversation, Message
from posttrain.templates.render import encode_conversation


def sequence_rewards(model, batch: dict) -> torch.Tensor:
    """(R,) scalar reward of each right-padded row, exactly as plain transformers computes it."""
    input_ids = batch["input_ids"]  # (R, T)
    if not is_prompt_learning(model):
        return model(input_ids=input_ids, use_cache=False).logits[:, 0].float()
    # Prompt tuning feeds embeddings, so transformers' head would read the last (padding) position:
    # take each row's last non-pad token ourselves, by the rule transformers uses for input ids.
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -input_ids.shape[1]:]  # (R, T, H) the real positions
    inner = unwrap(model)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = ((input_ids != inner.config.pad_token_id) * positions).argmax(-1)  # (R,)
    return inner.score(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


@torch.no_grad()
def raw_rewards(model, ids: list[list[int]], pad_id: int, batch_size: int, device) -> torch.Tensor:
    """(N,) raw score of each token-id row (no offset), right-padded in batches of `batch_size`."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start:start + batch_size]
        batch = collate([[k] for k in range(len(rows))], rows, [[0.0] * len(r) for r in rows], pad_id)
        out.append(sequence_rewards(model, {"input_ids": batch["input_ids"].to(device)}).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def fit_offset(model, ids: list[list[int]], pad_id: int, batch_size: int, device) -> float:
    """Store the mean raw reward of `ids` as the model's offset: those responses now average 0."""
    offset = float(raw_rewards(model, ids, pad_id, batch_size, device).double().mean())
    model.config.reward_offset = offset
    return offset


class RewardModel:
    """A scalar reward model: AutoModelForSequenceClassification (num_labels=1), or a PEFT adapter on one.

    Each (prompt, response) pair is rendered with the reward model's own chat template, the way
    the preference stage trains it; a tokenizer without a template gets `prompt\\nresponse`.
    """

    def __init__(self, path: str, device: torch.device | str = "cpu", batch_size: int = 8):
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"reward.model: {path} is not a folder")
        if (folder / "config.json").is_file():  # a full model (an adapter folder has none): check its head
            from transformers import AutoConfig  # heavy: transformers, ~3 s

            num_labels = AutoConfig.from_pretrained(str(folder)).num_labels
            if num_labels != 1:
                raise ConfigError(f"reward.model {path}: expected num_labels=1, found {num_labels}")
        model, self.tokenizer = load_reward_model(ModelConfig(name_or_path=str(folder)), device)
        self.tokenizer.padding_side = "right"
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size = torch.device(device), batch_size
        self.offset = reward_offset(model)  # `rm.normalize_data`: raw score - offset is the reward

    def _encode(self, prompt: str, response: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            conv = Conversation([Message("user", prompt), Message("assistant", response)])
            return encode_conversation(conv, self.tokenizer, mask="full")[0].input_ids
        return self.tokenizer(f"{prompt}\n{response}", add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            ids = [self._encode(p, r) for p, r in zip(prompts[start:start + self.batch_size],
                                                      responses[start:start + self.batch_size])]
            batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
            scores += (sequence_rewards(self.model, batch) - self.offset).tolist()
        return scores
