"""
The third stage, alignment: a trained SFT model improved further, each stage a Trainer subclass
(miniglm/trainer.py) that train.py picks by the config key `stage`.

  reference.py  what both share: the frozen reference model, log-probabilities of answer tokens
  dpo.py        DPO on preference pairs (stage='dpo')
  grpo.py       GRPO on rewards of sampled answers (stage='grpo')
  rewards.py    GRPO's rewards: the right author, the right next line, partial credit
"""
