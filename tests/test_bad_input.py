"""Bad input never gives a traceback: every reader of user files reports file:line and
skips the record (counted), or stops there under --strict. The classes of odd text: bytes
that are not UTF-8 (tests/test_sft.py, test_data.py), and JSON that parses yet cannot be
used: a lone surrogate (\\ud800: not valid Unicode, no file can hold it as UTF-8), nesting
too deep for the parser, a number too long to convert."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_script
from data_utils import UserError, parse_json, read_jsonl

SURROGATE = '{"text": "好\\ud800诗"}'  # parses: json.loads gives a str that UTF-8 cannot encode
CASES = {
    "surrogate": (SURROGATE, "text is not valid Unicode (lone surrogate U+D800 at character 2)"),
    "nested": ("[" * 100_000 + "]" * 100_000, "bad JSON (nested too deeply)"),
    "long number": ('{"text": "x", "n": ' + "9" * 5000 + "}", "bad JSON (Exceeds the limit (4300 digits)"),
}


@pytest.mark.parametrize("case", CASES)
def test_parse_json_names_the_problem(case):
    line, problem = CASES[case]
    with pytest.raises(ValueError) as e:
        parse_json(line)
    assert str(e.value).startswith(problem)


def test_the_problem_names_where_the_bad_text_is():
    with pytest.raises(ValueError, match=r"^conversations\[1\]\.content is not valid Unicode \(lone surrogate U\+DFFF"):
        parse_json('{"conversations": [{"content": "ok"}, {"content": "\\udfff"}]}')
    assert parse_json('{"text": "\\ud83d\\ude00"}') == {"text": "😀"}  # a surrogate pair is one real character


def write_lines(path, good):
    """A JSONL file: each bad case on its own line, a good record after each."""
    lines = [x for case in CASES.values() for x in (case[0], json.dumps(good, ensure_ascii=False))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_skips_and_counts_or_stops_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", {"text": "好诗"})
    records, bad = read_jsonl(path, strict=False)
    assert [r for _, r in records] == [{"text": "好诗"}] * 3
    assert [b.split(": ", 1)[0] for b in bad] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    with pytest.raises(UserError, match=f"^{path}:1: text is not valid Unicode"):
        list(read_jsonl(path, strict=True)[0])


def one_line_error(proc, where):
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {where}") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_fetch_local_and_prepare(tmp_path):
    src = write_lines(tmp_path / "docs.jsonl", {"text": "床前明月光，疑是地上霜。"})
    out = run_script("data/fetch_data.py", "local", "--input", src, "--out_dir", tmp_path / "a")
    assert f"skipped 3 malformed record(s), first: {src}:1: text is not valid Unicode" in out.stdout
    assert len((tmp_path / "a" / "docs.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    one_line_error(run_script("data/fetch_data.py", "local", "--input", src, "--strict", "--out_dir", tmp_path / "b",
                              check=False), f"{src}:1: text is not valid Unicode")
    docs = write_lines(tmp_path / "prep" / "docs.jsonl", {"text": "床前明月光，疑是地上霜。" * 20})
    out = run_script("data/prepare.py", "--docs", docs, "--bpe_vocab_size", "512", "--num_threads", "1")
    assert f"skipped 3 malformed document(s), first: {docs}:1" in out.stdout
    one_line_error(run_script("data/prepare.py", "--docs", docs, "--strict", check=False),
                   f"{docs}:1: text is not valid Unicode")


@pytest.mark.slow
def test_prepare_sft_jsonl_and_json_list(tmp_path):
    good = {"question": "你好", "answer": "你好!"}
    src = write_lines(tmp_path / "qa.jsonl", good)
    out = run_script("data/prepare_sft.py", "--input", src, "--out_dir", tmp_path / "o", "--block_size", "32")
    assert f"skipped 3 malformed record(s); first: {src}:1: text is not valid Unicode" in out.stdout
    one_line_error(
        run_script("data/prepare_sft.py", "--input", src, "--strict", "--out_dir", tmp_path / "s", check=False),
        f"{src}:1: text is not valid Unicode",
    )
    as_list = tmp_path / "qa.json"
    as_list.write_text(f'[{json.dumps(good)}, {{"question": "\\ud800", "answer": "x"}}, {json.dumps(good)}]')
    out = run_script("data/prepare_sft.py", "--input", as_list, "--out_dir", tmp_path / "j", "--block_size", "32")
    assert f"skipped 1 malformed record(s); first: {as_list}:record 2: question is not valid Unicode" in out.stdout


def test_chinese_poetry_file_with_a_bad_record(tmp_path):
    mirror = tmp_path / "mirror" / "曹操诗集"
    mirror.mkdir(parents=True)
    poems = [
        {"title": "观沧海", "author": "曹操", "paragraphs": ["东临碣石，以观沧海。"]},
        {"title": "\ud800", "author": "曹操", "paragraphs": ["x"]},
    ]
    (mirror / "caocao.json").write_text(json.dumps(poems), encoding="utf-8")  # ASCII escapes: the file is valid UTF-8
    out = run_script(
        "data/fetch_data.py",
        "chinese-poetry",
        "--mirror",
        tmp_path / "mirror",
        "--collections",
        "caocao",
        "--out_dir",
        tmp_path / "out",
    )
    assert (
        "skipped 1 malformed record(s), first: " in out.stdout and "record 2: title is not valid Unicode" in out.stdout
    )
    assert "观沧海" in (tmp_path / "out" / "docs.jsonl").read_text(encoding="utf-8")


@pytest.mark.slow
def test_sample_prompts_that_are_not_utf8(tiny_runs, tmp_path):
    pre, _ = tiny_runs
    proc = subprocess.run(
        [sys.executable, "sample.py", f"--out_dir={pre}", b"--start=\xff\xfe"], cwd=ROOT, capture_output=True, text=True
    )
    one_line_error(proc, "--start is not valid Unicode (lone surrogate U+DCFF at character 1)")
    (tmp_path / "p.txt").write_bytes(b"\xe4\xbd\xa0\xff")
    one_line_error(
        run_script("sample.py", f"--out_dir={pre}", f"--start=FILE:{tmp_path / 'p.txt'}", check=False),
        f"{tmp_path / 'p.txt'}: not UTF-8 (byte 0xff at offset 3)",
    )
