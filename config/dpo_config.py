# DPO of the 45M SFT model (config/sft_config.py), one GPU or torchrun DDP.
#   python data/prepare_pairs.py --vocab out/sft --on_policy --sft_data data/sft --out_dir data/pairs --block_size 512
#   python train.py config/dpo_config.py
# Not yet measured on a GPU: the settings follow the tiny model's dev-question search scaled as
# SFT's are (a tenth of the learning rate), and trl's and minimind's small learning rates.
out_dir = "out/dpo"
data_dir = "data/pairs"
init_from = "out/sft/best.pt"
stage = "dpo"
beta = 0.1
dpo_loss = "sigmoid"
dropout = 0.0
batch_size = 16  # pairs per micro-step
gradient_accumulation_steps = 1
learning_rate = 1e-5
min_lr = 1e-6
weight_decay = 0.0
max_iters = 200
warmup_iters = 20
eval_interval = 50
eval_iters = 10
log_interval = 10
