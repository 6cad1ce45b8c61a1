# The 45M-parameter pretrain (6 layers, 512 wide, 8 heads, GPT-2 BPE, tied embeddings).
# Meant for one GPU (or torchrun DDP); on a laptop CPU use train_tiny_cpu.py instead.
#   python data/fetch_data.py fortunes-zh && python data/prepare.py fortunes-zh
#   python train.py config/train_config.py
out_dir = "out/pretrain"  # checkpoints and log.jsonl go here
data_dir = "data/fortunes-zh"  # train.bin / val.bin of data/prepare.py
n_layer = 6  # the spec: 6 layers, 512 wide, 8 heads: 44.9M parameters with GPT-2's vocabulary
n_head = 8  # heads of 64
n_embd = 512  # the residual stream's width
block_size = 512  # the spec allows 256 or 512: 512 fits whole poems plus context
dropout = 0.1  # ~1.2M tokens of fortunes-zh is small for 45M parameters: regularize
# 32 rows x 512 tokens x 4 micro-steps = 65,536 tokens per iteration
batch_size = 32
gradient_accumulation_steps = 4
learning_rate = 6e-4  # GPT-2 small's peak (nanoGPT's default)
# Measured on an H100 (benchmarks/README.md): on fortunes-zh (1.2M tokens) val loss is
# lowest near iteration 600 (~34 epochs) and rises after it as the model memorises the
# data. For a larger corpus (data/chinese-poetry: ~17M tokens) raise max_iters.
max_iters = 600
warmup_iters = 100  # a linear warmup, then the cosine decay
min_lr = 6e-5  # a tenth of the peak, as Chinchilla
eval_interval = 100  # evaluate, log and checkpoint this often
eval_iters = 40  # batches per split in each evaluation
log_interval = 10  # a log line every this many iterations
