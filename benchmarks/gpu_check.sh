#!/usr/bin/env bash
# What only a GPU can show, in one go (the figures in benchmarks/README.md came from it):
# the 45M pretrain with torch.compile + bf16 AMP, the same under torchrun DDP (nccl),
# fp16 with GradScaler, SFT from the pretrain, and the throughput benchmarks.
# Needs data/fortunes-zh prepared (data/fetch_data.py, prepare.py); it makes its own GPT-2 SFT data
# (data/sft is the demo's, in the demo's trained BPE).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
echo "== 45M pretrain: compile + bf16 (auto)"
python3 train.py config/train_config.py --max_iters=${ITERS:-300} --eval_interval=100 --out_dir="$OUT/pretrain"
echo "== the same under torchrun DDP (1 process, nccl)"
torchrun --standalone --nproc_per_node=1 train.py config/train_config.py --max_iters=20 --eval_interval=20 \
  --out_dir="$OUT/ddp"
echo "== the same sharded: FSDP2 (1 process, bf16 MixedPrecisionPolicy, compile per block), then resumed"
torchrun --standalone --nproc_per_node=1 train.py config/train_config.py --max_iters=20 --eval_interval=10 \
  --parallel=fsdp --out_dir="$OUT/fsdp"
torchrun --standalone --nproc_per_node=1 train.py config/train_config.py --max_iters=30 --eval_interval=10 \
  --parallel=fsdp --out_dir="$OUT/fsdp" --init_from=resume
echo "== memory and tokens/s per process: DDP against FSDP (both settings)"
python3 benchmarks/bench_train.py config/train_config.py --parallel=ddp,fsdp,fsdp-zero2 --worlds=1 --iters=10
echo "== fp16 + GradScaler, no compile"
python3 train.py config/train_config.py --max_iters=20 --eval_interval=20 --dtype=float16 --compile=False \
  --out_dir="$OUT/fp16"
echo "== the 45M body on the trained 8,192-token BPE (data/prepare.py makes it): compare val bits/char, not loss"
python3 train.py config/train_config.py --vocab=bpe --vocab_size=8192 --max_iters=${ITERS:-300} --eval_interval=100 \
  --out_dir="$OUT/pretrain-bpe"
echo "== SFT from the pretrain"
python3 data/prepare_sft.py --vocab="$OUT/pretrain" --out_dir="$OUT/sft-data"
python3 train.py config/sft_config.py --init_from="$OUT/pretrain/best.pt" --data_dir="$OUT/sft-data" --max_iters=200 \
  --out_dir="$OUT/sft"
python3 sample.py --out_dir="$OUT/sft" --chat --start="《静夜思》的作者是谁?" --max_new_tokens=60
echo "== the third stage on the 45M SFT model: DPO on its own answers, then GRPO (not yet measured on a GPU)"
python3 data/prepare_pairs.py --vocab="$OUT/sft" --on_policy --sft_data="$OUT/sft-data" --block_size=512 \
  --out_dir="$OUT/pairs"
python3 train.py config/dpo_config.py --init_from="$OUT/sft/best.pt" --data_dir="$OUT/pairs" --out_dir="$OUT/dpo"
python3 train.py config/grpo_config.py --init_from="$OUT/sft/best.pt" --data_dir="$OUT/sft-data" --max_iters=50 \
  --out_dir="$OUT/grpo"
echo "== the OpenAI-compatible server under load: the SFT model above"
python3 benchmarks/bench_serve.py --out_dir="$OUT/sft" --sft_data="$OUT/sft-data" --device=cuda
echo "== generation: decode modes at batch 1 and 32 (the SFT model above)"
python3 benchmarks/bench_generate.py --out_dir="$OUT/sft" --decode=eager,static,compiled --batch=32
echo "== benchmarks"
python3 benchmarks/bench_train.py config/train_tiny_cpu.py --iters=20
# MFU and where a step's time goes: the chunked loss (model.LinearCrossEntropy, bf16 matmuls,
# fp32 softmax) at two chunk sizes against the plain loss (0, the CUDA default so far)
python3 benchmarks/bench_train.py config/train_config.py --iters=20 --loss_chunk_rows=4096,1024,0 --profile
echo "== 45M pretrain with the chunked loss: the val loss should track the plain run above"
python3 train.py config/train_config.py --max_iters=${ITERS:-300} --eval_interval=100 --loss_chunk_rows=4096 \
  --out_dir="$OUT/pretrain-chunked"
echo "== last (its autotuning compiles for minutes): the compile mode that autotunes the matmuls"
python3 benchmarks/bench_train.py config/train_config.py --iters=20 --loss_chunk_rows=4096,0 \
  --compile_mode=max-autotune-no-cudagraphs
