"""Environments of rllib-ext: math reasoning tasks and mean-field games."""
