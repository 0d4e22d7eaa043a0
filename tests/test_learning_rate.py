"""The learning-rate schedules against their closed forms."""

import math

import numpy as np
import pytest

from dim_jax import train_state
from dim_jax.configs import common


@pytest.mark.parametrize("decay", ["constant", "cosine"])
def test_schedule_matches_its_closed_form(decay):
  c = common.base_config().optim
  rng = np.random.default_rng()
  c.update(learning_rate=float(rng.uniform(1e-4, 1e-2)), warmup_steps=int(rng.integers(2, 50)))
  c.decay = decay
  total = c.warmup_steps + int(rng.integers(10, 500))
  schedule = train_state.learning_rate_schedule(c, total)
  peak, warmup = c.learning_rate, c.warmup_steps
  for step in [0, warmup // 2, warmup, (warmup + total) // 2, total - 1, total]:
    if step < warmup:
      want = peak * step / warmup
    elif decay == "constant":
      want = peak
    else:
      want = peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), (decay, step)


def test_unknown_decay_is_refused():
  c = common.base_config().optim
  c.decay = "linear"
  with pytest.raises(ValueError, match="optim.decay='linear'"):
    train_state.learning_rate_schedule(c, 100)
