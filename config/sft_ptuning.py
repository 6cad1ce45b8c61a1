# P-Tuning v2 on the 45M pretrain (config/train_config.py), for a GPU: as config/sft_config.py,
# with the pretrained weights frozen and 32 learned keys and values in front of every layer,
# made by a 512-wide MLP (prefix_projection, as ChatGLM's P-Tuning v2 demo can). The prefix
# takes 32 of the 512 positions; the default SFT rows (256 tokens) fit beside it.
#   python data/prepare_sft.py && python train.py config/sft_ptuning.py
import os  # noqa: E402 (modules and names starting with _ are not config keys)

exec(open(os.path.join(os.path.dirname(__file__), "sft_config.py"), encoding="utf-8").read())  # the rest as full SFT
out_dir = "out/ptuning"
finetune = "ptuning"
num_virtual_tokens = 32
prefix_projection = True
encoder_hidden_size = 512
learning_rate = 1e-2
min_lr = 1e-3
weight_decay = 0.0
