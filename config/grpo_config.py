# GRPO of the 45M SFT model (config/sft_config.py), one GPU or torchrun DDP (each process samples
# its own questions).
#   python train.py config/grpo_config.py
# Not yet measured on a GPU: the group size and rewards are the tiny model's; the learning rate is
# SFT's tenth, as for DPO. Rollouts dominate a step's time (benchmarks/bench_align.py prints the split).
out_dir = "out/grpo"
data_dir = "data/sft"
init_from = "out/sft/best.pt"
stage = "grpo"
grpo_prompts = 32
grpo_group = 16  # nanochat samples 16 per question
grpo_max_new_tokens = 64
grpo_temperature = 1.0
grpo_kl = 0.0
dropout = 0.0
learning_rate = 1e-5
min_lr = 1e-6
weight_decay = 0.0
max_iters = 200
warmup_iters = 10
eval_interval = 50
eval_iters = 10
log_interval = 10
