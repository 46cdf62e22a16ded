"""Generation on the Megatron model: the batched KV-cache decoder, and the multi-turn agent loop\nthat evaluation (and the RL rollout) run on it."""
