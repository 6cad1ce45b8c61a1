# LoRA on the 45M pretrain (config/train_config.py), for a GPU: as config/sft_config.py, with
# the pretrained weights frozen and a rank-16 update on every linear layer of the blocks.
#   python train.py config/sft_lora.py
import os  # noqa: E402 (modules and names starting with _ are not config keys)

exec(open(os.path.join(os.path.dirname(__file__), "sft_config.py"), encoding="utf-8").read())  # the rest as full SFT
out_dir = "out/lora"
finetune = "lora"
lora_r = 16
lora_alpha = 32.0
lora_dropout = 0.05
learning_rate = 1e-3  # ten times full SFT's: only the adapter moves
min_lr = 1e-4
weight_decay = 0.0
