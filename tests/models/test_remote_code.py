"""A loaded folder never switches on trust_remote_code: a run folder whose config.yaml says
`trust_remote_code: true` and whose config.json maps to its own modelling .py loads with the built-in
code (the planted file never runs); only the user's own flag or training config runs folder code."""

import json
import shutil
import sys
import types

import pytest
import transformers.dynamic_module_utils as dynamic_modules
from transformers import AutoModelForSequenceClassification

from posttrain.cli import main
from posttrain.train.config import load_config, save_config
from posttrain.models.load import load_base
from posttrain.models.methods import apply_method
from posttrain.models.run import load_model_for_inference, save_model
from posttrain.models.reward_head import RewardModel
from posttrain.serve import api
from posttrain.serve.api import load_engine

PLANTED = """from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast
class PlantedConfig(LlamaConfig): model_type = "planted"
class PlantedForCausalLM(LlamaForCausalLM): config_class = PlantedConfig
class PlantedForSequenceClassification(LlamaForSequenceClassification): config_class = PlantedConfig
class PlantedTokenizer(PreTrainedTokenizerFast): pass
"""


@pytest.fixture(autouse=True)
def _modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into its modules cache; keep that inside the test's folder."""
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def plant(folder, marker) -> None:
    """The folder's config.json and tokenizer_config.json point at planted.py, which writes `marker`."""
    (folder / "planted.py").write_text(PLANTED.format(marker=str(marker)))
    for name, auto_map in (("config.json", {"AutoConfig": "planted.PlantedConfig",
                                            "AutoModelForCausalLM": "planted.PlantedForCausalLM",
                                            "AutoModelForSequenceClassification":
                                                "planted.PlantedForSequenceClassification"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["planted.PlantedTokenizer", None]})):
        meta = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**meta, "auto_map": auto_map}))


def run_folder(tmp_path, tiny_dir, method: str, base: str):
    """A run folder saved by training (method lora: adapter on `base`), whose config.yaml trusts remote code."""
    cfg = load_config(None, [], **{"data.datasets": [{"path": "x.jsonl"}], "model.name_or_path": str(tiny_dir),
                                   "method.type": method})
    model, tokenizer = load_base(cfg.model, device="cpu")
    run_dir = tmp_path / f"run-{method}-{tmp_path.name}"  # unique: transformers caches modules by folder name
    save_model(apply_method(model, cfg.methods), tokenizer, run_dir)
    cfg.model.name_or_path, cfg.model.trust_remote_code = base, True
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def planted_base(tmp_path, tiny_dir, marker):
    base = tmp_path / f"base-{tmp_path.name}"
    shutil.copytree(tiny_dir, base)
    plant(base, marker)
    return base


def test_chat_with_a_planted_full_run_folder_does_not_run_its_code(tmp_path, tiny_dir, caplog):
    marker = tmp_path / "marker.txt"
    run_dir = run_folder(tmp_path, tiny_dir, "full", str(tiny_dir))
    plant(run_dir, marker)
    assert main(["chat", str(run_dir), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    model, _, cfg = load_model_for_inference(run_dir, device="cpu")
    assert not marker.exists()
    assert type(model).__name__ == "LlamaForCausalLM" and cfg.model.trust_remote_code is False
    assert "ignoring model.trust_remote_code" in caplog.text
    # control: the user's own flag does run it, so the plant above is live
    assert main(["chat", str(run_dir), "--prompt", "hi", "--max-new-tokens", "3", "--trust-remote-code"]) == 0
    assert marker.read_text() == "remote code ran"


def test_serve_runs_folder_code_only_with_the_flag(tmp_path, tiny_dir, monkeypatch):
    """`posttrain serve` loads like chat: the folder's code runs only with the user's --trust-remote-code."""
    marker = tmp_path / "marker.txt"
    run_dir = run_folder(tmp_path, tiny_dir, "full", str(tiny_dir))
    plant(run_dir, marker)
    engine = load_engine(str(run_dir), device="cpu")
    engine.close()
    assert not marker.exists() and type(engine.model).__name__ == "LlamaForCausalLM"
    served = {}

    def fake_load(ref, name, **kw):  # the command line's choice reaches the loader; no server starts
        served["kw"] = kw
        return types.SimpleNamespace(name="m")

    monkeypatch.setattr(api, "load_engine", fake_load)
    monkeypatch.setattr(api, "create_app", lambda *a, **kw: None)
    monkeypatch.setitem(sys.modules, "uvicorn", types.SimpleNamespace(run=lambda *a, **kw: None))
    for flags, expected in (([], False), (["--trust-remote-code"], True)):
        served.clear()
        assert main(["serve", str(run_dir), *flags]) == 0
        assert served["kw"] == {"trust_remote_code": expected, "dtype": None, "max_batch": 32}
    assert main(["serve", str(run_dir), "--dtype", "bfloat16"]) == 0 and served["kw"]["dtype"] == "bfloat16"
    assert main(["serve", str(run_dir), "--max-batch", "4"]) == 0 and served["kw"]["max_batch"] == 4
    engine = load_engine(str(run_dir), device="cpu", trust_remote_code=True)  # control: the plant is live
    engine.close()
    assert marker.read_text() == "remote code ran"


def test_adapter_run_on_a_planted_base_does_not_run_its_code(tmp_path, tiny_dir):
    marker = tmp_path / "marker.txt"
    run_dir = run_folder(tmp_path, tiny_dir, "lora", str(planted_base(tmp_path, tiny_dir, marker)))
    model, _, _ = load_model_for_inference(run_dir, device="cpu")
    assert not marker.exists() and type(model.base_model.model).__name__ == "LlamaForCausalLM"
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    assert not marker.exists()


def test_reward_model_folders_do_not_run_their_code(tmp_path, tiny_dir, capsys):
    """PPO's reward.model and `posttrain score` load a reward-model folder without its own code."""
    marker = tmp_path / "marker.txt"
    rm_dir = tmp_path / f"rm-{tmp_path.name}"
    AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1).save_pretrained(rm_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_dir / name).is_file():
            shutil.copy(tiny_dir / name, rm_dir / name)
    cfg = load_config(None, ["stage=rm", "model.trust_remote_code=true", f"model.name_or_path={tiny_dir}"],
                      **{"data.datasets": [{"path": "x.jsonl"}]})
    save_config(cfg, rm_dir / "config.yaml")
    plant(rm_dir, marker)
    scores = RewardModel(str(rm_dir))(["hi"], ["hello"])
    assert len(scores) == 1 and not marker.exists()
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    assert main(["score", str(rm_dir), "--data", str(prefs)]) == 0
    assert not marker.exists()


def test_plain_folder_that_needs_its_own_code_is_a_one_line_error(tmp_path, tiny_dir, capsys):
    marker = tmp_path / "marker.txt"
    folder = planted_base(tmp_path, tiny_dir, marker)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "model_type": "planted"}))  # no built-in code for it
    assert main(["chat", str(folder), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists() and "\n" not in err
    assert str(folder) in err and "--trust-remote-code" in err


def test_training_config_still_honours_trust_remote_code(tmp_path, tiny_dir):
    """The user's own config is the place to switch it on."""
    marker = tmp_path / "marker.txt"
    cfg = load_config(None, ["model.trust_remote_code=true"], **{
        "data.datasets": [{"path": "x.jsonl"}], "model.name_or_path": str(planted_base(tmp_path, tiny_dir, marker))})
    model, _ = load_base(cfg.model, device="cpu")
    assert marker.exists() and type(model).__name__ == "PlantedForCausalLM"
