"""Mean-field games with asynchronous agents: N-agent RLlib envs and their exact models.

- ``core``: game interface, activation schedules, the vectorised N-agent simulator;
- ``model``: exact mean-field flow, values, best response, exploitability;
- ``env``: the RLlib ``MultiAgentEnv`` boundary;
- ``resource_selection`` and ``queueing``: the two games and their envs.
"""

from envs.mean_field.core import Activation, MeanFieldGame, PopulationSimulator, TypedGame
from envs.mean_field.env import MeanFieldEnv
from envs.mean_field.model import MeanFieldModel
from envs.mean_field.queueing import DynamicQueueingEnv, DynamicQueueingGame
from envs.mean_field.resource_selection import (
    ResourceSelectionEnv,
    ResourceSelectionGame,
    wardrop_equilibrium,
)

__all__ = [
    "Activation", "DynamicQueueingEnv", "DynamicQueueingGame", "MeanFieldEnv", "MeanFieldGame",
    "MeanFieldModel", "PopulationSimulator", "ResourceSelectionEnv", "ResourceSelectionGame",
    "TypedGame", "wardrop_equilibrium",
]
