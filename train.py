"""
Pretraining, supervised fine-tuning (SFT) and preference alignment (DPO: align.py) of the GPT in model.py.

  python train.py config/train_tiny_cpu.py                     # one process
  python train.py config/train_config.py --batch_size=32       # --key=value overrides (Python literals)
  torchrun --standalone --nproc_per_node=4 train.py config/train_config.py   # DDP
  torchrun --standalone --nproc_per_node=8 train.py config/train_1b.py       # FSDP (parallel='fsdp')
  python train.py config/sft_lora_tiny_cpu.py                  # LoRA (finetune='lora'; or 'ptuning')
  python train.py config/dpo_tiny_cpu.py                       # DPO on preference pairs (stage='dpo')

The data folder decides the mode: sft_train.bin (data/prepare_sft.py) means SFT, the loss on
answer tokens only; pairs_train.bin (data/prepare_pairs.py) DPO, with stage='dpo'; train.bin
(data/prepare.py) pretraining. init_from: 'scratch', 'resume' (continue out_dir/ckpt.pt exactly), or the path of a
checkpoint whose weights to start from (SFT starts from a pretrained model this way).
finetune: 'full', or an adapter on the frozen init_from model (adapters.py).
vocab: 'gpt2' (all 50,257 tokens), 'trimmed' (the GPT-2 ids of data_dir's corpus, from its
vocab.json) or 'bpe' (the BPE of vocab_size tokens that data/prepare.py trained on data_dir's
train split): set when training from scratch; a checkpoint brings its own.

The steps: distributed.setup (processes, device, dtype) → Trainer.build_model (weights, tokenizer,
data, adapter) → Trainer.build_optimizer (and resumed state) → Trainer.train (the step loop).
"""
import ast
import sys
import time
from pathlib import Path

import torch

import align
import distributed
from adapters import adapter_settings, adapter_state, add_adapter, file_sha256, trained_fraction
from checkpoint import (SHARDED, best_line, checkpoint_tokenizer, gathered_weights, load_checkpoint, load_sharded, open_checkpoint,
                        resume_checkpoint, save_checkpoint, save_sharded)
from data_utils import SFTData, UserError, open_data, run_cli
from model import GPT, GPTConfig
from optimizers import configure_optimizers, get_lr, muon_matrices, pick_ns_dtype
from tokenizer import data_vocabulary
from tracking import RunLog, check_tracker

DEFAULTS = dict(
    # I/O
    out_dir="out/pretrain",
    data_dir="data/fortunes-zh",
    init_from="scratch",  # 'scratch' | 'resume' | path to a checkpoint to start from
    eval_interval=200,  # evaluate, log and checkpoint every this many iterations
    eval_iters=50,  # batches per split in each evaluation
    log_interval=10,
    eval_only=False,
    # model (ignored when the weights come from a checkpoint)
    n_layer=6, n_head=8, n_embd=512, block_size=512, dropout=0.0, bias=False, rope=False,  # rope: rotary positions
    # 'gpt2' | 'trimmed' (the GPT-2 ids data_dir's corpus uses: a cheap output layer) | 'bpe'
    # (data_dir's trained BPE: ~2.4x fewer tokens per Chinese character than GPT-2)
    vocab="gpt2",
    vocab_size=8192,  # vocab='bpe': which of data_dir's BPEs (prepare.py --bpe_vocab_size); the others ignore it
    # batch_size rows per micro-step, gradient_accumulation_steps micro-steps per iteration (all processes)
    batch_size=16, gradient_accumulation_steps=4,
    # AdamW and the cosine schedule; muon_lr > 0: Muon at that lr for the blocks' matrices
    learning_rate=6e-4, max_iters=5000, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, muon_lr=0.0,
    # Muon's Newton-Schulz dtype: 'auto' = bfloat16 on CUDA, float32 elsewhere (optimizers.py),
    # 'float32' or 'bfloat16'; a resumed run keeps the one its checkpoint recorded
    muon_ns_dtype="auto",
    decay_lr=True, warmup_iters=200, lr_decay_iters=None, min_lr=6e-5,  # lr_decay_iters None = max_iters
    # system
    device="auto",  # 'auto' = cuda > mps > cpu
    dtype="auto",  # 'auto' = bfloat16 on CUDA if supported, else float16 on CUDA, float32 elsewhere
    compile="auto",  # 'auto' = torch.compile on CUDA only
    compile_mode="default",  # torch.compile's mode: default | max-autotune | max-autotune-no-cudagraphs | ...
    # rows per chunk of the fused output layer + loss (model.LinearCrossEntropy); 0 = the plain
    # full-logits loss; 'auto' = 512 on the CPU (measured faster), 0 on CUDA until measured there
    loss_chunk_rows="auto", backend="auto",  # backend (DDP): nccl on CUDA, gloo on CPU
    # 'ddp': each process holds the whole model; 'fsdp': FSDP2 shards weights, gradients and optimizer
    # state (docs/training.md); reshard_after_forward True = ZeRO-3-like, False = ZeRO-2-like
    parallel="ddp", reshard_after_forward=True,
    log_to="none",  # 'none' | 'tensorboard' | 'wandb': a live tracker beside log.jsonl (tracking.py)
    seed=1337,
    peak_flops="auto",  # FLOP/s per device for MFU; 'auto' measures a matmul in the training dtype
    # fine-tuning method (adapters.py): 'full' trains every weight; 'lora' and 'ptuning' freeze
    # the model from init_from and train an adapter (a checkpoint of the adapter alone)
    finetune="full",
    lora_r=8, lora_alpha=16.0, lora_dropout=0.05,  # the update's rank, its scale alpha/r, dropout on its input
    lora_targets="all",  # 'all' or some of attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (list or comma-separated)
    num_virtual_tokens=16,  # P-Tuning v2: the prefix's keys and values per layer
    prefix_projection=False, encoder_hidden_size=512,  # make the prefix with an MLP of this width (as peft)
    **align.DEFAULTS,  # stage ('auto' | 'dpo' | 'grpo') and its keys: the third stage (align.py, grpo.py)
)


def load_config(argv, defaults=DEFAULTS):
    """Defaults, then each config file (plain Python) in order, then --key=value overrides."""
    config = dict(defaults)

    def set_key(key, value, where):
        if key not in config:
            raise UserError(f"{where}: unknown config key {key!r}; valid keys: {', '.join(sorted(config))}")
        old = config[key]
        if old is not None and not isinstance(old, str) and value is not None:
            ok = isinstance(value, type(old)) or (isinstance(old, float) and type(value) is int)
            if not ok or (isinstance(old, bool) != isinstance(value, bool)):
                raise UserError(f"{where}: {key} should be {type(old).__name__}, got {value!r}")
        config[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                raise UserError(f"{arg}: overrides are written --key=value")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word is a string: --device=cpu
            set_key(key, value, arg)
        else:
            if not Path(arg).is_file():
                raise UserError(f"{arg}: config file not found")
            scope = {"__file__": arg}  # a config may build on another beside it (config/sft_lora_tiny_cpu.py)
            try:
                exec(compile(Path(arg).read_text(encoding="utf-8"), arg, "exec"), scope)
            except Exception as e:
                line = getattr(e, "lineno", None) or (e.__traceback__.tb_next.tb_lineno if e.__traceback__.tb_next else "?")
                raise UserError(f"{arg}:{line}: {type(e).__name__}: {e}") from None
            for key, value in scope.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    set_key(key, value, arg)
    return config


class Trainer:
    def __init__(self, c):
        check_tracker(c["log_to"])
        align.check_stage(c)
        self.c, self.run = c, distributed.setup(c)
        self.out_dir = Path(c["out_dir"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        distributed.lock_out_dir(self.out_dir, self.run)  # one run per out_dir, until distributed.finish
        self.adapter = adapter_settings(c)
        self.build_model()
        self.build_optimizer()

    def build_model(self):
        """The weights (new, a checkpoint's, or a frozen one's plus an adapter), the
        tokenizer, the data, and what the checkpoints will carry."""
        c, run = self.c, self.run
        torch.manual_seed(c["seed"])  # the same initial weights (and adapter) in every process
        self.iter_num, self.best_val_loss, self.ckpt, self.base = 0, float("inf"), None, None
        self.best = None  # what chose best.pt, and when (consider_best)
        # the checkpoint this run's weights started from: iteration 0 is those weights
        self.started_from = c["init_from"] if c["init_from"] not in ("scratch", "resume") else None
        if c["init_from"] == "scratch":
            tok, chars = data_vocabulary(c["data_dir"], c["vocab"], c["vocab_size"]), ""
            model_args = dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"],
                              dropout=c["dropout"], bias=c["bias"], rope=c["rope"], vocab_size=tok.vocab_size)
            model = GPT(GPTConfig(**model_args))
        else:
            ckpt, path = resume_checkpoint(self.out_dir, c["parallel"]) if c["init_from"] == "resume" else (
                load_checkpoint(c["init_from"]), Path(c["init_from"]))
            self.ckpt, self.ckpt_path = ckpt, path
            resumed_adapter = ckpt.get("adapter")
            method = (resumed_adapter or {}).get("method", "full")
            if c["init_from"] != "resume" and resumed_adapter:
                raise UserError(f"{path}: an adapter checkpoint; init_from takes a full model (resume the adapter "
                                f"run with init_from='resume', or start from its base {ckpt['base']['path']})")
            if c["init_from"] == "resume" and method != c["finetune"]:
                raise UserError(f"{path}: a finetune={method!r} run; resume it with that method, not "
                                f"finetune={c['finetune']!r}")
            model_args = dict(ckpt["model_args"], dropout=c["dropout"])
            if path.name == SHARDED:  # the weights are read from the shards once the model is sharded
                model, tok, base_ckpt = GPT(GPTConfig(**model_args)), checkpoint_tokenizer(ckpt), ckpt
                model = add_adapter(model, resumed_adapter) if resumed_adapter else model
            else:
                model, tok, base_ckpt = open_checkpoint(ckpt, path, model_args)
            chars = (base_ckpt.get("chars") or "") + (ckpt.get("chars") or "")  # (the same one, for a full model)
            if c["init_from"] == "resume":
                self.iter_num, self.best_val_loss, self.base = ckpt["iter_num"], ckpt["best_val_loss"], ckpt.get("base")
                self.best, self.started_from = ckpt.get("best"), ckpt.get("started_from")
                self.adapter = resumed_adapter  # the run's own settings, whatever the config says now
            if self.adapter and not resumed_adapter:  # a new adapter on the frozen init_from model
                model = add_adapter(model, self.adapter)
                self.base = {"path": str(path), "resolved": str(path.resolve()), "sha256": file_sha256(path)}
        model.to(run.device)
        model.loss_chunk_rows = distributed.pick_loss_chunk_rows(c["loss_chunk_rows"], run.device_type)
        # the config saved with the checkpoints tells the model that was trained, also where
        # the shape and vocabulary came from a checkpoint rather than from these keys
        c.update({k: model_args[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")},
                 vocab=tok.kind, rope=model_args.get("rope", False))
        # a P-Tuning prefix takes positions: the text gets context_size (block_size - prefix)
        self.data = data = open_data(c["data_dir"], model.context_size, tok)
        self.kind = "dpo" if isinstance(data, align.PairData) else "sft" if isinstance(data, SFTData) else "pretrain"
        align.check_kind(c, self.kind, self.ckpt or {})
        # the characters the model has seen in training: by default generation writes no other
        self.chars = "".join(sorted(set(chars) | set(data.chars or "")))
        self.block = data.row_len - 1 if self.kind == "sft" else model.context_size
        # the chat template the SFT rows were written in: sample, Gradio and evaluations use it
        self.template = data.meta.get("template", "qa") if self.kind != "pretrain" else (self.ckpt or {}).get("template")
        self.raw_model, self.tok, self.model_args = model, tok, model_args

    def build_optimizer(self):
        """The optimizer over what trains; on resume, its state and every RNG stream as saved."""
        c, run, model = self.c, self.run, self.raw_model
        if run.fsdp:  # sharded in place first: the optimizer is made over the shards
            model = self.raw_model = distributed.wrap(model, run, c)
        self.scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == "float16")
        matrices = muon_matrices(model)
        recorded = self.ckpt.get("muon_ns_dtype") if c["init_from"] == "resume" else None
        self.ns_dtype, self.ns_why = pick_ns_dtype(c["muon_ns_dtype"], run.device, recorded) \
            if c["muon_lr"] > 0 and matrices else (None, "")
        self.optimizer = configure_optimizers(model, c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                              run.device_type, c["muon_lr"], self.ns_dtype)
        self.data_gen = torch.Generator().manual_seed(c["seed"])  # same draws in every process
        if c["init_from"] == "resume":
            ckpt = self.ckpt
            saved_muon = ckpt["config"].get("muon_lr", 0) > 0 if run.fsdp else "optimizers" in ckpt["optimizer"]
            if saved_muon != (self.ns_dtype is not None):  # Muon + AdamW, or AdamW alone
                raise UserError(f"{self.ckpt_path}: its optimizer does not fit muon_lr={c['muon_lr']}: resume with the run's")
            if run.fsdp:
                load_sharded(self.ckpt_path, model, self.optimizer, ckpt.get("optimizer_saved", True))
            else:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            if "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
            distributed.restore_rng(ckpt["rng"], self.data_gen, run)
        else:
            torch.manual_seed(c["seed"] + run.rank)  # different dropout masks per process
        self.ckpt = None  # free the memory
        self.model = model if run.fsdp else distributed.wrap(model, run, c)

    def startup_line(self):
        c, run, model = self.c, self.run, self.raw_model
        trained, total = trained_fraction(model)
        method = f" | finetune {self.adapter['method']}: {trained:,} of {total:,} parameters trained " \
                 f"({trained / total:.2%})" if self.adapter else ""
        print(f"{self.kind} | {model.num_params() / 1e6:.2f}M parameters | vocabulary {self.tok.name} "
              f"({self.tok.vocab_size:,} slots) | device {run.device} x{run.world} | {run.dtype} | "
              f"compile {run.use_compile} | {self.tokens_per_iter:,} tokens/iter | data {c['data_dir']}{method}")
        if self.ns_dtype is not None:  # the optimizer's own matmuls: a rule, kept on resume
            print(f"Muon Newton-Schulz in {str(self.ns_dtype)[6:]} ({self.ns_why})")

    def log(self, record, line):
        if self.run.master:
            self.runlog.write(record)
            print(line, flush=True)

    @torch.no_grad()
    def estimate_loss(self):
        """Mean loss over eval_iters batches per split; the same batches at every eval
        (a fixed generator), shared out among the processes."""
        c, run = self.c, self.run
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            rows = self.data.sample_rows(split, c["eval_iters"] * c["batch_size"],
                                         torch.Generator().manual_seed(c["seed"] + 1))
            total = torch.zeros(2, device=run.device)
            for batch_rows in rows.view(c["eval_iters"], c["batch_size"])[run.rank::run.world]:
                b = self.data.load(split, batch_rows, run.device)
                with run.amp:
                    _, loss = self.raw_model(b["x"], b["y"], b.get("loss_mask"), b.get("segment_ids"))
                total += torch.stack([loss.float(), torch.ones((), device=run.device)])
            if run.dist:
                torch.distributed.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
        self.model.train()
        return out

    def metadata(self, state):
        """What a checkpoint carries beside the weights (an adapter run: its settings and base)."""
        state = dict(state, model_args=self.model_args, config=self.c, kind=self.kind, started_from=self.started_from,
                     tokenizer_sha256=self.tok.sha256, chars=self.chars, template=self.template)
        # an adapter's vocabulary is its base's (not written again, but for the shards' meta.pt)
        return dict(state, adapter=self.adapter, base=self.base) if self.adapter else dict(state, vocab=self.tok.state())

    def save(self, name, state):
        """A checkpoint file (process 0 writes it; under FSDP every process gathers the
        weights first): the whole model, or for an adapter run its weights alone."""
        weights = gathered_weights(self.raw_model) if self.run.fsdp else self.raw_model.state_dict()
        if self.adapter:
            weights = adapter_state(self.raw_model, weights)
        if self.run.master:
            save_checkpoint(self.out_dir / name, dict(self.metadata(state), model=weights))

    def evaluate_and_save(self):
        losses = self.estimate_loss()
        rng = distributed.all_rng_states(self.data_gen, self.run)  # every process's: a resumed run continues exactly
        bpc = self.data.bits_per_char("val", losses["val"]) if self.kind == "pretrain" else None
        self.log({"kind": "eval", "iter": self.iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                  "val_bpc": bpc, "tokens": self.iter_num * self.tokens_per_iter, "time": time.time() - self.t_start},
                 f"eval {self.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                 + (f" ({bpc:.3f} bits/char)" if bpc is not None else ""))
        if self.c["eval_only"]:
            return
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        improved = self.consider_best(losses)
        state = dict(scaler=self.scaler.state_dict(), iter_num=self.iter_num, best_val_loss=self.best_val_loss, rng=rng,
                     best=self.best, muon_ns_dtype=str(self.ns_dtype)[6:] if self.ns_dtype is not None else None)
        if self.run.fsdp:  # (meta.pt carries the vocabulary, also an adapter run's: resume reads no base)
            save_sharded(self.out_dir / SHARDED, self.raw_model, self.optimizer,
                         dict(self.metadata(state), vocab=self.tok.state()), self.run)
        elif self.run.master:
            self.save("ckpt.pt", dict(state, optimizer=self.optimizer.state_dict()))
        if improved and (self.run.master or self.run.fsdp):
            self.save("best.pt", dict(iter_num=self.iter_num, best_val_loss=self.best_val_loss, best=self.best))

    def selection(self, losses):
        """What chooses best.pt: (metric, its value now, True if higher is better, the rule in words).
        Pretraining and SFT: the validation loss they lower (DPO's val loss is its held-out DPO loss)."""
        return "val_loss", losses["val"], False, "the lowest validation loss"

    def consider_best(self, losses):
        """Whether this evaluation's weights become best.pt, by the stage's selection rule; self.best
        records the rule, the metric and the iteration it chose (in every checkpoint: a resume keeps it)."""
        metric, value, higher, rule = self.selection(losses)
        if value is None:  # (a metric measured on process 0 alone: the others write no best.pt)
            return False
        if self.best is not None:
            if higher:  # ties go to the later weights: as good by the measure, and trained further on the objective
                improved = value >= self.best["value"]
            else:  # ties keep the earlier weights
                improved = value < self.best["value"]
            if not improved:
                return False
        self.best = dict(metric=metric, value=value, iter=self.iter_num, rule=rule)
        return True

    def train_step(self, lr):
        """One iteration: local_accum micro-steps of this process's rows, then the update."""
        c, run, model = self.c, self.run, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # the whole iteration's rows, drawn once: micro-step k of process r takes row block k*world + r
        rows = self.data.sample_rows("train", c["gradient_accumulation_steps"] * c["batch_size"], self.data_gen)
        my_rows = rows.view(run.local_accum, run.world, run.local_batch)[:, run.rank]
        batch = self.data.load("train", my_rows[0], run.device)
        for micro in range(run.local_accum):
            last = micro == run.local_accum - 1
            with distributed.micro_step(model, run, last, c["reshard_after_forward"]), run.amp:
                loss = self.step_loss(model, batch) / run.local_accum
            if self.kind == "sft":
                self.trained_tokens += batch["loss_mask"].sum()
            if not last:  # load the next micro-batch while the device works on this one
                batch = self.data.load("train", my_rows[micro + 1], run.device)
            self.scaler.scale(loss).backward()
            self.running_loss += loss.detach()
        if c["grad_clip"] > 0:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])  # (frozen: no grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.held is None:  # what this process holds, measured once with the gradients there
            self.held = distributed.held_bytes(model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)

    def step_loss(self, model, batch):  # (align.DPOMixin's is DPO's)
        return model(batch["x"], batch["y"], batch.get("loss_mask"), batch.get("segment_ids"))[1]

    def log_steps(self, lr, iters, dt):
        """The log line of the last `iters` iterations, which took dt seconds each."""
        run = self.run
        lossf = distributed.all_mean(self.running_loss, run).item() / iters  # .item() waits for the device
        tok_s = self.tokens_per_iter / dt
        trained = distributed.all_mean(self.trained_tokens, run).item() * run.world / iters  # per iteration
        flops = self.flops_per_iter - self.head_flops * (self.tokens_per_iter - trained) if self.head_flops \
            else self.flops_per_iter
        mfu = flops / dt / (self.peak * run.world)
        record = {"kind": "train", "iter": self.iter_num, "loss": lossf, "lr": lr, "dt_ms": dt * 1000,
                  "tokens_per_s": tok_s, "mfu": mfu, "tokens": self.iter_num * self.tokens_per_iter,
                  "time": time.time() - self.t_start}
        extra = ""
        if self.kind == "sft":  # the tokens that carry loss: what packing rows buys
            record["trained_tokens_per_s"] = trained / dt
            extra = f" ({trained / dt:,.0f} trained)"
        self.log(record, f"iter {self.iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                         f"{tok_s:,.0f} tok/s{extra}, mfu {mfu * 100:.1f}%")
        self.running_loss.zero_()
        self.trained_tokens.zero_()

    def train(self):
        c, run = self.c, self.run
        self.tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * self.block
        self.flops_per_iter = self.raw_model.flops_per_token() * self.tokens_per_iter
        # SFT without compile projects only the trained positions onto the vocabulary (model.py):
        # the output layer's FLOPs then count for those positions alone
        self.head_flops = 6 * self.model_args["n_embd"] * self.model_args["vocab_size"] \
            if self.kind == "sft" and not run.use_compile else 0
        self.peak = c["peak_flops"] if c["peak_flops"] != "auto" else distributed.measure_peak_flops(run.device,
                                                                                                     run.ptdtype)
        resumed_at = self.iter_num if c["init_from"] == "resume" else None
        if run.master:
            self.startup_line()
            self.runlog = RunLog(self.out_dir, c, self.kind, resumed_at)
        self.t_start, self.held = time.time(), None
        self.running_loss, self.trained_tokens = (torch.zeros((), device=run.device) for _ in range(2))
        t_log, iters_since_log = time.time(), 0
        while True:
            at_end = self.iter_num >= c["max_iters"] or c["eval_only"]
            if (self.iter_num % c["eval_interval"] == 0 or at_end) and self.iter_num != resumed_at:
                t_eval = time.time()
                self.evaluate_and_save()
                t_log += time.time() - t_eval  # evaluation and checkpointing are not training time
            if at_end:
                break
            lr = get_lr(self.iter_num, c)
            self.train_step(lr)
            self.iter_num += 1
            iters_since_log += 1
            if self.iter_num % c["log_interval"] == 0 or self.iter_num == c["max_iters"]:
                self.log_steps(lr, iters_since_log, (time.time() - t_log) / iters_since_log)
                t_log, iters_since_log = time.time(), 0
        self.log(*distributed.memory_record(self.held, run, self.iter_num))  # bytes held per process, peaks
        if run.master:
            print(f"done in {time.time() - self.t_start:.1f}s; best val loss {self.best_val_loss:.4f}; "
                  f"checkpoints in {self.out_dir}; peak memory {distributed.peak_memory_mib(run):,.0f} MiB")
            if self.best is not None and not c["eval_only"]:
                print(f"best.pt: {best_line(self.best, c['max_iters'])}")
            self.runlog.close()



def main(argv=None):
    c = load_config(sys.argv[1:] if argv is None else argv)
    try:
        align.trainer_class(Trainer, c["stage"])(c).train()
    finally:  # (also after an error in setting up: the process group goes)
        distributed.finish()


if __name__ == "__main__":
    run_cli(main)
