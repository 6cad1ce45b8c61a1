# A ~1B-parameter GPT for 8 GPUs with sharded data parallel (FSDP2, ZeRO-3-like):
#   python data/fetch_data.py chinese-poetry && python data/prepare.py chinese-poetry
#   torchrun --standalone --nproc_per_node=8 train.py config/train_1b.py
# 18 layers x 2048 wide, 16 heads of 128, GPT-2's vocabulary: 0.91B parameters in the blocks
# plus 0.10B in the (tied) embedding = 1.01B. With fp32 AdamW that is 16 GB of weights,
# gradients and optimizer state: one 80 GB GPU holds it under DDP, but not with room for
# activations at a useful batch; sharded over 8 GPUs each holds 2 GB of it
# (benchmarks/README.md has the calculation). chinese-poetry's 17M tokens are far too few for
# a model this size (Chinchilla: ~20 tokens per parameter): bring a larger corpus
# (data/prepare.py takes any docs.jsonl, docs/data.md) and point data_dir at it.
out_dir = "out/1b"
data_dir = "data/chinese-poetry"
n_layer = 18
n_head = 16
n_embd = 2048
block_size = 1024
rope = True
dropout = 0.0  # a large corpus, one pass: no dropout
parallel = "fsdp"
reshard_after_forward = True  # ZeRO-3-like; False (ZeRO-2-like) if memory allows: less communication
batch_size = 8  # rows per GPU per micro-step (1024 tokens each)
gradient_accumulation_steps = 32  # in total: 4 micro-steps on each of 8 GPUs -> 262,144 tokens an iteration
learning_rate = 3e-4
min_lr = 3e-5
weight_decay = 0.1
beta2 = 0.95
warmup_iters = 500
max_iters = 20000  # 5.2B tokens
eval_interval = 1000
eval_iters = 40  # divisible by 8: under FSDP every process runs the same number of forwards
log_interval = 10
log_to = "tensorboard"  # or "wandb" (offline unless you have logged in)
