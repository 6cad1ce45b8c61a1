#!/usr/bin/env bash
# The 45M body (6x512) on chinese-poetry, GPT-2's vocabulary against a 16,384-token BPE trained
# on its train split, on one GPU: pretrain, SFT, evaluate. Val bits/char compares the two (their
# losses per token do not). Prepare on any machine first (fetch_data needs opencc, prepare rustbpe):
#   python data/fetch_data.py chinese-poetry && python data/prepare.py chinese-poetry --bpe_vocab_size 16384
#   SFT="--poems data/chinese-poetry/docs.jsonl data/fortunes-zh/docs.jsonl --max_poems 20000 --block_size 512 --pack --no-all_next_lines"
#   (--no-all_next_lines: the set as it was measured, before every 下一句 pair became the default)
#   python data/prepare_sft.py $SFT --out_dir data/sft-cp-gpt2
#   python data/prepare_sft.py $SFT --vocab data/chinese-poetry/bpe-16384.json --out_dir data/sft-cp-bpe
# then: VOCABS="bpe gpt2" bash benchmarks/gpu_poetry.sh   (logs and eval-*.json in $OUT)
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-poetry}
RUNS=${RUNS:-/tmp/gpu-poetry-runs}  # checkpoints (too big to keep beside the logs)
mkdir -p "$OUT" "$RUNS"
for v in ${VOCABS:-bpe gpt2}; do
  case $v in
    bpe) flags="--vocab=bpe --vocab_size=16384" ;;
    gpt2) flags="--vocab=gpt2" ;;
    *) echo "unknown vocabulary $v (bpe or gpt2)"; exit 2 ;;
  esac
  echo "== 45M pretrain on chinese-poetry, vocabulary $v"
  python3 train.py config/train_config.py --data_dir=data/chinese-poetry $flags --max_iters="${ITERS:-1500}" \
    --eval_interval=250 --out_dir="$RUNS/pretrain-$v"
  echo "== SFT, vocabulary $v"
  python3 train.py config/sft_config.py --init_from="$RUNS/pretrain-$v/best.pt" --data_dir="data/sft-cp-$v" \
    --out_dir="$RUNS/sft-$v"
  cp "$RUNS/pretrain-$v/log.jsonl" "$OUT/pretrain-$v.jsonl"
  cp "$RUNS/sft-$v/log.jsonl" "$OUT/sft-$v.jsonl"
  echo "== evaluation, vocabulary $v"
  python3 evaluations.py --out_dir="$RUNS/sft-$v" --compare="$RUNS/pretrain-$v" --pretrain_data=data/chinese-poetry \
    --sft_data="data/sft-cp-$v" --questions=200 --json="$OUT/eval-$v.json" --report=none
done
