"""
Continuous batching: one decode loop serves every open request of a model (serve.py).

Each decode step runs one token of every running request together (GPT.decode_ragged: each
row at its own length). A request that arrives mid-generation is prefilled (with the others
that arrived meanwhile, left-padded in one forward) and joins the batch at the next step; a
finished or cancelled request leaves at once, and the last row moves into its place, so the
running rows are always the first rows of the cache and a freed row is reused.

Each row picks its next token with generation.choose_next, the step sample.py takes (the
penalties over its answer, its decoding constraint, its own seeded generator), so a greedy
answer is sample.py's token for token whatever else is in the batch (tests/test_serve.py).
"""
import threading
from collections import Counter, defaultdict, deque
from dataclasses import replace

import torch

from miniglm.generation import DEFAULT_DECODING, choose_next, left_padded, text_decoder, text_tail
from model import KVCache


class Busy(Exception):
    """The batch and the queue are full."""


class Job:
    """One request: prompt ids, at most max_tokens new tokens, decoding settings (the keys of
    generation.DEFAULT_DECODING), a seed (None: torch's global generator), stop strings, the
    decoding constraint, and emit(event), called from the engine's thread with ("text",
    piece), then ("done", finish_reason, usage) or ("error", message). stop_at_eot False
    writes on past the end token (sample.py's text continuation)."""

    def __init__(self, ids, max_tokens, decoding, emit, seed=None, stops=(), constraint=None, stop_at_eot=True):
        self.ids, self.max_tokens, self.emit, self.stops = list(ids), max_tokens, emit, tuple(stops)
        self.decoding = {k: decoding[k] for k in DEFAULT_DECODING}
        self.seed, self.constraint, self.stop_at_eot = seed, constraint, stop_at_eot
        self.cancelled = self.done = False
        self.written, self.state, self.held, self.length, self.last, self.generated = [], b"", "", 0, None, 0
        self.decoder, self.generator = text_decoder(constraint), None

    def cancel(self):
        """Leave the batch at the next step (the client went away)."""
        self.cancelled = True

    def usage(self):
        n = len(self.ids)
        return {"prompt_tokens": n, "completion_tokens": self.generated, "total_tokens": n + self.generated}


class Engine:
    """The decode loop of one model: submit() jobs from any thread; start() runs step() in a
    thread of its own (a test may call step() itself). At most max_batch jobs decode at once
    and max_queue wait; past that submit() raises Busy."""

    def __init__(self, model, tok, max_batch=32, max_queue=64):
        self.model, self.tok, self.max_batch, self.max_queue = model, tok, max_batch, max_queue
        w = model.lm_head.weight
        self.device, self.cache = w.device, KVCache(model.config, max_batch, w.device, w.dtype)
        self.rows, self.waiting, self.wake = [], deque(), threading.Condition()
        self.finished, self.steps, self.row_steps = Counter(), 0, 0  # finish reasons; batch occupancy
        self.thread, self.stopping = None, False

    def submit(self, job):
        with self.wake:
            if len(self.rows) + len(self.waiting) >= self.max_batch + self.max_queue:
                raise Busy(f"{len(self.rows)} requests are running and {len(self.waiting)} waiting (the limits: "
                           f"--max_batch {self.max_batch}, --max_queue {self.max_queue})")
            self.waiting.append(job)
            self.wake.notify()

    def start(self):
        self.thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def _run(self):
        while True:
            with self.wake:
                while not (self.waiting or self.rows or self.stopping):
                    self.wake.wait()
                if self.stopping:
                    return
            self.step()

    @torch.inference_mode()
    def step(self):
        """Admit the waiting jobs that fit (prefill, first token), then one decode step of all."""
        with self.wake:
            take = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.rows)))]
        fresh = [j for j in take if not j.cancelled]
        self.finished["cancelled"] += len(take) - len(fresh)
        running = list(self.rows)
        try:
            if fresh:
                self._advance(fresh, self._prefill(fresh))
            if running:
                self._advance(running, self._decode(running))
        except Exception as e:  # a failed step fails its requests; the loop serves on
            for j in self.rows + fresh:
                if not j.done:
                    j.done = True
                    j.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
            self.finished["error"] += 1
        self._compact()

    def _prefill(self, jobs):
        """Fill the cache rows of new jobs from their prompts (one left-padded forward) and
        return their first tokens."""
        idx, pad = left_padded([j.ids for j in jobs], self.tok.eot, self.device)
        # a cache just as long as the prompts (not block_size): it is copied into the rows, then dropped
        cache = KVCache(replace(self.model.config, block_size=idx.size(1)), len(jobs), self.device,
                        self.cache.k[0].dtype)
        logits, _ = self.model(idx, kv_cache=cache, last_logits_only=True, pad=pad if len(jobs) > 1 else None)
        for r, j in enumerate(jobs):
            row, n, p = len(self.rows), len(j.ids), int(pad[r])
            for store, new in ((self.cache.k, cache.k), (self.cache.v, cache.v)):
                for layer in range(len(store)):
                    store[layer][row, :, :n] = new[layer][r, :, p:p + n]
            j.length = n
            if j.seed is not None:
                j.generator = torch.Generator(device=self.device).manual_seed(j.seed)
            self.rows.append(j)
        return self._choose(jobs, logits[:, -1, :])

    def _decode(self, jobs):
        """One token for every running job: each row's last token goes in at its own length."""
        self.cache.lengths = torch.tensor([j.length for j in jobs], device=self.device)
        idx = torch.tensor([[j.last] for j in jobs], device=self.device)
        logits = self.model.decode_ragged(idx, self.cache)
        for j in jobs:
            j.length += 1
        self.steps, self.row_steps = self.steps + 1, self.row_steps + len(jobs)
        return self._choose(jobs, logits)

    def _choose(self, jobs, logits):
        """Next token ids: rows with the same decoding settings in one choose_next call; a
        seeded sampled row alone, with its own generator (as sample.py draws)."""
        groups = defaultdict(list)
        for i, j in enumerate(jobs):
            sampled_alone = j.generator is not None and j.decoding["temperature"] > 0
            groups[tuple(j.decoding.values()) + ((i,) if sampled_alone else ())].append(i)
        out = torch.empty(len(jobs), dtype=torch.long, device=self.device)
        for members in groups.values():
            first = jobs[members[0]]
            sel = torch.tensor(members, device=self.device)
            rows = logits if len(members) == len(jobs) else logits[sel]
            out[sel] = choose_next(rows, [jobs[i].written for i in members], [jobs[i].constraint for i in members],
                                   [jobs[i].state for i in members], generator=first.generator, **first.decoding)
        return out.tolist()

    def _advance(self, jobs, tokens):
        """Hand each job its token as text; finish those that stop."""
        for j, t in zip(jobs, tokens):
            if j.done:
                continue
            if j.cancelled:
                j.done = True
                self.finished["cancelled"] += 1
                continue
            j.generated += 1
            if t in self.tok.stop_ids and j.stop_at_eot:
                self._finish(j, "stop")
                continue
            j.written.append(t)
            j.last = t
            if j.constraint is not None:
                j.state = j.constraint.step(j.state, t)
            if self._text(j, j.decoder.decode(self.tok.decode_bytes([t]))):
                self._finish(j, "stop", tail=False)
            elif len(j.written) >= j.max_tokens:
                self._finish(j, "length")

    def _text(self, j, piece):
        """Send piece, holding back what may be the start of a stop string; True at a stop string."""
        buf = j.held + piece
        hits = [buf.find(s) for s in j.stops if s in buf]
        if hits:
            j.held = buf[:min(hits)]
            return True
        keep = max((k for s in j.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        j.held, send = buf[len(buf) - keep:], buf[:len(buf) - keep]
        if send:
            j.emit(("text", send))
        return False

    def _finish(self, j, reason, tail=True):
        rest = j.held + (text_tail(j.decoder, j.constraint) if tail else "")
        if rest:
            j.emit(("text", rest))
        j.done = True
        self.finished[reason] += 1
        j.emit(("done", reason, j.usage()))

    def _compact(self):
        """Drop finished rows: each running row past the new end moves into a freed row."""
        keep = [j for j in self.rows if not j.done]
        if len(keep) == len(self.rows):
            return
        free = [i for i, j in enumerate(self.rows[:len(keep)]) if j.done]
        movers = [(i, j) for i, j in enumerate(self.rows) if i >= len(keep) and not j.done]
        rows = self.rows[:len(keep)]
        for dst, (src, j) in zip(free, movers):
            for store in (self.cache.k, self.cache.v):
                for layer in range(len(store)):
                    store[layer][dst, :, :j.length] = store[layer][src, :, :j.length]
            rows[dst] = j
        self.rows = rows

    def load(self):
        """(running, waiting) request counts."""
        return len(self.rows), len(self.waiting)
