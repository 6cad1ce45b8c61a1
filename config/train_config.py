# The 45M-parameter pretrain (6 layers, 512 wide, 8 heads, GPT-2 BPE, tied embeddings).
# Meant for one GPU (or torchrun DDP); on a laptop CPU use train_tiny_cpu.py instead.
#   python data/fetch_data.py fortunes-zh && python data/prepare.py fortunes-zh
#   python train.py config/train_config.py
out_dir = "out/pretrain"
data_dir = "data/fortunes-zh"
n_layer = 6
n_head = 8
n_embd = 512
block_size = 512  # the spec allows 256 or 512: 512 fits whole poems plus context
dropout = 0.1  # ~1.2M tokens of fortunes-zh is small for 45M parameters: regularize
# 32 rows x 512 tokens x 4 micro-steps = 65,536 tokens per iteration
batch_size = 32
gradient_accumulation_steps = 4
learning_rate = 6e-4
# Measured on an H100 (benchmarks/README.md): on fortunes-zh (1.2M tokens) val loss is
# lowest near iteration 600 (~34 epochs) and rises after it as the model memorises the
# data. For a larger corpus (data/chinese-poetry: ~17M tokens) raise max_iters.
max_iters = 600
warmup_iters = 100
min_lr = 6e-5
eval_interval = 100
eval_iters = 40
log_interval = 10
