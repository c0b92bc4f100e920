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

    # RLlib's torch module switches to eval() and back around every inference and exploration
    # forward, two walks over all submodules per call: with one agent acting per env step
    # that was half the cost of the per-step forward and of the exact flow's per-t policy.
    # Linear and tanh layers act the same in both modes, so the switch is skipped.
    def forward_inference(self, batch, **kwargs):
        return self._forward_inference(batch, **kwargs)

    def forward_exploration(self, batch, **kwargs):
        return self._forward_exploration(batch, **kwargs)
