"""
Export a checkpoint as a Hugging Face transformers model folder, so the model leaves the
repo: safetensors weights, config, generation config, and a tokenizer that AutoTokenizer
loads (tokenizer.json, with the chat template the model was fine-tuned with).

  python export_hf.py --out_dir=out/tiny-sft --dest=hf/tiny-sft
  python export_hf.py --out_dir=out/tiny-lora --dest=hf/tiny-lora      # an adapter: base/ + adapter/ (peft)
  python export_hf.py --out_dir=out/tiny-lora --dest=hf/tiny-lora-merged --merge   # LoRA folded in: one model
  python export_hf.py --out_dir=out/tiny-sft --gguf=out/tiny-sft.gguf   # one GGUF file for llama.cpp (export_gguf.py)

  from transformers import AutoModelForCausalLM, AutoTokenizer
  tok, model = AutoTokenizer.from_pretrained("hf/tiny-sft"), AutoModelForCausalLM.from_pretrained("hf/tiny-sft")
  ids = tok.apply_chat_template([{"role": "user", "content": "《静夜思》的作者是谁?"}], add_generation_prompt=True,
                                return_tensors="pt", return_dict=True)

The model is GPT-2's architecture (GPT2LMHeadModel) with exact GELU and zero biases, or,
for a model trained with rope=True, GPT-NeoX's (GPTNeoXForCausalLM: sequential residuals,
full rotary dimensions): either computes what model.py computes. The tokenizer is the same BPE
(full GPT-2 or the trained one) as an HF byte-level BPE with the same split pattern: the same ids
as miniglm/tokenizer.py's.
A trimmed vocabulary spells GPT-2 tokens it lacks as bytes, which no HF tokenizer does:
it is refused. generation_config is greedy with both end tokens; the project's default
repetition penalty is left out, because HF's also counts the prompt's tokens.

An adapter run (LoRA, P-Tuning v2: miniglm/adapters.py) is written as its base model's folder plus a
peft adapter folder beside it, made by peft itself (get_peft_model, its weights set, then
save_pretrained): PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEST/base),
DEST/adapter) computes what the project computes (tested). P-Tuning v2 goes out as peft's
prefix tuning with the prefix table itself (prefix_projection off: the MLP's output is saved).
"""

import argparse
from pathlib import Path

from data_utils import UserError, run_cli
from miniglm.adapters import merge_lora
from miniglm.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint, open_checkpoint, weights_line
from miniglm.export import gguf as gguf_export  # (not the gguf package: the project's exporter, which uses it)
from miniglm.export.hf import hf_model, hf_tokenizer, peft_adapter, write_model
from miniglm.generation import model_template


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/tiny-sft", help="a training out_dir (its best.pt) or a .pt file")
    p.add_argument("--dest", help="the folder to write (created; files in it are replaced)")
    p.add_argument("--base", help="for an adapter (LoRA, P-Tuning): its base checkpoint, if not where it was trained")
    p.add_argument("--merge", action="store_true", help="a LoRA adapter: fold it into the weights and write one model")
    p.add_argument(
        "--gguf",
        metavar="FILE",
        help="write one GGUF file for llama.cpp / Ollama instead (export_gguf.py; --dest is then not needed)",
    )
    p.add_argument("--gguf_type", default="f32", help="with --gguf: f32, f16 or q8_0")
    p.add_argument("--force", action="store_true", help="with --gguf: replace the file if it exists")
    args = p.parse_args()
    if args.gguf:
        dest, mf = gguf_export.export(args.out_dir, args.gguf, args.gguf_type, args.force, args.base, args.merge)
        print(f"wrote {dest} ({args.gguf_type}) and {mf}")
        return
    if not args.dest:
        raise UserError("--dest (the folder to write) is required, unless --gguf FILE")
    file = find_checkpoint(args.out_dir)
    ckpt = load_checkpoint(file)
    print(f"weights: {weights_line(file, ckpt)}")
    # the model (an adapter on its base), and the base's checkpoint: read and hash-checked once
    model, tok, base_ckpt = open_checkpoint(ckpt, file, base=args.base)
    model.eval()
    template, adapter = model_template(ckpt), ckpt.get("adapter")
    if args.merge and (adapter or {}).get("method") != "lora":
        raise UserError(
            f"{args.out_dir}: --merge folds a LoRA adapter into its base; this is "
            + (
                "a P-Tuning v2 prefix, which is not a weight to fold (export it as an adapter)"
                if adapter
                else "a full model already (export it without --merge)"
            )
        )
    fast = hf_tokenizer(tok, template)  # first: a vocabulary that cannot be exported stops before any file is written
    dest = Path(args.dest)
    info = {
        "checkpoint": str(file),
        "vocab": tok.name,
        "template": template,
        "kind": ckpt.get("kind"),
        "iter": ckpt["iter_num"],
        "finetune": (adapter or {}).get("method", "full"),
    }
    if args.merge:
        merge_lora(model)
    if not adapter or args.merge:
        hf = hf_model(model, ckpt["model_args"], tok)
        write_model(hf, fast, tok, dest, dict(info, merged=bool(args.merge)))
        print(
            f"wrote {dest}: {type(hf).__name__} ({model.num_params() / 1e6:.2f}M parameters"
            f"{', LoRA merged' if args.merge else ''}), tokenizer {tok.name}, chat template {template}; load it with "
            f"AutoModelForCausalLM / AutoTokenizer.from_pretrained({str(dest)!r})"
        )
        return
    # an adapter: the base model's folder, and beside it peft's adapter folder that points at it
    hf = hf_model(model_from_checkpoint(base_ckpt).eval(), ckpt["model_args"], tok)
    write_model(
        hf, fast, tok, dest / "base", dict(info, checkpoint=str(args.base or ckpt["base"]["path"]), finetune=None)
    )
    peft_model = peft_adapter(hf, model, adapter)
    peft_model.peft_config["default"].base_model_name_or_path = str((dest / "base").resolve())
    peft_model.save_pretrained(dest / "adapter")
    fast.save_pretrained(dest / "adapter")
    print(
        f"wrote {dest}/base ({type(hf).__name__}) and {dest}/adapter (peft {adapter['method']}); load them with "
        f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(dest / 'base')!r}), "
        f"{str(dest / 'adapter')!r})"
    )


if __name__ == "__main__":
    run_cli(main)
