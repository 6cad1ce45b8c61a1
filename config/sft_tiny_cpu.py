# SFT of the tiny CPU pretrain (config/train_tiny_cpu.py) on the default 问/答 set.
#   python data/prepare_sft.py --vocab out/tiny-pretrain --pack   # rows in the pretrain's (trimmed) vocabulary
# Packed rows (67% trained) train ~1.9x more answer tokens per second than padded ones
# (28%; benchmarks/bench_sft.py). Measured
# (benchmarks/README.md): lr 5e-4 forgets less of the pretraining than 1e-3 and answers
# held-out questions as well or better.
#   python train.py config/sft_tiny_cpu.py
out_dir = "out/tiny-sft"
data_dir = "data/sft"
init_from = "out/tiny-pretrain/best.pt"
dropout = 0.0
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 5e-4
min_lr = 1e-4
max_iters = 300
warmup_iters = 10
eval_interval = 100
eval_iters = 20
log_interval = 10
device = "cpu"
