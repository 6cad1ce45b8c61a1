"""
serve.py under load: N concurrent streaming clients (the official AsyncOpenAI client), each
sending its requests one after another, against a server this script starts on 127.0.0.1
and stops. Every request is greedy (sample.py's chat decoding) on a held-out question, and
every answer is checked identical to the one the same question gets alone.

  python benchmarks/bench_serve.py --out_dir=out/tiny-sft --sft_data=data/sft          # the demo's model
  python benchmarks/bench_serve.py --config=config/train_config.py --sft_data=data/sft  # 45M shape, random weights

First a warm-up pass, then the questions one by one (1 client: the reference answers and the
unloaded time to first token), then N = 4, 16, 32 clients. Per row: total generated tokens/s
and its ratio to one client's, time to first token p50 / p95 and p95's ratio to the unloaded
one, requests lost (errors, timeouts: must be 0), answers that differ from the one-by-one ones
(must be 0). Bounded: --requests per client, --time_limit seconds a run.
"""
import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data_utils import UserError, run_cli  # noqa: E402
from miniglm.checkpoint import save_checkpoint  # noqa: E402
from miniglm.distributed import free_port  # noqa: E402
from miniglm.metrics import held_out_questions  # noqa: E402
from miniglm.tokenizer import GPT2  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import load_config  # noqa: E402


def random_checkpoint(config, folder):
    """A checkpoint of config's shape with random weights and the GPT-2 vocabulary."""
    c = load_config([config])
    args = dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "best.pt", dict(model=model.state_dict(), model_args=model.config.__dict__, iter_num=0,
                                             tokenizer_sha256=GPT2.sha256, vocab=None, kind="sft"))
    return folder, model.num_params()


def pin(server_pid):
    """The load generator on the last core, the server on the others, as a load test runs its
    clients on other machines: otherwise the clients' parsing takes the server's CPU and its
    delays count in the server's time to first token. Linux only; else nothing is pinned."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
    if len(cores) < 2:
        return "not pinned"
    os.sched_setaffinity(server_pid, cores[:-1])  # (before the server starts its threads: they inherit it)
    os.sched_setaffinity(0, cores[-1:])
    return f"server on cores {cores[0]}-{cores[-2]}, clients on core {cores[-1]}"


def start_server(out_dir, port, max_batch, threads=None, device="cpu", pinned=True):
    proc = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={out_dir}", f"--port={port}", f"--device={device}",
                             f"--max_batch={max_batch}", "--max_queue=256",
                             *([f"--threads={threads}"] if threads else [])], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc.placement = pin(proc.pid) if pinned else "not pinned: clients and server share the cores"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise UserError(f"serve.py did not come up: {proc.stderr.read()[-500:]}")


async def one_request(client, model, question, max_tokens):
    """(text, completion tokens, seconds to the first text, seconds in all) of one streamed answer."""
    t0 = time.perf_counter()
    first, text, tokens = None, [], 0
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                  temperature=0, max_tokens=max_tokens, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return "".join(text), tokens, first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0


async def run_clients(url, model, jobs, time_limit, max_tokens, ramp=0.0):
    """jobs: per client, its questions in order; the clients start one after another over ramp
    seconds, as users arrive. Returns (results [(question, outcome)], seconds)."""
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=time_limit,
                                http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=256)))
    results = []

    async def one_client(c, questions):
        await asyncio.sleep(ramp * c / len(jobs))
        for q in questions:
            try:
                results.append((q, await one_request(client, model, q, max_tokens)))
            except Exception as e:  # counted as lost
                results.append((q, e))

    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(one_client(c, qs) for c, qs in enumerate(jobs))), time_limit)
    except asyncio.TimeoutError:
        pass
    elapsed = time.perf_counter() - t0
    await client.close()
    return results, elapsed


def summarize(n, results, elapsed, expected, reference):
    done = [(q, r) for q, r in results if not isinstance(r, Exception)]
    lost = expected - len(done)
    differ = sum(r[0] != reference[q] for q, r in done) if reference else 0
    tokens = sum(r[1] for _, r in done)
    ttft = sorted(r[2] for _, r in done)
    p95 = ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] if ttft else float("nan")
    return dict(n=n, requests=len(done), tokens=tokens, tok_s=tokens / elapsed, p50=statistics.median(ttft) if ttft
                else float("nan"), p95=p95, lost=lost, differ=differ, seconds=elapsed)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="a trained model to serve (its folder name is the model id)")
    p.add_argument("--config", help="or: a training config; its shape with random weights (GPT-2 vocabulary)")
    p.add_argument("--sft_data", default="data/sft", help="where the held-out questions come from")
    p.add_argument("--clients", default="1,4,16,32", help="concurrent clients per run (1 = the one-by-one pass)")
    p.add_argument("--questions", type=int, default=64, help="distinct questions (the one-by-one pass answers each)")
    p.add_argument("--device", default="cpu", help="serve.py --device")
    p.add_argument("--no_pin", action="store_true", help="let clients and server share every core (default: the "
                   "clients on the last core, the server on the rest)")
    p.add_argument("--threads", type=int, help="serve.py --threads (default: serve.py's, all cores but one)")
    p.add_argument("--requests", type=int, default=16, help="requests each client sends, one after another")
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--time_limit", type=float, default=600, help="seconds a run may take; unfinished requests are lost")
    args = p.parse_args()
    questions = [q for q, _ in held_out_questions(args.sft_data, args.questions)]
    if not questions:
        raise UserError(f"no held-out questions in {args.sft_data}/sft_val.jsonl (prepare the SFT data first)")
    counts = [int(n) for n in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.config:
            out_dir, n_params = random_checkpoint(args.config, Path(tmp) / Path(args.config).stem)
        elif args.out_dir:
            out_dir, n_params = args.out_dir, None
        else:
            raise UserError("give --out_dir or --config")
        port = free_port()
        server = start_server(out_dir, port, max(counts), args.threads, args.device, not args.no_pin)
        try:
            rows = bench(f"http://127.0.0.1:{port}/v1", Path(out_dir).name, questions, counts, args)
        finally:
            server.terminate()
            server.wait(timeout=30)
    report(rows, args.config or out_dir, n_params, args, server.placement)


def bench(url, model, questions, counts, args):
    warm_up = [questions[i::8] for i in range(8)]
    asyncio.run(run_clients(url, model, warm_up, args.time_limit, args.max_tokens))
    one, elapsed = asyncio.run(run_clients(url, model, [questions], args.time_limit, args.max_tokens))
    reference = {q: r[0] for q, r in one if not isinstance(r, Exception)}
    rows = [summarize(1, one, elapsed, len(questions), reference)]
    for n in [c for c in counts if c > 1]:
        # at any moment the clients ask different questions (users do): answers of equal length would
        # finish in the same step, and their clients would all come back at once
        jobs = [[questions[(c + r * n) % len(questions)] for r in range(args.requests)] for c in range(n)]
        ramp = statistics.mean(r[3] for _, r in one if not isinstance(r, Exception))  # one request's time
        results, elapsed = asyncio.run(run_clients(url, model, jobs, args.time_limit, args.max_tokens, ramp))
        rows.append(summarize(n, results, elapsed, n * args.requests, reference))
    return rows


def report(rows, out_dir, n_params, args, placement):
    base = rows[0]
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    print(
        f"\n{out_dir}"
        + (f" ({n_params / 1e6:.1f}M parameters, random weights)" if n_params else "")
        + (f"; {args.device}" if args.device != "cpu" else "")
        + f"; {os.cpu_count()} CPU cores, the server's decode loop on {threads} thread(s); greedy, "
        f"max_tokens {args.max_tokens}; {args.requests} requests per client; {placement}"
    )
    print(
        "| clients | requests | tokens | tokens/s | x 1 client | TTFT p50 | TTFT p95 | p95 / unloaded | lost | differ |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['requests']} | {r['tokens']} | {r['tok_s']:,.0f} | x{r['tok_s'] / base['tok_s']:.1f} | "
            f"{r['p50'] * 1000:.0f} ms | {r['p95'] * 1000:.0f} ms | x{r['p95'] / base['p95']:.1f} | {r['lost']} | "
            f"{r['differ']} |"
        )
    if any(r["lost"] or r["differ"] for r in rows):
        raise UserError("requests were lost or answers differed from one-by-one greedy (see the table)")


if __name__ == "__main__":
    run_cli(main)
