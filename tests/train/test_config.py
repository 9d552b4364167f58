"""Config: YAML + overrides, typed errors with suggestions, resolved config written out."""

import pytest
import yaml

from posttrain.train.config import describe_keys, load_config, save_config
from posttrain.errors import ConfigError

BASE = {"model.name_or_path": "tiny-random", "data.datasets": [{"path": "train.jsonl"}]}


def test_defaults_and_overrides():
    cfg = load_config(None, ["lora.r=16", "optim.lr=1e-4", "train.epochs=2", "data.packing=true"], **BASE)
    assert cfg.lora.r == 16 and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.train.epochs == 2.0 and cfg.data.packing is True
    assert cfg.method.type == "lora" and cfg.data.datasets[0].format == "auto"


def test_yaml_file_and_relative_paths(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "c.yaml").write_text("model: {name_or_path: tiny-random}\ndata:\n  datasets:\n    - path: d.jsonl\n"
                                     "lora:\n  r: 4\n")
    cfg = load_config(tmp_path / "c.yaml", ["lora.alpha=8"])
    assert cfg.lora.r == 4 and cfg.lora.alpha == 8.0
    assert cfg.data.datasets[0].path == str(tmp_path / "d.jsonl")


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key optim\.lrr; did you mean optim\.lr\?"):
        load_config(None, ["optim.lrr=1"], **BASE)
    with pytest.raises(ConfigError, match=r"unknown config key lroa; did you mean lora\?"):
        load_config(None, ["lroa.r=1"], **BASE)


def test_unknown_key_inside_list_item():
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.pth; did you mean data\.datasets\[0\]\.path"):
        load_config(None, [], **{"data.datasets": [{"pth": "x"}]})


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"config key lora\.r: expected int, got 'sixteen'"):
        load_config(None, ["lora.r=sixteen"], **BASE)
    with pytest.raises(ConfigError, match=r"config key train\.epochs: expected float"):
        load_config(None, ["train.epochs=[1]"], **BASE)
    with pytest.raises(ConfigError, match=r"method\.type: 'lorra' is not one of .*did you mean 'lora'"):
        load_config(None, ["method.type=lorra"], **BASE)


def test_validate_cross_field_rules():
    with pytest.raises(ConfigError, match="data.datasets is empty"):
        load_config(None, ["model.name_or_path=tiny-random"])
    with pytest.raises(ConfigError, match="train.micro_batch_size must be >= 1"):
        load_config(None, ["train.micro_batch_size=0"], **BASE)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(None, ["lora.r"], **BASE)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["lora.r=12"], **BASE)
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["lora"]["r"] == 12 and saved["optim"]["lr"] == cfg.optim.lr
    assert load_config(tmp_path / "config.yaml") == cfg


def test_every_key_has_a_doc():
    rows = describe_keys()
    assert len(rows) > 30
    assert all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]


def test_saved_config_holds_only_the_sections_its_run_uses(tmp_path):
    every_run = {"stage", "model", "data", "template", "method", "optim", "train", "output"}
    sft = load_config(None, ["lora.r=4"], **BASE)
    save_config(sft, tmp_path / "sft.yaml")
    assert set(yaml.safe_load((tmp_path / "sft.yaml").read_text())) == every_run | {"lora"}
    ppo = load_config(None, ["stage=ppo", "method.type=freeze", "reward.function=m:f", "train.max_steps=1"], **BASE)
    save_config(ppo, tmp_path / "ppo.yaml")
    assert set(yaml.safe_load((tmp_path / "ppo.yaml").read_text())) == every_run | {"freeze", "ppo", "reward"}
    assert load_config(tmp_path / "ppo.yaml") == ppo


@pytest.mark.parametrize("stage, key, owner", [("sft", "ppo.kl_coef=0.1", "ppo"), ("dpo", "rm.center_coef=0.1", "rm"),
                                               ("rm", "reward.function=m:f", "ppo"), ("ppo", "dpo.beta=0.2", "dpo")])
def test_section_of_another_stage_is_an_error_naming_it(stage, key, owner):
    section = key.split(".")[0]
    with pytest.raises(ConfigError, match=f"^config section {section} applies to stage {owner}, not {stage}$"):
        load_config(None, [f"stage={stage}", key, "train.max_steps=1"], **BASE)


def test_eval_config_is_not_a_training_config(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text("stage: eval\neval:\n  mc: {data: ceval}\n")
    with pytest.raises(ConfigError, match=f"eval config .*run it with posttrain eval {path}$"):
        load_config(path)
