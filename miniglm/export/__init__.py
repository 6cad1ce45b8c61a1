"""The model out of the repo: a Hugging Face folder (hf.py), one GGUF file (gguf.py)."""
