# SFT of the 45M pretrain into a 问/答 model (one GPU or torchrun DDP).
#   python data/prepare_sft.py            # data/sft: the default poem Q/A + dialogue set
#   python train.py config/sft_config.py
out_dir = "out/sft"
data_dir = "data/sft"
init_from = "out/pretrain/best.pt"  # the model (and its shape) come from this checkpoint
dropout = 0.1
batch_size = 32
gradient_accumulation_steps = 1
learning_rate = 1e-4  # fine-tuning: a tenth of the pretraining rate
min_lr = 1e-5
# measured on an H100: answer val loss is lowest after ~100-200 iterations (~1-2 epochs
# of the default set); past that the model memorises the training answers
max_iters = 200
warmup_iters = 20
eval_interval = 50
eval_iters = 10
log_interval = 10
