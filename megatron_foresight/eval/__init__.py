"""Evaluation: agent episodes scored for success, format, rollout fidelity and calibration."""
