"""rto: Reinforced Token Optimization (DPO meets PPO) for RLHF."""

__version__ = "0.1.0"
