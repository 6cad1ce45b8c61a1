"""
Export a checkpoint as one GGUF file, for llama.cpp, llama-cpp-python, Ollama and LM Studio;
and an Ollama Modelfile beside it.

  python export_gguf.py --out_dir=out/tiny-sft --dest=out/tiny-sft.gguf            # f32
  python export_gguf.py --out_dir=out/tiny-sft --dest=out/tiny-sft-q8.gguf --type=q8_0
  python export_hf.py --out_dir=out/tiny-sft --gguf=out/tiny-sft.gguf               # the same, from export_hf
  ollama create tiny-sft -f out/tiny-sft.Modelfile && ollama run tiny-sft "《静夜思》的作者是谁?"

Written with the `gguf` package's writer (llama.cpp's own Python library), from the project's
own files: the weights as llama.cpp's GPT-NeoX (rotary positions: the demo's model) or GPT-2
(learned positions) architecture, every bias (zero where model.py has none) and a separate output
matrix (the tied embedding written twice), as those loaders want; the tokenizer (tokens, merges,
pre-tokenizer 'gpt-2', whose split pattern the project's BPE uses, and the end-of-text ids, which
llama.cpp would otherwise take as 11); the chat template (Jinja, as export_hf writes it), the
context length and the rotary base. f32, f16 or q8_0 (2-D weights; norms and biases stay f32).
A LoRA adapter is folded in with --merge (the file is one model); a P-Tuning prefix has no place in GGUF.
Note: llama.cpp's GELU is the tanh approximation, model.py's the exact one (the logits differ a
little: tests/test_gguf.py states by how much).
"""
import argparse

from data_utils import run_cli
from miniglm.export.gguf import TYPES, export


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/tiny-sft", help="a training out_dir (its best.pt) or a .pt file")
    p.add_argument("--dest", required=True, help="the .gguf file to write (a .Modelfile for Ollama goes beside it)")
    p.add_argument("--type", default="f32", help=f"weights: {', '.join(TYPES)}")
    p.add_argument("--force", action="store_true", help="replace dest if it exists")
    p.add_argument("--base", help="for a LoRA adapter: its base checkpoint, if not where it was trained")
    p.add_argument("--merge", action="store_true", help="a LoRA adapter: fold it into the weights (required)")
    args = p.parse_args()
    dest, mf = export(args.out_dir, args.dest, args.type, args.force, args.base, args.merge)
    print(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MiB, {args.type}) and {mf}; run it with llama.cpp "
          f"(llama-cli -m {dest}) or Ollama (ollama create NAME -f {mf})")


if __name__ == "__main__":
    run_cli(main)
