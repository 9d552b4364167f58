"""`posttrain eval vqa` (and eval.task: vqa) on the tiny LLaVA: exact-match accuracy over normalised answers, with
a shuffled-image control that never hands a question its own image; bad rows name file and line.

The references are the tiny model's own greedy answers to each colour's image (distinct per image), so the right
images score 100% and the shuffled ones 0%: the gap is measured, not assumed."""

import json
import shutil

import pytest
from conftest import greedy_replies

from posttrain.cli import main
from posttrain.errors import ConfigError, DataError
from posttrain.eval.config import load_eval_config
from posttrain.eval.vqa import VQAItem, normalise_answer, read_vqa, shuffled_images
from posttrain.models.run import load_model_for_inference

QUESTION = "What colour is this?"
TOKENS = 4


@pytest.fixture(scope="module")
def vqa_file(tiny_vlm_dir, colour_pngs, tmp_path_factory):
    """Two questions per colour image (the control must not hand either its own image), image paths relative to
    the file; only colours whose answers are non-empty and distinct (at least two; which ones depends on the
    machine's rounding)."""
    root = tmp_path_factory.mktemp("vqa")
    model, tokenizer, _ = load_model_for_inference(str(tiny_vlm_dir), device="cpu")
    replies = greedy_replies(model, tokenizer, colour_pngs, QUESTION, TOKENS)
    kept = {}
    for colour, reply in replies.items():
        if normalise_answer(reply) and normalise_answer(reply) not in {normalise_answer(r) for r in kept.values()}:
            kept[colour] = reply
    assert len(kept) >= 2, replies
    rows = []
    for colour, reply in kept.items():
        shutil.copy(colour_pngs[colour], root / f"{colour}.png")
        rows += [{"messages": [{"role": "user", "content": "<image>" + QUESTION},
                               {"role": "assistant", "content": reply}], "images": [f"{colour}.png"]}] * 2
    (root / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "vqa.jsonl"


def test_accuracy_beside_the_shuffled_image_control(tiny_vlm_dir, vqa_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "vqa", "--model", str(tiny_vlm_dir), "--data", str(vqa_file), "--out", str(out),
                 "--max-new-tokens", str(TOKENS), "--batch-size", "1"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    n = len(vqa_file.read_text().splitlines())
    assert (result["questions"], result["accuracy"], result["accuracy_shuffled_images"]) == (n, 1.0, 0.0)
    assert f"VQA accuracy ({n} questions): 100.0%" in printed and "shuffled images: 0.0%" in printed
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert all(r["control_images"] != r["images"] for r in rows)
    assert {r["control_images"][0] for r in rows} == {r["images"][0] for r in rows}  # the same images, handed around


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
