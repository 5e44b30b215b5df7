"""Power-law fits and crossovers on synthetic timings whose answers are known."""

import math
import random

import pytest

from pyssm.bench.fit import crossover, crossovers, fit_power_law, fits


@pytest.mark.parametrize("exponent", [0.93, 1.0, 1.37, 2.0])
def test_fit_recovers_a_known_exponent_through_noise(exponent):
    rng = random.Random(exponent)
    tokens = [16, 36, 64, 144, 256, 576, 1024, 4096]
    ms = [0.031 * t ** exponent * math.exp(rng.gauss(0, 0.02)) for t in tokens]
    a, c, r2 = fit_power_law(tokens, ms)
    assert a == pytest.approx(exponent, abs=0.03)
    assert c == pytest.approx(0.031, rel=0.15)
    assert r2 > 0.99


def test_fit_is_exact_without_noise():
    a, c, r2 = fit_power_law([3, 7, 19], [5 * t ** 1.618 for t in (3, 7, 19)])
    assert (a, c, r2) == pytest.approx((1.618, 5.0, 1.0), rel=1e-12)


def test_fit_needs_two_distinct_points():
    with pytest.raises(ValueError, match="two distinct"):
        fit_power_law([5, 5], [1.0, 2.0])
    with pytest.raises(ValueError, match="differ in length"):
        fit_power_law([1, 2, 3], [1.0, 2.0])


def _rows(op, coeff, exponent, resolutions, batch=3, patch=16, mode="forward"):
    return [{"op": op, "provider": "pyssm", "mode": mode, "res": r, "batch": batch,
             "tokens": (r // patch) ** 2, "ms": batch * coeff * ((r // patch) ** 2) ** exponent}
            for r in resolutions]


def test_fits_group_by_encoder_and_recover_each_exponent():
    rows = _rows("vmamba_x", 0.02, 1.05, [64, 128, 256, 512])
    rows += _rows("vit_x", 0.001, 1.8, [64, 128, 256, 512])
    rows += [{"op": "vit_x", "provider": "pyssm", "mode": "forward", "res": 999, "batch": 1,
              "tokens": 1, "status": "error: OOM"}]  # no time: left out, not a crash
    laws = {law.encoder: law for law in fits(rows)}
    assert laws["vmamba_x"].exponent == pytest.approx(1.05)
    assert laws["vit_x"].exponent == pytest.approx(1.8)
    assert laws["vit_x"].points == 4


def test_crossover_measured_between_two_resolutions():
    # 0.01 r^2 vs 1e-6 r^4 per image: equal at r = 100, measured at 64 and 128
    res, how = crossover([(r, 0.01 * r ** 2) for r in (32, 64, 128, 256)],
                         [(r, 1e-6 * r ** 4) for r in (32, 64, 128, 256)])
    assert how == "measured"
    assert res == pytest.approx(100.0)


def test_crossover_extrapolated_beyond_the_range():
    res, how = crossover([(r, 0.5 * r ** 1.0) for r in (32, 64)],
                         [(r, 0.001 * r ** 2.0) for r in (32, 64)])
    assert how == "extrapolated"
    assert res == pytest.approx(500.0)


def test_crossover_past_any_float_is_never():
    """Exponents that nearly agree (noisy CPU timings) put the fitted crossing past the largest
    float: "never", not an overflow."""
    res, how = crossover([(r, 1e6 * r ** 1.0) for r in (32, 64)],
                         [(r, 1e-6 * r ** 1.001) for r in (32, 64)])
    assert (res, how) == (None, "never")


def test_crossover_always_never_and_too_few():
    assert crossover([(64, 1.0), (128, 2.0)], [(64, 2.0), (128, 8.0)]) == (None, "always")
    assert crossover([(64, 4.0), (128, 16.0)], [(64, 1.0), (128, 2.0)]) == (None, "never")
    assert crossover([(64, 4.0)], [(64, 1.0)]) == (None, "too few points")


def test_crossovers_pair_each_vmamba_with_each_vit_per_mode():
    rows = _rows("vmamba_a", 0.01, 1.0, [64, 128, 256]) + \
        _rows("vit_b", 0.0001, 2.0, [64, 128, 256]) + \
        _rows("vit_b", 0.0001, 2.0, [64, 128], mode="step")
    found = crossovers(rows)
    assert [(c["vmamba"], c["vit"], c["mode"]) for c in found] == [
        ("vmamba_a", "vit_b", "forward")]
    # 0.01 T = 1e-4 T^2 at T = 100 tokens = (R/16)^2 -> R = 160 px, between 128 and 256
    assert found[0]["how"] == "measured"
    assert found[0]["resolution"] == pytest.approx(160.0, rel=0.12)
