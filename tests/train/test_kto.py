"""Stage kto: both unpaired layouts, mismatched KL pairs, clear errors, and a tiny-model run that separates
desirable from undesirable responses."""

import json

import pytest

from posttrain.data.kto import KTORecord, encode_kto, is_kto_row, row_to_kto
from posttrain.errors import ConfigError, DataError
from posttrain.records import Message


def test_both_layouts_read_to_the_same_record():
    lf = row_to_kto({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                     "label": True}, source="a.json:1")
    trl = row_to_kto({"prompt": "Hi", "completion": "Hello!", "label": True}, source="b.jsonl:1")
    trl_msgs = row_to_kto({"prompt": [{"role": "user", "content": "Hi"}],
                           "completion": [{"role": "assistant", "content": "Hello!"}], "label": False},
                          source="c.jsonl:1")
    for conv, _ in (lf, trl, trl_msgs):
        assert [(m.role, m.content) for m in conv.messages] == [("user", "Hi"), ("assistant", "Hello!")]
    assert lf[1] and trl[1] and not trl_msgs[1]
    assert is_kto_row({"prompt": "Hi", "completion": "Yo", "label": True}) and not is_kto_row({"prompt": "Hi"})


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "completion": "Yo", "label": "yes"}, "b.jsonl:3: field 'label' must be true or false"),
    ({"prompt": "Hi", "completion": "Yo"}, "field 'label'"),
    ({"completion": "Yo", "label": True}, "field 'prompt' is missing"),
    ({"messages": [{"role": "user", "content": "Hi"}], "label": True}, r"does not end with an assistant reply"),
])
def test_bad_rows_name_the_row_and_field(row, message):
    with pytest.raises(DataError, match=message):
        row_to_kto(row, source="b.jsonl:3")


def test_mismatched_pairs_take_another_rows_response(tiny_tokenizer):
    from collections import Counter

    recs = [KTORecord([Message("user", f"question {i}")], Message("assistant", f"answer {i}"), i % 2 == 0)
            for i in range(5)]
    samples = encode_kto(recs, tiny_tokenizer, None, None, seed=0, drops=Counter())
    decode = tiny_tokenizer.decode
    partners = []
    for i, s in enumerate(samples):
        assert f"question {i}" in decode(s.input_ids) and f"answer {i}" in decode(s.input_ids)
        kl_text = decode(s.kl_input_ids)
        assert f"question {i}" in kl_text and f"answer {i}" not in kl_text
        partners.append(next(j for j in range(5) if f"answer {j}" in kl_text))
        # only the response is weighted, in both sequences
        assert "question" not in decode([t for t, w in zip(s.kl_input_ids, s.kl_weights) if w])
    assert sorted(partners) == list(range(5))  # a cycle: every response is some prompt's mismatch once


def _cfg(tmp_path, tiny_dir, **extra):
    rows = [{"prompt": f"Say something about {w}.", "completion": f"{w} is good good good.", "label": True}
            for w in ("cats", "dogs", "tea", "rain", "books", "maps")]
    rows += [{"prompt": f"Say something about {w}.", "completion": f"{w} bad bad bad!", "label": False}
             for w in ("trees", "milk", "snow", "cars", "songs", "clocks")]
    (tmp_path / "kto.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    overrides = {"stage": "kto", "model.name_or_path": str(tiny_dir),
                 "data.datasets": [{"path": str(tmp_path / "kto.jsonl")}], "kto.beta": 0.5,
                 "optim.lr": 0.01, "optim.scheduler": "constant", "train.max_steps": 12, "train.micro_batch_size": 4,
                 "output.dir": str(tmp_path / "out"), "output.tensorboard": False} | extra
    from posttrain.train.config import load_config

    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def test_kto_run_separates_desirable_from_undesirable(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    from posttrain.train import kto

    summary = kto.run(_cfg(tmp_path, tiny_dir))
    rows = [json.loads(x) for x in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert summary["train_samples"] == 12 and summary["desirable"] == 6 and summary["reference"] == "adapter"
    # step 1: the policy is the reference (LoRA B = 0), so every implicit reward and z_ref are 0 and the loss is
    # lambda (1 - sigmoid(0)) = 0.5
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-6) and train[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)
    last = train[-1]
    assert last["loss"] < 0.45, [r["loss"] for r in train]
    assert last["rewards/desirable/mean"] > 0 > last["rewards/undesirable/mean"]
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k)


def test_full_fine_tuning_scores_against_a_frozen_copy(tmp_path, tiny_dir):
    """Full fine-tuning: the reference is a copy taken before training (inside the module the engine wraps), so
    step 1 starts at the same 0.5 as with an adapter, later steps move away from it, and the output is the plain
    policy (no reference weights saved with it)."""
    from safetensors.torch import load_file

    from posttrain.train import kto

    summary = kto.run(_cfg(tmp_path, tiny_dir, **{"method.type": "full", "optim.lr": 1e-3, "train.max_steps": 4}))
    rows = [json.loads(x) for x in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert summary["reference"] == "copy" and summary["total_params"] == summary["trainable_params"]
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-6) and train[-1]["kl/mean"] != 0.0
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(k.startswith(("policy.", "reference.")) for k in saved)


def test_kto_config_rules(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match="kto.beta"):
        _cfg(tmp_path, tiny_dir, **{"kto.beta": 0.0})
    with pytest.raises(ConfigError, match="applies to stage kto"):
        _cfg(tmp_path, tiny_dir, **{"stage": "dpo", "kto.beta": 0.2})
