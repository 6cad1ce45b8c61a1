"""
The chat templates: how a conversation becomes token ids and a 0/1 loss mask (SFT), and
how a prompt asks for the next answer (sample, Gradio, evaluations). The one place for them.

A conversation is a list of messages {"role", "content", "loss"?, "tool"?}.
"qa" (问/答, the default):
  system       系统:{content}[\n工具:{tools as JSON}]\n      masked
  user         问:{content}\n                               masked
  assistant    答:{content}<|endoftext|>                    content + end token trained
  tool call    答:调用:{name}\n{content}<|endoftext|>        (assistant with "tool") trained
  observation  结果:{content}\n                              masked
"chatml" (as Qwen uses it): <|im_start|>{role}\n{content}<|im_end|>\n, roles system, user,
assistant and tool (the observation); on an assistant turn the content and <|im_end|> are
trained. The markers are special tokens that user text never encodes to.
A message's "loss": true/false overrides its role's default; the role prefixes and
separators are never trained. So a single 问/答 turn is exactly 问:{q}\n答:{a}<|endoftext|>,
with loss only on {a}<|endoftext|>.

`tok` is any tokenizer of miniglm/tokenizer.py: encode(), eot, im_start, im_end.
"""
import json

ROLES = ("system", "user", "assistant", "observation")
TEMPLATES = ("qa", "chatml")
PREFIX = {"system": "系统:", "user": "问:", "assistant": "答:", "observation": "结果:"}
CHATML_ROLE = {"system": "system", "user": "user", "assistant": "assistant", "observation": "tool"}
TEMPLATE_PIECES = [*PREFIX.values(), "\n", "工具:", "调用:", *(f"{r}\n" for r in CHATML_ROLE.values())]


def check_template(template):
    if template not in TEMPLATES:
        raise ValueError(f"chat template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    return template


def message_segments(tok, messages, tools=None, template="qa"):
    """Each message as a segment {"role", "head", "body", "tail", "tail_mask", "trained"}:
    head = the role marker (never trained), body = the content ids (trained iff "trained"),
    tail = the end marker with its own 0/1 mask. Truncation cuts bodies; joining the
    segments gives render_conversation's ids and mask."""
    check_template(template)
    messages = list(messages)
    if tools:
        tools_text = "工具:" + json.dumps(tools, ensure_ascii=False)
        if messages and messages[0]["role"] == "system":
            first = dict(messages[0])
            first["content"] = (first["content"] + "\n" if first["content"] else "") + tools_text
            messages[0] = first
        else:
            messages.insert(0, {"role": "system", "content": tools_text})
    segments = []
    for m in messages:
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        trained = m.get("loss")
        if trained is None:
            trained = role == "assistant"
        content = m["content"]
        if role == "assistant" and m.get("tool"):
            content = f"调用:{m['tool']}\n{content}"
        if template == "qa":
            head = tok.encode(PREFIX[role])
            tail, tail_mask = ([tok.eot], [int(trained)]) if role == "assistant" else (tok.encode("\n"), [0])
        else:
            head = [tok.im_start] + tok.encode(CHATML_ROLE[role] + "\n")
            tail = [tok.im_end] + tok.encode("\n")
            tail_mask = [int(trained and role == "assistant"), 0]
        segments.append({"role": role, "head": head, "body": tok.encode(content), "tail": tail,
                         "tail_mask": tail_mask, "trained": bool(trained), "tool": bool(m.get("tool"))})
    return segments


def join_segments(segments):
    ids, mask = [], []
    for s in segments:
        ids += s["head"] + s["body"] + s["tail"]
        mask += [0] * len(s["head"]) + [int(s["trained"])] * len(s["body"]) + s["tail_mask"]
    return ids, mask


def render_conversation(tok, messages, tools=None, template="qa"):
    """Token ids (in tok's vocabulary) and the 0/1 loss mask (1 on trained tokens) of a whole session."""
    return join_segments(message_segments(tok, messages, tools, template))


def assistant_head(tok, template="qa"):
    """The ids that open an answer: 答: or <|im_start|>assistant\n."""
    return message_segments(tok, [{"role": "assistant", "content": ""}], template=template)[0]["head"]


def render_prompt(tok, history, question, template="qa"):
    """Ids that ask the model for the next answer: past turns, the question, the answer's head."""
    ids, _ = render_conversation(tok, list(history) + [{"role": "user", "content": question}], template=template)
    return ids + assistant_head(tok, template)


