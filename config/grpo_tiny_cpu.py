# GRPO of the tiny CPU SFT model (config/sft_tiny_cpu.py) with rewards that can be checked
# (miniglm/align/rewards.py: the exact author, the exact next line, char F1 as partial credit, a format term).
#   python train.py config/grpo_tiny_cpu.py          # or: python demo.py --align=grpo
# Each iteration samples grpo_group answers to each of grpo_prompts SFT *train* questions from the
# current model, scores them, and pushes up the answers better than their group's mean. The
# settings were chosen on the dev questions (benchmarks/bench_align.py), never the 100 scored ones.
out_dir = "out/tiny-grpo"
data_dir = "data/sft"
init_from = "out/tiny-sft/best.pt"
stage = "grpo"
grpo_prompts = 8
grpo_group = 8
grpo_max_new_tokens = 48
grpo_temperature = 1.0
grpo_kl = 0.0  # trl's default (nanochat uses none either)
grpo_question_types = "all"
dropout = 0.0
learning_rate = 2e-5  # dev: distinct-2 0.522, char F1 0.419 (SFT 0.536, 0.420); 5e-5 and 1e-4: distinct-2 < 0.5
min_lr = 2e-6
weight_decay = 0.0
max_iters = 60
warmup_iters = 5
eval_interval = 30
eval_iters = 10
log_interval = 5
device = "cpu"
