"""Sampler steps with log-probabilities (DDIM-eta, flow SDE, DanceGRPO SDE, CPS, ODE) and trajectories.

Pure tensor math over scheduler coefficients: no model is loaded here. The model is any callable
`predict(x_t [B, ...], timestep [B]) -> prediction`. Log-probabilities are computed in fp32 and averaged over
latent elements by default (`reduce="mean"`, as DDPO / Flow-GRPO / DanceGRPO), summed with `reduce="sum"`.

    step functions   ddim_step_with_logprob, ddim_ode_step, flow_sde_step_with_logprob,
                     flow_dance_step_with_logprob, flow_cps_step_with_logprob, flow_ode_step
    schedules        ddim_schedule -> DDIMSchedule, flow_schedule -> FlowSchedule (built by diffusers)
    samplers         DDIMSampler, FlowSampler (schedule + step rule, indexed by step)
    rollouts         sample_trajectory -> Trajectory, sample_sde_window

Conventions:
- Every stochastic step returns StepOutput(prev_sample, log_prob [B], mean, std [B, 1, ...]) with
  x' ~ N(mean, std^2); pass `prev_sample=` to score a stored transition instead of sampling (the training
  recompute): it reproduces the rollout log-prob bit for bit, also with bf16 latents.
- A deterministic step (ODE, DDIM eta = 0, steps outside an SDE window, DDIM's last step with
  final_alpha_cumprod = 1) has no density: its log_prob is NaN, its std 0.
- CPS's log-prob follows Flow-GRPO: -(x' - mean)^2 without any constant (log_prob_form="squared_error");
  log_prob_form="gaussian" gives the true Gaussian log-density.
- Flow timesteps given to the network are sigma * 1000 (diffusers); DDIM's are the integer train timesteps.
"""

from imgalign.sampling.ddim import ddim_ode_step, ddim_step_with_logprob
from imgalign.sampling.flow import (
    flow_cps_step_with_logprob,
    flow_dance_step_with_logprob,
    flow_ode_step,
    flow_sde_step_with_logprob,
)
from imgalign.sampling.gaussian import StepOutput, gaussian_log_prob, reduce_latent
from imgalign.sampling.samplers import DDIMSampler, FlowSampler
from imgalign.sampling.schedules import DDIMSchedule, FlowSchedule, ddim_schedule, flow_schedule
from imgalign.sampling.trajectory import Trajectory, Transition, sample_sde_window, sample_trajectory

__all__ = [
    "DDIMSampler",
    "DDIMSchedule",
    "FlowSampler",
    "FlowSchedule",
    "StepOutput",
    "Trajectory",
    "Transition",
    "ddim_ode_step",
    "ddim_schedule",
    "ddim_step_with_logprob",
    "flow_cps_step_with_logprob",
    "flow_dance_step_with_logprob",
    "flow_ode_step",
    "flow_schedule",
    "flow_sde_step_with_logprob",
    "gaussian_log_prob",
    "reduce_latent",
    "sample_sde_window",
    "sample_trajectory",
]
