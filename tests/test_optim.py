"""Learning-rate schedules: optax's warmup-cosine gives the schedule wm used before, step for step."""

import ml_collections
import numpy as np
import optax
import pytest

from wm import optim


def hand_written(lr, warmup, total, min_lr_ratio):
  """The cosine schedule as wm wrote it before using optax.warmup_cosine_decay_schedule."""
  warm = optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
  after = optax.cosine_decay_schedule(lr, max(total - warmup, 1), alpha=min_lr_ratio)
  return after if not warmup else optax.join_schedules([warm, after], boundaries=[warmup])


@pytest.mark.parametrize("lr,warmup,total,ratio", [(1e-3, 100, 1000, 0.1), (3e-4, 0, 50, 0.0), (2e-3, 50, 600, 0.1),
                                                   (1e-2, 10, 10, 0.5), (1.0, 7, 8, 0.25)])
def test_cosine_schedule_matches_the_hand_written_one(lr, warmup, total, ratio):
  o = ml_collections.ConfigDict({"lr": lr, "warmup_steps": warmup, "schedule": "cosine", "min_lr_ratio": ratio})
  steps = np.arange(total + 20)
  got = np.array([optim.learning_rate_schedule(o, total)(s) for s in steps])
  want = np.array([hand_written(lr, warmup, total, ratio)(s) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
  assert got[0] == (0.0 if warmup else lr)
  np.testing.assert_allclose(got[-1], lr * ratio, rtol=1e-6)


def test_inverse_sqrt_is_continuous_after_warmup():
  o = ml_collections.ConfigDict({"lr": 1e-3, "warmup_steps": 100, "schedule": "inverse_sqrt", "min_lr_ratio": 0.1})
  s = optim.learning_rate_schedule(o, 1000)
  np.testing.assert_allclose([s(100), s(400)], [1e-3, 1e-3 * (100 / 400) ** 0.5], rtol=1e-6)
