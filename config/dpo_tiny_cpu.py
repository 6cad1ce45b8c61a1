# DPO of the tiny CPU SFT model (config/sft_tiny_cpu.py) on its own answers (python demo.py --align=dpo).
#   python data/prepare_pairs.py --vocab out/tiny-sft --on_policy --sft_data data/sft --out_dir data/pairs
#   python train.py config/dpo_tiny_cpu.py
# Pairs: for each SFT *train* question, chosen = the reference answer, rejected = one of the model's
# own sampled answers (temperature 1) under char F1 0.5 against it. The reference model is a
# frozen copy of init_from. beta, learning rate and steps: chosen on the dev questions
# (benchmarks/bench_align.py, benchmarks/README.md), never on the 100 scored ones.
out_dir = "out/tiny-dpo"
data_dir = "data/pairs"
choice_set = "data/sft/choices_dev.jsonl"  # the pairs folder has none: the SFT set's dev choice questions
init_from = "out/tiny-sft/best.pt"
stage = "dpo"
beta = 0.1
dpo_loss = "sigmoid"
rpo_alpha = 0.0
dropout = 0.0
batch_size = 8  # pairs per micro-step: 16 rows through the policy and the reference
gradient_accumulation_steps = 1
learning_rate = 1e-5  # dev char F1 0.427 (SFT 0.420); 3e-5: 0.420, 1e-4: 0.408 and distinct-2 0.45
min_lr = 1e-6
weight_decay = 0.0
max_iters = 100
warmup_iters = 10
eval_interval = 50
eval_iters = 10
log_interval = 10
device = "cpu"
