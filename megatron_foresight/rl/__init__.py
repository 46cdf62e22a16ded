"""FC-RL: rollout, rewards, advantages, policy loss."""
