"""Run folders end to end on the tiny model: save -> load, merged export, chat replies and the REPL."""

import json

import pytest
import torch

from posttrain.train.config import load_config, save_config
from posttrain.records import Message
from posttrain.errors import PosttrainError
from posttrain.models.export import EXPORT_MARKER, export_merged
from posttrain.models.load import load_base
from posttrain.models.methods import apply_method
from posttrain.models.run import is_peft_model, load_model_for_inference, save_model
from posttrain.serve import chat
from posttrain.models.generate import generate_reply
from posttrain.serve.chat import run_repl

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8]])  # (1, T)


def make_run(tmp_path, tiny_dir, method: str = "lora"):
    """A run folder as the training loop leaves it, after one AdamW step; returns (dir, model)."""
    cfg = load_config(None, [], **{
        "data.datasets": [{"path": "x.jsonl"}], "model.name_or_path": str(tiny_dir), "method.type": method,
    })
    model, tokenizer = load_base(cfg.model, device="cpu")
    model = apply_method(model, cfg.methods)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optim.step()
    run_dir = tmp_path / f"run-{method}"
    save_model(model, tokenizer, run_dir)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir, model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method", ["lora", "full", "freeze"])
def test_save_then_load_gives_same_logits(tmp_path, tiny_dir, method):
    run_dir, trained = make_run(tmp_path, tiny_dir, method)
    adapter = (run_dir / "adapter_config.json").is_file()
    assert adapter == (method == "lora")
    assert (run_dir / ("adapter_model.safetensors" if adapter else "model.safetensors")).is_file()
    assert (run_dir / "chat_template.jinja").is_file()
    model, tokenizer, cfg = load_model_for_inference(str(run_dir), device="cpu")
    assert cfg is not None and cfg.method.type == method
    assert is_peft_model(model) == adapter and not model.training
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")
    torch.testing.assert_close(_logits(model), _logits(trained), rtol=0, atol=1e-6)


def test_load_plain_folder_and_builtin(tmp_path, tiny_dir, monkeypatch):
    model, tokenizer, cfg = load_model_for_inference(str(tiny_dir), device="cpu")
    assert cfg is None and not is_peft_model(model) and tokenizer.eos_token == "<|im_end|>"
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    model, _, cfg = load_model_for_inference("tiny-random", device="cpu")
    assert cfg is None and model.config.num_hidden_layers == 2


@pytest.mark.parametrize("method", ["lora", "full", None])
def test_dtype_overrides_the_run_and_auto(tmp_path, tiny_dir, method, capsys):
    """chat / serve --dtype: a LoRA run's base, a full run, a plain folder all load in the chosen dtype."""
    from posttrain.cli import main

    ref = str(tiny_dir) if method is None else str(make_run(tmp_path, tiny_dir, method)[0])
    model, _, _ = load_model_for_inference(ref, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model, tokenizer, _ = load_model_for_inference(ref, device="cpu", dtype="bfloat16")
    # PEFT keeps the adapter's own weights in float32 over a bf16 base
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    expected = generate_reply(model, tokenizer, [Message("user", "hi")], max_new_tokens=4)
    capsys.readouterr()
    assert main(["chat", ref, "--prompt", "hi", "--max-new-tokens", "4", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_export_lora_round_trip(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, trained = make_run(tmp_path, tiny_dir, "lora")
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)
    out = export_merged(run_dir, tmp_path / "export")
    assert {"config.json", "model.safetensors", "generation_config.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain), _logits(trained), rtol=0, atol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = plain.generation_config.eos_token_id
    assert im_end == eos or im_end in eos
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = plain.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert json.loads((out / EXPORT_MARKER).read_text())["merged_lora"] is True


def test_export_full_run_and_overwrite_rules(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    run_dir, trained = make_run(tmp_path, tiny_dir, "freeze")
    out = export_merged(run_dir, tmp_path / "export")
    export_merged(run_dir, out)  # a previous export may be replaced
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(plain), _logits(trained), rtol=0, atol=1e-6)

    foreign = tmp_path / "not-an-export"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(PosttrainError, match="not empty"):
        export_merged(run_dir, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(PosttrainError, match="differ"):
        export_merged(run_dir, run_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_merged(run_dir, empty) / "model.safetensors").is_file()


def test_generate_reply_greedy_is_deterministic_and_streams(tiny):
    model, tokenizer = tiny
    messages = [Message("user", "Who are you?")]
    pieces: list[str] = []
    first = generate_reply(model, tokenizer, messages, max_new_tokens=12, stream_to=pieces.append)
    second = generate_reply(model, tokenizer, messages, max_new_tokens=12)
    assert first == second and first
    assert "".join(pieces).strip() == first
    torch.manual_seed(0)
    sampled = generate_reply(model, tokenizer, messages, max_new_tokens=6, temperature=1.0, top_p=0.9)
    assert isinstance(sampled, str)


def test_generate_reply_stops_at_end_of_turn(tiny_dir):
    model, tokenizer, _ = load_model_for_inference(str(tiny_dir), device="cpu")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Rig the head to always pick <|im_end|>: generation must end after that one token, i.e. after the
    # prompt's forward pass, with no decode step after it.
    forwards: list[int] = []
    head = torch.nn.Linear(64, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[im_end] = 10.0
    model.lm_head = head
    model.register_forward_hook(lambda module, args, output: forwards.append(1))
    reply = generate_reply(model, tokenizer, [Message("user", "hi")], max_new_tokens=50)
    assert reply == "" and len(forwards) == 1


def test_repl_multi_turn_clear_and_exit(tiny, monkeypatch):
    model, tokenizer = tiny
    seen: list[list[str]] = []
    real = chat.generate_reply

    def spy(model, tokenizer, messages, **kwargs):
        seen.append([m.role for m in messages])
        return real(model, tokenizer, messages, **kwargs)

    monkeypatch.setattr(chat, "generate_reply", spy)
    script = iter(["hello", "", "and again", "clear", "fresh start", "quit", "never read"])
    printed: list[str] = []
    history = run_repl(model, tokenizer, max_new_tokens=4, input_fn=lambda _: next(script),
                       print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))))
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]
    assert [m.role for m in history] == ["user", "assistant"] and history[0].content == "fresh start"
    assert "(history cleared)" in printed
    assert next(script) == "never read"


def test_repl_ends_on_eof(tiny):
    model, tokenizer = tiny

    def eof(_prompt):
        raise EOFError

    assert run_repl(model, tokenizer, input_fn=eof, print_fn=lambda *a, **k: None) == []
