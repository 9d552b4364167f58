"""Vision-language SFT on the tiny LLaVA (tiny-random + a 2-layer DINOv2, 16 tokens per 32 px image).

Proves: `<image>` expands after the model's own chat template renders and carries no loss; image
counts are checked against placeholders; the assembled LLaVA's text-only logits equal the LLM's; each
method trains exactly its weights (projector / LoRA + projector / full LLM + projector, never the tower)
and lowers the loss; a full run's folder (and a LoRA run's export) loads in plain transformers with the
same logits as posttrain's own loading (serving: tests/serve/test_serve_vision.py).
"""

import json

import pytest
import torch

from posttrain.models.config import ModelConfig
from posttrain.train.config import load_config
from posttrain.data.pipeline import build_sft_data
from posttrain.errors import DataError
from posttrain.models.export import export_merged
from posttrain.models.run import load_model_for_inference
from posttrain.models.vision import assemble_llava, load_tower
from posttrain.models.vision_config import VisionConfig
from posttrain.models.vision_load import image_inputs_of, load_vision_model
from posttrain.records import Conversation, Message
from posttrain.templates.render import encode_conversation
from posttrain.train import sft_vision

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}
TOKENS = 16  # tiny-random-vision: a 32 px image is 4 x 4 patches, CLS dropped


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Four solid-colour images and rows asking for their colour (the answer needs the image)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(root / f"{name}.png")
        rows.append({"messages": [{"role": "user", "content": "<image>What colour is this?"},
                                  {"role": "assistant", "content": f"It is {name}."}], "images": [f"{name}.png"]})
    (root / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_two_images_expand_in_the_models_own_template_and_carry_no_loss(tiny_vlm_dir, data_dir):
    _, tokenizer, _ = load_vision_model(ModelConfig(name_or_path=str(tiny_vlm_dir)), VisionConfig(), "cpu")
    messages = [Message("user", "<image>Left, <image>right: which is red?"), Message("assistant", "The left one.")]
    [enc] = encode_conversation(Conversation(messages=messages, images=["a.png", "b.png"]), tokenizer)

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    own = tokenizer.apply_chat_template([m.to_template_dict() for m in messages], tokenize=False)
    expected = tokenizer(own.replace("<image>", "<image>" * TOKENS), add_special_tokens=False)["input_ids"]
    assert enc.input_ids == expected  # the model's own template, then each placeholder -> 16 image tokens
    runs = [t for t in range(len(enc.input_ids)) if enc.input_ids[t] == image_id]
    assert len(runs) == 2 * TOKENS and runs[TOKENS - 1] - runs[0] == TOKENS - 1  # two contiguous runs of 16
    assert all(enc.weights[t] == 0 for t in runs)
    trained = tokenizer.decode([i for i, w in zip(enc.input_ids, enc.weights) if w > 0])
    assert trained.startswith("The left one.") and "which is red" not in trained and "<image>" not in trained


def test_data_resolves_images_and_checks_counts_against_placeholders(tiny_vlm_dir, data_dir, tmp_path):
    from posttrain.data.config import DataConfig, DatasetConfig
    from posttrain.templates.config import TemplateConfig

    _, tokenizer, _ = load_vision_model(ModelConfig(name_or_path=str(tiny_vlm_dir)), VisionConfig(), "cpu")
    data = build_sft_data(DataConfig(datasets=[DatasetConfig(path=str(data_dir / "colours.jsonl"))]),
                          TemplateConfig(), tokenizer, seed=0, images=True)
    assert sorted(refs[0] for refs in data.train["images"]) == sorted(str(data_dir / f"{c}.png") for c in COLOURS)

    bad = tmp_path / "bad.jsonl"
    row = {"messages": [{"role": "user", "content": "<image><image>Same?"}, {"role": "assistant", "content": "Yes"}],
           "images": ["a.png"]}
    text_row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    bad.write_text(json.dumps(text_row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"{bad} line 2: field 'images' has 1 image\(s\) but the messages hold 2"):
        build_sft_data(DataConfig(datasets=[DatasetConfig(path=str(bad))]), TemplateConfig(), tokenizer, seed=0,
                       images=True)


def test_text_only_logits_equal_the_base_llm(tiny_dir, tiny_vision_dir):
    from transformers import AutoModelForCausalLM

    from posttrain.models.load import load_tokenizer

    llm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = load_tokenizer(str(tiny_dir))("Hello there, how are you?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = llm(input_ids=ids).logits
        tokenizer = load_tokenizer(str(tiny_dir))
        llava = assemble_llava(llm, tokenizer, load_tower(str(tiny_vision_dir), torch.float32)).eval()
        logits = llava(input_ids=ids).logits
    assert torch.allclose(logits[..., :base.shape[-1]], base, atol=1e-5)


# ---------------------------------------------------------------- training

# method -> overrides; lr high enough that 100 steps on 4 samples move each method clearly
METHODS = {"projector": {"optim.lr": 1e-2}, "lora": {"lora.r": 4, "optim.lr": 1e-2}, "full": {"optim.lr": 3e-3}}
STEPS = 100


def _run(method: str, tiny_vlm_dir, data_dir, out, monkeypatch) -> tuple[dict, dict, dict]:
    """(summary, parameters after the method is applied, parameters at save) of a STEPS-step run."""
    cfg = load_config(None, [], **{
        "model.name_or_path": str(tiny_vlm_dir), "method.type": method, "output.dir": str(out),
        "output.tensorboard": False, "train.device": "cpu", "train.max_steps": STEPS, "train.micro_batch_size": 4,
        "data.max_length": 64, "data.datasets": [{"path": str(data_dir / "colours.jsonl")}],
        "optim.warmup_ratio": 0.0, "vision.cache_features": False, **METHODS[method]})
    seen = {}
    real_apply, real_save = sft_vision.apply_vision_method, sft_vision.save_model

    def apply(model, *args):
        model = real_apply(model, *args)
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    def save(model, *args):
        seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return real_save(model, *args)

    monkeypatch.setattr(sft_vision, "apply_vision_method", apply)
    monkeypatch.setattr(sft_vision, "save_model", save)
    return sft_vision.run(cfg), seen["before"], seen["after"]


@pytest.fixture(scope="module")
def runs(tiny_vlm_dir, data_dir, tmp_path_factory):
    """method -> (run folder, summary, parameters after apply, parameters at save)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for method in METHODS:
            folder = tmp_path_factory.mktemp(method) / "run"
            out[method] = (folder, *_run(method, tiny_vlm_dir, data_dir, folder, mp))
    return out


def _changed(before: dict, after: dict) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_its_weights_never_the_tower(runs, method):
    _, _, before, after = runs[method]
    changed = _changed(before, after)
    assert changed and not any("vision_tower" in n for n in changed)
    assert any("multi_modal_projector" in n for n in changed)  # every method trains the projector
    others = {n for n in changed if "multi_modal_projector" not in n}
    if method == "projector":
        assert not others
    elif method == "lora":
        assert others and all("lora_" in n for n in others)
    else:
        assert any(n.startswith("model.language_model.layers.") for n in others)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_lowers_the_loss(runs, method):
    rows = [json.loads(line) for line in (runs[method][0] / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    # the run's own first step is the control; projector-only moves least (the tiny LLM is random and frozen)
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1


def _reply_nll(model, processor, images: list) -> float:
    """Mean NLL of the replies `It is <colour>.` given `images` (in COLOURS order), computed by plain
    transformers (AutoProcessor expands <image>; labels mask everything before the reply)."""
    total = 0.0
    for name, image in zip(COLOURS, images):
        messages = [{"role": "user", "content": "<image>What colour is this?"}]
        prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = processor.tokenizer.apply_chat_template(  # rstrip: the newline after the turn is never trained
            messages + [{"role": "assistant", "content": f"It is {name}."}], tokenize=False).rstrip()
        inputs = processor(text=full, images=[image], return_tensors="pt")
        n_prompt = processor(text=prompt, images=[image], return_tensors="pt")["input_ids"].shape[1]
        labels = inputs["input_ids"].clone()
        labels[:, :n_prompt] = -100
        with torch.no_grad():
            total += model(**inputs, labels=labels).loss.item()
    return total / len(COLOURS)


def _plain(folder):
    """What plain transformers (no posttrain, no peft) makes of a folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def _images(data_dir) -> list:
    from PIL import Image

    return [Image.open(data_dir / f"{c}.png").convert("RGB") for c in COLOURS]


def test_full_run_learns_from_the_image(runs, tiny_vlm_dir, data_dir):
    images = _images(data_dir)
    shuffled = images[1:] + images[:1]  # every image paired with another colour's answer
    before = _reply_nll(*_plain(tiny_vlm_dir), images)
    model, processor = _plain(runs["full"][0])
    matched, control = _reply_nll(model, processor, images), _reply_nll(model, processor, shuffled)
    print(f"reply nll: untrained {before:.3f}, trained {matched:.3f}, trained with shuffled images {control:.3f}")
    assert matched < 0.5 * before  # training lowered the loss ...
    assert matched < 0.5 * control  # ... through the image: the wrong image costs far more


def _posttrain_logits(ref, data_dir) -> tuple[torch.Tensor, list[int]]:
    """Logits of an image prompt as posttrain loads and encodes it (chat / serve / eval)."""
    from posttrain.templates.render import encode_prompt

    model, tokenizer, _ = load_model_for_inference(str(ref), device="cpu")
    ids = encode_prompt([Message("user", "<image>What colour is this?")], tokenizer)
    pixels = image_inputs_of(model).pixel_values(_images(data_dir)[:1])
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits, ids


def _plain_logits(folder, data_dir) -> tuple[torch.Tensor, list[int]]:
    model, processor = _plain(folder)
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": "<image>What colour is this?"}],
                                                   tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, images=_images(data_dir)[:1], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits, inputs["input_ids"][0].tolist()


def test_full_run_folder_loads_in_plain_transformers_with_the_same_logits(runs, data_dir):
    ours, our_ids = _posttrain_logits(runs["full"][0], data_dir)
    plain, plain_ids = _plain_logits(runs["full"][0], data_dir)
    assert our_ids == plain_ids and torch.allclose(ours, plain, atol=1e-5)


def test_lora_run_export_loads_in_plain_transformers_with_the_same_logits(runs, data_dir, tmp_path):
    exported = export_merged(runs["lora"][0], tmp_path / "export")
    ours, our_ids = _posttrain_logits(runs["lora"][0], data_dir)  # base rebuilt + adapter, unmerged
    plain, plain_ids = _plain_logits(exported, data_dir)
    assert our_ids == plain_ids and torch.allclose(ours, plain, atol=1e-4)
