"""
SFT input formats → conversations, the readers behind data/prepare_sft.py --input. A
conversation is {"messages": [{"role", "content", "loss"?, "tool"?}], "tools": ...} with
the roles of miniglm/chat_template.py. Formats, detected per record (or forced with --format):

  text      问:...\n答:... blocks separated by blank lines (.txt; several 问/答 = multi-turn)
  qa        {"question": ..., "answer": ...}
  alpaca    {"instruction": ..., "input": ..., "output": ...}
  chatglm3  {"conversations": [{"role", "content", "loss"?, "metadata"?}], "tools"?: [...]}
            tool turn: {"role": "tool", "name", "parameters", "observation"}
  glm4      {"messages": [{"role", "content", "loss"?, "tool_calls"?, "tools"? (system)}], "tools"?: [...]}
  sharegpt  {"conversations": [{"from", "value"}], "system"?: ..., "tools"?: ...}

A bad record is reported as 'file:line: problem' and skipped (counted), or stops the run
at the first one in file order (strict).
"""
import json
import re
from collections import Counter
from pathlib import Path

from data_utils import UserError, invalid_unicode, read_jsonl, read_lines

FORMATS = ("auto", "text", "qa", "alpaca", "chatglm3", "glm4", "sharegpt")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "observation": "observation", "tool": "observation", "function_response": "observation",
                "function_call": "assistant"}


class BadRecord(ValueError):
    pass


# ------------------------------------------------------------------ records → conversations
def _message(role, content, loss=None, tool=None):
    if not isinstance(role, str) or role not in ROLE_ALIASES:
        raise BadRecord(f"unknown role {role!r}")
    if not isinstance(content, str):
        raise BadRecord(f"{role} content is not a string")
    m = {"role": ROLE_ALIASES[role], "content": content}
    if loss is not None:
        if not isinstance(loss, bool):
            raise BadRecord(f"loss flag must be true or false, got {loss!r}")
        m["loss"] = loss
    if tool:
        m["tool"] = tool
    return m


# the keys a message may carry besides its role and content, by role; any other key is
# reported (counted once per key), never dropped in silence
EXTRA_KEYS = {"system": {"tools"}, "assistant": {"metadata", "tool_calls", "function_call"},
              "tool": {"name", "parameters", "observation"}}


def _turns(items, role_key, content_key, ignored=None):
    """Messages of a turn list, plus the tools found on a system message (GLM-4)."""
    if not isinstance(items, list) or not items:
        raise BadRecord("conversation is empty or not a list")
    messages, tools = [], []
    for t in items:
        if not isinstance(t, dict) or role_key not in t:
            raise BadRecord(f"each turn needs {role_key!r} and {content_key!r}")
        role = t[role_key]
        if role == "tool" and ("parameters" in t or "observation" in t):
            messages += _chatglm3_tool_turn(t)
        elif content_key not in t:
            raise BadRecord(f"each turn needs {role_key!r} and {content_key!r}")
        else:
            content, tool = t[content_key], t.get("metadata") or None
            if role == "function_call" or t.get("tool_calls"):  # ShareGPT / OpenAI-style tool call
                calls = t.get("tool_calls") or [content]
                call = calls[0] if isinstance(calls[0], dict) else _json_or(calls[0])
                fn = call.get("function", call) if isinstance(call, dict) else {}
                tool = fn.get("name") or "tool"
                if not content:
                    args = fn.get("arguments", "")
                    content = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                role = "assistant"
            messages.append(_message(role, content, t.get("loss"), tool))
        if messages[-1]["role"] == "system" and t.get("tools"):  # GLM-4: the tools ride on the system message
            if not isinstance(t["tools"], list):
                raise BadRecord("a system message's 'tools' must be a list")
            tools += t["tools"]
        if ignored is not None:
            used = (
                {role_key, content_key, "loss"}
                | EXTRA_KEYS.get(role, set())
                | EXTRA_KEYS.get(ROLE_ALIASES[role], set())
            )
            ignored.update(k for k in t if k not in used)
    return messages, tools


def _chatglm3_tool_turn(t):
    """ChatGLM3's {"role": "tool", "name", "parameters", "observation"} is two messages: the
    assistant's call (the tool's name as metadata, the parameters as content; trained) and
    the tool's observation (masked). A "loss" flag on the turn applies to both halves."""
    name = t.get("name")
    if not isinstance(name, str) or not name:
        raise BadRecord("a tool turn needs the tool's 'name'")
    as_text = lambda v: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)  # noqa: E731
    return [
        _message("assistant", as_text(t.get("parameters", {})), t.get("loss"), name),
        _message("observation", as_text(t.get("observation", "")), t.get("loss")),
    ]


def _json_or(text):
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return {}


def detect_format(r):
    if "question" in r or "answer" in r:
        return "qa"
    if "instruction" in r or "output" in r:
        return "alpaca"
    if "messages" in r:
        return "glm4"
    conv = r.get("conversations")
    if isinstance(conv, list) and conv and isinstance(conv[0], dict):
        return "sharegpt" if "from" in conv[0] else "chatglm3"
    raise BadRecord("unknown record format (expected question/answer, instruction/output, messages or conversations)")


def to_conversation(r, fmt="auto", ignored=None):
    """Any supported record → {"messages": [...], "tools": ...} in the internal format.
    ignored: a Counter that gets the message keys the parser did not use."""
    if not isinstance(r, dict):
        raise BadRecord("record is not a JSON object")
    fmt = detect_format(r) if fmt == "auto" else fmt
    tools = r.get("tools") or None
    if fmt == "qa":
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise BadRecord("qa record needs string fields 'question' and 'answer'")
        messages = [_message("user", r["question"]), _message("assistant", r["answer"])]
    elif fmt == "alpaca":
        if not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise BadRecord("alpaca record needs string fields 'instruction' and 'output'")
        prompt = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
        messages = ([_message("system", r["system"])] if r.get("system") else []) + [
            _message("user", prompt),
            _message("assistant", r["output"]),
        ]
    elif fmt in ("chatglm3", "glm4"):
        messages, system_tools = _turns(
            r.get("conversations" if fmt == "chatglm3" else "messages"), "role", "content", ignored
        )
        tools = (tools or []) + system_tools or None
    elif fmt == "sharegpt":
        messages, _ = _turns(r.get("conversations"), "from", "value", ignored)
        if r.get("system"):
            messages.insert(0, _message("system", r["system"]))
        if isinstance(tools, str):
            tools = _json_or(tools) or tools
    else:
        raise BadRecord(f"format {fmt!r} is not a JSON record format")
    for m in messages:
        if m["role"] == "assistant" and not m["content"].strip() and m.get("loss", True):
            raise BadRecord("empty answer")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn to learn from")
    # ChatGLM3's rule: at most one system message, and it comes before the first user turn
    systems = [i for i, m in enumerate(messages) if m["role"] == "system"]
    if len(systems) > 1:
        raise BadRecord(f"{len(systems)} system messages (at most one, before the first user turn)")
    if systems and any(m["role"] == "user" for m in messages[: systems[0]]):
        raise BadRecord("the system message comes after a user turn (it must come before the first one)")
    return {"messages": messages, "tools": tools}


def parse_text_blocks(text):
    """问:/答: blocks separated by blank lines → [(line number, conversation)]; a line
    without a marker continues the turn above it (multi-line answers, poems)."""
    out, block, start = [], [], None
    for lineno, line in enumerate(text.splitlines() + [""], 1):
        if line.strip():
            start = start or lineno
            block.append(line)
            continue
        if block:
            messages = []
            for ln in block:
                m = re.match(r"^\s*(问|答)\s*[:：](.*)$", ln)
                if m:
                    messages.append(
                        {"role": "user" if m.group(1) == "问" else "assistant", "content": m.group(2).strip()}
                    )
                elif messages:
                    messages[-1]["content"] += "\n" + ln.strip()
                else:
                    out.append((start, BadRecord("a block must start with 问: or 答:")))
                    break
            else:
                try:
                    out.append((start, to_conversation({"messages": messages}, "glm4")))
                except BadRecord as e:
                    out.append((start, e))
        block, start = [], None
    return out


def read_records(path, fmt, strict, ignored=None):
    """(conversations, bad) of one input file; bad lists 'file:line: problem'. ignored (a
    dict) gets, per message key the parser did not use, [messages with it, first place]."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found")
    convs, bad = [], []

    def report(where, err):
        if strict:
            raise UserError(f"{path}:{where}: {err}")
        bad.append(f"{path}:{where}: {err}")

    if fmt == "text" or (fmt == "auto" and path.suffix == ".txt"):
        # every problem, bad bytes and bad blocks alike, in file order: --strict stops at the first
        lines, bad_bytes = read_lines(path, strict=False)
        lines = [t for _, t in lines]
        problems = list(zip([n for n, t in enumerate(lines, 1) if t is None], bad_bytes))

        def has_bad_line(start):  # the block from line start to the next blank line
            for t in lines[start - 1 :]:
                if t is None:
                    return True
                if not t.strip():
                    return False
            return False

        # a block with a line that is not UTF-8 is dropped whole, reported once for its bytes
        for lineno, item in parse_text_blocks("\n".join("?" if t is None else t for t in lines)):
            if has_bad_line(lineno):
                continue
            if isinstance(item, Exception):
                problems.append((lineno, f"{path}:{lineno}: {item}"))
            else:
                convs.append(item)
        for _, problem in sorted(problems):
            if strict:
                raise UserError(problem)
            bad.append(problem)
        return convs, bad
    if path.suffix == ".json":  # a JSON list of records
        try:
            records = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
        except (RecursionError, ValueError):
            raise UserError(f"{path}: bad JSON (nested too deeply, or a number too long)") from None
        numbered = [(f"record {i + 1}", r) for i, r in enumerate(records if isinstance(records, list) else [records])]
        # text that parses but is not valid Unicode (a lone surrogate) is that record's problem
        numbered = [(where, BadRecord(problem) if (problem := invalid_unicode(r)) else r) for where, r in numbered]
    else:
        # lazily, and into read_jsonl's own list of problems: --strict meets a bad line and a
        # bad record in file order, and the skipped ones are listed in file order too
        numbered, bad = read_jsonl(path, strict=strict)
    for where, r in numbered:
        unused = Counter()
        try:
            if isinstance(r, BadRecord):
                raise r
            convs.append(to_conversation(r, fmt, unused))
        except BadRecord as e:
            report(where, e)
            continue
        for key, n in unused.items() if ignored is not None else ():
            ignored.setdefault(key, [0, f"{path}:{where}"])[0] += n
    return convs, bad
