"""Reading files (json/jsonl/csv/parquet) and the SFT pipeline: caps, weights, splits, drops, cache."""

import json

import datasets
import pandas as pd
import pytest

from posttrain.data.config import DataConfig, DatasetConfig
from posttrain.templates.config import TemplateConfig
from posttrain.data.pipeline import build_sft_data
from posttrain.data.reading import read_rows, source_of
from posttrain.errors import DataError, PosttrainError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep datasets' Arrow cache inside the test's temp folder, not the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))


def write_jsonl(path, rows, blank_after=()):
    lines = []
    for i, row in enumerate(rows):
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if i in blank_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(i: int, answer: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": answer or f"Answer {i}."}]}


def build(tokenizer, *datasets_, seed=0, **data_kw):
    cfg = DataConfig(datasets=list(datasets_), **{"max_length": 128, **data_kw})
    return build_sft_data(cfg, TemplateConfig(name="chatml"), tokenizer, seed)


# ---------------------------------------------------------------- reading


def test_read_jsonl_and_json_array(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}])
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"text": "x"}, {"text": "y"}, {"text": "z"}]), encoding="utf-8")
    assert read_rows(jsonl)["text"] == ["x", "y"]
    assert len(read_rows(array)) == 3
    assert source_of(array, 2) == f"{array} row 3"


def test_read_csv_and_parquet(tmp_path):
    frame = pd.DataFrame({"instruction": ["q1", "q2"], "output": ["a1", "a2"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet", index=False)
    for name in ("d.csv", "d.parquet"):
        rows = read_rows(tmp_path / name)
        assert rows.column_names == ["instruction", "output"] and rows["output"] == ["a1", "a2"]
    assert source_of(tmp_path / "d.csv", 0).endswith("d.csv row 1")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c"'], blank_after=(0,))
    with pytest.raises(DataError, match=r"data\.jsonl line 4: not valid JSON"):
        read_rows(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="dataset file not found: .*nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        read_rows(tmp_path / "x.txt")


def test_source_of_counts_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}], blank_after=(0, 1))
    assert len(read_rows(path)) == 3
    assert [source_of(path, i).rsplit(" ", 1)[1] for i in range(3)] == ["1", "3", "5"]


# ---------------------------------------------------------------- pipeline


def test_encodes_counts_drops_and_fills_variables(tmp_path, tiny_tokenizer):
    rows = [chat(0, "I am {{name}}."), {"messages": [{"role": "user", "content": "no reply"}]},
            chat(2, "Paris. " * 200), chat(3)]
    data = build(tiny_tokenizer, DatasetConfig(path=str(write_jsonl(tmp_path / "c.jsonl", rows))),
                 variables={"name": "Aria"})
    assert data.drops == {"no_assistant_turn": 1, "too_long": 1}
    assert data.n_rows == 4 and len(data.train) == 2 and data.eval is None
    assert set(data.train.column_names) == {"input_ids", "weights", "n_loss_tokens"}
    first = data.train[0]
    assert "I am Aria." in tiny_tokenizer.decode(first["input_ids"])
    assert len(first["weights"]) == len(first["input_ids"])
    assert first["n_loss_tokens"] == sum(w > 0 for w in first["weights"]) > 0


def test_all_formats_auto_detected_and_csv_columns_renamed(tmp_path, tiny_tokenizer):
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}])
    pd.DataFrame({"instruction": ["q"], "answer": ["a"]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"text": ["Once upon a time " * 40]}).to_parquet(tmp_path / "t.parquet")
    data = build(tiny_tokenizer, DatasetConfig(path=str(sharegpt)),
                 DatasetConfig(path=str(tmp_path / "a.csv"), columns={"output": "answer"}),
                 DatasetConfig(path=str(tmp_path / "t.parquet")), max_length=32)
    # plain text longer than max_length becomes several chunks, each at most 32 tokens
    assert len(data.train) > 3 and data.drops == {}
    assert max(len(ids) for ids in data.train["input_ids"]) <= 32


def test_bad_row_error_names_line_through_map(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", [chat(0), {"messages": [{"role": "bot", "content": "x"}]}],
                       blank_after=(0,))
    with pytest.raises(DataError, match=r"data\.jsonl line 3: field 'messages\[0\]\.role'.*role_tags"):
        build(tiny_tokenizer, DatasetConfig(path=str(path)))


def test_max_samples_and_weights(tmp_path, tiny_tokenizer):
    path = str(write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(10)]))
    assert len(build(tiny_tokenizer, DatasetConfig(path=path, max_samples=4)).train) == 4
    assert len(build(tiny_tokenizer, DatasetConfig(path=path, weight=2.5)).train) == 25
    half = build(tiny_tokenizer, DatasetConfig(path=path, weight=0.5))
    assert len(half.train) == 5 and len(set(map(tuple, half.train["input_ids"]))) == 5
    mixed = build(tiny_tokenizer, DatasetConfig(path=path, max_samples=4, weight=2), DatasetConfig(path=path))
    assert len(mixed.train) == 18 and mixed.n_rows == 20


def test_seed_decides_which_rows_are_capped(tmp_path, tiny_tokenizer):
    path = str(write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(20)]))
    picks = [build(tiny_tokenizer, DatasetConfig(path=path, max_samples=5), seed=s).train["input_ids"]
             for s in (0, 0, 1)]
    assert picks[0] == picks[1] and picks[0] != picks[2]


def test_val_size_fraction_count_and_explicit_eval(tmp_path, tiny_tokenizer):
    path = str(write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(10)]))
    frac = build(tiny_tokenizer, DatasetConfig(path=path, weight=2), val_size=0.2)
    assert len(frac.eval) == 2 and len(frac.train) == 16  # held out before weighting: no leak
    train_ids = set(map(tuple, frac.train["input_ids"]))
    assert not train_ids & set(map(tuple, frac.eval["input_ids"]))
    assert len(build(tiny_tokenizer, DatasetConfig(path=path), val_size=3).eval) == 3
    eval_path = str(write_jsonl(tmp_path / "e.jsonl", [chat(i) for i in range(100, 104)]))
    cfg = DataConfig(datasets=[DatasetConfig(path=path)], eval_datasets=[DatasetConfig(path=eval_path)],
                     val_size=0.5)
    explicit = build_sft_data(cfg, TemplateConfig(name="chatml"), tiny_tokenizer, 0)
    assert len(explicit.train) == 10 and len(explicit.eval) == 4 and explicit.n_rows == 14
    with pytest.raises(PosttrainError, match="holds out 10 of 10 rows"):
        build(tiny_tokenizer, DatasetConfig(path=path), val_size=10)


def test_zero_samples_lists_drop_reasons(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "x"}]}, chat(1, "long " * 300)]
    with pytest.raises(PosttrainError, match=r"no training samples left.*no_assistant_turn: 1, too_long: 1"):
        build(tiny_tokenizer, DatasetConfig(path=str(write_jsonl(tmp_path / "c.jsonl", rows))))
    with pytest.raises(PosttrainError, match="no rows selected"):
        build(tiny_tokenizer, DatasetConfig(path=str(tmp_path / "c.jsonl"), weight=0))


def test_second_build_reuses_the_cache(tmp_path, tiny_tokenizer):
    path = str(write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(6)]))
    first = build(tiny_tokenizer, DatasetConfig(path=path))
    second = build(tiny_tokenizer, DatasetConfig(path=path))
    assert first.train.cache_files and first.train.cache_files == second.train.cache_files
    changed = build(tiny_tokenizer, DatasetConfig(path=path), variables={"unused": "x"})
    assert changed.train.cache_files != first.train.cache_files
    reweighted = build(tiny_tokenizer, DatasetConfig(path=path, weight=2))
    assert reweighted.train.cache_files == first.train.cache_files  # a new weight reuses the encodings
