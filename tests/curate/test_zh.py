"""The data commands on Chinese text (fixtures in tests/curate/fixtures/zh, written for these tests):
seed-style records, from-task in Chinese, filter rules and PII, stats with jieba and a CJK font."""

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest

from conftest import SHARED_ASSETS
from posttrain.cli import main
from posttrain.curate import convert, dedup, filter as filt, from_task, stats, validate
from posttrain.curate.lang import is_cjk, lang_of, script_of, units
from posttrain.errors import DataError

ZH = Path(__file__).parent / "fixtures" / "zh"


def rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_language_by_share_of_cjk_letters():
    mixed = "Apple iPhone 15粉色款很好看"  # 11 Latin letters, 6 CJK characters
    assert script_of(mixed) == "latin" and is_cjk(mixed) and lang_of(mixed) == "zh"
    assert not is_cjk("Translate 你好 into French, please.") and lang_of("") == "en"
    assert units("将85华氏度转换为摄氏度。") == ["将", "85", "华", "氏", "度", "转", "换", "为", "摄", "氏", "度"]


def test_seed_records_list_input_and_input_only_rows(tmp_path):
    report = validate.validate(ZH / "seed_records.json")
    assert (report["valid"], report["invalid"]) == (4, 0)
    out = tmp_path / "o.jsonl"
    report = convert.convert(ZH / "seed_records.json", out, "openai")
    assert report["written"] == 4 and report["rejected"] == {} and report["lost"] == {}
    assert report["reshaped"] == {"list-valued input joined with '\\n'": 1,
                                  "no instruction: the input is the prompt": 2}
    prompts = [r["messages"][0]["content"] for r in rows(out)]
    assert prompts[0] == "把下面的句子改写成意思相同的另一种说法。\n今天天气很好。\n我们去公园散步吧。"
    assert prompts[1:] == ["你是谁？", "你叫什么名字？", "翻译成英文。\n你好"]


def test_alpaca_row_with_neither_instruction_nor_input_names_the_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "", "output": "x"}\n{"input": ["a", 3], "output": "y"}\n')
    report = validate.validate(bad)
    assert "bad.jsonl line 1: field 'instruction' is missing/empty" in report["errors"][0]
    assert "bad.jsonl line 2: field 'input' must be a string" in report["errors"][1]


def test_every_task_has_several_chinese_templates():
    tasks = from_task.load_templates()
    for name in ("sentiment", "classification", "nli", "paraphrase", "qa", "translation", "summarization",
                 "data_to_text", "multiple_choice", "reading_comprehension"):
        assert len(tasks[name]["templates"]["zh"]) >= 3 and len(tasks[name]["templates"]["en"]) >= 2, name
        assert all(units(t["instruction"] + t.get("input", "")) for t in tasks[name]["templates"]["zh"])


def test_from_task_chinese_sentiment_seeded(tmp_path):
    report = from_task.from_task(ZH / "sentiment.csv", tmp_path / "a.jsonl", "sentiment", seed=0)
    out = rows(tmp_path / "a.jsonl")
    assert report["langs"] == {"zh": 4} and [r["output"] for r in out] == ["正面", "负面", "正面", "负面"]
    assert all("“负面”、“正面”" in r["instruction"] or "正面还是负面" in r["instruction"] for r in out)
    from_task.from_task(ZH / "sentiment.csv", tmp_path / "b.jsonl", "sentiment", seed=0)
    assert rows(tmp_path / "b.jsonl") == out
    firsts = set()
    for seed in range(6):
        from_task.from_task(ZH / "sentiment.csv", tmp_path / "s.jsonl", "sentiment", seed=seed)
        firsts.add(tuple(r["instruction"] for r in rows(tmp_path / "s.jsonl")))
    assert len(firsts) > 1  # templates are sampled per row
    forced = from_task.from_task(ZH / "sentiment.csv", tmp_path / "e.jsonl", "sentiment", lang="en")
    assert forced["langs"] == {"en": 4}
    assert [r["output"] for r in rows(tmp_path / "e.jsonl")] == ["positive", "negative", "positive", "negative"]


def test_multiple_choice_options_and_answers(tmp_path):
    out = tmp_path / "mc.jsonl"
    with pytest.raises(DataError, match=r"mc.jsonl line 4: field 'answer' is 'E': not a letter A-B"):
        from_task.from_task(ZH / "mc.jsonl", out, "multiple_choice")
    report = from_task.from_task(ZH / "mc.jsonl", out, "multiple_choice", skip_bad=True)
    assert report["rows"] == 3 and report["rejected"] == {"field 'answer' is 'E'": 1}
    got = rows(out)
    assert [r["output"] for r in got] == ["B", "A", "C"]  # list + letter, dict + option text, A-D columns + "c"
    assert "A. 上海\nB. 北京\nC. 广州\nD. 深圳" in got[0]["instruction"] + got[0]["input"]
    assert "A. 两个\nB. 三个\nC. 四个\nD. 五个" in got[2]["instruction"] + got[2]["input"]
    from_task.from_task(ZH / "mc.jsonl", out, "multiple_choice", answer="both", skip_bad=True)
    assert [r["output"] for r in rows(out)] == ["B. 北京", "A. H2O", "C. 四个"]
    assert rows(tmp_path / "mc.rejected.jsonl")[0]["source"].endswith("mc.jsonl line 4")


def test_reading_comprehension(tmp_path):
    out = tmp_path / "rc.jsonl"
    report = from_task.from_task(ZH / "rc.jsonl", out, "reading_comprehension", answer="text", seed=3)
    got = rows(out)
    assert report["langs"] == {"zh": 2} and [r["output"] for r in got] == ["骑自行车", "成都"]
    assert "小明每天早上七点起床" in got[0]["instruction"] + got[0]["input"]
    assert "A. 走路\nB. 骑自行车\nC. 坐公交" in got[0]["instruction"] + got[0]["input"]


def test_data_to_text_fields_and_dict_column(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["data", "from-task", str(ZH / "products.jsonl"), "--task", "data_to_text", "--out", str(out),
                 "--fields", "品牌,型号,颜色", "--columns", "text=描述"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["data", "from-task", str(ZH / "products.jsonl"), "--task", "data_to_text", "--out", str(out),
                 "--columns", "text"]) == 2
    assert "--columns must be field=column pairs" in capsys.readouterr().err
    got = rows(out)
    assert report["langs"] == {"zh": 3} and report["empty_fields"] == {"颜色": 1}
    assert "品牌：华为；型号：Mate 60；颜色：雅川青" in got[0]["instruction"] + got[0]["input"]
    assert "品牌：小米；型号：14" in got[1]["instruction"] + got[1]["input"] and "颜色" not in got[1]["input"]
    assert got[2]["output"] == "苹果iPhone 15粉色款，清新可爱。"
    dict_rows = tmp_path / "d.jsonl"
    dict_rows.write_text(json.dumps({"data": {"品牌": "华为", "颜色": "黑色"}, "text": "华为黑色款。"},
                                    ensure_ascii=False) + "\n", encoding="utf-8")
    from_task.from_task(dict_rows, out, "data_to_text")
    assert "品牌：华为；颜色：黑色" in "".join(rows(out)[0].values())
    with pytest.raises(DataError, match=r"products.jsonl line 1: fields 型号x are all missing/empty"):
        from_task.from_task(ZH / "products.jsonl", out, "data_to_text", fields=["型号x"], columns={"text": "描述"})


def test_user_yaml_chinese_templates(tmp_path):
    extra = tmp_path / "t.yaml"
    extra.write_text("tasks:\n  echo:\n    columns: [text]\n    templates:\n"
                     "      - {instruction: '重复这句话：{text}', output: '{text}'}\n"
                     "      - {instruction: 'Repeat: {text}', output: '{text}'}\n", encoding="utf-8")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "你好，世界"}\n{"text": "hello world"}\n', encoding="utf-8")
    report = from_task.from_task(data, tmp_path / "o.jsonl", "echo", templates=extra)
    assert report["templates"] == {"en": 1, "zh": 1} and report["langs"] == {"zh": 1, "en": 1}
    assert [r["instruction"] for r in rows(tmp_path / "o.jsonl")] == ["重复这句话：你好，世界", "Repeat: hello world"]


def test_filter_chinese_rules_and_pii(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - pii: {scrub: [email, phone, id, name], names_file: names.txt}\n"
                     "  - length: {field: response, unit: chars, min: 2}\n  - refusal: true\n"
                     "  - repetition: {max_ratio: 0.3}\n", encoding="utf-8")
    (tmp_path / "names.txt").write_text((ZH / "names.txt").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "f.jsonl"
    report = filt.filter_file(ZH / "alpaca_zh.jsonl", out, rules)
    assert report["dropped"] == {"refusal": 2, "repetition": 1, "length": 1} and report["kept"] == 6
    assert report["changed"] == {"pii": 1} and report["pii_matches"] == {"email": 1, "phone": 1, "id": 1, "name": 1}
    scrubbed = next(r["output"] for r in rows(out) if r["user_id"] == "u6")
    # the ID number with a wrong check digit (an order number here) is left alone
    assert scrubbed == "请拨打<phone>或发邮件到<email>联系<name>，身份证号<id>，订单号110101199003070000。"
    reasons = {r["row"]["user_id"]: r["reason"] for r in rows(tmp_path / "f.rejected.jsonl")}
    assert reasons["u3"] == "refusal '抱歉，我不能'" and reasons["u4"] == "refusal '作为一个ai'"
    assert reasons["u10"] == "response chars 1 outside [2, inf]" and reasons["u5"].startswith("repetition")


def test_repetition_counts_character_ngrams_in_chinese():
    loop = "苹果香蕉橙子" * 5
    assert filt.repetition_ratio(loop) > 0.5  # a space split would see one word and no repeats
    assert filt.repetition_ratio("秋风起，落叶黄，雁南飞，稻花香。今年的秋天来得特别早。") == 0.0
    assert filt.repetition_ratio("a b c a b c a b c") == pytest.approx(4 / 7)  # English unchanged


def test_pii_patterns_next_to_chinese_text():
    scrub = filt.PiiScrubber(["email", "phone", "id"])
    assert scrub("手机+86 139-1234-5678，座机010-12345678。") == "手机<phone>，座机<phone>。"
    assert scrub("邮箱abc@x.com。") == "邮箱<email>。"
    assert scrub("身份证44052418800101001X号") == "身份证44052418800101001X号"  # check digit should be 4
    assert scrub("身份证440524188001010014号") == "身份证<id>号"
    assert filt.cn_id_valid("11010519491231002X") and not filt.cn_id_valid("110101199003070000")
    with pytest.raises(DataError, match="needs a list of names"):
        filt.PiiScrubber(["name"])


def test_stats_chinese_verb_noun_and_cjk_font(tmp_path, tiny_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)" for tofu boxes
        report = stats.stats(ZH / "alpaca_zh.jsonl", tmp_path / "r", tokenizer=str(tiny_dir))
    assert report["scripts"] == {"cjk": 8, "latin": 2}  # 'I love Beijing.' outweighs 翻译下面的句子。我爱北京。
    pairs = {(v, n): c for v, n, c in report["verb_noun"]}
    assert pairs[("写", "短诗")] == 2 and pairs[("转换", "摄氏度")] == 1 and pairs[("give", "tips")] == 1
    assert report["verb_noun_rows"] == sum(pairs.values()) and "plot_note" not in report
    assert set(report["lengths"]) == {"prompt_chars", "response_chars", "prompt_tokens", "response_tokens"}
    assert report["lengths"]["response_chars"]["max"] == 90  # characters (u6 has one space-separated "word")
    assert "Noto Sans SC" in stats.cjk_fonts()
    assert "| 写 | 短诗 | 2 |" in (tmp_path / "r" / "stats.md").read_text(encoding="utf-8")


def test_stats_without_jieba_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(stats, "_pos_tagger", lambda: None)
    report = stats.stats(ZH / "alpaca_zh.jsonl", tmp_path / "r")
    assert report["verb_noun_skipped"].startswith("9 Chinese instructions: install posttrain[zh]")
    assert Counter(v for v, _, _ in report["verb_noun"]) == {"give": 1}


def test_shared_chinese_demo_dedup_and_filter(tmp_path):
    """Integration: the shared alpaca_zh_demo (alpaca-derived, non-commercial; not in a user's clone)."""
    demo = SHARED_ASSETS / "data" / "llamafactory" / "alpaca_zh_demo.json"
    if not demo.is_file():
        pytest.skip("../shared/assets not present")
    report = dedup.dedup(demo, tmp_path / "d.jsonl", near=0.8)
    assert report["rows"] == 1000 and report["removed"] == {"exact": 8} and report["near"]["unit"] == "auto"
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - pii: {}\n  - refusal: true\n  - repetition: {max_ratio: 0.3}\n"
                     "  - script: {allow: [cjk]}\n", encoding="utf-8")
    report = filt.filter_file(tmp_path / "d.jsonl", tmp_path / "f.jsonl", rules)
    # the README walk-through's counts (its rules add length limits that drop none of these rows)
    assert report["kept"] == 889 and report["dropped"] == {"script": 65, "refusal": 34, "repetition": 4}
    assert report["pii_matches"] == {}
