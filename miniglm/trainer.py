"""
The training loop of pretraining and supervised fine-tuning (SFT): one class, Trainer, that
train.py runs. A later stage (DPO, GRPO: miniglm/align/) is a subclass that supplies its own
data, loss or rollouts, and checkpoint rule, and reuses everything else here.

The steps: distributed.setup (processes, device, dtype) → build_model (weights, tokenizer,
data, adapter) → build_optimizer (and resumed state) → train (the step loop):

  train_step = set_lr → accumulate_gradients (micro-steps of step_loss) → update
  every eval_interval: evaluate_and_save → estimate_loss (and the dev choice questions:
  miniglm/choices.py), ckpt.pt, and best.pt when consider_best says the stage's metric
  (selection) improved

The hooks a stage overrides: check_config, open_data, step_loss, estimate_loss, selection,
train_step (built from set_lr and update), log_extras, metadata.
"""
import time
from pathlib import Path

import torch

from data_utils import SFTData, UserError, open_data
from miniglm import choices, distributed
from miniglm.adapters import adapter_settings, adapter_state, add_adapter, file_sha256, trained_fraction
from miniglm.checkpoint import (
    SHARDED,
    best_line,
    checkpoint_tokenizer,
    load_checkpoint,
    open_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from miniglm.optimizers import configure_optimizers, get_lr, muon_matrices, pick_ns_dtype
from miniglm.tokenizer import data_vocabulary
from miniglm.tracking import RunLog, check_tracker
from model import GPT, GPTConfig


class Trainer:
    """Pretraining (a folder of train.bin tokens) or SFT (a folder of sft_train.bin rows)."""

    stage = "auto"  # the value of the config key `stage` that picks this class (train.py: STAGES)
    CONFIG = {}  # the stage's own config keys and their defaults (train.py adds them to its DEFAULTS)

    def __init__(self, c):
        check_tracker(c["log_to"])
        self.check_config(c)
        self.c, self.run = c, distributed.setup(c)
        self.out_dir = Path(c["out_dir"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        distributed.lock_out_dir(self.out_dir, self.run)  # one run per out_dir, until distributed.finish
        self.adapter = adapter_settings(c)
        self.build_model()
        self.build_optimizer()

    def check_config(self, c):
        """One-line errors for settings that do not fit this stage (a stage adds its own)."""

    def open_data(self, data_dir, block_size, tok):
        """The training data: pretraining windows or SFT rows, by what the folder holds."""
        return open_data(data_dir, block_size, tok)

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
            tok = data_vocabulary(c["data_dir"], c["vocab"], c["vocab_size"])
            chars = ""
            model_args = dict(
                n_layer=c["n_layer"],
                n_head=c["n_head"],
                n_embd=c["n_embd"],
                block_size=c["block_size"],
                dropout=c["dropout"],
                bias=c["bias"],
                rope=c["rope"],
                vocab_size=tok.vocab_size,
            )
            model = GPT(GPTConfig(**model_args))
        else:
            model, tok, chars, model_args = self.load_start()
        model.to(run.device)
        model.loss_chunk_rows = distributed.pick_loss_chunk_rows(c["loss_chunk_rows"], run.device_type)
        # the config saved with the checkpoints tells the model that was trained, also where
        # the shape and vocabulary came from a checkpoint rather than from these keys
        for key in ("n_layer", "n_head", "n_embd", "block_size", "bias"):
            c[key] = model_args[key]
        c["vocab"] = tok.kind
        c["rope"] = model_args.get("rope", False)
        # a P-Tuning prefix takes positions: the text gets context_size (block_size - prefix)
        self.data = data = self.open_data(c["data_dir"], model.context_size, tok)
        self.kind = "sft" if isinstance(data, SFTData) else "pretrain"
        if c["init_from"] == "resume":
            self.check_resumed_stage(self.ckpt)
        # the characters the model has seen in training: by default generation writes no other
        self.chars = "".join(sorted(set(chars) | set(data.chars or "")))
        if self.kind == "sft":
            self.block = data.row_len - 1
        else:
            self.block = model.context_size
        # the chat template the SFT rows were written in: sample, Gradio and evaluations use it
        if self.kind == "pretrain":
            self.template = (self.ckpt or {}).get("template")
        else:
            self.template = data.meta.get("template", "qa")
        self.raw_model, self.tok, self.model_args = model, tok, model_args
        self.choices = self.open_choices(c["choice_set"], c["data_dir"])

    def open_choices(self, choice_set, data_dir):
        """The choice items scored at each evaluation (miniglm/choices.py), or None: 'auto' =
        data_dir's choices_dev.jsonl where there is one; a file that is not there is a note."""
        if choice_set == "none":
            return None
        path = choices.choice_file(data_dir, "dev") if choice_set == "auto" else Path(choice_set)
        if not path.is_file():
            if choice_set != "auto" and self.run.master:
                print(f"note: choice_set {path} not found (data/prepare_sft.py writes it); no choice scores")
            return None
        return choices.read_choices(path)

    def load_start(self):
        """(model, tokenizer, characters seen, model_args) of init_from: the run to resume, or the
        checkpoint whose weights to start from (for an adapter run: the frozen model it trains on)."""
        c = self.c
        if c["init_from"] == "resume":
            ckpt, path = resume_checkpoint(self.out_dir, c["parallel"])
        else:
            ckpt, path = load_checkpoint(c["init_from"]), Path(c["init_from"])
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
            if resumed_adapter:
                model = add_adapter(model, resumed_adapter)
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
        return model, tok, chars, model_args

    def check_resumed_stage(self, ckpt):
        """A run is resumed by the stage that started it."""
        recorded = ckpt.get("stage")
        if recorded is None:  # (written before checkpoints recorded their stage: the kind tells it)
            recorded = "auto" if ckpt.get("kind") in ("pretrain", "sft") else ckpt.get("kind")
        if recorded != self.stage:
            raise UserError(f"{self.c['out_dir']}: a {ckpt.get('kind')} run; resume it with stage={recorded!r}, "
                            f"not stage={self.stage!r}")

    def build_optimizer(self):
        """The optimizer over what trains; on resume, its state and every RNG stream as saved."""
        c, run, model = self.c, self.run, self.raw_model
        if run.fsdp:  # sharded in place first: the optimizer is made over the shards
            model = self.raw_model = distributed.wrap(model, run, c)
        self.scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == "float16")
        matrices = muon_matrices(model)
        recorded = self.ckpt.get("muon_ns_dtype") if c["init_from"] == "resume" else None
        if c["muon_lr"] > 0 and matrices:
            self.ns_dtype, self.ns_why = pick_ns_dtype(c["muon_ns_dtype"], run.device, recorded)
        else:
            self.ns_dtype, self.ns_why = None, ""
        betas = (c["beta1"], c["beta2"])
        self.optimizer = configure_optimizers(model, c["weight_decay"], c["learning_rate"], betas, run.device_type,
                                              c["muon_lr"], self.ns_dtype)
        self.data_gen = torch.Generator().manual_seed(c["seed"])  # same draws in every process
        if c["init_from"] == "resume":
            self.resume_optimizer(model)
        else:
            torch.manual_seed(c["seed"] + run.rank)  # different dropout masks per process
        self.ckpt = None  # free the memory
        self.model = model if run.fsdp else distributed.wrap(model, run, c)

    def resume_optimizer(self, model):
        """The optimizer's, the loss scaler's and every RNG stream's state, as the checkpoint saved them."""
        c, run, ckpt = self.c, self.run, self.ckpt
        if run.fsdp:
            saved_muon = ckpt["config"].get("muon_lr", 0) > 0
        else:
            saved_muon = "optimizers" in ckpt["optimizer"]  # Muon + AdamW, or AdamW alone
        if saved_muon != (self.ns_dtype is not None):
            raise UserError(f"{self.ckpt_path}: its optimizer does not fit muon_lr={c['muon_lr']}: "
                            f"resume with the run's")
        if run.fsdp:
            distributed.load_sharded(self.ckpt_path, model, self.optimizer, ckpt.get("optimizer_saved", True))
        else:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        distributed.restore_rng(ckpt["rng"], self.data_gen, run)

    def startup_line(self):
        c, run, model = self.c, self.run, self.raw_model
        method = ""
        if self.adapter:
            trained, total = trained_fraction(model)
            method = (
                f" | finetune {self.adapter['method']}: {trained:,} of {total:,} parameters trained "
                f"({trained / total:.2%})"
            )
        print(
            f"{self.kind} | {model.num_params() / 1e6:.2f}M parameters | vocabulary {self.tok.name} "
            f"({self.tok.vocab_size:,} slots) | device {run.device} x{run.world} | {run.dtype} | "
            f"compile {run.use_compile} | {self.tokens_per_iter:,} tokens/iter | data {c['data_dir']}{method}"
        )
        if self.ns_dtype is not None:  # the optimizer's own matmuls: a rule, kept on resume
            print(f"Muon Newton-Schulz in {str(self.ns_dtype)[6:]} ({self.ns_why})")

    def log(self, record, line):
        """A record for log.jsonl and its line on the screen (process 0); a stage adds its own
        figures in log_extras."""
        line = self.log_extras(record, line)
        if self.run.master:
            self.runlog.write(record)
            print(line, flush=True)

    def log_extras(self, record, line):
        """A stage's own figures, added to a train or eval record and its line (the line, returned)."""
        return line

    @torch.no_grad()
    def estimate_loss(self):
        """Mean loss over eval_iters batches per split; the same batches at every eval
        (a fixed generator), shared out among the processes."""
        c, run = self.c, self.run
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            rows = self.data.sample_rows(
                split, c["eval_iters"] * c["batch_size"], torch.Generator().manual_seed(c["seed"] + 1)
            )
            total = torch.zeros(2, device=run.device)  # (summed loss, batches)
            for batch_rows in rows.view(c["eval_iters"], c["batch_size"])[run.rank :: run.world]:
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
        state = dict(
            state,
            model_args=self.model_args,
            config=self.c,
            kind=self.kind,
            stage=self.stage,
            started_from=self.started_from,
            tokenizer_sha256=self.tok.sha256,
            chars=self.chars,
            template=self.template,
        )
        if self.adapter:  # an adapter's vocabulary is its base's (not written again, but for the shards' meta.pt)
            return dict(state, adapter=self.adapter, base=self.base)
        return dict(state, vocab=self.tok.state())

    def save(self, name, state):
        """A checkpoint file (process 0 writes it; under FSDP every process gathers the
        weights first): the whole model, or for an adapter run its weights alone."""
        weights = distributed.gathered_weights(self.raw_model) if self.run.fsdp else self.raw_model.state_dict()
        if self.adapter:
            weights = adapter_state(self.raw_model, weights)
        if self.run.master:
            save_checkpoint(self.out_dir / name, dict(self.metadata(state), model=weights))

    def evaluate_and_save(self):
        losses = self.estimate_loss()
        rng = distributed.all_rng_states(self.data_gen, self.run)  # every process's: a resumed run continues exactly
        bpc = self.data.bits_per_char("val", losses["val"]) if self.kind == "pretrain" else None
        record = {
            "kind": "eval",
            "iter": self.iter_num,
            "train_loss": losses["train"],
            "val_loss": losses["val"],
            "val_bpc": bpc,
            "tokens": self.iter_num * self.tokens_per_iter,
            "time": time.time() - self.t_start,
        }
        line = f"eval {self.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        if bpc is not None:
            line += f" ({bpc:.3f} bits/char)"
        if self.choices:  # what the model knows: the dev choice questions, by log-likelihood
            t_choices = time.time()
            with self.run.amp:
                # a pretrained model (no template) is asked in the corpus's plain text, a fine-tuned one in its template
                scored = choices.score(self.raw_model, self.tok, self.choices, self.template)
            record.update(dev_choice_acc=scored["acc"], dev_choice_acc_norm=scored["acc_norm"],
                          dev_choice_s=time.time() - t_choices)
            line += f"; dev choices acc {scored['acc']:.3f}, acc_norm {scored['acc_norm']:.3f}"
        self.log(record, line)
        if self.c["eval_only"]:
            return
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        improved = self.consider_best(losses)
        state = dict(
            scaler=self.scaler.state_dict(),
            iter_num=self.iter_num,
            best_val_loss=self.best_val_loss,
            rng=rng,
            best=self.best,
            muon_ns_dtype=str(self.ns_dtype)[6:] if self.ns_dtype is not None else None,
        )
        if self.run.fsdp:  # (meta.pt carries the vocabulary, also an adapter run's: resume reads no base)
            meta = dict(self.metadata(state), vocab=self.tok.state())
            distributed.save_sharded(self.out_dir / SHARDED, self.raw_model, self.optimizer, meta, self.run)
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

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # (Muon's group scales it)

    def update(self):
        """The optimizer step on the gradients there: unscale and clip, step, then zero them."""
        if self.c["grad_clip"] > 0:
            self.scaler.unscale_(self.optimizer)
            # (frozen weights have no gradient and are left out)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.c["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.held is None:  # what this process holds, measured once with the gradients there
            self.held = distributed.held_bytes(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, lr):
        """One iteration: the learning rate, the gradients of this process's rows, the update."""
        self.set_lr(lr)
        self.accumulate_gradients()
        self.update()

    def accumulate_gradients(self):
        """local_accum micro-steps of this process's rows, each step_loss's gradient added up."""
        c, run, model = self.c, self.run, self.model
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

    def step_loss(self, model, batch):
        """A micro-batch's loss: next-token cross-entropy (SFT: on the answer tokens only)."""
        _, loss = model(batch["x"], batch["y"], batch.get("loss_mask"), batch.get("segment_ids"))
        return loss

    def log_steps(self, lr, dt):
        """The log line of the iterations since the last one (iters_since_log), which took dt seconds each."""
        run, iters = self.run, self.iters_since_log
        lossf = distributed.all_mean(self.running_loss, run).item() / iters  # .item() waits for the device
        tok_s = self.tokens_per_iter / dt
        trained = distributed.all_mean(self.trained_tokens, run).item() * run.world / iters  # per iteration
        flops = self.flops_per_iter
        if self.head_flops:  # the output layer's FLOPs count only for the trained positions
            flops -= self.head_flops * (self.tokens_per_iter - trained)
        mfu = flops / dt / (self.peak * run.world)
        record = {
            "kind": "train",
            "iter": self.iter_num,
            "loss": lossf,
            "lr": lr,
            "dt_ms": dt * 1000,
            "tokens_per_s": tok_s,
            "mfu": mfu,
            "tokens": self.iter_num * self.tokens_per_iter,
            "time": time.time() - self.t_start,
        }
        extra = ""
        if self.kind == "sft":  # the tokens that carry loss: what packing rows buys
            record["trained_tokens_per_s"] = trained / dt
            extra = f" ({trained / dt:,.0f} trained)"
        self.log(
            record,
            f"iter {self.iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
            f"{tok_s:,.0f} tok/s{extra}, mfu {mfu * 100:.1f}%",
        )
        self.running_loss.zero_()
        self.trained_tokens.zero_()
        self.iters_since_log = 0

    def train(self):
        c, run = self.c, self.run
        self.tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * self.block
        self.flops_per_iter = self.raw_model.flops_per_token() * self.tokens_per_iter
        # SFT without compile projects only the trained positions onto the vocabulary (model.py):
        # the output layer's FLOPs then count for those positions alone
        self.head_flops = 0
        if self.kind == "sft" and not run.use_compile:
            self.head_flops = 6 * self.model_args["n_embd"] * self.model_args["vocab_size"]
        if c["peak_flops"] == "auto":
            self.peak = distributed.measure_peak_flops(run.device, run.ptdtype)
        else:
            self.peak = c["peak_flops"]
        resumed_at = self.iter_num if c["init_from"] == "resume" else None
        if run.master:
            self.startup_line()
            self.runlog = RunLog(self.out_dir, c, self.kind, resumed_at)
        self.t_start, self.held = time.time(), None
        self.running_loss = torch.zeros((), device=run.device)
        self.trained_tokens = torch.zeros((), device=run.device)
        self.iters_since_log = 0
        t_log = time.time()
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
            self.iters_since_log += 1
            if self.iter_num % c["log_interval"] == 0 or self.iter_num == c["max_iters"]:
                self.log_steps(lr, (time.time() - t_log) / self.iters_since_log)
                t_log = time.time()
        self.log(*distributed.memory_record(self.held, run, self.iter_num))  # bytes held per process, peaks
        if run.master:
            print(
                f"done in {time.time() - self.t_start:.1f}s; best val loss {self.best_val_loss:.4f}; "
                f"checkpoints in {self.out_dir}; peak memory {distributed.peak_memory_mib(run):,.0f} MiB"
            )
            if self.best is not None and not c["eval_only"]:
                print(f"best.pt: {best_line(self.best, c['max_iters'])}")
            self.runlog.close()
