"""
Train the GPT of model.py: pretraining, supervised fine-tuning (SFT), and the later stages.

  python train.py config/train_tiny_cpu.py                     # one process
  python train.py config/train_config.py --batch_size=32       # --key=value overrides (Python literals)
  torchrun --standalone --nproc_per_node=4 train.py config/train_config.py   # DDP
  torchrun --standalone --nproc_per_node=8 train.py config/train_1b.py       # FSDP (parallel='fsdp')
  python train.py config/sft_lora_tiny_cpu.py                  # LoRA (finetune='lora'; or 'ptuning')
  python train.py config/dpo_tiny_cpu.py                       # DPO on preference pairs (stage='dpo')
  python train.py config/grpo_tiny_cpu.py                      # GRPO on rewards (stage='grpo')

The data folder decides between pretraining and SFT: sft_train.bin (data/prepare_sft.py) means
SFT, the loss on answer tokens only; train.bin (data/prepare.py) pretraining. The key `stage`
picks a later stage instead: each is a class in miniglm/align/, listed in STAGES below, that
subclasses miniglm/trainer.py's Trainer and brings its own config keys.
init_from: 'scratch', 'resume' (continue out_dir/ckpt.pt exactly), or the path of a checkpoint
whose weights to start from (SFT starts from a pretrained model this way).
finetune: 'full', or an adapter on the frozen init_from model (miniglm/adapters.py).
vocab: 'gpt2' (all 50,257 tokens), 'trimmed' (the GPT-2 ids of data_dir's corpus, from its
vocab.json) or 'bpe' (the BPE of vocab_size tokens that data/prepare.py trained on data_dir's
train split): set when training from scratch; a checkpoint brings its own.
"""
import ast
import sys
from pathlib import Path

from data_utils import UserError, run_cli
from miniglm import distributed
from miniglm.adapters import ADAPTER_CONFIG
from miniglm.align.dpo import DPOTrainer
from miniglm.align.grpo import GRPOTrainer
from miniglm.trainer import Trainer

# The one place that says which class trains which stage. A stage's own config keys live in its
# class (CONFIG) and are valid only when that stage is chosen.
STAGES = {
    "auto": Trainer,  # pretraining or SFT, by what data_dir holds
    "dpo": DPOTrainer,  # preference pairs (miniglm/align/dpo.py)
    "grpo": GRPOTrainer,  # rewards of sampled answers (miniglm/align/grpo.py)
}

DEFAULTS = dict(
    # I/O
    out_dir="out/pretrain",
    data_dir="data/fortunes-zh",
    init_from="scratch",  # 'scratch' | 'resume' | path to a checkpoint to start from
    eval_interval=200,  # evaluate, log and checkpoint every this many iterations
    eval_iters=50,  # batches per split in each evaluation
    log_interval=10,  # a log line every this many iterations
    eval_only=False,  # evaluate once and stop (no checkpoint written)
    # choice questions scored by log-likelihood at each evaluation (miniglm/choices.py): what the model
    # knows, long before its greedy answers show it. A choices JSONL, 'auto' = data_dir's
    # choices_dev.jsonl where there is one (data/prepare_sft.py writes it), or 'none'
    choice_set="auto",
    # the stage: a key of STAGES above
    stage="auto",
    # model (ignored when the weights come from a checkpoint)
    n_layer=6,
    n_head=8,
    n_embd=512,
    block_size=512,  # the context: positions per row
    dropout=0.0,
    bias=False,  # biases in the Linears and LayerNorms (GPT-2 had them; a little faster without)
    rope=False,  # rotary positions instead of a learned table
    # 'gpt2' | 'trimmed' (the GPT-2 ids data_dir's corpus uses: a cheap output layer) | 'bpe'
    # (data_dir's trained BPE: ~2.4x fewer tokens per Chinese character than GPT-2)
    vocab="gpt2",
    vocab_size=8192,  # vocab='bpe': which of data_dir's BPEs (prepare.py --bpe_vocab_size); the others ignore it
    # batch_size rows per micro-step, gradient_accumulation_steps micro-steps per iteration (all processes)
    batch_size=16,
    gradient_accumulation_steps=4,
    # AdamW
    learning_rate=6e-4,  # the peak of the schedule
    max_iters=5000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # clip the gradient's global norm to this (0: no clipping)
    # Muon for the blocks' matrices at this lr (0: AdamW for everything)
    muon_lr=0.0,
    # Muon's Newton-Schulz dtype: 'auto' = bfloat16 on CUDA, float32 elsewhere (miniglm/optimizers.py),
    # 'float32' or 'bfloat16'; a resumed run keeps the one its checkpoint recorded
    muon_ns_dtype="auto",
    # the schedule: linear warmup, then cosine decay to min_lr
    decay_lr=True,
    warmup_iters=200,
    lr_decay_iters=None,  # None = max_iters
    min_lr=6e-5,
    # system
    device="auto",  # 'auto' = cuda > mps > cpu
    dtype="auto",  # 'auto' = bfloat16 on CUDA if supported, else float16 on CUDA, float32 elsewhere
    compile="auto",  # 'auto' = torch.compile on CUDA only
    compile_mode="default",  # torch.compile's mode: default | max-autotune | max-autotune-no-cudagraphs | ...
    # rows per chunk of the fused output layer + loss (model.LinearCrossEntropy); 0 = the plain
    # full-logits loss; 'auto' = 512 on the CPU (measured faster), 0 on CUDA until measured there
    loss_chunk_rows="auto",
    backend="auto",  # DDP's: nccl on CUDA, gloo on CPU
    # 'ddp': each process holds the whole model; 'fsdp': FSDP2 shards weights, gradients and optimizer
    # state (docs/training.md)
    parallel="ddp",
    reshard_after_forward=True,  # FSDP: True = ZeRO-3-like, False = ZeRO-2-like (more memory, less traffic)
    log_to="none",  # 'none' | 'tensorboard' | 'wandb': a live tracker beside log.jsonl (miniglm/tracking.py)
    seed=1337,
    peak_flops="auto",  # FLOP/s per device for MFU; 'auto' measures a matmul in the training dtype
    # fine-tuning method (miniglm/adapters.py): 'full' trains every weight; 'lora' and 'ptuning'
    # freeze the model from init_from and train an adapter (a checkpoint of the adapter alone);
    # each adapter's keys (ADAPTER_CONFIG) are valid when it is chosen
    finetune="full",
)


def read_settings(argv):
    """(key, value, where) of each setting: every config file (plain Python) in order, then
    each --key=value override."""
    settings = []
    for arg in argv:
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                raise UserError(f"{arg}: overrides are written --key=value")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word is a string: --device=cpu
            settings.append((key, value, arg))
            continue
        if not Path(arg).is_file():
            raise UserError(f"{arg}: config file not found")
        scope = {"__file__": arg}  # a config may build on another beside it (config/sft_lora_tiny_cpu.py)
        try:
            exec(compile(Path(arg).read_text(encoding="utf-8"), arg, "exec"), scope)
        except Exception as e:
            line = getattr(e, "lineno", None)
            if line is None:
                line = e.__traceback__.tb_next.tb_lineno if e.__traceback__.tb_next else "?"
            raise UserError(f"{arg}:{line}: {type(e).__name__}: {e}") from None
        for key, value in scope.items():
            if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                settings.append((key, value, arg))
    return settings


def defaults_for(stage, finetune):
    """DEFAULTS, plus the keys of the chosen stage and of the chosen adapter."""
    if stage not in STAGES:
        raise UserError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if finetune not in ADAPTER_CONFIG:
        raise UserError(f"finetune must be one of {', '.join(ADAPTER_CONFIG)}, got {finetune!r}")
    return dict(DEFAULTS, **STAGES[stage].CONFIG, **ADAPTER_CONFIG[finetune])


def whose_key(key):
    """The stage or adapter whose key this is, in words, or None."""
    for stage, trainer in STAGES.items():
        if key in trainer.CONFIG:
            return f"stage={stage!r}"
    for method, keys in ADAPTER_CONFIG.items():
        if key in keys:
            return f"finetune={method!r}"
    return None


def load_config(argv, defaults=None):
    """The run's config: the defaults, then each config file in order, then --key=value
    overrides. The keys of a stage or an adapter are valid only when it is chosen."""
    settings = read_settings(argv)
    if defaults is None:
        chosen = {key: value for key, value, _ in settings}  # (the last setting of each key wins)
        defaults = defaults_for(chosen.get("stage", DEFAULTS["stage"]), chosen.get("finetune", DEFAULTS["finetune"]))
    config = dict(defaults)
    for key, value, where in settings:
        if key not in config:
            owner = whose_key(key)
            if owner:
                raise UserError(f"{where}: {key!r} is a key of {owner}, which this run does not use")
            raise UserError(f"{where}: unknown config key {key!r}; valid keys: {', '.join(sorted(config))}")
        old = config[key]
        if old is not None and not isinstance(old, str) and value is not None:
            same_type = isinstance(value, type(old)) or (isinstance(old, float) and type(value) is int)
            if not same_type or isinstance(old, bool) != isinstance(value, bool):
                raise UserError(f"{where}: {key} should be {type(old).__name__}, got {value!r}")
        config[key] = value
    return config


def main(argv=None):
    c = load_config(sys.argv[1:] if argv is None else argv)
    trainer_class = STAGES[c["stage"]]
    try:
        trainer_class(c).train()
    finally:  # (also after an error in setting up: the process group goes)
        distributed.finish()


if __name__ == "__main__":
    run_cli(main)
    distributed.exit_worker()  # (a torchrun worker ends here, its process group destroyed)
