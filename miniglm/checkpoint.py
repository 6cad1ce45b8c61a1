"""
Checkpoint I/O, the one place for it. Files are written atomically (temp file + rename)
and read with torch.load(weights_only=True), which never runs code from the file.

out_dir/ckpt.pt  the latest full training state (model, optimizer, RNG states, ...): resume
out_dir/best.pt  the weights chosen by what the stage optimises (Trainer.selection: the lowest
                 validation loss, or for GRPO the highest dev reward; recorded as "best"):
                 sampling, serving, export and evaluation open it
out_dir/ckpt.dcp/ under parallel='fsdp', ckpt.pt's place: the sharded model and optimizer
                 written by every process in parallel (torch.distributed.checkpoint), and
                 meta.pt, the rest of ckpt.pt, written last: a folder without it is no
                 checkpoint (written and read by miniglm/distributed.py). It resumes on any number of
                 processes. best.pt stays one file (gathered by process 0), so everything that
                 reads a model reads it as before.

Every checkpoint carries the model's vocabulary ("vocab": None for full GPT-2, the GPT-2
ids of a trimmed vocabulary, or a trained BPE's ranks; "tokenizer_sha256" the hash of the
ranks) and the characters of its training text ("chars", for the decoding constraint),
so whatever loads a model turns text into ids its way.

A checkpoint of an adapter run (LoRA, P-Tuning v2: miniglm/adapters.py) holds only the adapter's
weights ("adapter": its settings) and "base": the path and sha256 of the checkpoint it was
trained on. Loading it loads that base first (its weights, vocabulary and characters), checks
the hash, then adds the adapter: sample.py, evaluations.py, the Gradio page and export_hf.py
take an adapter out_dir as they take a full one.
"""

from pathlib import Path

import torch

from data_utils import UserError, atomic_write
from miniglm.adapters import add_adapter, file_sha256, load_adapter_state
from miniglm.tokenizer import tokenizer_from_state
from model import GPT, GPTConfig

REQUIRED = ("model", "model_args", "iter_num", "tokenizer_sha256")
SHARDED = "ckpt.dcp"
ADAPTER_REQUIRED = ("model", "model_args", "iter_num", "adapter", "base")


def save_checkpoint(path, state):
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint dict, or a one-line UserError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: checkpoint not found" + (" (train a model first)" if not path.parent.exists() else "")
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, not a torch file, or holding code objects
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable MiniGLM checkpoint ({reason})") from None
    required = ADAPTER_REQUIRED if isinstance(ckpt, dict) and "adapter" in ckpt else REQUIRED
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a MiniGLM checkpoint (missing {', '.join(missing)})")
    if "adapter" in ckpt:
        return ckpt  # its vocabulary is its base's, checked when the base is loaded
    tok = checkpoint_tokenizer(ckpt)
    if ckpt["tokenizer_sha256"] != tok.sha256:
        raise UserError(
            f"{path}: trained with a different tokenizer (sha256 {str(ckpt['tokenizer_sha256'])[:12]}…, "
            f"its vocabulary hashes to {tok.sha256[:12]}…)"
        )
    if ckpt["model_args"].get("vocab_size") != tok.vocab_size:
        raise UserError(
            f"{path}: its model has {ckpt['model_args'].get('vocab_size')} output slots but its "
            f"vocabulary {tok.name} needs {tok.vocab_size}"
        )
    return ckpt


def checkpoint_tokenizer(ckpt):
    """The model's own tokenizer (older checkpoints without 'vocab' used full GPT-2)."""
    try:
        return tokenizer_from_state(ckpt.get("vocab"))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"checkpoint vocabulary is not a GPT-2 id list or a BPE ({e})") from None


def model_from_checkpoint(ckpt, model_args=None):
    """The GPT of a full checkpoint (model_args: other settings for it, such as dropout)."""
    model = GPT(GPTConfig(**(model_args or ckpt["model_args"])))
    # torch.compile prefixes parameter names with _orig_mod.; strip it from older files
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit its model_args: {str(e).splitlines()[0]}") from None
    return model


def load_base(ckpt, path, base=None):
    """The full checkpoint an adapter checkpoint (at path) was trained on: `base` where the
    user points elsewhere, else its "base" path as given to train.py (relative to the working
    directory) or, from another directory, as it resolved then; refused unless its sha256
    matches."""
    info = ckpt["base"]
    places = [Path(base)] if base else list(dict.fromkeys(Path(p) for p in (info["path"], info.get("resolved")) if p))
    flag = "pass --base=PATH" if base is None else "point --base at it"
    found = [p for p in places if p.is_file()]
    if not found:
        raise UserError(
            f"{path}: its base model {places[0]} is not there (the adapter's 'base' path, from train.py's "
            f"init_from): put the base back or {flag}"
        )
    digests = {}
    for where in found:  # the same file may stand there twice (relative and resolved): stop at a match
        digests[where] = file_sha256(where)
        if digests[where] == info["sha256"]:
            break
    else:
        raise UserError(
            f"{path}: its base {found[0]} is not the checkpoint the adapter was trained on (sha256 "
            f"{digests[found[0]][:12]}…, trained on {info['sha256'][:12]}…): {flag}"
        )
    base_ckpt = load_checkpoint(where)
    if "adapter" in base_ckpt:
        raise UserError(f"{path}: its base {where} is itself an adapter; an adapter goes on a full model")
    return base_ckpt


def open_checkpoint(ckpt, path, model_args=None, base=None):
    """(model, tokenizer, the base checkpoint or ckpt itself) of a loaded checkpoint: a
    full one as it is, an adapter on its base (load_base) with its weights put in."""
    if "adapter" not in ckpt:
        return model_from_checkpoint(ckpt, model_args), checkpoint_tokenizer(ckpt), ckpt
    base_ckpt = load_base(ckpt, path, base)
    model = add_adapter(model_from_checkpoint(base_ckpt, model_args or ckpt["model_args"]), ckpt["adapter"])
    load_adapter_state(model, ckpt["model"], path)
    return model, checkpoint_tokenizer(base_ckpt), base_ckpt


def find_checkpoint(path):
    """A checkpoint file, or an out_dir: its best.pt, else its ckpt.pt."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "ckpt.pt"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: no best.pt or ckpt.pt in this folder (train a model first)")
    return path


def load_model(path, device="cpu", decode_mode="eager", base=None):
    """(model in eval mode on device, its tokenizer, the checkpoint's other fields) from a
    file or an out_dir, an adapter on its base (base: where the base is, if not where the
    adapter says). decode_mode: how generation runs its decode steps (model.DECODE_MODES)."""
    file = find_checkpoint(path)
    ckpt = load_checkpoint(file)
    model, tok, base_ckpt = open_checkpoint(ckpt, file, base=base)
    model = model.to(device).eval()
    model.decode_mode = decode_mode
    # the weights now live in the model; the optimizer state is for resuming only. An
    # adapter's fields (its template, characters, kind) override its base's
    meta = {k: v for c in (base_ckpt, ckpt) for k, v in c.items() if k not in ("model", "optimizer")}
    meta["weights"] = weights_line(file, ckpt)  # which file, which iteration, chosen by what: scripts print it
    return model, tok, meta


def best_line(best, max_iters):
    """What chose best.pt, in words: 'iteration 60 of 60, dev_reward 0.5312 (the highest mean reward ...)'."""
    return f"iteration {best['iter']} of {max_iters}, {best['metric']} {best['value']:.4f} ({best['rule']})"


def weights_line(file, meta):
    """Which weights a script opened, in one line: the file, its iteration out of max_iters, and
    what chose them; and plainly so when they are iteration 0 of a run that started from a
    checkpoint, and so still that checkpoint's weights."""
    file, config = Path(file), meta.get("config") or {}
    max_iters = config.get("max_iters", "?")
    best = meta.get("best")
    if file.name == "best.pt" and best is None and "best_val_loss" in meta:  # (written before the rule was recorded)
        best = dict(
            metric="val_loss", value=meta["best_val_loss"], iter=meta["iter_num"], rule="the lowest validation loss"
        )
    if file.name == "best.pt" and best is not None:
        line = f"{file}: {best_line(best, max_iters)}"
    else:
        line = f"{file}: iteration {meta.get('iter_num', '?')} of {max_iters} (the latest checkpoint)"
    if meta.get("iter_num") == 0 and meta.get("started_from"):
        line += (
            f"; iteration 0 of this {meta.get('kind', '')} run: the weights it started from "
            f"({meta['started_from']}), not trained by it"
        )
    return line


def resume_checkpoint(out_dir, parallel):
    """(the checkpoint init_from='resume' continues, its path): out_dir/ckpt.pt, or under
    parallel='fsdp' the sharded folder's meta.pt (its shards are read into the sharded model:
    load_sharded). A checkpoint of the other kind is refused in one line."""
    out_dir = Path(out_dir)
    single = out_dir / "ckpt.pt"
    # (ckpt.dcp.old: a save that stopped between its two renames)
    folder = next((f for f in (out_dir / SHARDED, out_dir / f"{SHARDED}.old") if (f / "meta.pt").is_file()), None)
    if parallel == "fsdp":
        if folder is None:
            raise UserError(
                f"{single}: a single-file checkpoint (parallel='ddp'): resume it with parallel='ddp'"
                if single.is_file()
                else f"{out_dir / SHARDED}: no complete sharded checkpoint to resume"
            )
        return load_checkpoint(folder / "meta.pt"), folder
    if folder is not None and not single.is_file():
        raise UserError(
            f"{folder}: a sharded checkpoint (parallel='fsdp'): resume it with --parallel=fsdp, on any "
            f"number of processes"
        )
    return load_checkpoint(single), single
