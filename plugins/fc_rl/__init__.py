"""FC-RL (foresight-conditioned RL, GRPO) as an on-policy stage plugin. Recipe section:

    stage: fc_rl
    tasks:                      # what it trains on: the train split of each set, by weight
      - {env: search, world: true}
      - {name: gsm8k, env: math, splits: {train: gsm8k/train.jsonl}}
    checkpoint: {init_from: runs/<the FE-SFT run>}
    fc_rl:
      prompts_per_step: 4
      group_size: 4
      reward_weights: {task: 1.0, calibration: 0.5, fidelity: 0.5, format: 0.5}
"""

from plugins.fc_rl.plugin import STAGE, Config

__all__ = ["STAGE", "Config"]
