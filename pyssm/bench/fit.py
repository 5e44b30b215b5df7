"""How cost grows with resolution: power-law fits of time per image against visual tokens, and
the resolution where a VMamba overtakes a ViT.

An encoder that costs c * T^a per image over T tokens is a straight line of slope a on log-log
axes: attention's quadratic term pulls a ViT's slope towards 2 as T grows, while a scan stays
near 1. fit_power_law() fits log(ms per image) = log(c) + a log(T) by least squares;
crossovers() finds the resolution where the faster-growing encoder becomes the slower one,
between two measured resolutions (interpolated on the log-log segments) or, when the measured
range has no crossing, from power laws in the resolution (flagged as extrapolated).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass


@dataclass
class PowerLaw:
    encoder: str
    provider: str
    mode: str
    exponent: float      # a in c * tokens^a
    coefficient: float   # c, ms per image at one token
    r2: float
    points: int

    def ms_per_image(self, tokens: float) -> float:
        return self.coefficient * tokens ** self.exponent


def fit_power_law(tokens: list[float], ms_per_image: list[float]) -> tuple[float, float, float]:
    """(exponent, coefficient, r^2) of ms = c * tokens^a, least squares in log space."""
    if len(tokens) != len(ms_per_image):
        raise ValueError(f"tokens and ms_per_image differ in length: {len(tokens)} vs "
                         f"{len(ms_per_image)}")
    pts = [(math.log(t), math.log(m)) for t, m in zip(tokens, ms_per_image) if t > 0 and m > 0]
    if len({x for x, _ in pts}) < 2:
        raise ValueError("a power-law fit needs at least two distinct positive token counts")
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in pts)
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return slope, math.exp(intercept), r2


def _series(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(encoder, provider, mode) -> its measured rows, sorted by tokens."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("ms") and row.get("tokens") and row.get("batch"):
            groups.setdefault((row["op"], row["provider"], row["mode"]), []).append(row)
    return {k: sorted(v, key=lambda r: r["tokens"]) for k, v in groups.items()}


def fits(rows: list[dict]) -> list[PowerLaw]:
    """A power law per (encoder, provider, mode) with two or more measured resolutions."""
    out = []
    for (encoder, provider, mode), series in _series(rows).items():
        if len({r["tokens"] for r in series}) < 2:
            continue
        a, c, r2 = fit_power_law([r["tokens"] for r in series],
                                 [r["ms"] / r["batch"] for r in series])
        out.append(PowerLaw(encoder, provider, mode, a, c, r2, len(series)))
    return out


def crossover(slow_grower: list[tuple[float, float]],
              fast_grower: list[tuple[float, float]]) -> tuple[float | None, str]:
    """Where ``slow_grower`` (a VMamba: (resolution, ms per image) pairs) becomes cheaper than
    ``fast_grower`` (a ViT). Returns (resolution, how): how is "measured" (the sign of the log
    ratio changes between two resolutions measured for both, interpolated linearly in log-log),
    "always" (cheaper at every measured resolution), "extrapolated" (from power laws in the
    resolution fitted to each, beyond the measured range), "never" (the fits do not cross
    beyond it) or "too few points" (fewer than two resolutions on a side); resolution None
    unless measured or extrapolated."""
    a, b = dict(slow_grower), dict(fast_grower)
    diffs = [(r, math.log(a[r]) - math.log(b[r])) for r in sorted(set(a) & set(b))]
    for (r0, d0), (r1, d1) in zip(diffs, diffs[1:]):
        if d0 > 0 >= d1:
            x0, x1 = math.log(r0), math.log(r1)
            return math.exp(x0 + (x1 - x0) * d0 / (d0 - d1)), "measured"
    if diffs and all(d <= 0 for _, d in diffs):
        return None, "always"
    if len(a) < 2 or len(b) < 2:
        return None, "too few points"
    exp_a, c_a, _ = fit_power_law(list(a), list(a.values()))
    exp_b, c_b, _ = fit_power_law(list(b), list(b.values()))
    if exp_a >= exp_b:
        return None, "never"
    # c_a r^exp_a = c_b r^exp_b, in logs: exponents that nearly agree put the crossing past any
    # float (noisy CPU timings do), which is never
    log_res = (math.log(c_a) - math.log(c_b)) / (exp_b - exp_a)
    if log_res > math.log(sys.float_info.max):
        return None, "never"
    res = math.exp(log_res)
    if diffs and res <= max(r for r, _ in diffs):
        return None, "never"  # the fits cross inside the range, where the measurements do not
    return res, "extrapolated"


def crossovers(rows: list[dict], provider: str = "pyssm") -> list[dict]:
    """For each VMamba x ViT pair measured by ``provider`` in the same mode: the resolution at
    which the VMamba becomes faster per image (see crossover)."""
    series = _series(rows)
    out = []
    for (enc_a, prov_a, mode), rows_a in series.items():
        if prov_a != provider or not enc_a.startswith("vmamba"):
            continue
        for (enc_b, prov_b, mode_b), rows_b in series.items():
            if prov_b != provider or mode_b != mode or not enc_b.startswith("vit"):
                continue
            res, how = crossover([(r["res"], r["ms"] / r["batch"]) for r in rows_a],
                                 [(r["res"], r["ms"] / r["batch"]) for r in rows_b])
            out.append({"vmamba": enc_a, "vit": enc_b, "provider": provider, "mode": mode,
                        "how": how, "resolution": res})
    return out


def as_dicts(laws: list[PowerLaw]) -> list[dict]:
    return [asdict(law) for law in laws]
