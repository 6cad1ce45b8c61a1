# SFT of the tiny CPU pretrain (config/train_tiny_cpu.py) on the default 问/答 set.
#   python data/prepare_sft.py --vocab out/tiny-pretrain --pack   # rows in the pretrain's vocabulary (its BPE)
#   python train.py config/sft_tiny_cpu.py
# Packed rows (65% trained) train ~1.9x more answer tokens per second than padded ones
# (benchmarks/bench_sft.py). The default set asks a 下一句 question about every pair of
# half-lines of a training poem (5,044 samples in 991 rows of 256 BPE tokens), which drills
# copying the question's line into the answer; 300 iterations are 2.4 epochs. Chosen on dev
# questions (benchmarks/README.md): char F1 0.397 at 200 iterations, 0.445 at 300, 0.454 at
# 400 (the answer-token val loss is lowest near 100: the answers learn their forms later).
out_dir = "out/tiny-sft"  # checkpoints, log.jsonl and the report go here
data_dir = "data/sft"  # sft_train.bin in this folder makes it an SFT run
init_from = "out/tiny-pretrain/best.pt"  # the weights, shape and vocabulary to start from
dropout = 0.0  # 0.1 was worse
batch_size = 8  # packed rows of 256 tokens per step
gradient_accumulation_steps = 1  # one micro-step: the rows fit at once
learning_rate = 1e-3  # 5e-4 and 3e-4 answered worse; 2e-3 as well as 1e-3
min_lr = 2e-4  # the cosine ends at a fifth of the peak
max_iters = 300  # 2.4 epochs of the default set (above)
warmup_iters = 10  # a short warmup: the weights are already trained
eval_interval = 300  # best.pt is the last one: the iteration count is the choice, not the val loss
eval_iters = 20  # batches per split in each evaluation
log_interval = 20  # a log line every this many iterations
device = "cpu"  # the tiny configs are made for a CPU
