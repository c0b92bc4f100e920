"""RL algorithms of rllib-ext, laid out like ray.rllib.algorithms."""
