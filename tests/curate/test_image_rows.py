"""`posttrain data validate` and `data stats` on image rows: every image must exist and decode (the error names
file, line and field), placeholders must match images; stats counts images. Text rows are untouched."""

import base64
import json

import pytest

from posttrain.cli import main
from posttrain.curate import stats, validate


def _row(content, images=None, answer="It is red."):
    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}
    return row | ({"images": images} if images is not None else {})


@pytest.fixture
def image_file(tmp_path):
    """Rows naming images every way a data file can, with one missing file, one that does not decode and one
    count mismatch."""
    from PIL import Image

    Image.new("RGB", (8, 8), (220, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "red.png").read_bytes()).decode()
    rows = [
        _row("<image>What colour?", ["red.png"]),  # line 1: relative to the data file
        _row("<image><image>Same?", ["red.png", str(tmp_path / "red.png")]),  # line 2: two images, one absolute
        _row([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Colour?"}]),  # line 3
        _row("No image here."),  # line 4: a text row
        _row("<image>What colour?", ["missing.png"]),  # line 5
        _row("<image>What colour?", ["broken.png"]),  # line 6
        _row("<image>What colour?", ["red.png", "red.png"]),  # line 7: two images, one placeholder
        _row("<image><image>Colour?", ["red.png", "broken.png"]),  # line 8: the second image is bad
    ]
    path = tmp_path / "vision.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_validate_checks_that_images_exist_and_decode(image_file, capsys):
    report = validate.validate(image_file)
    assert (report["rows"], report["valid"], report["invalid"]) == (8, 4, 4)
    errors = "\n".join(report["errors"])
    assert f"{image_file} line 5: field 'images[0]': image file not found: " in errors
    assert f"{image_file} line 6: field 'images[0]': image does not decode" in errors
    assert f"{image_file} line 7: field 'images'" in errors and "placeholder" in errors
    assert f"{image_file} line 8: field 'images[1]': image does not decode" in errors
    assert report["images"] == 4 and report["distinct_images"] == 4  # red.png (twice the same file), the URL, ...
    assert main(["data", "validate", str(image_file)]) == 1
    assert "images: 4 in valid rows" in capsys.readouterr().out


def test_validate_names_a_bad_image_url_part(tmp_path):
    row = _row([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "Colour?"}])
    path = tmp_path / "parts.jsonl"
    path.write_text(json.dumps(row) + "\n")
    report = validate.validate(path)
    assert report["invalid"] == 1 and report["errors"][0].startswith(f"{path} line 1: field 'image_url part 1': ")


def test_stats_counts_images(image_file, tmp_path):
    good = tmp_path / "good.jsonl"  # stats reads files that parse: lines 1-6 (it does not decode images)
    good.write_text("".join(image_file.read_text().splitlines(keepends=True)[:6]))
    report = stats.stats(good, tmp_path / "r")
    # red.png relative and absolute is one file: distinct = red.png, the data URL, missing.png, broken.png
    assert report["images"] == {"total": 6, "rows_with_images": 5, "distinct": 4, "per_row": {0: 1, 1: 4, 2: 1}}
    assert "- images: 6 in 5 rows (4 distinct" in (tmp_path / "r" / "stats.md").read_text()
