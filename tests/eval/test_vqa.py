"""`posttrain eval vqa` (and eval.task: vqa) on the tiny LLaVA: exact-match accuracy over normalised answers, with
a shuffled-image control that never hands a question its own image; bad rows name file and line.

The references are the tiny model's own greedy answers to each colour's image (distinct per image), so the right
images score 100% and the shuffled ones 0%: the gap is measured, not assumed."""

import json

import pytest

from posttrain.cli import main
from posttrain.errors import ConfigError, DataError
from posttrain.eval.config import load_eval_config
from posttrain.eval.vqa import VQAItem, normalise_answer, read_vqa, shuffled_images
from posttrain.models.generate import generate_reply
from posttrain.models.run import load_model_for_inference
from posttrain.records import Message
from posttrain.serve.chat import prompt_images

QUESTION = "What colour is this?"
COLOURS = {"blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}  # red: an empty answer
TOKENS = 4


@pytest.fixture(scope="module")
def vqa_file(tiny_vlm_dir, tmp_path_factory):
    """Two questions per colour image (the control must not hand either its own image), relative image paths."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vqa")
    model, tokenizer, _ = load_model_for_inference(str(tiny_vlm_dir), device="cpu")
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(root / f"{name}.png")
        content, pixels = prompt_images(model, [str(root / f"{name}.png")], QUESTION)
        reply = generate_reply(model, tokenizer, [Message("user", content)], max_new_tokens=TOKENS, pixel_values=pixels)
        rows += [{"messages": [{"role": "user", "content": "<image>" + QUESTION},
                               {"role": "assistant", "content": reply}], "images": [f"{name}.png"]}] * 2
    assert len({normalise_answer(r["messages"][1]["content"]) for r in rows}) == len(COLOURS)  # distinct answers
    (root / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "vqa.jsonl"


def test_accuracy_beside_the_shuffled_image_control(tiny_vlm_dir, vqa_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "vqa", "--model", str(tiny_vlm_dir), "--data", str(vqa_file), "--out", str(out),
                 "--max-new-tokens", str(TOKENS), "--batch-size", "1"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert (result["questions"], result["accuracy"], result["accuracy_shuffled_images"]) == (6, 1.0, 0.0)
    assert "VQA accuracy (6 questions): 100.0%" in printed and "shuffled images: 0.0%" in printed
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert all(r["control_images"] != r["images"] for r in rows)
    assert len({r["control_images"][0] for r in rows}) == len(COLOURS)  # the same images, handed around


def test_normalised_exact_match():
    assert normalise_answer("The Circle.") == normalise_answer("circle") == "circle"
    assert normalise_answer("  Yes!\n") == "yes" and normalise_answer("an  apple") == "apple"
    assert normalise_answer("theory") == "theory" and normalise_answer("no") != normalise_answer("not")


def test_control_is_a_derangement_of_the_images():
    items = [VQAItem("f line 1", [], [ref], "x") for ref in "aabbbcd"]
    for seed in range(5):
        control = shuffled_images(items, seed)
        assert all(c != it.images for c, it in zip(control, items))
        assert sorted({c[0] for c in control}) == ["a", "b", "c", "d"]
    with pytest.raises(DataError, match="two different images"):
        shuffled_images(items[:2], 0)


def test_bad_rows_and_configs_are_named(tmp_path, tiny_dir, vqa_file, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]})
                   + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 1: field 'images'"):
        read_vqa(bad)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>Hi"}], "images": ["a.png"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 1: .*reference answer"):
        read_vqa(bad)
    with pytest.raises(ConfigError, match="eval.vqa.data is empty"):
        load_eval_config(None, ["eval.task=vqa"])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        load_eval_config(None, ["eval.task=vqa", f"eval.vqa.data={vqa_file}", "eval.vqa.max_new_tokens=0"])
    assert main(["eval", "vqa", "--model", str(tiny_dir), "--data", str(vqa_file), "--out", str(tmp_path / "o")]) == 2
    assert "takes no images" in capsys.readouterr().err
