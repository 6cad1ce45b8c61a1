# SFT of the tiny CPU pretrain (config/train_tiny_cpu.py) on the default 问/答 set.
#   python data/prepare_sft.py --vocab out/tiny-pretrain --pack   # rows in the pretrain's vocabulary (its BPE)
#   python train.py config/sft_tiny_cpu.py
# Packed rows (65% trained) train ~1.9x more answer tokens per second than padded ones
# (benchmarks/bench_sft.py). The default set asks a 下一句 question about every pair of
# half-lines of a training poem (5,044 samples in 991 rows of 256 BPE tokens), which drills
# copying the question's line into the answer; 300 iterations are 2.4 epochs. Chosen on dev
# questions (benchmarks/README.md): char F1 0.397 at 200 iterations, 0.445 at 300, 0.454 at
# 400 (the answer-token val loss is lowest near 100: the answers learn their forms later).
out_dir = "out/tiny-sft"
data_dir = "data/sft"
init_from = "out/tiny-pretrain/best.pt"
dropout = 0.0  # 0.1 was worse
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 1e-3  # 5e-4 and 3e-4 answered worse; 2e-3 as well as 1e-3
min_lr = 2e-4
max_iters = 300
warmup_iters = 10
eval_interval = 300  # best.pt is the last one: the iteration count is the choice, not the val loss
eval_iters = 20
log_interval = 20
device = "cpu"
