"""RLlib ``MultiAgentEnv`` over a vectorised mean-field game with asynchronous agents.

Agents are ``"agent_0" .. "agent_{N-1}"``. The dicts follow RLlib's convention that an
observation asks for an action:

* ``reset()`` and every non-final ``step()`` return observations for exactly the agents that
  act at the next step (S_t, drawn by the activation schedule) and for no one else; idle
  agents are absent from the dict, so RLlib never queries them. Idle agents still move by
  the game's passive kernel P_0 (a queue keeps serving them); their next observation shows
  where they are when they act again.
* ``step(actions)`` must receive an action for each of those agents and only for them; it
  returns rewards for the agents that just acted. An agent that then idles keeps its action
  and reward "hanging" in RLlib's ``MultiAgentEpisode`` until its next observation (idle
  steps pay nothing, so nothing is summed onto it).
* The finite horizon ends the game: the last step returns ``terminateds={"__all__": True}``
  and no observations (nobody acts again), so RLlib closes every agent's episode on its last
  observation. (A *truncated* agent with a pending action and no final observation would
  make ``MultiAgentEpisode`` raise.)

Each observation is float32 ``[onehot(o_i), mu_t]`` (length 2 O), or just ``onehot(o_i)``
with ``observe_mu: false`` (the baseline that does not see the population). With
``mu_scale: s`` the mu part is ``1/O + s (mu_t - 1/O)``: mu's deviation from the uniform
distribution magnified s times, so that a policy network resolves small moves of mu (on
resource selection with one agent acting, mu moves by a few hundredths per round over a long
transient; docs/tmf_pg.md). The env also
exposes ``mu`` (the current empirical distribution), ``mu_history`` (this episode's mu_0..mu_t),
``mean_field_model()`` (the exact model with this env's alpha_t and horizon) and
``freeze_mean_field(flow)`` (play against a fixed flow mu-hat instead of the population: the
inner problem of TMF-PG; see ``core.PopulationSimulator``).

Common env config keys, defaults in brackets (each game adds its own; see
``resource_selection.py`` and ``queueing.py``):
    num_agents    N >= 2                                                      [100]
    activation    "all" | "sequential" | "k=<int>" | "bernoulli=<p>" |
                  "cycle=<k0>,<k1>,..." (B_t = k_{t mod L})                      ["all"]
    rounds        episode length as the expected number of actions per agent; the
                  episode has H = round(rounds / mean alpha) env steps         [10]
    observe_mu    include mu_t in the observation                             [true]
    mu_scale      s > 0: observe 1/O + s (mu_t - 1/O) instead of mu_t          [1.0]

With ``bernoulli=<p>`` the first activation set of an episode is redrawn while empty (RLlib
cannot start an episode without observations); the chance of that, (1 - p)^N, is
negligible for the N p >= 5 this schedule is meant for.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from envs.mean_field.core import (
    MeanFieldGame,
    PopulationSimulator,
    check_float,
    check_int,
    encode_observations,
    horizon_for,
    parse_activation,
)
from envs.mean_field.model import MeanFieldModel
from envs.validation import check_known_keys, config_error

COMMON_DEFAULTS = {
    "num_agents": 100,
    "activation": "all",
    "rounds": 10,
    "observe_mu": True,
    "mu_scale": 1.0,
}


def agent_index(agent_id: str) -> int:
    """``"agent_17"`` -> 17."""
    return int(agent_id.rsplit("_", 1)[1])


class MeanFieldEnv(MultiAgentEnv):
    """Base class; a subclass names its ``game_class`` and the game's ``game_defaults``."""

    game_class: type[MeanFieldGame]
    game_defaults: dict

    def __init__(self, config: dict | None = None):
        super().__init__()
        config = dict(config or {})
        check_known_keys(config, [*COMMON_DEFAULTS, *self.game_defaults], type(self).__name__)
        settings = {**COMMON_DEFAULTS, **self.game_defaults, **config}
        num_agents = check_int("num_agents", settings["num_agents"], low=2)
        self.activation = parse_activation(settings["activation"], num_agents)
        self.rounds = check_float("rounds", settings["rounds"], low=0.0, low_open=True)
        if not isinstance(settings["observe_mu"], bool):
            raise config_error("observe_mu", f"got {settings['observe_mu']!r}",
                               "use true or false.")
        self.observe_mu = settings["observe_mu"]
        mu_scale = check_float("mu_scale", settings["mu_scale"], low=0.0, low_open=True)
        # What encode_observations takes: None drops mu from the observation.
        self.mu_scale = mu_scale if self.observe_mu else None
        self.game = self.game_class(**{key: settings[key] for key in self.game_defaults})
        self.horizon = horizon_for(self.rounds, self.activation)
        self.simulator = PopulationSimulator(self.game, num_agents, self.activation,
                                             self.horizon)

        # MultiAgentEnv.num_agents is len(self.agents): every agent is always in the game.
        self.possible_agents = [f"agent_{i}" for i in range(num_agents)]
        self.agents = list(self.possible_agents)
        self._ids = np.array(self.possible_agents, dtype=object)
        self._index = {aid: i for i, aid in enumerate(self.possible_agents)}
        size = self.game.num_observations
        low, high = np.zeros(size, np.float32), np.ones(size, np.float32)
        if self.observe_mu:  # the bounds of 1/O + s (mu - 1/O) for mu in the simplex
            low = np.concatenate([low, np.full(size, min(0.0, (1.0 - mu_scale) / size),
                                               np.float32)])
            high = np.concatenate([high, np.full(size, max(1.0, 1.0 / size + mu_scale
                                                          * (1.0 - 1.0 / size)), np.float32)])
        observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        action_space = gym.spaces.Discrete(self.game.num_actions)
        self.observation_spaces = dict.fromkeys(self.possible_agents, observation_space)
        self.action_spaces = dict.fromkeys(self.possible_agents, action_space)
        self._acting = np.zeros(0, dtype=np.int64)
        self._acting_ids: list[str] = []

    # ------------------------------------------------------------------ gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed, options=options)
        if seed is not None:
            self.simulator.seed(seed)
        self.simulator.reset()
        self._acting = self.simulator.sample_active()
        while len(self._acting) == 0:
            self._acting = self.simulator.sample_active()
        return self._observations(self._acting), {}

    def step(self, action_dict: dict):
        agents, actions = self._parse_actions(action_dict)
        rewards = self.simulator.step(agents, actions)
        reward_dict = dict(zip(action_dict, rewards.tolist()))
        if self.simulator.t >= self.horizon:
            self._acting = np.zeros(0, dtype=np.int64)
            self._acting_ids = []
            return {}, reward_dict, {"__all__": True}, {"__all__": False}, {}
        self._acting = self.simulator.sample_active()
        return (self._observations(self._acting), reward_dict, {"__all__": False},
                {"__all__": False}, {})

    # ------------------------------------------------------------------ mean-field views

    @property
    def num_observations(self) -> int:
        return self.game.num_observations

    @property
    def mu(self) -> np.ndarray:
        """The current empirical distribution over observations ([O])."""
        return self.simulator.mu

    @property
    def mu_history(self) -> np.ndarray:
        """mu_0 .. mu_t of the current episode ([t+1, O])."""
        return self.simulator.mu_history[: self.simulator.t + 1]

    @property
    def acting_agents(self) -> list[str]:
        """The agents that act at the next step (the keys of the last observation dict)."""
        return list(self._ids[self._acting])

    def mean_field_model(self, gamma: float = 1.0) -> MeanFieldModel:
        """The exact model: this env's game, alpha_0..alpha_{H-1}, horizon and ``gamma``."""
        return MeanFieldModel(self.game, self.simulator.step_durations, self.horizon, gamma)

    def freeze_mean_field(self, flow: np.ndarray | None) -> None:
        """From the next step on, rewards, transitions and the mu in observations use the
        fixed flow ``flow`` ([H+1, O]) instead of the empirical mu (None: back to the
        population)."""
        self.simulator.freeze(flow)

    @property
    def frozen(self) -> bool:
        return self.simulator.frozen_flow is not None

    def policy_inputs(self, mu: np.ndarray) -> np.ndarray:
        """The observation every observation o would produce under population ``mu``
        ([O, obs_dim]); a policy network on these rows gives the table pi(. | ., mu)."""
        return encode_observations(np.arange(self.game.num_observations), mu, self.mu_scale)

    # ------------------------------------------------------------------ dict boundary

    def _observations(self, agents: np.ndarray) -> dict:
        self._acting_ids = self._ids[agents].tolist()
        return dict(zip(self._acting_ids, self.simulator.observation_matrix(
            agents, self.mu_scale)))

    def _parse_actions(self, action_dict: dict) -> tuple[np.ndarray, np.ndarray]:
        # Fast path: the keys of the last observation dict, in the same order (what RLlib
        # sends back); list equality of the same string objects is a pointer comparison.
        if list(action_dict) == self._acting_ids:
            agents = self._acting
        else:
            agents = self._agents_of(action_dict)
        actions = np.fromiter(action_dict.values(), np.int64, len(action_dict))
        if np.any((actions < 0) | (actions >= self.game.num_actions)):
            raise ValueError(f"actions must be integers in [0, {self.game.num_actions}); "
                             f"got {actions[(actions < 0) | (actions >= self.game.num_actions)][:5]}.")
        return agents, actions

    def _agents_of(self, action_dict: dict) -> np.ndarray:
        """Indices of the agents in ``action_dict`` (any order); raises if they are not
        exactly the acting agents."""
        index = self._index
        try:
            agents = np.fromiter((index[aid] for aid in action_dict), np.int64,
                                 len(action_dict))
        except KeyError as e:
            raise ValueError(f"action for unknown agent {e.args[0]!r}; agents are "
                             f"'agent_0' .. 'agent_{self.num_agents - 1}'.") from None
        expected = self._acting
        if len(agents) != len(expected) or not np.array_equal(np.sort(agents), expected):
            extra = sorted(set(agents.tolist()) - set(expected.tolist()))
            missing = sorted(set(expected.tolist()) - set(agents.tolist()))
            raise ValueError(
                f"step {self.simulator.t}: actions must come from exactly the agents of the "
                f"last observation dict; idle agents that sent actions: "
                f"{[self.possible_agents[i] for i in extra[:5]]}, acting agents without an "
                f"action: {[self.possible_agents[i] for i in missing[:5]]}.")
        return agents
