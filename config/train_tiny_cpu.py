# A tiny pretrain that visibly learns on the embedded default (fortunes-zh) in a few
# minutes on a 2-core CPU: 4 layers, 128 wide. Most of its 7M parameters are the
# GPT-2 vocabulary's embedding table, which this tokenizer needs whatever the width.
#   python train.py config/train_tiny_cpu.py
out_dir = "out/tiny-pretrain"
data_dir = "data/fortunes-zh"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 256  # SFT rows (data/prepare_sft.py) are 256 tokens
dropout = 0.0
batch_size = 4
gradient_accumulation_steps = 1
learning_rate = 3e-3  # small models take a larger step
max_iters = 250
warmup_iters = 20
min_lr = 3e-4
eval_interval = 100
eval_iters = 10
log_interval = 10
device = "cpu"
