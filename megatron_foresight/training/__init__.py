"""The train loop on Megatron schedules, its optimizer and schedule, and checkpoints."""
