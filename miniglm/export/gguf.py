"""
A checkpoint as one GGUF file for llama.cpp, and an Ollama Modelfile beside it (export_gguf.py
and export_hf.py --gguf are the commands; the module docstring of export_gguf.py says how).
"""
from pathlib import Path

import numpy as np

from data_utils import UserError, atomic_write
from miniglm.adapters import merge_lora
from miniglm.chat_template import PREFIX
from miniglm.checkpoint import find_checkpoint, load_checkpoint, open_checkpoint, weights_line
from miniglm.export.hf import byte_level, chat_template_jinja, merges_of, state_dict_with_biases
from miniglm.generation import DEFAULT_DECODING, model_template
from miniglm.tokenizer import SPECIALS

TYPES = ("f32", "f16", "q8_0")
BLOCK = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
         "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}  # model.py's names in a block → llama.cpp's


def gguf_tensors(model):
    """{GGUF name: float32 array} in llama.cpp's layout: nn.Linear's (out, in), and the fused qkv
    as all queries, all keys, all values, which is model.py's own (llama.cpp's GPT-NeoX converter
    undoes Hugging Face's head-by-head interleaving: export_hf.neox_state_dict's, not used here)."""
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}
    out = {}
    for name, t in state_dict_with_biases(model).items():
        parts = name.split(".")
        new = names.get(name) or f"blk.{parts[2]}.{BLOCK['.'.join(parts[3:-1])]}.{parts[-1]}"
        out[new] = t.detach().float().contiguous().numpy()
    return out


def tokenizer_fields(tok, vocab_size):
    """(tokens, token types, merges) as llama.cpp's 'gpt2' BPE reads them: byte-level strings."""
    import gguf
    ranks = {t: i for i, t in enumerate(tok.token_bytes[:tok.eot])}
    tokens = [byte_level(t) for t in tok.token_bytes[:tok.eot]] + ["<|endoftext|>", *SPECIALS]
    types = [gguf.TokenType.NORMAL] * tok.eot + [gguf.TokenType.CONTROL] * (1 + len(SPECIALS))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]  # the model's padded slots, never written
    types += [gguf.TokenType.UNUSED] * (vocab_size - len(types))
    return tokens, types, [f"{a} {b}" for a, b in merges_of(ranks)]


def modelfile(gguf_name, template, context):
    """An Ollama Modelfile: the file, the chat template in Ollama's Go syntax, stops, decoding."""
    if template == "chatml":
        turns = ('{{- range .Messages }}<|im_start|>{{ if eq .Role "tool" }}tool{{ else }}{{ .Role }}{{ end }}\n'
                 '{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')
        stops = ["<|im_end|>", "<|endoftext|>"]
    else:
        turns = ('{{- range .Messages }}{{ if eq .Role "system" }}' + PREFIX["system"] + '{{ .Content }}\n'
                 '{{ else if eq .Role "user" }}' + PREFIX["user"] + '{{ .Content }}\n'
                 '{{ else if eq .Role "assistant" }}' + PREFIX["assistant"] + '{{ .Content }}<|endoftext|>'
                 '{{ end }}{{ end }}' + PREFIX["assistant"])
        stops = ["<|endoftext|>"]
    d = DEFAULT_DECODING
    lines = [
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{turns}"""',
        *(f'PARAMETER stop "{s}"' for s in stops),
        f"PARAMETER temperature {d.get('temperature') or 0}",
        f"PARAMETER repeat_penalty {d['repetition_penalty']}",
        "PARAMETER repeat_last_n -1",
        f"PARAMETER num_ctx {context}",
    ]
    return "\n".join(lines) + "\n"


def write_gguf(model, tok, ckpt, dest, qtype="f32"):
    import gguf

    c, template = model.config, model_template(ckpt)
    arch = "gptneox" if c.rope else "gpt2"
    w = gguf.GGUFWriter(str(dest), arch)
    w.add_name(Path(str(dest)).name.split(".")[0])
    w.add_context_length(model.context_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(4 * c.n_embd)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(1e-5)
    if c.rope:
        w.add_rope_dimension_count(c.n_embd // c.n_head)  # every dimension rotates (partial_rotary_factor 1)
        w.add_rope_freq_base(10000.0)
        w.add_parallel_residual(False)
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[qtype]
    )
    tokens, types, merges = tokenizer_fields(tok, c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.eot)
    w.add_eos_token_id(tok.eot)
    w.add_pad_token_id(tok.eot)
    if template == "chatml":
        w.add_eot_token_id(tok.im_end)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template_jinja(template))
    for name, t in gguf_tensors(model).items():
        if t.ndim == 2 and qtype == "q8_0" and name != "position_embd.weight":
            w.add_tensor(
                name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            w.add_tensor(name, t.astype(np.float16) if t.ndim == 2 and qtype == "f16" else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export(out_dir, dest, qtype="f32", force=False, base=None, merge=False):
    """Write dest (.gguf) and dest's .Modelfile beside it; returns their paths."""
    if qtype not in TYPES:
        raise UserError(f"--type must be one of {', '.join(TYPES)}, got {qtype!r}")
    dest = Path(dest)
    modelfile_path = dest.with_suffix(".Modelfile")
    if dest.exists() and not force:
        raise UserError(f"{dest} exists: give another --dest, or --force to replace it")
    file = find_checkpoint(out_dir)
    ckpt = load_checkpoint(file)
    print(f"weights: {weights_line(file, ckpt)}")
    model, tok, _ = open_checkpoint(ckpt, file, base=base)
    adapter = (ckpt.get("adapter") or {}).get("method")
    if adapter == "ptuning":
        raise UserError(
            f"{out_dir}: a P-Tuning v2 prefix has no place in GGUF (no weight to fold it into; only a "
            f"LoRA adapter is, with --merge): export it with export_hf.py for peft"
        )
    if adapter == "lora" and not merge:
        raise UserError(f"{out_dir}: a LoRA adapter; GGUF holds one model: add --merge to fold it into the weights")
    if tok.kind == "trimmed":
        raise UserError(
            f"the trimmed vocabulary {tok.name} cannot be written as a GGUF tokenizer exactly (it spells "
            f"GPT-2 tokens it lacks as bytes): export a model trained with vocab='bpe' or vocab='gpt2'"
        )
    if adapter == "lora":
        merge_lora(model)
    model.eval()
    tmp = dest.with_name(dest.name + ".tmp")
    write_gguf(model, tok, ckpt, tmp, qtype)
    tmp.replace(dest)  # whole or not at all
    atomic_write(
        modelfile_path, lambda f: f.write(modelfile(dest.name, model_template(ckpt), model.context_size)), mode="w"
    )
    return dest, modelfile_path


def open_in_llama_cpp(path, n_ctx, threads=2, **kwargs):
    """llama_cpp.Llama on a GGUF file, with llama.cpp's extra buffer types off: its AMX repacking of
    q8_0 weights crashed (SIGSEGV) on the 2-core Sapphire Rapids machine this was tested on
    (llama-cpp-python 0.3.36); without it q8_0 runs on the plain CPU path. llama-cpp-python has no
    argument for it, so its default model parameters are wrapped for this call."""
    import llama_cpp
    import llama_cpp.llama as module

    default = module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, verbose=False, **kwargs)
    finally:
        module.llama_cpp.llama_model_default_params = default
