"""Numerical safety of the ratio-based losses: one place for the clamp of the log-ratio before ``exp``
and the cap of the KL estimate, their defaults and their checks.

- ``log_ratio_clamp`` (ppo_policy_loss, linear_ppo_loss): ``d = clamp(logprobs - old_logprobs, -c, c)``
  before ``r = exp(d)``, default ``c = 20`` as verl and OpenRLHF. Outside ``[-c, c]`` the ratio is
  constant, so the gradient there is 0. ``None``: no clamp (``exp`` overflows to inf past d = 88).
- ``kl_cap`` (kl_penalty's ``cap``, linear_ppo_loss's ``kl_cap``): the estimate is clamped to
  ``[-k, k]``, gradient 0 where that is active. Default ``"default"``: ``k = 10`` for k3 (verl's
  ``low_var_kl``, whose ``exp(-x)`` explodes for very negative x), no cap for k1 / abs / k2 (verl's
  choice; OpenRLHF caps k1, k2 and k3 alike at 10: pass ``cap=10.0`` for that). ``None``: no cap.

The same defaults are compiled into csrc/include/rlhf_fast/ppo_losses_math.h (kDefaultLogRatioClamp,
default_kl_cap).
"""

from __future__ import annotations

from rlhf_fast import _validation as V

LOG_RATIO_CLAMP = 20.0
K3_CAP = 10.0
DEFAULT = "default"


def check_log_ratio_clamp(value) -> float | None:
    """None or a finite number > 0."""
    return None if value is None else V.check_positive_float("log_ratio_clamp", value)


def default_kl_cap(estimator: str) -> float | None:
    """The cap of an estimator's value when the caller does not choose one: 10 for k3, else none."""
    return K3_CAP if estimator == "k3" else None


def resolve_kl_cap(name: str, value, estimator: str) -> float | None:
    """``"default"`` -> default_kl_cap(estimator); None -> None; else a finite number > 0."""
    if isinstance(value, str):
        if value != DEFAULT:
            raise ValueError(f"{name}: expected 'default', None or a finite number > 0, got {value!r}")
        return default_kl_cap(estimator)
    return None if value is None else V.check_positive_float(name, value)
