"""
The run's log, written by process 0: out_dir/log.jsonl always (visualize.py, miniglm/report.py and
the tests read it) and, beside it when log_to says so, a live tracker with the same records
and the config:
  log_to='tensorboard'  event files in out_dir/tensorboard (tensorboard --logdir out)
  log_to='wandb'        a Weights & Biases run; offline (files in out_dir/wandb, `wandb sync`
                        them later) unless you have logged in: training never needs the network
"""
import importlib.util
import json
import os

from data_utils import UserError

TRACKERS = ("none", "tensorboard", "wandb")  # (each tracker's package has its name)


def check_tracker(name):
    """A one-line error for an unknown tracker or one whose package is not installed."""
    if name not in TRACKERS:
        raise UserError(f"log_to must be one of {', '.join(TRACKERS)}, got {name!r}")
    if name != "none" and importlib.util.find_spec(name) is None:
        raise UserError(f"log_to={name!r} needs the {name} package: pip install {name}")


class RunLog:
    """log.jsonl (cut back to iteration `resumed_at` on resume, else started afresh) and the tracker."""

    def __init__(self, out_dir, config, kind, resumed_at=None):
        self.path, self.kind, self.tracker = out_dir / "log.jsonl", kind, None
        if resumed_at is not None:
            truncate_log(self.path, resumed_at)
        elif self.path.exists():
            self.path.unlink()
        name = config["log_to"]
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tracker = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=resumed_at)
            self.tracker.add_text("config", "    " + json.dumps(config, indent=1, default=str).replace("\n", "\n    "))
        elif name == "wandb":
            import wandb
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb.api.api_key else "offline")
            self.tracker = wandb.init(project=os.environ.get("WANDB_PROJECT", "miniglm"), name=out_dir.name,
                                      dir=str(out_dir), config=config, mode=mode, resume="allow")

    def write(self, record):
        record = dict(record, mode=self.kind)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is None:
            return
        numbers = {f"{record['kind']}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iter"}
        if hasattr(self.tracker, "add_scalar"):  # tensorboard
            for key, value in numbers.items():
                self.tracker.add_scalar(key, value, record["iter"])
            self.tracker.flush()
        else:
            self.tracker.log(numbers, step=record["iter"])

    def close(self):
        if self.tracker is not None:
            (self.tracker.close if hasattr(self.tracker, "add_scalar") else self.tracker.finish)()


def truncate_log(log_path, iter_num):
    """On resume, forget log lines past the checkpoint: they are about to be redone."""
    if log_path.exists():
        lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln)["iter"] <= iter_num]
        log_path.write_text("".join(ln + "\n" for ln in keep))
