"""`--validation_prompts` files (soar_fast.data.validation_prompts): a .txt of prompts, or for FLUX.1
Kontext a .jsonl of prompt + input image rows (images relative to the file); bad rows are one line
naming the line and the fix."""

import json

import pytest

from soar_fast.config import ConfigError
from soar_fast.data.validation_prompts import read_validation_set


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_txt_and_jsonl_sets(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# header\na cat\n\n  a dog  \n", encoding="utf-8")
    vs = read_validation_set(str(txt))
    assert vs.prompts == ["a cat", "a dog"] and vs.images is None
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    vs = read_validation_set(str(_jsonl(tmp_path / "e.jsonl", [{"prompt": "make it red", "image": "in/a.png"}, "",
                                                                 {"text": "make it blue", "file_name": "in/a.png"}])))
    assert vs.prompts == ["make it red", "make it blue"]
    assert vs.images == [str((tmp_path / "in" / "a.png").resolve())] * 2
    vs = read_validation_set(str(_jsonl(tmp_path / "t.jsonl", [{"prompt": "a cat"}])))
    assert vs.prompts == ["a cat"] and vs.images is None  # a .jsonl of prompts only: text-to-image


@pytest.mark.parametrize("rows, needle", [
    (["{not json"], "e.jsonl:1: not valid JSON"),
    ([{"image": "a.png"}], 'e.jsonl:1: no "prompt" string'),
    ([{"prompt": "x", "image": "missing.png"}], "e.jsonl:1: image missing.png is not a file (paths are relative to"),
    ([{"prompt": "x", "image": "a.png"}, {"prompt": "y"}], 'some rows have an "image" and some not'),
    ([""], "holds no prompts"),
])
def test_bad_jsonl_rows_are_one_line(tmp_path, rows, needle):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ConfigError) as e:
        read_validation_set(str(_jsonl(tmp_path / "e.jsonl", rows)))
    assert needle in str(e.value) and "\n" not in str(e.value)
