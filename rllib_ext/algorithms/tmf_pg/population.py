"""The exact mean-field model seen through RLlib modules: policy mappings, the policy an
agent population follows, its exploitability and its flow, and the flow estimated from
sampled episodes.

With one module every agent follows pi(a | o, mu). With several modules (e.g. a per-type
mapping) the population is a mixture of types with fractions w_k; the exact model then runs
on :class:`~envs.mean_field.core.TypedGame`, where each type follows its own module against
the shared marginal mu, and exploitability is sum_k w_k (best response - value) of type k.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
from ray.rllib.core.columns import Columns

from envs.mean_field.core import TypedGame
from envs.mean_field.env import MeanFieldEnv, agent_index
from envs.mean_field.model import Evaluation, MeanFieldModel, PolicyFn

SHARED_MODULE_ID = "shared"


def shared_policy_mapping(agent_id, episode=None, **kwargs) -> str:
    """Every agent -> the one shared module."""
    return SHARED_MODULE_ID


class AgentTypeMapping:
    """agent_i -> module ``type_{i mod num_types}``: K equally sized agent types."""

    def __init__(self, num_types: int):
        self.num_types = num_types

    def module_ids(self) -> list[str]:
        return [f"type_{k}" for k in range(self.num_types)]

    def __call__(self, agent_id, episode=None, **kwargs) -> str:
        return f"type_{agent_index(agent_id) % self.num_types}"


def module_fractions(mapping_fn: Callable, agent_ids: Sequence[str]) -> dict[str, float]:
    """Fraction of the population each module serves (called with ``episode=None``)."""
    counts = Counter(mapping_fn(aid, None) for aid in agent_ids)
    return {mid: counts[mid] / len(agent_ids) for mid in sorted(counts)}


def policy_table(module, inputs: np.ndarray) -> np.ndarray:
    """pi(a | o, mu) as a float64 [O, A] array from a module's action logits on the rows
    ``inputs`` (one observation per o, from ``MeanFieldEnv.policy_inputs``)."""
    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: torch.as_tensor(inputs)})
        return torch.softmax(out[Columns.ACTION_DIST_INPUTS].double(), dim=-1).numpy()


class PopulationView:
    """The exact model of ``env`` (discount ``gamma`` per own action) for the population
    that ``mapping_fn`` assigns to modules."""

    def __init__(self, env: MeanFieldEnv, mapping_fn: Callable, gamma: float = 1.0):
        self.env = env
        fractions = module_fractions(mapping_fn, env.possible_agents)
        self.module_ids = list(fractions)
        base = env.mean_field_model(gamma)
        self.typed = len(fractions) > 1
        game = TypedGame(base.game, list(fractions.values())) if self.typed else base.game
        self.model = MeanFieldModel(game, base.alpha, base.horizon, gamma)

    def marginal(self, mus: np.ndarray) -> np.ndarray:
        """Distribution over the env's observations ([..., O]) of (typed) flows."""
        if not self.typed:
            return mus
        game = self.model.game
        return mus.reshape(*mus.shape[:-1], game.num_types, -1).sum(axis=-2)

    def policy(self, multi_module) -> PolicyFn:
        """The population policy of ``multi_module`` (a MultiRLModule or a dict of modules)."""
        modules = [multi_module[mid] for mid in self.module_ids]

        def population_policy(mu: np.ndarray, t: int) -> np.ndarray:
            inputs = self.env.policy_inputs(self.marginal(mu))
            return np.concatenate([policy_table(module, inputs) for module in modules])

        return population_policy

    def evaluate(self, multi_module, entropy_coeff: float = 0.0) -> Evaluation:
        """Value, best-response value and exploitability of the modules' policy."""
        return self.model.evaluate(self.policy(multi_module), entropy_coeff)

    def flow(self, multi_module) -> np.ndarray:
        """The mean-field flow mu_0..mu_H over the env's observations ([H+1, O])."""
        mus, _ = self.model.flow(self.policy(multi_module))
        return self.marginal(mus)


def mu_distance(empirical: np.ndarray, flow: np.ndarray) -> float:
    """mean_t || mu_N(t) - mu(t) ||_1 over the steps both trajectories cover."""
    steps = min(len(empirical), len(flow))
    return float(np.abs(empirical[:steps] - flow[:steps]).sum(axis=1).mean())


def population_flow(histories: Sequence[np.ndarray]) -> np.ndarray:
    """mu-hat_t = the mean over episodes of the empirical mu_t ([H+1, O]): TMF-PG's estimate
    of the population flow of the policy that generated the episodes."""
    if not histories:
        raise ValueError("population_flow: no episodes.")
    return np.mean(np.stack(histories), axis=0)
