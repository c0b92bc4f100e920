"""Exact-model TMF-PG: the same algorithm with every expectation computed on the mean-field
model (the N -> infinity limit, no sampling noise).

Outer iteration k: mu-hat = the flow mu^{pi_k} of the current policy, propagated by the
model (``flow_and_kernels``). Inner loop: ``inner_updates`` optimizer steps on
-J_tau(pi_theta; mu-hat), the value of the network policy against the *fixed* mu-hat (policy
inputs and kernels built from mu-hat once per outer iteration; nothing in the inner loop
touches them). ``inner_updates = 1`` is one gradient step per flow, the round-1 variant.
``lr`` and ``entropy_coeff`` take a number or a schedule ``[[step, value], ...]``
(piecewise linear in gradient steps, RLlib's format), e.g. tau annealed to 0 while the lr
decays, as the RLlib algorithm does in agent actions. Tests use it to check convergence to
the equilibrium, benches as a reference.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.utils.schedules.scheduler import Scheduler

from envs.mean_field.model import Kernels, MeanFieldModel, flow_and_kernels, kernels_along


def network_policy(module, policy_inputs: Callable[[np.ndarray], np.ndarray]):
    """The policy (mu, t) -> pi(. | ., mu) of a module whose inputs come from
    ``policy_inputs(mu)`` ([O, obs_dim])."""

    def policy(mu: np.ndarray, t: int) -> np.ndarray:
        with torch.no_grad():
            logits = module.forward_inference(
                {Columns.OBS: torch.as_tensor(policy_inputs(mu))})[Columns.ACTION_DIST_INPUTS]
        return torch.softmax(logits.double(), dim=-1).numpy()

    return policy


class FixedFlow:
    """Everything the inner loop needs about a fixed flow mu-hat_0..mu-hat_H, computed once:
    the policy inputs at every step ([H, O, obs_dim]) and the kernels along it (torch)."""

    def __init__(self, model: MeanFieldModel, mus: np.ndarray,
                 policy_inputs: Callable[[np.ndarray], np.ndarray],
                 kernels: Kernels | None = None):
        kernels = kernels or kernels_along(model.game, mus, model.alphas)
        self.mus = mus
        self.inputs = torch.as_tensor(np.stack([policy_inputs(mus[t])
                                                for t in range(model.horizon)]))
        self.rewards = torch.as_tensor(kernels.rewards)
        self.active = torch.as_tensor(kernels.active)
        self.passive = torch.as_tensor(kernels.passive)
        self.alphas = torch.tensor(model.alphas)
        self.gamma = model.gamma
        self.mu0 = torch.as_tensor(mus[0])


def regularized_value(flow: FixedFlow, module, entropy_coeff: float) -> torch.Tensor:
    """J_tau(pi_theta; mu-hat) as a differentiable torch scalar (``model.py``'s recursion):
    Q_t = r_t + gamma P_t W_{t+1}, V_t = sum_a pi (Q_t - tau log pi),
    W_t = alpha_t V_t + (1 - alpha_t) P0_t W_{t+1}, J = mu-hat_0 . W_0."""
    horizon, num_obs, dim = flow.inputs.shape
    logits = module.forward_train(
        {Columns.OBS: flow.inputs.reshape(horizon * num_obs, dim)})[Columns.ACTION_DIST_INPUTS]
    log_pi = torch.log_softmax(logits.double(), dim=-1).reshape(horizon, num_obs, -1)
    values = torch.zeros(num_obs, dtype=torch.float64)
    for t in range(horizon - 1, -1, -1):
        q = flow.rewards[t] + flow.gamma * flow.active[t] @ values
        acting = (log_pi[t].exp() * (q - entropy_coeff * log_pi[t])).sum(dim=1)
        values = flow.alphas[t] * acting + (1.0 - flow.alphas[t]) * flow.passive[t] @ values
    return flow.mu0 @ values


def exact_tmf_pg(model: MeanFieldModel, module, policy_inputs, *, iterations: int, lr,
                 inner_updates: int = 1, entropy_coeff=0.0,
                 evaluate_every: int = 1, on_inner_step=None) -> list[dict]:
    """Run exact-model TMF-PG on ``module`` (updated in place) with Adam for ``iterations``
    outer iterations of ``inner_updates`` steps each (``lr``, ``entropy_coeff``: a number or
    a ``[[step, value], ...]`` schedule over gradient steps); returns the history of
    {iteration, lr, entropy_coeff, exploitability, exploitability_regularized, value,
    max_gap} (evaluated every ``evaluate_every`` outer iterations and at the end, with the
    lr and tau of the next step). ``on_inner_step(flow)`` (tests) sees the fixed flow of
    every inner step."""
    lr_schedule, tau_schedule = Scheduler(lr), Scheduler(entropy_coeff)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr_schedule.update(0))
    policy = network_policy(module, policy_inputs)
    history = []
    step = 0
    for iteration in range(iterations + 1):
        tau = tau_schedule.update(step)
        if iteration % evaluate_every == 0 or iteration == iterations:
            plain = model.evaluate(policy)
            history.append({
                "iteration": iteration,
                "lr": lr_schedule.update(step),
                "entropy_coeff": tau,
                "exploitability": plain.exploitability,
                "exploitability_regularized": model.exploitability(policy, tau)
                if tau else plain.exploitability,
                "value": plain.value,
                "max_gap": plain.max_gap,
            })
        if iteration == iterations:
            break
        mus, _, kernels = flow_and_kernels(model.game, policy, model.alphas)
        flow = FixedFlow(model, mus, policy_inputs, kernels)
        for _ in range(inner_updates):
            if on_inner_step is not None:
                on_inner_step(flow)
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule.update(step)
            loss = -regularized_value(flow, module, tau_schedule.update(step))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return history
