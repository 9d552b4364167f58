"""Near-dedup recall and precision on planted duplicates (English words and Chinese characters).

The file has distinct rows of unrelated words, case/whitespace variants (exact duplicates after
normalising) and copies with 1-3 output words changed, so the planted pairs spread over Jaccard
0.63-0.97. Every planted pair at Jaccard >= threshold + 0.05 must be found in >= 95% of cases,
and no pair below the threshold may be removed (candidates are verified exactly).
"""

import json
import random

import pytest

from posttrain.cli import main
from posttrain.curate import dedup

LETTERS = "abcdefghijklmnopqrstuvwxyz"
HANZI = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 3000))  # 3,000 CJK unified ideographs


def _words(rng, lang, k):
    if lang == "en":
        return [''.join(rng.choices(LETTERS, k=rng.randint(3, 8))) for _ in range(k)]
    return [''.join(rng.choices(HANZI, k=2)) for _ in range(k)]


def planted(path, lang, seed=0, distinct=500, variants=50, copies=50):
    """Write the planted file; return [(copy line, original line)] for the changed-word copies."""
    rng = random.Random(seed)
    sep = " " if lang == "en" else ""
    size = (10, 60) if lang == "en" else (10, 40)  # Chinese: 2-character words, ~100 characters a row
    rows = [{"instruction": sep.join(_words(rng, lang, size[0])), "input": "",
             "output": sep.join(_words(rng, lang, size[1]))} for _ in range(distinct)]
    pairs, picks = [], rng.sample(range(distinct), variants + copies)
    for i in picks[:variants]:
        text = rows[i]["output"]
        rows.append({**rows[i], "output": "  " + (text.upper() if lang == "en" else text) + " \n"})
    for n, i in enumerate(picks[variants:]):
        text = rows[i]["output"]
        out = text.split(" ") if lang == "en" else [text[j:j + 2] for j in range(0, len(text), 2)]
        for pos in rng.sample(range(len(out)), (1, 1, 1, 2, 3)[n % 5]):  # 1-3 words changed: Jaccard spreads out
            out[pos] = _words(rng, lang, 1)[0]
        rows.append({**rows[i], "output": sep.join(out)})
        pairs.append((len(rows), i + 1))
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return pairs, rows


def true_jaccard(a, b):
    sa, sb = dedup.shingles(a), dedup.shingles(b)
    return len(sa & sb) / len(sa | sb)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_planted_near_duplicates_recall_and_precision(tmp_path, lang):
    pairs, rows = planted(tmp_path / "rows.jsonl", lang)
    text = lambda r: f"{r['instruction']}\n{r['output']}"  # noqa: E731 (what --key all compares)
    jac = {copy: true_jaccard(text(rows[copy - 1]), text(rows[orig - 1])) for copy, orig in pairs}
    high = [c for c, j in jac.items() if j >= 0.85]
    assert 15 <= len(high) < len(pairs) and min(jac.values()) < 0.8  # the planted pairs straddle the threshold
    found = 0
    for seed in range(3):  # three MinHash seeds: recall holds for the banding, not for one lucky draw
        report = dedup.dedup(tmp_path / "rows.jsonl", tmp_path / "out.jsonl", near=0.8, seed=seed)
        assert report["removed"]["exact"] == 50
        removed = {int(r["source"].rsplit(" ", 1)[1]): r for r in
                   map(json.loads, (tmp_path / "out.removed.jsonl").read_text().splitlines()) if r["reason"] == "near"}
        assert set(removed) <= set(jac)  # precision: only planted copies go
        assert all(jac[c] >= 0.8 and r["similarity"] == pytest.approx(jac[c], abs=1e-3) for c, r in removed.items())
        found += sum(c in removed for c in high)
        assert report["near"]["unit"] == "auto" and report["near"]["candidate_probability"]["0.85"] >= 0.95
    assert found / (3 * len(high)) >= 0.95


def test_band_choice_meets_recall_at_every_threshold():
    for threshold in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95):
        bands, rows = dedup.lsh_bands(threshold, 64)
        assert bands * rows <= 64
        assert dedup.candidate_probability(dedup.recall_point(threshold), bands, rows) >= 0.95
        # one more row per band would miss the target: the banding is the sharpest that meets it
        assert dedup.candidate_probability(dedup.recall_point(threshold), 64 // (rows + 1), rows + 1) < 0.95


def test_help_states_the_s_curve(capsys):
    with pytest.raises(SystemExit):
        main(["data", "dedup", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    bands, rows = dedup.lsh_bands(0.8, 64)
    p = [round(dedup.candidate_probability(j, bands, rows), 2) for j in (0.7, 0.8, 0.85)]
    assert f"{bands} bands x {rows} rows, P = {p[0]:.2f} at J 0.7, {p[1]:.2f} at 0.8, {p[2]:.2f} at 0.85" in help_text


def test_chinese_rows_use_character_shingles():
    a = "将85华氏度转换为摄氏度并说明换算公式。"
    assert dedup.shingles(a) == dedup.shingles(a, unit="char") and len(dedup.shingles(a, unit="word")) == 1
    assert dedup.shingles("the cat sat on the mat today") == dedup.shingles("the cat sat on the mat today", unit="word")
