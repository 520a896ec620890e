"""The default model's UNet loss weighting (export/default_model/train.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_timestep_weights_favour_mid_noise_and_keep_a_floor_at_pure_noise():
    from export.default_model.train import HIGH_NOISE_FLOOR, MIN_SNR_GAMMA, make_train_scheduler, timestep_weights

    sched = make_train_scheduler()
    t = torch.tensor([0, 100, 300, 500, 700, 999])
    w = timestep_weights(sched.alphas_cumprod, t).flatten()
    assert w.shape == (6,)
    # Low noise (SNR >> gamma) and pure noise (SNR 0) sit at the floor, far below mid noise.
    assert float(w[0]) == pytest.approx(HIGH_NOISE_FLOOR) and float(w[-1]) == pytest.approx(HIGH_NOISE_FLOOR)
    assert float(w[1]) > 5 * HIGH_NOISE_FLOOR and float(w[2]) > 5 * HIGH_NOISE_FLOOR
    # Mid noise (SNR around 1) gets the most weight; never more than gamma / (gamma + 1).
    assert int(w.argmax()) in (1, 2)
    assert float(w.max()) <= MIN_SNR_GAMMA / (MIN_SNR_GAMMA + 1) + 1e-6
    assert float(w.min()) >= HIGH_NOISE_FLOOR - 1e-6
