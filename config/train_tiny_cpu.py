# A tiny pretrain that learns real Chinese text from the embedded default (fortunes-zh) in
# about 3.5 minutes on a 2-core CPU. Its vocabulary is trimmed to the GPT-2 ids the corpus
# uses (5,795 tokens, padded to 5,824, from data/fortunes-zh/vocab.json): with the full
# 50,304-way output layer most of a small model's compute goes to the softmax.
#   python train.py config/train_tiny_cpu.py
# Tuned on the 2-core dev machine for the demo's budget (benchmarks/README.md): 4 x 192 beat
# 4 x 128 (more tokens, too little capacity) and 4 x 256 (too few tokens) in the same time.
out_dir = "out/tiny-pretrain"
data_dir = "data/fortunes-zh"
vocab = "trimmed"
n_layer = 4
n_head = 4
n_embd = 192
block_size = 256  # SFT rows (data/prepare_sft.py) are 256 tokens
dropout = 0.0  # ~1.2 epochs of the data: nothing to regularise yet
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 3e-3  # small models take a larger step
max_iters = 720  # 1.47M tokens
warmup_iters = 30
min_lr = 3e-4
eval_interval = 180
eval_iters = 20
log_interval = 20
device = "cpu"
