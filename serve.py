"""
An OpenAI-compatible HTTP server for trained models, with continuous batching (miniglm/batching.py).

  python serve.py --out_dir=out/tiny-sft                      # http://127.0.0.1:8000/v1, model "tiny-sft"
  python serve.py --out_dir=out/tiny-sft --out_dir=out/tiny-pretrain --port 8001
  MINIGLM_API_KEY=secret python serve.py --out_dir=out/tiny-sft   # clients must send that key

GET /v1/models; POST /v1/chat/completions (messages in the checkpoint's own chat template);
POST /v1/completions (plain continuation: how a pretrained model is used). OpenAI's request
and response shapes, streamed as server-sent events when "stream" is true. Fields a client
does not send take sample.py's defaults: greedy answers with its repetition penalty for chat,
its sampled writing for completions. vLLM's extra fields are accepted too: top_k,
repetition_penalty, ignore_eos, and no_repeat_ngram (sample.py's flag). Other unknown fields
are ignored, as vLLM ignores them (and logged). Only the checkpoints named at start are
served; the server binds to 127.0.0.1 unless --host says otherwise. docs/using.md has clients.
"""
import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from data_utils import UserError, invalid_unicode, pick_device, run_cli
from miniglm.batching import Busy, Engine, Job
from miniglm.chat_template import assistant_head, render_conversation
from miniglm.checkpoint import load_model
from miniglm.constraint import CONSTRAINTS
from miniglm.generation import DEFAULT_DECODING, WRITING, decoding_from_flags, model_constraint, model_template

log = logging.getLogger("miniglm.serve")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BaseRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    repetition_penalty: float | None = Field(None, gt=0)
    no_repeat_ngram: int | None = Field(None, ge=0)
    ignore_eos: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(BaseRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(BaseRequest):
    prompt: str | list[str] = Field(min_length=1)


class Served:
    """A model the server answers for, with its tokenizer, template, constraint and decode loop."""

    def __init__(self, name, model, tok, meta, constrain, max_batch, max_queue):
        self.name, self.model, self.tok, self.template = name, model, tok, model_template(meta)
        self.constraint = model_constraint(tok, meta, constrain)
        self.engine = Engine(model, tok, max_batch, max_queue)


async def read_json(request, max_bytes):
    """The request's JSON body: at most max_bytes, UTF-8, valid JSON, valid Unicode."""
    too_big = APIError(413, f"request body over the server's limit of {max_bytes} bytes", code="body_too_large")
    if int(request.headers.get("content-length") or 0) > max_bytes:
        raise too_big
    body = b""
    async for chunk in request.stream():  # (a chunked body has no content-length)
        body += chunk
        if len(body) > max_bytes:
            raise too_big
    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if invalid_unicode(value):
        raise APIError(400, f"request body has {invalid_unicode(value)}")
    if not isinstance(value, dict):
        raise APIError(400, "request body must be a JSON object")
    return value


def parse(cls, body):
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"] if p not in (
            "str", "list[str]", "list[TextPart]")).lstrip(".")
        raise APIError(400, f"{param}: {err['msg']}", param=param) from None
    if req.model_extra:
        log.info("ignored unknown fields: %s", ", ".join(sorted(req.model_extra)))
    return req


def message_text(m, i):
    if m.role not in ROLES:
        raise APIError(400, f"messages[{i}].role: unknown role {m.role!r} (this server takes "
                            f"{', '.join(ROLES)})", param=f"messages[{i}].role")
    return m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])


def prompt_ids(served, req):
    """Token ids of the prompt, and the text whose characters the constraint must also allow."""
    if isinstance(req, ChatRequest):
        messages = [{"content": message_text(m, i), "role": ROLES[m.role]} for i, m in enumerate(req.messages)]
        ids, _ = render_conversation(served.tok, messages, template=served.template)
        return ids + assistant_head(served.tok, served.template), "".join(m["content"] for m in messages)
    if isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise APIError(400, "prompt: one prompt per request", param="prompt")
    text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    return served.tok.encode(text), text


def make_job(served, req, emit):
    """The batching.Job of a parsed request, its limits checked."""
    ids, text = prompt_ids(served, req)
    context = served.model.context_size
    if len(ids) >= context:
        raise APIError(400, f"the prompt is {len(ids)} tokens; model {served.name} has a context of {context} tokens "
                            f"(prompt and answer together, at least 1 new token)",
                       param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
    wanted = req.max_completion_tokens or req.max_tokens
    max_tokens = min(wanted or context, context - len(ids))  # capped by what the context leaves
    decoding = decoding_from_flags(req, DEFAULT_DECODING if isinstance(req, ChatRequest) else WRITING)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or "" in stops:
        raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
    constraint = served.constraint.with_chars(text) if served.constraint is not None else None
    return Job(ids, max_tokens, decoding, emit, req.seed, stops, constraint, stop_at_eot=not req.ignore_eos)


class Reply:
    """OpenAI's response objects for one request: a chat completion or a text completion."""

    def __init__(self, chat, model):
        self.chat, self.model, self.created = chat, model, int(time.time())
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.object = "chat.completion" if chat else "text_completion"

    def _wrap(self, choices, usage=None, chunk=False):
        out = {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
               "created": self.created, "model": self.model, "choices": choices, "system_fingerprint": None}
        if usage is not None:
            out["usage"] = usage
        return out

    def full(self, text, finish, usage):
        choice = {"index": 0, "logprobs": None, "finish_reason": finish}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return self._wrap([choice], usage)

    def chunk(self, text=None, finish=None, first=False):
        choice = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            if first:
                choice["delta"] = {"role": "assistant", "content": ""}
            elif text is None:
                choice["delta"] = {}
            else:
                choice["delta"] = {"content": text}
        else:
            choice["text"] = text or ""
        return self._wrap([choice], chunk=True)

    def usage_chunk(self, usage):
        return self._wrap([], usage, chunk=True)


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def next_event(events, request):
    """The engine's next event for a request; a client that went away cancels it."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise asyncio.CancelledError from None


class Mailbox:
    """Events from the decode loop's thread to the requests' queues on the event loop: one
    wake-up of the loop carries every event posted meanwhile (a step's tokens for all rows),
    not one wake-up per token."""

    def __init__(self, loop):
        self.loop, self.lock, self.pending = loop, threading.Lock(), []

    def post(self, queue, event):
        with self.lock:
            self.pending.append((queue, event))
            if len(self.pending) == 1:
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self):
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, event in pending:
            queue.put_nowait(event)


async def complete(request, served, req):
    events = asyncio.Queue()
    job = make_job(served, req, partial(request.app.state.mailbox.post, events))
    try:
        served.engine.submit(job)
    except Busy as e:
        raise APIError(429, f"server busy: {e}; retry later", code="rate_limit_exceeded", kind="requests") from None
    reply = Reply(isinstance(req, ChatRequest), served.name)
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(stream(reply, job, events, include_usage), media_type="text/event-stream")
    text = []
    try:
        while True:
            event = await next_event(events, request)
            if event[0] == "text":
                text.append(event[1])
            elif event[0] == "error":
                raise APIError(500, event[1], kind="server_error")
            else:
                return reply.full("".join(text), event[1], event[2])
    finally:
        job.cancel()


async def stream(reply, job, events, include_usage):
    """The SSE body: a first chunk (the role), one chunk per piece of text, the finish reason,
    usage if asked, [DONE]. A client that disconnects cancels the job (the body is closed)."""
    try:
        if reply.chat:
            yield sse(reply.chunk(first=True))
        after = None
        while True:
            event, after = after or await events.get(), None
            while event[0] == "text" and not events.empty():  # the client fell behind: one chunk for all
                after = events.get_nowait()
                if after[0] != "text":
                    break
                event, after = ("text", event[1] + after[1]), None
            if event[0] == "text":
                yield sse(reply.chunk(event[1]))
            elif event[0] == "error":
                yield sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}})
                break
            else:
                yield sse(reply.chunk(finish=event[1]))
                if include_usage:
                    yield sse(reply.usage_chunk(event[2]))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def make_app(models, api_key=None, max_body=1 << 20):
    """The FastAPI app serving models {id: Served}; their decode loops run while it does."""

    @asynccontextmanager
    async def lifespan(app):
        app.state.mailbox = Mailbox(asyncio.get_running_loop())
        for served in models.values():
            served.engine.start()
        yield
        for served in models.values():
            served.engine.stop()

    app = FastAPI(title="MiniGLM", lifespan=lifespan)

    def check_key(request):  # in each endpoint, not a middleware: that would wrap the streams
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if api_key and not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return JSONResponse(
            APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body, status_code=e.status_code
        )

    @app.exception_handler(Exception)
    async def server_error(request, e):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(
            APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body, status_code=500
        )

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "miniglm",
                    "max_model_len": s.model.context_size,
                }
                for name, s in models.items()
            ],
        }

    async def answer(request, cls):
        check_key(request)
        req = parse(cls, await read_json(request, max_body))
        if req.model not in models:
            raise APIError(
                404,
                f"the model `{req.model}` does not exist here; this server serves {', '.join(models)}",
                param="model",
                code="model_not_found",
            )
        return await complete(request, models[req.model], req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, CompletionRequest)

    return app


def load_models(out_dirs, device="cpu", constrain="chars", max_batch=32, max_queue=64):
    """{model id: Served}: each out_dir (or .pt file) is a model, named by its folder."""
    models = {}
    for out_dir in out_dirs:
        path = Path(out_dir)
        name = path.parent.name if path.suffix == ".pt" else path.name
        if name in models:
            raise UserError(
                f"{out_dir}: another checkpoint is already served as model {name!r}; give each its own folder name"
            )
        model, tok, meta = load_model(out_dir, device)
        print(f"model {name}: {meta['weights']}", flush=True)
        models[name] = Served(name, model, tok, meta, constrain, max_batch, max_queue)
    return models


def main():
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out_dir",
        action="append",
        required=True,
        help="a checkpoint folder (or .pt) to serve; repeat for more. Its folder name is the model id",
    )
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 = this machine only (0.0.0.0: reachable from others)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api_key",
        default=os.environ.get("MINIGLM_API_KEY"),
        help="require Authorization: Bearer KEY (default: $MINIGLM_API_KEY; unset = no key)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--constrain", default="chars", choices=CONSTRAINTS, help="the decoding constraint (sample.py --help)"
    )
    p.add_argument("--max_batch", type=int, default=32, help="requests decoded together (the rest wait)")
    p.add_argument("--max_queue", type=int, default=64, help="requests waiting for a row; more get 429")
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch threads of the decode loops on a CPU (default: all cores but one, which serves HTTP)",
    )
    p.add_argument("--max_body_bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    args = p.parse_args()
    if min(args.max_batch, args.max_body_bytes) < 1 or args.max_queue < 0:
        raise UserError("--max_batch and --max_body_bytes must be >= 1, --max_queue >= 0")
    torch.set_num_threads(args.threads)
    # the decode loop and the HTTP event loop share the GIL: hand it over every 1 ms, not 5,
    # so that a new request's first token is not kept waiting behind a decode step
    sys.setswitchinterval(0.001)
    models = load_models(args.out_dir, pick_device(args.device), args.constrain, args.max_batch, args.max_queue)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(
        f"serving {', '.join(models)} at http://{args.host}:{args.port}/v1"
        + (" (API key required)" if args.api_key else ""),
        flush=True,
    )
    uvicorn.run(
        make_app(models, args.api_key, args.max_body_bytes), host=args.host, port=args.port, log_level="warning"
    )


if __name__ == "__main__":
    run_cli(main)
