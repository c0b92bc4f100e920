"""Exact-model TMF-PG: the same update with the expectation computed on the mean-field model.

Each iteration freezes the flow mu^pi of the current policy, evaluates the regularised
value J_tau(pi_theta; mu^pi) by the backward recursion of ``envs.mean_field.model`` in torch
(differentiable in theta), and takes one optimizer step on -J_tau. This is the deterministic
counterpart of the sample-based learner (same network, same objective, no sampling noise);
tests use it to check convergence to the equilibrium, benches as a reference.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from ray.rllib.core.columns import Columns

from envs.mean_field.model import MeanFieldModel


def network_policy(module, policy_inputs: Callable[[np.ndarray], np.ndarray]):
    """The policy (mu, t) -> pi(. | ., mu) of a module whose inputs come from
    ``policy_inputs(mu)`` ([O, obs_dim])."""

    def policy(mu: np.ndarray, t: int) -> np.ndarray:
        with torch.no_grad():
            logits = module.forward_inference(
                {Columns.OBS: torch.as_tensor(policy_inputs(mu))})[Columns.ACTION_DIST_INPUTS]
        return torch.softmax(logits.double(), dim=-1).numpy()

    return policy


def regularized_value(model: MeanFieldModel, mus: np.ndarray, module,
                      policy_inputs: Callable[[np.ndarray], np.ndarray],
                      entropy_coeff: float) -> torch.Tensor:
    """J_tau(pi_theta; mus) as a differentiable torch scalar:
    V_t = alpha sum_a pi (r + P V_{t+1} - tau log pi) + (1 - alpha) V_{t+1}, J = mu_0 . V_0."""
    game, alpha = model.game, model.alpha
    values = torch.zeros(game.num_observations, dtype=torch.float64)
    for t in range(model.horizon - 1, -1, -1):
        logits = module.forward_train(
            {Columns.OBS: torch.as_tensor(policy_inputs(mus[t]))})[Columns.ACTION_DIST_INPUTS]
        log_pi = torch.log_softmax(logits.double(), dim=-1)
        q = torch.tensor(game.rewards(mus[t])) \
            + torch.tensor(game.transitions(mus[t])) @ values
        acting = (log_pi.exp() * (q - entropy_coeff * log_pi)).sum(dim=1)
        values = alpha * acting + (1.0 - alpha) * values
    return torch.as_tensor(mus[0]) @ values


def exact_tmf_pg(model: MeanFieldModel, module, policy_inputs, *, iterations: int, lr: float,
                 entropy_coeff: float, evaluate_every: int = 1) -> list[dict]:
    """Run exact-model TMF-PG on ``module`` (updated in place) with Adam; returns the history
    of {iteration, exploitability, exploitability_regularized, value}."""
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    policy = network_policy(module, policy_inputs)
    history = []
    for iteration in range(iterations + 1):
        if iteration % evaluate_every == 0 or iteration == iterations:
            plain = model.evaluate(policy)
            history.append({
                "iteration": iteration,
                "exploitability": plain.exploitability,
                "exploitability_regularized": model.exploitability(policy, entropy_coeff),
                "value": plain.value,
            })
        if iteration == iterations:
            break
        mus, _ = model.flow(policy)
        loss = -regularized_value(model, mus, module, policy_inputs, entropy_coeff)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return history
