"""PyTorch-specific parts of VCPO."""
