# LoRA on the tiny CPU pretrain (config/train_tiny_cpu.py): the same SFT set and steps as
# config/sft_tiny_cpu.py, the pretrained weights frozen, a rank-8 update trained on every
# linear layer of the blocks (docs/finetune.md).
#   python train.py config/sft_lora_tiny_cpu.py      # or: python demo.py --finetune=lora
import os  # noqa: E402 (modules and names starting with _ are not config keys)

exec(open(os.path.join(os.path.dirname(__file__), "sft_tiny_cpu.py"), encoding="utf-8").read())  # the rest as full SFT
out_dir = "out/tiny-lora"
finetune = "lora"
lora_r = 8
lora_alpha = 16.0  # the update is scaled by alpha / r = 2
lora_dropout = 0.0
lora_targets = "all"  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
learning_rate = 2e-2  # an adapter takes a larger step than the whole model (1e-3): chosen on dev questions
min_lr = 2e-3
weight_decay = 0.0  # decaying A and B pulls the update to zero, not towards the base
