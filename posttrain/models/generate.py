"""The one generation layer: every caller (chat, serve, eval, synth, the UI, PPO rollouts) samples here.

Prompts arrive as token ids rendered by `templates.encode_prompt` (the training path), so a reply is
what the trained format predicts; generation stops at the template's end-of-turn tokens
(`stop_token_ids`) and optional stop strings. A batch runs in `models.decode` (a KV cache that drops each
row once it stops: greedy output equals HF `generate`'s); vision prompts, sharded weights (`synced`) and
models that cache differently (sliding windows, prompt-learning PEFT) go through `model.generate` (on a CPU with
the linear layers through oneDNN there too, models/onednn_linear.py, except for sharded weights).

`row_seeds` gives every row its own random stream (`models.sampling.RowSampler`): a row's sample then
does not depend on which other rows share its batch. Without them, sampling draws from torch's global
stream with `generate`'s own warpers (seed it with `seed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextStreamer

from posttrain.models.decode import Picker, decode, lean_decode_ok
from posttrain.models.onednn_linear import onednn_linears
from posttrain.models.sampling import RowSampler, picker, stop_hit
from posttrain.records import Message
from posttrain.templates.render import encode_prompt

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")  # ChatML, Llama 3, Gemma, Phi


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated ids, stop token and padding removed
    finish_reason: str  # "stop" (end-of-turn token or stop string) or "length"


@dataclass
class SampledIds:
    """A batch of sampled responses as tensors. B rows, P prompt positions (left-padded), R response positions."""

    prompt_ids: torch.Tensor  # (B, P) long, pad on the left
    prompt_mask: torch.Tensor  # (B, P) bool, False on padding
    response_ids: torch.Tensor  # (B, R) long, pad after each response's end
    response_mask: torch.Tensor  # (B, R) bool, True on sampled tokens up to and including the stop token
    ended: torch.Tensor  # (B,) bool, the response stopped on its own (stop token or string) within the limit


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the generation config's eos, the tokenizer's eos,
    and common end-of-turn markers present in the vocabulary (ChatML, Llama 3, Gemma)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.extend(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return list(dict.fromkeys(i for i in ids if i is not None))


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """Text up to the earliest stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop or [] if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class CallbackStreamer(TextStreamer):
    """Hands each decoded piece to a callback; TextStreamer holds back half-formed words."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


class _AskEachStep(StoppingCriteria):
    """Stops every row once `should_stop()` says so (checked between tokens)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


def _strip_pad(row: list[int], pad_id: int) -> list[int]:
    """A row that ended on a stop string before the longest row ended: its padding removed."""
    while row and row[-1] == pad_id:
        row = row[:-1]
    return row


def pad_id_of(tokenizer, stops: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]


# Generation-config fields that make `model.generate` add processors the lean loop does not run.
_HF_ONLY_FIELDS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                   "min_length", "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                   "forced_eos_token_id", "sequence_bias", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                   "top_h")


def _lean(model: nn.Module, pixel_values, synced: bool) -> bool:
    """Whether the lean decode loop gives what `model.generate` would (else generate runs)."""
    if synced or (pixel_values is not None and len(pixel_values)) or not lean_decode_ok(model):
        return False
    config, defaults = getattr(model, "generation_config", None), GenerationConfig._get_default_generation_params()
    return config is None or all(getattr(config, f, None) in (None, defaults.get(f)) for f in _HF_ONLY_FIELDS)


def _lean_generate(model: nn.Module, tokenizer, prompts: list[list[int]], prompt_ids: torch.Tensor, *, stops, pad_id,
                   max_new_tokens: int, pick: Picker, stop_strings, streamer, should_stop) -> torch.Tensor:
    """(B, N) new tokens on the CPU, padded with pad_id after each row's end: what `model.generate` returns."""
    on_tokens = None
    if streamer is not None:  # generate's streamer protocol: the prompt, then each token, then end()
        streamer.put(prompt_ids)
        on_tokens = lambda rows, tokens: streamer.put(tokens.cpu())  # noqa: E731
    rows = decode(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=pad_id, pick=pick,
                  stop_hit=stop_hit(tokenizer, stop_strings), on_tokens=on_tokens, should_stop=should_stop)
    if streamer is not None:
        streamer.end()
    width = max(map(len, rows))
    return torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long).view(len(rows), width)


@torch.no_grad()
def _generate(model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
              top_p: float, seed: int | None = None, row_seeds: list[int] | None = None,
              stop_strings: list[str] | None = None, streamer=None, should_stop: Callable[[], bool] | None = None,
              top_k: int | None = None, pixel_values: torch.Tensor | None = None, synced: bool = False,
              ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(prompt ids (B, P) left-padded, new tokens (B, N) on the CPU, stop token ids).

    pixel_values (N, 3, H, W): the images of a vision model's prompts, in the order their tokens appear.
    synced: every process generates, with sharded weights (FSDP, ZeRO-3): each keeps running forward passes
    until all are done, since every pass gathers weights from all of them."""
    stops = stop_token_ids(model, tokenizer)
    pad_id = pad_id_of(tokenizer, stops)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    # Left padding keeps every prompt's last token in the last column, where generation continues.
    prompt_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])  # (B, P)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, P)
    per_row = row_seeds is not None and temperature > 0
    sample = temperature > 0 and not per_row
    if seed is not None and sample:
        torch.manual_seed(seed)
    model.eval()
    if _lean(model, pixel_values, synced):
        pick = picker(model, temperature=temperature, top_p=top_p, top_k=top_k, row_seeds=row_seeds, device=device)
        return prompt_ids, _lean_generate(model, tokenizer, prompts, prompt_ids, stops=stops, pad_id=pad_id,
                                          max_new_tokens=max_new_tokens, pick=pick, stop_strings=stop_strings,
                                          streamer=streamer, should_stop=should_stop), stops
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=stops or None, pad_token_id=pad_id,
        # Sampling knobs only when generate samples: transformers warns about them under greedy decoding.
        temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=top_k if sample else None,
        stop_strings=stop_strings or None)
    processors = LogitsProcessorList([RowSampler(row_seeds, temperature, top_p, device)] if per_row else [])
    criteria = StoppingCriteriaList([_AskEachStep(should_stop)] if should_stop is not None else [])
    images = {} if pixel_values is None or not len(pixel_values) else {"pixel_values": pixel_values.to(device)}
    with contextlib.nullcontext() if synced else onednn_linears(model):  # fixed weights (not sharded) on a CPU
        output = model.generate(input_ids=prompt_ids.to(device), attention_mask=attention_mask.to(device),
                                generation_config=gen_cfg, logits_processor=processors, stopping_criteria=criteria,
                                streamer=streamer, tokenizer=tokenizer if stop_strings else None, synced_gpus=synced,
                                **images)
    return prompt_ids, output[:, width:].cpu(), stops


def generate_from_ids(
    model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 256,
    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
    strip: bool = True, streamer=None, should_stop: Callable[[], bool] | None = None,
    row_seeds: list[int] | None = None, pixel_values: torch.Tensor | None = None, synced: bool = False,
) -> list[Generation]:
    """One generation per prompt (token ids); temperature 0 is greedy, `seed` makes sampling repeatable.

    `streamer` (a transformers streamer, batch of one prompt only) sees tokens as they come;
    `should_stop`, asked after every token, ends the whole batch early when it returns True.
    """
    if not prompts:
        return []
    _, new_tokens, stops = _generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, seed=seed, row_seeds=row_seeds,
                                     streamer=streamer, should_stop=should_stop, pixel_values=pixel_values,
                                     synced=synced, stop_strings=stop)  # a stop string ends its row early
    pad_id = pad_id_of(tokenizer, stops)
    return [to_generation(tokenizer, row, stops, pad_id, max_new_tokens=max_new_tokens, stop=stop, strip=strip)
            for row in new_tokens.tolist()]  # (B, N) new tokens


def to_generation(tokenizer, row: list[int], stops: list[int], pad_id: int, *, max_new_tokens: int,
                  stop: list[str] | None, strip: bool) -> Generation:
    """One row of new tokens as a reply: cut at its first stop token or stop string."""
    end = next((i for i, t in enumerate(row) if t in stops), None)
    ids = row[:end] if end is not None else _strip_pad(row, pad_id)
    text, hit = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)
    reason = "stop" if end is not None or hit or len(ids) < max_new_tokens else "length"
    return Generation(text.strip() if strip else text, ids, reason)


def generate_batch(
    model: nn.Module, tokenizer, conversations: list[list[Message]], *, system: str | None = None,
    max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
    stop: list[str] | None = None,
) -> list[str]:
    """The assistant's next reply to each conversation, generated as one batch."""
    prompts = [encode_prompt(conv, tokenizer, system=system) for conv in conversations]
    gens = generate_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed, stop=stop)
    return [g.text for g in gens]


def generate_reply(
    model: nn.Module, tokenizer, messages: list[Message], *, system: str | None = None,
    max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
    stream_to: Callable[[str], None] | None = None, pixel_values: torch.Tensor | None = None, synced: bool = False,
) -> str:
    """The assistant's next reply to `messages`; temperature 0 is greedy (deterministic). A vision model's
    `<image>` placeholders take `pixel_values` (N, 3, H, W), in order."""
    streamer = CallbackStreamer(tokenizer, stream_to) if stream_to is not None else None
    prompt = encode_prompt(messages, tokenizer, system=system)
    return generate_from_ids(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, streamer=streamer, pixel_values=pixel_values, synced=synced)[0].text


def sample_ids(model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
               top_p: float = 1.0, row_seeds: list[int] | None = None,
               stop_strings: list[str] | None = None, synced: bool = False) -> SampledIds:
    """Sampled responses as tensors (RL rollouts): each response runs up to and including its first stop
    token; one that ended on a stop string (generate pads after it) ends at its last real token."""
    prompt_ids, response, stops = _generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                            temperature=temperature, top_p=top_p, row_seeds=row_seeds,
                                            stop_strings=stop_strings, top_k=0, synced=synced)  # top_k 0: off
    pad_id = pad_id_of(tokenizer, stops)
    is_stop = torch.isin(response, torch.tensor(stops))  # (B, R)
    has_stop = is_stop.any(1)
    first_stop = torch.where(has_stop, is_stop.float().argmax(1), torch.full_like(has_stop, 10**9, dtype=torch.long))
    not_pad = response != pad_id
    last_real = torch.where(not_pad.any(1), response.shape[1] - 1 - not_pad.flip(1).float().argmax(1), -1)
    length = torch.where(has_stop, first_stop + 1, last_real + 1)  # (B,)
    response_mask = torch.arange(response.shape[1]).unsqueeze(0) < length.unsqueeze(1)  # (B, R)
    ended = has_stop | (length < response.shape[1])
    response_ids = torch.where(response_mask, response, pad_id)
    return SampledIds(prompt_ids, _left_mask(prompts, prompt_ids.shape[1]), response_ids, response_mask, ended)


def _left_mask(prompts: list[list[int]], width: int) -> torch.Tensor:
    """(B, width) bool: True on each left-padded prompt's real tokens."""
    lengths = torch.tensor([len(p) for p in prompts])
    return torch.arange(width).unsqueeze(0) >= (width - lengths).unsqueeze(1)
