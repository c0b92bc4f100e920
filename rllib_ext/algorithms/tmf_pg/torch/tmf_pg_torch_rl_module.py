"""The shared TMF-PG policy pi(a | o, mu): an MLP on the observation [onehot(o), mu]."""

from __future__ import annotations

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.torch import TorchRLModule

DEFAULT_MODEL_CONFIG = {"hidden": [64, 64]}


class TMFPGTorchRLModule(TorchRLModule):
    """Policy-only module: tanh MLP -> action logits (RLlib's Categorical over Discrete).

    ``model_config``: ``hidden`` (list of layer widths, default [64, 64]). The last layer
    starts at zero so the initial policy is uniform for every (o, mu).
    """

    def setup(self):
        hidden = list((self.model_config or {}).get("hidden", DEFAULT_MODEL_CONFIG["hidden"]))
        sizes = [self.observation_space.shape[0], *hidden]
        layers = []
        for width_in, width_out in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(width_in, width_out), torch.nn.Tanh()]
        head = torch.nn.Linear(sizes[-1], self.action_space.n)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        self.policy_net = torch.nn.Sequential(*layers, head)

    def _forward(self, batch, **kwargs):
        return {Columns.ACTION_DIST_INPUTS: self.policy_net(batch[Columns.OBS])}
