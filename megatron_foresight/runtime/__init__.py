"""Process start-up: torch.distributed, Megatron parallel state, the CPU compatibility layer,
seeding and logging. Everything device- or launcher-specific lives here."""
