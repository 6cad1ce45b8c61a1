# SFT of the tiny CPU pretrain (config/train_tiny_cpu.py) on the default 问/答 set.
#   python data/prepare_sft.py --vocab out/tiny-pretrain --pack   # rows in the pretrain's vocabulary (its BPE)
#   python train.py config/sft_tiny_cpu.py
# Packed rows (65% trained) train ~1.9x more answer tokens per second than padded ones
# (benchmarks/bench_sft.py). With the BPE the 2,989 samples fill 629 rows of 256 tokens,
# so 200 iterations are 2.5 epochs. Chosen on dev questions (benchmarks/README.md): the
# answer-token val loss is lowest near iteration 100, but held-out char F1 keeps rising
# to ~200 (the answers learn their forms), then flattens while dialogue answers get worse.
out_dir = "out/tiny-sft"
data_dir = "data/sft"
init_from = "out/tiny-pretrain/best.pt"
dropout = 0.0  # 0.1 was worse
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 1e-3  # 5e-4 and 3e-4 answered worse; 2e-3 as well as 1e-3
min_lr = 2e-4
max_iters = 200
warmup_iters = 10
eval_interval = 200  # best.pt is the last one: the iteration count is the choice, not the val loss
eval_iters = 20
log_interval = 20
device = "cpu"
