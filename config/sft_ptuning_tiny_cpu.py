# P-Tuning v2 on the tiny CPU pretrain (config/train_tiny_cpu.py): the same SFT set and steps
# as config/sft_tiny_cpu.py, the pretrained weights frozen, 16 learned keys and values in
# front of every attention layer (docs/finetune.md). The prefix takes 16 of the model's 256
# positions, so the SFT rows are 241 tokens:
#   python data/prepare_sft.py --vocab out/tiny-pretrain --pack --block_size=241 --out_dir=data/sft-241
#   python train.py config/sft_ptuning_tiny_cpu.py    # or: python demo.py --finetune=ptuning
import os  # noqa: E402 (modules and names starting with _ are not config keys)

exec(open(os.path.join(os.path.dirname(__file__), "sft_tiny_cpu.py"), encoding="utf-8").read())  # the rest as full SFT
out_dir = "out/tiny-ptuning"
data_dir = "data/sft-241"
finetune = "ptuning"
num_virtual_tokens = 16
prefix_projection = False
learning_rate = 1e-1  # chosen on dev questions (1e-2 and 3e-2 answered worse): only 12,288 numbers move
min_lr = 1e-2
weight_decay = 0.0
