"""Invariances of the streaming :class:`suscept.Moments` (merge, remove, slices, finalizers).

Ground truth everywhere is a direct two-pass float64 computation on all draws at once.
"""

import random

import pytest
import torch

import suscept
from suscept import Moments
from suscept.estimators import as_moments

RTOL = 1e-10
N, KX, KY = 600, 3, 4


def draws(seed, n=N, kx=KX, ky=KY):
    """Skewed, correlated draws with non-zero means (third moments are far from zero)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, kx + ky, generator=g, dtype=torch.float64)
    mix = torch.randn(kx + ky, kx + ky, generator=g, dtype=torch.float64)
    v = z @ mix
    v = v + 0.4 * v**2 + 3.0 * torch.arange(kx + ky, dtype=torch.float64)  # skew, offsets
    return v[:, :kx].contiguous(), v[:, kx:].contiguous()


def direct(x, y):
    """Two-pass float64 reference: mean, unbiased cov, unbiased k3 slices, m2."""
    n = x.shape[0]
    dx, dy = x - x.mean(0), y - y.mean(0)
    k3f = n / ((n - 1) * (n - 2))
    return {
        "mean_x": x.mean(0), "mean_y": y.mean(0),
        "m2_x": (dx**2).sum(0), "m2_y": (dy**2).sum(0),
        "cov": dx.T @ dy / (n - 1),
        "xyy": torch.einsum("na,nb->ab", dx, dy**2) * k3f,
        "xxy": torch.einsum("na,nb->ab", dx**2, dy) * k3f,
    }


def close(a, b, rtol=RTOL, scale=None):
    """Relative agreement, scaled by the largest entry of the reference (or ``scale``)."""
    scale = b.abs().max().clamp(min=1e-300) if scale is None else scale
    err = (a - b).abs().max() / scale
    assert err < rtol, f"relative error {err:.3e} >= {rtol:.0e}"


def check_total(m: Moments, x, y):
    ref = direct(x, y)
    assert m.n_segments == 1
    assert m.n.item() == x.shape[0]
    close(m.mean_x[0], ref["mean_x"])
    close(m.mean_y[0], ref["mean_y"])
    close(m.m2_x[0], ref["m2_x"])
    close(m.m2_y[0], ref["m2_y"])
    close(m.cov()[0], ref["cov"])
    close(m.k3("xyy")[0], ref["xyy"])
    close(m.k3("xxy")[0], ref["xxy"])


def random_cuts(n, n_parts, rng, min_size=1):
    cuts = sorted(rng.sample(range(min_size, n - min_size + 1), n_parts - 1))
    bounds = [0, *cuts, n]
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def chunks(x, y, bounds):
    return [Moments.from_draws(x[lo:hi], y[lo:hi]) for lo, hi in bounds]


def random_tree_merge(parts, rng):
    """Merge single-segment Moments pairwise in a random order and random tree shape."""
    parts = list(parts)
    while len(parts) > 1:
        i, j = rng.sample(range(len(parts)), 2)
        a, b = parts[i], parts[j]
        merged = a.merge(b)
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [merged]
    return parts[0]


# ---- (a) merge order, tree shape and chunking -------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_total_of_random_chunking_matches_direct(seed):
    x, y = draws(seed)
    rng = random.Random(seed)
    bounds = random_cuts(N, rng.randint(2, 40), rng)
    m = Moments.cat(chunks(x, y, bounds))
    assert m.n_segments == len(bounds)
    check_total(m.total(), x, y)


def test_chunks_of_one_and_two_draws():
    x, y = draws(3, n=57)
    bounds = [(i, i + 1) for i in range(20)] + [(20 + 2 * i, 22 + 2 * i) for i in range(18)] \
        + [(56, 57)]
    m = Moments.cat(chunks(x, y, bounds))
    check_total(m.total(), x, y)


@pytest.mark.parametrize("seed", [4, 5, 6, 7])
def test_random_merge_tree_and_order_matches_direct(seed):
    x, y = draws(seed)
    rng = random.Random(seed)
    bounds = random_cuts(N, 17, rng)
    parts = chunks(x, y, bounds)
    check_total(random_tree_merge(parts, rng), x, y)
    # left fold in reverse order, and a right fold: the draw order does not matter
    acc = parts[-1]
    for p in reversed(parts[:-1]):
        acc = acc.merge(p)
    check_total(acc, x, y)
    acc = parts[0]
    for p in parts[1:]:
        acc = p.merge(acc)
    check_total(acc, x, y)


def test_permuting_draws_gives_same_moments():
    x, y = draws(8)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(8))
    rng = random.Random(8)
    m = Moments.cat(chunks(x[perm], y[perm], random_cuts(N, 9, rng))).total()
    check_total(m, x, y)


def test_merge_is_segmentwise():
    """Merging two multi-segment accumulators merges segment s with segment s."""
    x, y = draws(9)
    a = Moments.cat([Moments.from_draws(x[0:50], y[0:50]),
                     Moments.from_draws(x[100:230], y[100:230])])
    b = Moments.cat([Moments.from_draws(x[50:100], y[50:100]),
                     Moments.from_draws(x[230:250], y[230:250])])
    ab = a.merge(b)
    assert ab.n_segments == 2
    check_total(ab.segment(0), x[0:100], y[0:100])
    check_total(ab.segment(1), x[100:250], y[100:250])


def test_total_of_segments_from_as_moments():
    """The estimators' own segmentation ([chain, draw, k] -> blocks) merges to the direct value."""
    x, y = draws(10)
    xs, ys = x.reshape(4, N // 4, KX), y.reshape(4, N // 4, KY)
    m = as_moments(xs, ys, third=True, n_blocks=3)
    assert m.n_segments == 12
    check_total(m.total(), x, y)


def test_default_y_is_x():
    x, _ = draws(11)
    m = Moments.from_draws(x)
    check_total(m, x, x)
    close(m.cov()[0], torch.cov(x.T))


# ---- (b) remove is the inverse of merge --------------------------------------------------------
FIELDS = ("n", "mean_x", "mean_y", "m2_x", "m2_y", "cxy", "t_xyy", "t_xxy")


def same_moments(a: Moments, b: Moments, whole: Moments, rtol=1e-9):
    """Field-wise agreement, relative to the size of the field in the merged accumulator
    (a one-draw part has m2 = 0 exactly; rounding of the merged sums is the relevant scale)."""
    for f in FIELDS:
        ref = getattr(b, f)
        scale = torch.maximum(ref.abs().max(), getattr(whole, f).abs().max())
        close(getattr(a, f), ref, rtol, scale)


@pytest.mark.parametrize("na,nb", [(300, 300), (500, 7), (3, 400), (1, 50), (50, 1)])
def test_remove_inverts_merge(na, nb):
    x, y = draws(12, n=na + nb)
    a = Moments.from_draws(x[:na], y[:na])
    b = Moments.from_draws(x[na:], y[na:])
    ab = a.merge(b)
    same_moments(ab.remove(b), a, ab)
    same_moments(ab.remove(a), b, ab)  # merge is symmetric, so either part can be removed
    # and against the direct moments of the remainder
    whole = Moments.from_draws(x, y)
    same_moments(whole.remove(b), a, whole)
    same_moments(ab, whole, whole)


def test_remove_segment_matches_leave_one_out_direct():
    """What the jackknife does: total minus one segment = the other segments' direct moments."""
    x, y = draws(13)
    bounds = random_cuts(N, 6, random.Random(13), min_size=5)
    m = Moments.cat(chunks(x, y, bounds))
    total = m.total()
    for s, (lo, hi) in enumerate(bounds):
        keep = torch.cat([torch.arange(0, lo), torch.arange(hi, N)])
        check_total(total.remove(m.segment(s)), x[keep], y[keep])


# ---- (c) third-order slices of from_draws ------------------------------------------------------
def test_from_draws_third_slices_are_direct_sums():
    x, y = draws(14, n=200)
    m = Moments.from_draws(x, y)
    dx, dy = x - x.mean(0), y - y.mean(0)
    for a in range(KX):
        for b in range(KY):
            assert torch.isclose(m.t_xyy[0, a, b], (dx[:, a] * dy[:, b] ** 2).sum(), rtol=1e-12)
            assert torch.isclose(m.t_xxy[0, a, b], (dx[:, a] ** 2 * dy[:, b]).sum(), rtol=1e-12)
            assert torch.isclose(m.cxy[0, a, b], (dx[:, a] * dy[:, b]).sum(), rtol=1e-12)
    n = 200
    close(m.k3("xyy")[0], m.t_xyy[0] * n / ((n - 1) * (n - 2)), 1e-14)


def test_from_draws_without_third():
    x, y = draws(15, n=50)
    m = Moments.from_draws(x, y, third=False)
    assert not m.has_third and m.t_xyy is None and m.t_xxy is None
    with pytest.raises(suscept.ShapeError):
        m.k3("xyy")
    merged = m.merge(Moments.from_draws(x, y, third=False))
    assert merged.t_xyy is None


def test_from_draws_casts_to_float64():
    x, y = draws(16, n=40)
    m = Moments.from_draws(x.float(), y.float())
    assert m.cxy.dtype == torch.float64 and m.t_xyy.dtype == torch.float64


def test_from_draws_bad_shapes():
    x, y = draws(17, n=40)
    with pytest.raises(suscept.ShapeError):
        Moments.from_draws(x[None])
    with pytest.raises(suscept.ShapeError):
        Moments.from_draws(x, y[:-1])
    with pytest.raises(suscept.ShapeError):
        Moments.from_draws(x, y[:, 0])


# ---- (d) finalizers do not mutate -------------------------------------------------------------
def snapshot(m: Moments):
    return {f: getattr(m, f).clone() for f in FIELDS}


def test_finalizers_are_pure():
    x, y = draws(18)
    m = Moments.cat(chunks(x, y, random_cuts(N, 8, random.Random(18))))
    before = snapshot(m)
    first = [m.cov(), m.var_x(), m.var_y(), m.k3("xyy"), m.k3("xxy"), m.total().cov()]
    second = [m.cov(), m.var_x(), m.var_y(), m.k3("xyy"), m.k3("xxy"), m.total().cov()]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    tot = m.total()
    tot.remove(m.segment(0))
    tot.merge(m.segment(1))
    for f, v in before.items():
        assert torch.equal(getattr(m, f), v), f"{f} changed in place"


def test_estimators_on_moments_twice_identical():
    x, y = draws(19)
    m = as_moments(x.reshape(4, -1, KX), y.reshape(4, -1, KY), third=True)
    before = snapshot(m)
    for _ in range(2):
        outs = [suscept.bif(m), suscept.loss_kernel(m), suscept.third_cumulant(m, slice="xyy"),
                suscept.third_cumulant(m, slice="xxy"), suscept.variance_response(m)]
        exp = suscept.influence_expansion(m, beta=0.5)
        vals = [(o.value.clone(), o.stderr.clone()) for o in outs]
        vals += [(exp.second.value.clone(), exp.second.stderr.clone())]
        if _ == 0:
            ref = vals
    for (v1, s1), (v2, s2) in zip(ref, vals):
        assert torch.equal(v1, v2) and torch.equal(s1, s2)
    for f, v in before.items():
        assert torch.equal(getattr(m, f), v), f"{f} changed in place"


# ---- (e) cat of mismatched shapes -------------------------------------------------------------
def test_cat_mismatched_raises():
    x, y = draws(20, n=30)
    base = Moments.from_draws(x, y)
    with pytest.raises(suscept.ShapeError):
        Moments.cat([base, Moments.from_draws(x[:, :2], y)])  # kx differs
    with pytest.raises(suscept.ShapeError):
        Moments.cat([base, Moments.from_draws(x, y[:, :3])])  # ky differs
    with pytest.raises(suscept.ShapeError):
        Moments.cat([base, Moments.from_draws(x, y, third=False)])  # order differs
    with pytest.raises(suscept.ShapeError):
        Moments.cat([Moments.from_draws(x, y, third=False), base])
    with pytest.raises(suscept.ShapeError):
        Moments.cat([])
    ok = Moments.cat([base, base, base])
    assert ok.n_segments == 3 and ok.cxy.shape == (3, KX, KY)
