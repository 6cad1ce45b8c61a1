# A tiny pretrain that learns real Chinese text from the demo's data (fortunes-zh, or the
# embedded corpus) in about 4 minutes on a 2-core CPU.
#   python data/prepare.py fortunes-zh        # the GPT-2 .bin files and an 8,192-token BPE trained on train
#   python train.py config/train_tiny_cpu.py
# The vocabulary is a byte-level BPE trained on the data's train split (docs/tokenizer.md):
# 0.51 tokens per character of fortunes-zh against GPT-2's 1.24, so the same tokens/s read
# 2.4x more text. Shape and step size were searched on the demo's budget
# (benchmarks/README.md): at 2 cores a narrow, shallow model that sees more text wins, and
# 3 x 128 beat 4 x 128, 6 x 128, 4 x 192 and 4 x 256; Muon lowered it further, and rotary
# positions with a little dropout (the model overfits 451k tokens read 7 times) further still.
out_dir = "out/tiny-pretrain"
data_dir = "data/fortunes-zh"
vocab = "bpe"
vocab_size = 8192
n_layer = 3
n_head = 2
n_embd = 128
block_size = 256  # SFT rows (data/prepare_sft.py) are 256 tokens
rope = True  # rotary positions: 0.03 bits/char lower than a learned table (3 seeds); exports as GPT-NeoX
dropout = 0.05  # on the residual branches: helps only with rope (0.1 about as well); without rope 0.05 was worse
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 2e-3  # small models take a larger step; 3e-3 and 1e-3 were worse
# Muon for the blocks' matrices (AdamW at learning_rate for the rest): 0.15 bits/char lower
# than AdamW alone at 1,400 iterations; 0.005 and 0.02 were a little worse, 0.04 clearly
muon_lr = 0.01
beta2 = 0.99
weight_decay = 0.1  # also Muon's (decoupled: lr x 0.1 a step), which helped with rope
max_iters = 1500  # 3.1M tokens: 6.8 passes over the 451k train tokens; ~6 min on 2 cores
warmup_iters = 30
min_lr = 2e-4
eval_interval = 500
# what the model knows, at each evaluation: the dev choice questions, scored by log-likelihood
# (miniglm/choices.py; data/prepare_sft.py writes them; demo.py builds them before pretraining)
choice_set = "data/sft/choices_dev.jsonl"
eval_iters = 20
log_interval = 50
device = "cpu"
