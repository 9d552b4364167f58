"""`tiny-random`: a 2-layer random Llama with a BPE tokenizer trained on a frozen text corpus.

Built offline in about a second, deterministic for a seed; used by tests and smoke runs.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    """The tokenizer's training text: a frozen snapshot of posttrain's source plus a few CJK lines.

    Frozen (resources/tiny_corpus.json.gz) so the tiny model's tokens, and every test built on
    them, do not change whenever a source file is edited.
    """
    path = Path(__file__).resolve().parents[1] / "resources" / "tiny_corpus.json.gz"
    return json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast  # heavy: transformers, ~3 s

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_model(tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    """A random LlamaForCausalLM sized for tests (about 100k parameters with the default tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy: transformers, ~3 s

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny-random model folder (safetensors, config, tokenizer with chat template)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
