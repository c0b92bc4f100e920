"""TMF-PG: policy gradient for mean-field games with asynchronous agents."""

from rllib_ext.algorithms.tmf_pg.tmf_pg import TMFPG, TMFPGConfig

__all__ = ["TMFPG", "TMFPGConfig"]
