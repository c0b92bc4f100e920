"""VCPO: variance-controlled off-policy RL for LLMs (arXiv 2602.17616)."""
