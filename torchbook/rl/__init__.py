"""Reinforcement learning (book chapter 19): environments, tabular methods, policy networks and agents."""
