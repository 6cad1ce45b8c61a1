"""
Rewards that can be checked, for GRPO (train.py stage='grpo', miniglm/align/grpo.py). A reward is a Python
function (prompt, answer, record) -> float: the question, the model's sampled answer (text, the
end token not included) and the SFT record it came from, with "reference" (the reference answer)
added. Name yours in the config as grpo_reward = "my_module:my_reward".

The default, qa_reward, for the 问/答 set of data/prepare_sft.py:
  作者 questions    1 for the exact author (…的作者是A。, A the reference's), else 0
  下一句 questions  1 for the exact next line (…的下一句是“B”), else 0
  every question   + 0.5 x char F1 against the reference: partial credit, so that a group of
                   samples is rarely all equal (a group of equal rewards carries no signal)
miniglm/align/grpo.py adds the format term itself (grpo_format_reward if the answer ended with the end token,
in the template's form, before the length cap).
"""
import importlib
import importlib.util
import math

from data_utils import UserError
from miniglm.metrics import char_f1, key_fact


def qa_reward(prompt, answer, record):
    fact = key_fact(prompt, record["reference"], answer)
    return float(bool(fact)) + 0.5 * char_f1(answer, record["reference"])


def import_module(module):
    """A module by its name; the project's own reward modules also by their short name
    ('rewards:qa_reward', as configs wrote it before the library moved into miniglm/align/)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if "." in module or importlib.util.find_spec(f"miniglm.align.{module}") is None:
            raise
        return importlib.import_module(f"miniglm.align.{module}")


def load_reward(spec):
    """The function a 'module:function' names, or a one-line error."""
    module, sep, name = str(spec).partition(":")
    if not sep or not module or not name:
        raise UserError(f"grpo_reward must be 'module:function', got {spec!r}")
    try:
        fn = getattr(import_module(module), name)
    except ImportError as e:
        raise UserError(f"grpo_reward {spec!r}: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise UserError(f"grpo_reward {spec!r}: {module!r} has no {name!r}") from None
    if not callable(fn):
        raise UserError(f"grpo_reward {spec!r}: not a function")
    return fn


def score(fn, prompt, answer, record):
    """fn's reward as a float, or a one-line error naming the prompt."""
    try:
        value = fn(prompt, answer, record)
    except Exception as e:  # a user's function: whatever it raises, one line
        raise UserError(f"the reward function raised {type(e).__name__}: {e} (prompt {prompt!r})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"the reward function returned {value!r}, not a finite number (prompt {prompt!r})")
    return float(value)
