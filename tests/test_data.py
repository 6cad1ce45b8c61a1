import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from conftest import SHARED_POETRY, load_script, run_script
from data_utils import PretrainData
from miniglm.tokenizer import EOT, GPT2


def test_fortunes_documents(fortunes_docs):
    docs = [json.loads(line) for line in fortunes_docs.read_text().splitlines()]
    poems = [d for d in docs if d.get("lines")]
    assert len(poems) > 350 and len(docs) > 5000
    assert not any("\x1b" in d["text"] for d in docs), "ANSI colour codes must be stripped"
    first = poems[0]
    assert first["title"] == "感遇・其一" and first["author"] == "张九龄"
    assert first["text"].startswith("《感遇・其一》\n作者:张九龄\n兰叶春葳蕤")


def test_prepare_round_trip(pretrain_dir, corpus_docs):
    """Decoding train.bin + val.bin gives back exactly the documents, each ended by EOT."""
    texts = sorted(json.loads(line)["text"] for line in corpus_docs.read_text().splitlines())
    ids = np.concatenate([np.fromfile(pretrain_dir / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert ids[-1] == EOT
    recovered = GPT2.decode(ids).split("<|endoftext|>")[:-1]
    assert sorted(recovered) == texts
    meta = json.loads((pretrain_dir / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == len(ids)
    assert meta["val_documents"] >= 1 and meta["train_documents"] + meta["val_documents"] == len(texts)


def test_windows_stay_in_bounds_and_shift_by_one(pretrain_dir):
    data = PretrainData(pretrain_dir, block_size=64, tok=GPT2)
    n = data.num_tokens("val")
    g = torch.Generator().manual_seed(0)
    rows = data.sample_rows("val", 5000, g)
    assert int(rows.min()) >= 0 and int(rows.max()) + 64 + 1 <= n
    batch = data.get_batch("val", 8, torch.Generator().manual_seed(1))
    assert batch["x"].shape == (8, 64) and batch["y"].shape == (8, 64)
    assert torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    raw = np.fromfile(pretrain_dir / "val.bin", dtype=np.uint16)
    start = int(data.sample_rows("val", 1, torch.Generator().manual_seed(1))[0])
    assert batch["x"][0].tolist() == raw[start:start + 64].tolist()


def test_chinese_poetry_mirror(tmp_path):
    if not SHARED_POETRY.exists():
        pytest.skip("no ../shared/data/chinese-poetry mirror beside the checkout")
    run_script("data/fetch_data.py", "chinese-poetry", "--mirror", SHARED_POETRY, "--collections", "tangshi300",
               "songci300", "--out_dir", tmp_path)
    docs = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    assert len(docs) == 366 + 280 - 1  # 唐诗三百首 lists one poem twice: kept once
    assert len({d["text"] for d in docs}) == len(docs)
    assert all(d["lines"] and d["text"].startswith("《") for d in docs)


def test_local_files_and_malformed_records(tmp_path):
    (tmp_path / "a.txt").write_text("第一篇\n%\n第二篇\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "一"}\nnot json\n{"nope": 1}\n{"text": "二"}\n', encoding="utf-8")
    proc = run_script("data/fetch_data.py", "local", "--input", tmp_path / "a.txt", tmp_path / "b.jsonl",
                      "--txt_sep", "\n%\n", "--out_dir", tmp_path / "out")
    assert "skipped 2 malformed record(s)" in proc.stdout
    texts = [json.loads(line)["text"] for line in (tmp_path / "out" / "docs.jsonl").read_text().splitlines()]
    assert texts == ["第一篇", "第二篇", "一", "二"]
    strict = run_script("data/fetch_data.py", "local", "--input", tmp_path / "b.jsonl", "--strict",
                        "--out_dir", tmp_path / "o2", check=False)
    assert (
        strict.returncode == 1
        and strict.stderr.strip() == f"error: {tmp_path / 'b.jsonl'}:2: bad JSON (Expecting value)"
    )


@pytest.mark.slow
def test_missing_inputs_give_one_line_errors(tmp_path):
    proc = run_script("data/fetch_data.py", "fortunes-zh", "--fortunes_dir", tmp_path, check=False)
    assert proc.returncode == 1 and "apt-get install -y fortunes-zh" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("data/prepare.py", "--docs", tmp_path / "none.jsonl", check=False)
    assert proc.returncode == 1 and "run data/fetch_data.py first" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_download_resumes_a_dropped_transfer(tmp_path):
    """A loopback server drops the first transfer halfway; download() retries with a
    Range request for the rest and only then gives the file its name."""
    fetch_data = load_script("data/fetch_data.py")
    payload = ("床前明月光，疑是地上霜。" * 5000).encode()
    starts = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            rng = self.headers.get("Range")
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            starts.append(start)
            body = payload[start:]
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if len(starts) == 1:  # first try: half the bytes, then the connection drops
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = tmp_path / "poems.json"
        fetch_data.download(f"http://127.0.0.1:{server.server_port}/poems.json", dest, retries=2)
    finally:
        server.shutdown()
    assert dest.read_bytes() == payload and not (tmp_path / "poems.json.part").exists()
    assert starts[0] == 0 and starts[1] == len(payload) // 2  # resumed, not restarted
