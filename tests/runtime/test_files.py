"""runtime.files: atomic file replacement and the JSON Lines reader."""

import os
import re

import pytest

from mistral_jax.runtime import files


def test_atomic_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "out.json"
    files.write_atomic(path, "old\n")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_file(path) as f:
            f.write("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]       # no temp file left
    files.write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~files.umask()


def test_jsonl_lines_numbers_skip_blanks_and_bom(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n  \n[1,\n"\xff"\n' + b"[" * 100_000 + b"\n")
    rows = list(files.read_jsonl(path))
    assert [n for n, *_ in rows] == [1, 4, 5, 6]
    assert rows[0][1:] == ({"a": 1}, None)
    assert rows[1][2].startswith("not valid JSON (")
    assert rows[2][2] == "not UTF-8 text (byte 0xff at byte 1 of the line)"
    assert rows[3][2] == "not valid JSON (nested too deeply to read)"


def test_read_json_object_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    for text, why in (("{", "not valid JSON ("), ("[1]", "expected a JSON object, got list"),
                      ("\udcff", "not valid JSON (")):
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(ValueError, match="^" + re.escape(f"{path}: {why}")):
            files.read_json_object(path, ValueError)
    path.write_text('{"a": 1}')
    assert files.read_json_object(path, ValueError) == {"a": 1}
    with pytest.raises(ValueError, match="not valid JSON"):
        files.read_json_object(tmp_path / "missing.json", ValueError)


def test_replace_dir_replaces_a_folder_only_on_success(tmp_path):
    real = tmp_path / "out"
    real.mkdir()
    (real / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with files.replace_dir(real) as tmp:
            (tmp / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in real.iterdir()] == ["old.txt"]
    with files.replace_dir(real) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in real.iterdir()] == ["new.txt"]
