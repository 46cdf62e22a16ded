"""Stage plugins: one package per training stage. Each exposes `PLUGIN` (see
megatron_foresight/training/plugin.py for the contract)."""
