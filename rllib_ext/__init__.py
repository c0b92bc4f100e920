"""rllib-ext: Ray RLlib extensions for asynchronous LLM RL (VCPO) and mean-field MARL (TMF-PG)."""

__version__ = "0.1.0"
