"""
A checkpoint as a Hugging Face transformers model folder (export_hf.py is the command): the
config of GPT-2's or GPT-NeoX's architecture, the weights under their names, a byte-level BPE
tokenizer with the chat template, and a peft adapter folder for an adapter run.
"""
import json

import torch

from data_utils import UserError
from miniglm.chat_template import CHATML_ROLE, PREFIX
from miniglm.tokenizer import SPECIALS, merge_parts


def hf_config(model_args, tok):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=model_args["vocab_size"], n_positions=model_args["block_size"],
                      n_embd=model_args["n_embd"], n_layer=model_args["n_layer"], n_head=model_args["n_head"],
                      activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      layer_norm_epsilon=1e-5, bos_token_id=tok.eot, eos_token_id=list(tok.stop_ids),
                      pad_token_id=tok.eot, tie_word_embeddings=True, architectures=["GPT2LMHeadModel"])


def neox_config(model_args, tok):
    from transformers import GPTNeoXConfig
    d = model_args["n_embd"]
    return GPTNeoXConfig(vocab_size=model_args["vocab_size"], hidden_size=d, num_hidden_layers=model_args["n_layer"],
                         num_attention_heads=model_args["n_head"], intermediate_size=4 * d, hidden_act="gelu",
                         max_position_embeddings=model_args["block_size"], layer_norm_eps=1e-5,
                         use_parallel_residual=False, attention_bias=True, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
                         bos_token_id=tok.eot, eos_token_id=list(tok.stop_ids), pad_token_id=tok.eot,
                         architectures=["GPTNeoXForCausalLM"])


NEOX_NAMES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_attn": "attention.query_key_value",
              "attn.c_proj": "attention.dense", "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}


def neox_state_dict(model):
    """model.py's weights under GPTNeoXForCausalLM's names. NeoX's fused qkv is laid out head
    by head (q, k, v of head 0, then of head 1, ...); model.py's is all q, all k, all v."""
    c, sd = model.config, state_dict_with_biases(model)
    out = {"gpt_neox.embed_in.weight": sd["transformer.wte.weight"], "lm_head.weight": sd["lm_head.weight"],
           "gpt_neox.final_layer_norm.weight": sd["transformer.ln_f.weight"],
           "gpt_neox.final_layer_norm.bias": sd["transformer.ln_f.bias"]}
    for i in range(c.n_layer):
        for ours, theirs in NEOX_NAMES.items():
            w, b = sd[f"transformer.h.{i}.{ours}.weight"], sd[f"transformer.h.{i}.{ours}.bias"]
            if ours == "attn.c_attn":
                w = w.view(3, c.n_head, -1, c.n_embd).transpose(0, 1).reshape(3 * c.n_embd, c.n_embd)
                b = b.view(3, c.n_head, -1).transpose(0, 1).reshape(-1)
            out[f"gpt_neox.layers.{i}.{theirs}.weight"], out[f"gpt_neox.layers.{i}.{theirs}.bias"] = w, b
    return {k: v.contiguous().clone() for k, v in out.items()}


def state_dict_with_biases(model):
    """model.state_dict() with a zero bias for each Linear and LayerNorm that has none (the
    output layer aside): both HF architectures have them, and zero computes what model.py does."""
    sd = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head" and module.bias is None:
            sd[f"{name}.bias"] = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    return sd


def hf_state_dict(model):
    """model.py's weights under GPT2LMHeadModel's names. GPT-2 keeps its linear layers as
    Conv1D, (in, out): transposed. Where model.py has no bias, GPT-2's is zero."""
    out = {}
    for name, p in state_dict_with_biases(model).items():
        if name.endswith(".weight") and p.dim() == 2 and ".h." in f".{name}" and "ln_" not in name:
            p = p.t()
        out[name] = p.contiguous().clone()
    return out


def byte_level(b):
    """GPT-2's bytes → printable characters table, as HF's ByteLevel pre-tokenizer uses it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for i in range(256):
        table[i] = chr(i) if i in keep else chr(256 + n)
        n += i not in keep
    return "".join(table[x] for x in b)


def merges_of(ranks):
    """HF's merges list: each token's two parts (tokenizer.merge_parts) as byte-level strings,
    in rank order (merge priority = the rank)."""
    return [(byte_level(a), byte_level(b)) for a, b in merge_parts(ranks).values()]


def chat_template_jinja(template):
    """The model's chat template as Jinja for apply_chat_template: the same text render_prompt
    writes (the project encodes the role markers apart from the content, so at the markers
    the token ids can differ from encoding the whole text at once)."""
    if template == "chatml":
        turn = "'<|im_start|>' + {role} + '\\n' + message['content'] + '<|im_end|>\\n'"
        roles = {r: turn.format(role=repr(c)) for r, c in CHATML_ROLE.items()}
        opener = "'<|im_start|>assistant\\n'"
    else:
        roles = {r: f"{PREFIX[r]!r} + message['content'] + " + ("'<|endoftext|>'" if r == "assistant" else "'\\n'")
                 for r in PREFIX}
        opener = repr(PREFIX["assistant"])
    roles["tool"] = roles["observation"]
    body = "".join(f"{{%- {'if' if i == 0 else 'elif'} message['role'] == {r!r} -%}}{{{{ {text} }}}}"
                   for i, (r, text) in enumerate(roles.items()))
    return (f"{{%- for message in messages -%}}{body}{{%- endif -%}}{{%- endfor -%}}"
            f"{{%- if add_generation_prompt -%}}{{{{ {opener} }}}}{{%- endif -%}}")


def hf_tokenizer(tok, template):
    """miniglm/tokenizer.py's BPE as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    if tok.kind == "trimmed":
        raise UserError(f"the trimmed vocabulary {tok.name} cannot be written as a Hugging Face tokenizer exactly "
                        f"(it spells GPT-2 tokens it lacks as bytes): export a model trained with vocab='bpe' "
                        f"(the demo's default) or vocab='gpt2'")
    ranks = {t: i for i, t in enumerate(tok.token_bytes[:tok.eot])}
    bpe = Tokenizer(models.BPE(vocab={byte_level(t): i for t, i in ranks.items()}, merges=merges_of(ranks)))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", additional_special_tokens=list(SPECIALS),
                                   chat_template=chat_template_jinja(template), clean_up_tokenization_spaces=False)
    added = {"<|endoftext|>": tok.eot, SPECIALS[0]: tok.im_start, SPECIALS[1]: tok.im_end}
    wrong = {t: fast.convert_tokens_to_ids(t) for t in added if fast.convert_tokens_to_ids(t) != added[t]}
    if wrong:  # the special tokens must land on the model's ids: right after the ranks
        raise UserError(f"special tokens got ids {wrong}, expected {added}")
    return fast


def hf_model(model, model_args, tok):
    """model.py's weights in transformers' class: GPT-NeoX for rotary positions, else GPT-2."""
    from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM
    if model.config.rope:
        hf = GPTNeoXForCausalLM(neox_config(model_args, tok))
        hf.load_state_dict(neox_state_dict(model), strict=True)
    else:
        hf = GPT2LMHeadModel(hf_config(model_args, tok))
        hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.eval()


def write_model(hf, fast, tok, dest, info):
    """A transformers model folder: weights, generation config, tokenizer, miniglm.json."""
    from transformers import GenerationConfig
    hf.save_pretrained(dest, safe_serialization=True)
    GenerationConfig(do_sample=False, eos_token_id=list(tok.stop_ids), pad_token_id=tok.eot,
                     bos_token_id=tok.eot).save_pretrained(dest)
    fast.save_pretrained(dest)
    (dest / "miniglm.json").write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")


def peft_adapter(hf_base, model, adapter):
    """A peft model on hf_base holding model's adapter, weight for weight: LoRA's A and B
    under transformers' layer names (NeoX's fused qkv rows reordered head by head, as its
    weight is), or P-Tuning v2's prefix table as peft's prefix tuning embedding."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    c, neox = model.config, model.config.rope
    if adapter["method"] == "ptuning":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=adapter["num_virtual_tokens"],
                                    prefix_projection=False)  # the table itself: what the projection made
        peft_model = get_peft_model(hf_base, config)
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(model.prefix.table())
        return peft_model
    names = {t: (NEOX_NAMES[t] if neox else t) for t in adapter["targets"]}
    config = LoraConfig(task_type="CAUSAL_LM", r=adapter["r"], lora_alpha=adapter["alpha"],
                        lora_dropout=adapter["dropout"], target_modules=list(names.values()), fan_in_fan_out=not neox)
    peft_model = get_peft_model(hf_base, config)
    for i in range(c.n_layer):
        for ours, theirs in names.items():
            layer = model.get_submodule(f"transformer.h.{i}.{ours}")
            a, b = layer.lora_A.detach(), layer.lora_B.detach()
            if neox and ours == "attn.c_attn":
                b = b.view(3, c.n_head, -1, b.size(1)).transpose(0, 1).reshape(3 * c.n_embd, -1)
            where = f"base_model.model.{'gpt_neox.layers' if neox else 'transformer.h'}.{i}.{theirs}"
            target = peft_model.get_submodule(where)
            with torch.no_grad():
                target.lora_A["default"].weight.copy_(a)
                target.lora_B["default"].weight.copy_(b)
    return peft_model
