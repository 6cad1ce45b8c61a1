"""
A Gradio chat page over the same generation code as sample.py: streamed answers,
multi-turn history, sampling sliders, a checkpoint picker, held-out example questions; and an
Inside tab that looks inside the model (miniglm/inside.py): the answer's token probabilities,
the attention maps and the logit lens.

  python sample_gradio.py                          # http://127.0.0.1:7860, checkpoints under out/
  python sample_gradio.py --out_dir=out/tiny-sft --port 8000
  python sample_gradio.py --host 0.0.0.0 --share   # reachable from elsewhere: opt-in only

Only the checkpoints found at start-up (or named with --out_dir) can be chosen, from the
page or through the API; any other path gets a note and nothing is opened. At most
--max_models models are kept loaded; the least recently used one is dropped.
"""
import argparse
import html
import tempfile
import threading
from collections import OrderedDict
from functools import partial
from pathlib import Path

import gradio as gr

from data_utils import UserError, invalid_unicode, pick_device, read_jsonl, run_cli
from miniglm.checkpoint import load_model
from miniglm.constraint import CONSTRAINTS
from miniglm.generation import DEFAULT_DECODING, answer, chat_prompt, model_constraint, model_template
from miniglm.inside import look as look_inside
from miniglm.inside import own_answer
from model import DECODE_MODES
from visualize import MAX_SHOWN, plot_attention, shown, use_cjk_font

MAX_QUESTION_CHARS = 500


def find_checkpoints(*roots):
    """Training out_dirs that hold a checkpoint, SFT ones first."""
    found = []
    for root in map(Path, roots):
        for d in [root, *sorted(root.glob("*/"))]:
            if ((d / "best.pt").exists() or (d / "ckpt.pt").exists()) and str(d) not in found:
                found.append(str(d))
    return sorted(found, key=lambda d: "sft" not in Path(d).name)


def example_questions(sft_data, n=6):
    path = Path(sft_data) / "sft_val.jsonl"
    if not path.exists():
        return ["《静夜思》的作者是谁?", "请背诵《春晓》。", "你好"]
    records, _ = read_jsonl(path)
    seen, out = set(), []
    for _, c in records:
        q = c["messages"][0]["content"]
        kind = q[:2]  # one of each question type first
        if kind not in seen:
            seen.add(kind)
            out.append(q)
        if len(out) == n:
            break
    return out


class NotServed(Exception):
    pass


def open_model(path, device, decode_mode="eager"):
    """load_model, and a line in the page's log saying which weights it took."""
    model, tok, meta = load_model(path, device, decode_mode)
    print(f"opened {meta['weights']}", flush=True)
    return model, tok, meta


class Models:
    """The page's checkpoints: only those in `allowed` (the list the page offers) are ever
    opened, and at most max_loaded stay in memory, the least recently used dropped first.
    One lock, so two sessions never load the same one twice."""

    def __init__(self, allowed, device, max_loaded=2, load=open_model):
        self.allowed, self.device, self.max_loaded, self.load = set(allowed), device, max_loaded, load
        self.cache, self.lock = OrderedDict(), threading.Lock()

    def get(self, path):
        if not isinstance(path, str) or path not in self.allowed:  # decided before touching the file system
            raise NotServed(f"{str(path)[:80]!r} is not one of this page's checkpoints; choose one from the list")
        with self.lock:
            if path in self.cache:
                self.cache.move_to_end(path)
            else:
                self.cache[path] = self.load(path, self.device)
                while len(self.cache) > self.max_loaded:
                    self.cache.popitem(last=False)
            return self.cache[path]


def message_text(m):
    """Gradio gives message content as a string or as a list of {"type": "text", "text"} parts."""
    content = m.get("content")
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)


def dialogue(history):
    """The 问/答 turns of the chat history, without the page's notes."""
    turns = [m for m in history if not (m.get("metadata") or {}).get("title")]
    out = []
    for user, bot in zip(turns, turns[1:]):
        if user.get("role") == "user" and bot.get("role") == "assistant":
            out += [
                {"role": "user", "content": message_text(user)},
                {"role": "assistant", "content": message_text(bot)},
            ]
    return out


def generation_settings(temperature, top_k, top_p, max_new_tokens, repetition_penalty):
    """The sliders' values as generation settings; a ValueError says which one is out of range
    (the page's sliders keep them in range; the API does not)."""
    gen = dict(
        temperature=float(temperature),
        top_k=int(top_k) or None,
        top_p=float(top_p),
        max_new_tokens=int(max_new_tokens),
        repetition_penalty=float(repetition_penalty),
        no_repeat_ngram=DEFAULT_DECODING["no_repeat_ngram"],
    )
    if not (
        gen["temperature"] >= 0
        and 0 < gen["top_p"] <= 1
        and gen["max_new_tokens"] >= 1
        and gen["repetition_penalty"] > 0
        and (gen["top_k"] or 0) >= 0
    ):
        raise ValueError("temperature >= 0, 0 < top-p <= 1, max new tokens >= 1, repetition penalty > 0, top-k >= 0")
    return gen


def page(respond, look, choices, sft_data):
    """The page: the chat (the checkpoint and the decoding settings on the right), and the Inside tab."""
    with gr.Blocks(title="MiniGLM chat") as app:
        gr.Markdown(
            "## MiniGLM 问答\nA small GPT, pretrained on Chinese poetry and fine-tuned on 问/答 pairs. "
            "Answers stream token by token; the conversation is kept as context."
        )
        with gr.Tab("对话 Chat"), gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="对话", height=420)
                question = gr.Textbox(label="问题", placeholder="例如: 《静夜思》的作者是谁?", lines=1)
                with gr.Row():
                    send = gr.Button("发送 Send", variant="primary")
                    clear = gr.Button("清空 Clear")
                gr.Examples(example_questions(sft_data), inputs=question, label="held-out questions")
            with gr.Column(scale=1):
                ckpt = gr.Dropdown(
                    choices, value=choices[0] if choices else None, label="checkpoint", allow_custom_value=False
                )
                d = DEFAULT_DECODING
                temperature = gr.Slider(0.0, 2.0, value=d["temperature"], step=0.05, label="temperature (0 = greedy)")
                top_k = gr.Slider(0, 200, value=d["top_k"] or 0, step=1, label="top-k (0 = off; sampling only)")
                top_p = gr.Slider(0.05, 1.0, value=d["top_p"] or 1.0, step=0.05, label="top-p (sampling only)")
                penalty = gr.Slider(
                    1.0,
                    2.0,
                    value=d["repetition_penalty"],
                    step=0.05,
                    label="repetition penalty (1 = off): less looping",
                )
                max_new = gr.Slider(8, 512, value=128, step=8, label="max new tokens")
                constrain = gr.Radio(
                    list(CONSTRAINTS),
                    value="chars",
                    label="decoding: known characters only / any valid UTF-8 / off (raw byte tokens)",
                )
        inputs = [question, chatbot, ckpt, temperature, top_k, top_p, max_new, constrain, penalty]
        send.click(respond, inputs, [chatbot, question], api_name="chat")
        question.submit(respond, inputs, [chatbot, question], api_name=False)
        clear.click(lambda: ([], ""), None, [chatbot, question], api_name="clear")
        inside_tab(look, choices, chatbot)
    return app


def inside_tab(look, choices, chatbot):
    """The Inside tab (miniglm/inside.py): a checkpoint, a question and an answer (typed, the chat's
    last one, or the model's own), and the three views of them."""
    with gr.Tab("Inside 模型内部", elem_id="inside-tab"):
        gr.Markdown("What the model computes for one question and answer: the probability of each answer token "
                    "(hover a token for the top-5 alternatives), the attention maps of every layer and head, and "
                    "the logit lens (each layer's stream read out through the final norm and output layer; hover "
                    "a cell). An empty answer: the model's own.")
        with gr.Row():
            ckpt = gr.Dropdown(choices, value=choices[0] if choices else None, label="checkpoint",
                               allow_custom_value=False)
            layer = gr.Number(value=0, precision=0, label="enlarged map: layer (0 = the last)")
            head = gr.Number(value=1, precision=0, label="head")
        question = gr.Textbox(label="问题 (a pretrained model: the text)", value="《静夜思》的作者是谁?",
                              elem_id="inside-question")
        answer = gr.Textbox(label="答案 (empty: the model's own)", elem_id="inside-answer")
        with gr.Row():
            reuse = gr.Button("use the chat's last question and answer")
            go = gr.Button("Look inside", variant="primary", elem_id="inside-go")
        note = gr.Markdown(elem_id="inside-note")
        tokens = gr.HTML(label="token probabilities", elem_id="inside-tokens")
        attention = gr.Image(label="attention", type="filepath", elem_id="inside-attention")
        lens = gr.HTML(label="logit lens", elem_id="inside-lens")
        reuse.click(last_turn, chatbot, [question, answer], api_name=False)
        go.click(look, [ckpt, question, answer, layer, head], [note, tokens, attention, lens], api_name="inside")


def last_turn(history):
    """The chat's last question and answer, for the Inside tab."""
    turns = dialogue(history or [])
    return (turns[-2]["content"], turns[-1]["content"]) if turns else ("", "")


INSIDE_CSS = """
.tok {display: inline-block; position: relative; margin: 2px; padding: 4px 6px; border-radius: 4px;
      font-size: 20px; color: black; cursor: default}
.tok .p {display: block; font-size: 10px; text-align: center}
.tok .alts {display: none; position: absolute; top: 100%; left: 0; z-index: 10; background: white; color: black;
            border: 1px solid #888; padding: 4px; font-size: 12px; white-space: nowrap}
.tok:hover .alts {display: block}
.lens td {padding: 2px 4px; font-size: 12px; text-align: center; color: black}
"""


def color(p):
    """A probability as a colour from red (0) to green (1)."""
    return f"hsl({120 * max(0.0, min(1.0, p)):.0f}, 70%, 70%)"


def tokens_html(rows):
    """The answer's tokens, each coloured by its probability, its top-5 alternatives shown on hover."""
    spans = []
    for row in rows:
        alternatives = "<br>".join(f"{html.escape(t)} {p:.3f}" for t, p in row["top"])
        spans.append(f'<span class="tok" style="background:{color(row["prob"])}">{html.escape(shown(row["token"]))}'
                     f'<span class="p">{row["prob"]:.2f}</span><span class="alts">{alternatives}</span></span>')
    return f"<style>{INSIDE_CSS}</style><div>" + "".join(spans) + "</div>"


def lens_html(lens, last=MAX_SHOWN):
    """The logit lens as a table: a row per layer (the last block on top), a column per position;
    each cell the top token, coloured by how high the text's next token ranks, details on hover."""
    t0 = max(0, len(lens["tokens"]) - last)
    positions = range(t0, len(lens["tokens"]) - 1)
    names = ["embedding"] + [f"block {i}" for i in range(1, len(lens["top"]))]
    rows = []
    for i in reversed(range(len(names))):
        cells = []
        for t in positions:
            rank, nxt = lens["next_rank"][i][t], lens["tokens"][t + 1]
            hint = (f"top: {lens['top'][i][t]} ({lens['top_prob'][i][t]:.3f}); next token {nxt}: rank {rank}, "
                    f"p {lens['next_prob'][i][t]:.3f}")
            cells.append(f'<td title="{html.escape(hint)}" style="background:{color(1 - min(rank, 100) / 100)}">'
                         f"{html.escape(shown(lens['top'][i][t]))}</td>")
        rows.append(f"<tr><th>{names[i]}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{html.escape(shown(lens['tokens'][t]))}</th>" for t in positions)
    return f'<style>{INSIDE_CSS}</style><table class="lens"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


def inside_handler(models):
    """The Inside tab's handler over the page's checkpoints."""
    def look(ckpt, question, answer, layer=0, head=1):
        """The Inside tab: (note, tokens HTML, attention PNG, logit lens HTML)."""
        question = question if isinstance(question, str) else ""
        answer = answer if isinstance(answer, str) else ""
        if not question.strip() or len(question) + len(answer) > 4 * MAX_QUESTION_CHARS:
            return f"请输入问题 (a question of 1 to {MAX_QUESTION_CHARS} characters).", "", None, ""
        if invalid_unicode(question + answer):
            return "问题含有无效字符 (invalid Unicode).", "", None, ""
        try:
            model, tok, meta = models.get(ckpt)
        except (NotServed, UserError) as e:
            return str(e), "", None, ""
        template = meta.get("template")
        if not answer.strip():
            try:
                answer = own_answer(model, tok, meta, question)
            except ValueError as e:
                return str(e), "", None, ""
        views = look_inside(model, tok, question, answer, template)
        layers, heads = len(views["attention"]["maps"]), len(views["attention"]["maps"][0])
        try:  # (the page's fields are whole numbers; the API may send anything)
            layer, head = int(layer or 0), int(head or 1)
        except (TypeError, ValueError):
            layer, head = 0, 1
        layer = layer - 1 if 0 < layer <= layers else layers - 1  # 0 or out of range: the last layer
        head = head - 1 if 0 < head <= heads else 0
        picture = Path(tempfile.mkdtemp(prefix="miniglm-inside-")) / "attention.png"
        plot_attention(views["attention"], picture, f"{Path(ckpt).name}: attention", layer, head)
        said = "the text" if template is None else f"答: {answer}"
        note = f"`{meta['weights']}` · {said} · {len(views['ids'])} tokens"
        prefix = len(views["attention"]["keys"]) - len(views["ids"])
        if prefix:
            note += f" · the first {prefix} keys of each attention map are P-Tuning's virtual tokens"
        return note, tokens_html(views["tokens"]), str(picture), lens_html(views["lens"])

    return look


def build_app(out_dirs, sft_data="data/sft", device="cpu", max_models=2, decode_mode="eager"):
    models = Models(out_dirs, device, max_models, load=partial(open_model, decode_mode=decode_mode))
    use_cjk_font()  # the Inside tab's attention maps label Chinese tokens
    choices = out_dirs

    def respond(
        question,
        history,
        ckpt,
        temperature,
        top_k,
        top_p,
        max_new_tokens,
        constrain="chars",
        repetition_penalty=DEFAULT_DECODING["repetition_penalty"],
    ):
        history = list(history or [])
        question = (question or "").strip() if isinstance(question, str) else ""

        def note(text):  # shown in the chat, but not part of the dialogue the model sees
            return history + [{"role": "assistant", "content": text, "metadata": {"title": "提示 note"}}], question

        if not question:
            yield note("请输入一个问题。(Please type a question.)")[0], ""
            return
        if len(question) > MAX_QUESTION_CHARS:
            yield note(f"问题太长了: {len(question)} characters, at most {MAX_QUESTION_CHARS}. Please shorten it.")
            return
        past = dialogue(history)
        texts = {"question": question, **{f"turn {i + 1} of the history": m["content"] for i, m in enumerate(past)}}
        bad = next((where for where, text in texts.items() if invalid_unicode(text)), None)
        if bad:  # a lone surrogate (the API lets one through): tiktoken would quietly make it �
            yield note(f"问题含有无效字符: the {bad} {invalid_unicode(texts[bad]).removeprefix('text ')}")
            return
        try:
            gen = generation_settings(temperature, top_k, top_p, max_new_tokens, repetition_penalty)
        except (TypeError, ValueError) as e:
            yield note(f"invalid setting: {e}")
            return
        if not ckpt:
            yield note("没有可用的模型: train one first (see README).")
            return
        try:
            model, tok, meta = models.get(ckpt)
        except NotServed as e:
            yield note(str(e))
            return
        except UserError as e:
            yield note(f"cannot load {ckpt}: {e}")
            return
        if constrain not in CONSTRAINTS:
            yield note(f"unknown decoding constraint {constrain!r}")
            return
        template = model_template(meta)
        try:
            chat_prompt(tok, past, question, model.context_size, gen["max_new_tokens"], template)
        except ValueError as e:
            yield note(str(e))
            return
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        # whole characters only: the streamed pieces never hold half a character
        for piece in answer(
            model, tok, past, question, constraint=model_constraint(tok, meta, constrain), template=template, **gen
        ):
            history[-1]["content"] += piece
            yield history, ""
        if not history[-1]["content"]:
            history[-1]["content"] = "(空回答 / empty answer)"
        yield history, ""

    app = page(respond, inside_handler(models), choices, sft_data)
    # one generation at a time on this device; other users wait in the queue
    return app.queue(default_concurrency_limit=1, max_size=64)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", action="append", help="checkpoint folder(s) to offer (default: every out/*/ with one)")
    p.add_argument("--sft_data", default="data/sft", help="where the held-out example questions come from")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--max_models", type=int, default=2, help="models kept in memory at once (least recently used dropped)"
    )
    p.add_argument("--decode", default="eager", choices=DECODE_MODES, help="decode steps (sample.py --help)")
    args = p.parse_args()
    if args.max_models < 1:
        raise UserError("--max_models must be at least 1")
    out_dirs = find_checkpoints(*(args.out_dir or ["out"]))
    if not out_dirs:
        raise UserError(f"no checkpoints under {', '.join(args.out_dir or ['out'])}: train a model first (see README)")
    app = build_app(out_dirs, args.sft_data, pick_device(args.device), args.max_models, args.decode)
    app.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    run_cli(main)
