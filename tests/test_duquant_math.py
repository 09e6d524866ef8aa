"""DuQuant math: base rotation, greedy search, zigzag, smoothing, and the transform's exactness."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantvla_fx.duquant import DuQuantTransform, PackError
from quantvla_fx.duquant.permutation import block_maxima, zigzag_permutation
from quantvla_fx.duquant.rotation import givens_base, greedy_rotation, greedy_rotations, random_base, swap_index
from quantvla_fx.duquant.smooth import smooth_scales, weight_column_max
from quantvla_fx.duquant.transform import block_rotate, restore_output, rotate_weight_rows

F64 = torch.float64


def orth_err(r):
    r = r.to(F64)
    return (r @ r.transpose(-1, -2) - torch.eye(r.shape[-1], dtype=F64)).abs().max().item()


def random_orthogonal(n, b, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, b, b, generator=g, dtype=F64))
    return q.float()  # stored like a pack: fp32, so only orthogonal to ~1e-7


def outlier_rows(t, k, channels, seed=0, gain=(50.0, 100.0)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    lo, hi = gain
    x[:, channels] *= lo + (hi - lo) * torch.rand(len(channels), generator=g)
    return x


# -- base rotation --------------------------------------------------------------------------
def duquant_get_rot_literal(n):
    """A literal transcription of DuQuant's get_rot.py (dense Givens products, then the swap)."""
    r = torch.eye(n, dtype=F64)
    for i in range(n - 1):
        rot = torch.eye(n, dtype=F64)
        c, s = 1 / math.sqrt(i + 2), math.sqrt(i + 1) / math.sqrt(i + 2)
        rot[i, i] = rot[i + 1, i + 1] = c
        rot[i, i + 1] = -s
        rot[i + 1, i] = s
        r = rot @ r
    idx = list(range(n))
    idx[0], idx[n - 1] = idx[n - 1], idx[0]
    return r[idx][:, idx]


@pytest.mark.parametrize("n", [2, 8, 64])
def test_givens_base_matches_duquant_and_is_orthogonal(n):
    r = givens_base(n)
    torch.testing.assert_close(r, duquant_get_rot_literal(n), rtol=0, atol=1e-12)
    assert orth_err(r) < 1e-12
    torch.testing.assert_close(r[0], torch.full((n,), n ** -0.5, dtype=F64))  # row 0 uniform


def test_random_base_orthogonal_and_seeded():
    a = random_base(32, torch.Generator().manual_seed(1))
    b = random_base(32, torch.Generator().manual_seed(1))
    c = random_base(32, torch.Generator().manual_seed(2))
    assert orth_err(a) < 1e-12
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_swap_index_is_conjugation_by_a_transposition():
    r = torch.randn(6, 6, dtype=F64)
    p = torch.eye(6, dtype=F64)[[3, 1, 2, 0, 4, 5]]
    torch.testing.assert_close(swap_index(r, 0, 3), p @ r @ p)


# -- greedy search --------------------------------------------------------------------------
@pytest.mark.parametrize("exchange", ["column", "row"])
def test_greedy_rotation_reduces_peak_and_is_deterministic(exchange):
    b = 32
    x = outlier_rows(64, 4 * b, channels=[3, 40, 77])
    info = {}
    r = greedy_rotation(x, b, 48, torch.Generator().manual_seed(0), exchange, info)
    assert r.dtype == F64 and orth_err(r) < 1e-12
    y = block_rotate(x.to(F64), r[None])
    peak_after = (y.max() - y.min()).item()
    assert len(info["peaks"]) == 49
    assert peak_after == pytest.approx(min(info["peaks"]), rel=1e-4)  # the kept prefix is the argmin
    assert peak_after < info["peaks"][0] / 2  # outliers of 50-100x get spread over the block
    r2 = greedy_rotation(x, b, 48, torch.Generator().manual_seed(0), exchange)
    assert torch.equal(r, r2)
    r3 = greedy_rotation(x, b, 48, torch.Generator().manual_seed(1), exchange)
    assert not torch.equal(r, r3)


def scalar_greedy(x, b, steps, base, exchange):
    """The greedy search written out one step at a time (the batched search must equal it)."""
    xs, peaks, ids = x.float().reshape(-1, b), [], []
    for step in range(steps + 1):
        flat = xs.reshape(-1)
        imax, imin = int(flat.argmax()), int(flat.argmin())
        peaks.append(float(flat[imax]) - float(flat[imin]))
        pick = imax if abs(float(flat[imax])) > abs(float(flat[imin])) else imin
        ids.append(pick % b if exchange == "column" else (pick // b) % b)
        if step < steps:
            xs = xs @ swap_index(base.float(), 0, ids[-1])
    keep = min(range(len(peaks)), key=peaks.__getitem__)
    r = torch.eye(b, dtype=F64)
    for k in ids[:keep]:
        r = r @ swap_index(base, 0, k)
    return r, keep


@pytest.mark.parametrize("exchange", ["column", "row"])
def test_batched_greedy_rotations_equal_one_search_per_input(exchange):
    b = 32
    base = random_base(b, torch.Generator().manual_seed(3))
    xs = torch.stack([outlier_rows(48, 3 * b, channels=ch) for ch in ([3], [40, 77], [5, 6, 90], [])])
    rots, infos = greedy_rotations(xs, b, 24, base, exchange)
    for j in range(xs.shape[0]):
        r, keep = scalar_greedy(xs[j], b, 24, base, exchange)
        assert infos[j]["steps"] == keep and torch.equal(rots[j], r), j


def test_greedy_rotation_keeps_identity_when_nothing_helps():
    x = torch.zeros(8, 64)  # every peak is 0: argmin picks the empty prefix
    info = {}
    r = greedy_rotation(x, 32, 5, torch.Generator().manual_seed(0), info=info)
    assert info["steps"] == 0 and torch.equal(r, torch.eye(32, dtype=F64))
    assert torch.equal(greedy_rotation(torch.randn(4, 64), 32, 0, torch.Generator()), torch.eye(32, dtype=F64))


def test_greedy_rotation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="exchange"):
        greedy_rotation(torch.randn(4, 64), 32, 1, torch.Generator(), exchange="diag")
    with pytest.raises(ValueError, match="multiple"):
        greedy_rotation(torch.randn(4, 60), 32, 1, torch.Generator())


# -- zigzag -----------------------------------------------------------------------------------
def duquant_zigzag_literal(channel_max, block_size):
    """A transcription of DuQuant's permutation_zigzag (python lists and sorts)."""
    k = len(channel_max)
    pairs = sorted([(i, float(channel_max[i])) for i in range(k)], key=lambda p: p[1], reverse=True)
    blocks, cur, up = [[] for _ in range(k // block_size)], 0, True
    for p in pairs:
        blocks[cur].append(p)
        if up:
            cur += 1
            if cur == len(blocks):
                cur, up = cur - 1, False
        else:
            cur -= 1
            if cur == -1:
                cur, up = 0, True
    for blk in blocks:
        blk.sort(key=lambda p: p[1], reverse=True)
    return torch.tensor([i for blk in blocks for i, _ in blk])


@settings(max_examples=40, deadline=None)
@given(nb=st.integers(1, 6), b=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**16), ties=st.booleans())
def test_zigzag_is_duquants_permutation(nb, b, seed, ties):
    g = torch.Generator().manual_seed(seed)
    k = nb * b
    cm = torch.randint(0, 4, (k,), generator=g).float() if ties else torch.rand(k, generator=g)
    perm = zigzag_permutation(cm, b)
    assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(k))
    assert torch.equal(perm, duquant_zigzag_literal(cm, b))


def test_zigzag_balances_block_maxima():
    b, nb = 16, 4
    cm = torch.rand(b * nb)
    cm[[0, 1, 2, 3]] = torch.tensor([100.0, 90.0, 80.0, 70.0])  # all outliers in block 0
    before = block_maxima(cm, b)
    after = block_maxima(cm[zigzag_permutation(cm, b)], b)
    assert before.min() < 2 and after.min() >= 70  # each block now holds one outlier
    assert (after.max() - after.min()) < (before.max() - before.min())


# -- smoothing --------------------------------------------------------------------------------
def test_smooth_scales_formula_clamps_and_floor():
    act = torch.tensor([4.0, 100.0, 0.0, 1e-3])
    w = torch.tensor([0.25, 0.5, 2.0, 1.0])
    s = smooth_scales(act, w, alpha=0.6)
    expected = [4.0 ** 0.6 / 0.25 ** 0.4, 100.0 ** 0.6 / 0.5 ** 0.4, 1e-2, max(1e-3 ** 0.6, 1e-2)]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float32))
    assert s.dtype == torch.float32
    # alpha = 1: s = act_max (weights ignored); the floor is 1e-2 unless changed
    torch.testing.assert_close(smooth_scales(act, w, 1.0, floor=1e-5), torch.tensor([4.0, 100.0, 1e-5, 1e-3]))
    with pytest.raises(ValueError):
        smooth_scales(act, w, alpha=1.5)


def test_weight_column_max_over_group():
    a = torch.tensor([[1.0, -5.0], [2.0, 0.5]])
    b = torch.tensor([[-3.0, 1.0]])
    torch.testing.assert_close(weight_column_max([a, b]), torch.tensor([3.0, 5.0], dtype=F64))


# -- the transform ----------------------------------------------------------------------------
def make_transform(k, b, seed=0, shared=True, smooth=True, rot1=True, perm=True, rot2=True):
    g = torch.Generator().manual_seed(seed)
    nb = 1 if shared else k // b
    return DuQuantTransform(
        in_features=k, block_size=b,
        smooth=(torch.rand(k, generator=g) * 4 + 0.05) if smooth else None,
        rot1=random_orthogonal(nb, b, seed + 1) if rot1 else None,
        perm=torch.randperm(k, generator=g) if perm else None,
        rot2=random_orthogonal(nb, b, seed + 2) if rot2 else None,
    )


@settings(max_examples=30, deadline=None)
@given(nb=st.integers(1, 4), b=st.sampled_from([2, 8, 16]), n=st.integers(1, 9), lead=st.sampled_from([(5,), (2, 3), ()]),
       shared=st.booleans(), parts=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()), seed=st.integers(0, 999))
def test_transform_preserves_the_product_exactly_in_fp64(nb, b, n, lead, shared, parts, seed):
    k = nb * b
    t = make_transform(k, b, seed, shared, *parts)
    t.validate("test")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g, dtype=F64) * 10
    w = torch.randn(n, k, generator=g, dtype=F64)
    ref = x @ w.T
    got = t.transform_activation(x) @ t.transform_weight(w).T
    assert got.shape == ref.shape and got.dtype == F64
    assert (got - ref).abs().max().item() <= 1e-9 * max(ref.abs().max().item(), 1.0)


def test_weight_side_is_the_exact_inverse_and_rotations_are_orthogonal():
    k, b = 64, 16
    t = make_transform(k, b, seed=3, shared=False, smooth=False)
    eye = torch.eye(k, dtype=F64)
    m = t.transform_activation(eye)  # x~ = x M
    m_inv_t = t.transform_weight(eye)  # W~ = W M^-T
    torch.testing.assert_close(m @ m_inv_t.T, eye, rtol=0, atol=1e-12)
    assert orth_err(m) < 1e-5  # fp32-stored rotations: orthogonal up to storage precision
    torch.testing.assert_close(m_inv_t, m, rtol=0, atol=1e-5)  # and the inverse is ~ the same matrix


def test_transform_activation_is_smoothing_then_rotation_and_overrides():
    t = make_transform(32, 8, seed=5)
    x = torch.randn(3, 32, dtype=F64)
    torch.testing.assert_close(t.transform_activation(x), t.rotate_activation(x / t.smooth.to(F64)))
    manual = block_rotate(block_rotate(x, t.rot1.to(F64)).index_select(-1, t.perm), t.rot2.to(F64))
    torch.testing.assert_close(t.rotate_activation(x), manual)
    other = make_transform(32, 8, seed=6)
    torch.testing.assert_close(t.rotate_activation(x, other.rot1, other.perm, other.rot2), other.rotate_activation(x))


def test_block_rotate_matches_dense_block_diagonal():
    b, nb = 8, 3
    x = torch.randn(2, 5, b * nb, dtype=F64)
    per = random_orthogonal(nb, b, 0).to(F64)
    torch.testing.assert_close(block_rotate(x, per), x @ torch.block_diag(*per))
    torch.testing.assert_close(block_rotate(x, per[:1]), x @ torch.block_diag(*([per[0]] * nb)))
    torch.testing.assert_close(block_rotate(x[0, 0], per), x[0, 0] @ torch.block_diag(*per))  # 1-D input


def test_half_activation_is_rotated_in_fp32():
    t = make_transform(64, 16, seed=1)
    x = torch.randn(4, 64)
    y = t.transform_activation(x.to(torch.bfloat16))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, t.transform_activation(x.to(torch.bfloat16).float()))


def test_output_rotation_restores_the_product():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 20, generator=g, dtype=F64)
    x = torch.randn(7, 20, generator=g, dtype=F64)
    r_out = random_orthogonal(3, 16, 4).to(F64)
    y_t = x @ rotate_weight_rows(w, r_out).T
    torch.testing.assert_close(restore_output(y_t, r_out), x @ w.T, rtol=0, atol=1e-10)


def test_rotate_activation_traces_with_dynamic_tokens():
    t = make_transform(64, 16, seed=2, shared=False)
    fn = torch.compile(lambda x, r1, p, r2: t.rotate_activation(x, r1, p, r2), backend="eager", dynamic=True, fullgraph=True)
    for m in (3, 11):
        x = torch.randn(m, 64)
        torch.testing.assert_close(fn(x, t.rot1, t.perm, t.rot2), t.rotate_activation(x))


def test_fingerprint_is_content_based():
    a, b = make_transform(32, 8, seed=1), make_transform(32, 8, seed=1)
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 40
    assert a.fingerprint() != make_transform(32, 8, seed=2).fingerprint()
    assert a.fingerprint() != DuQuantTransform(32, 16, a.smooth, None, a.perm, None).fingerprint()
    before = a.fingerprint()
    a.smooth.mul_(2)  # in-place edits are seen (tensor version changes)
    assert a.fingerprint() != before


@pytest.mark.parametrize("field,mutate,needle", [
    ("smooth", lambda t: t.smooth.__setitem__(0, -1.0), "> 0"),
    ("smooth", lambda t: t.smooth.__setitem__(1, float("nan")), "NaN"),
    ("rot1", lambda t: t.rot1.mul_(1.01), "not orthogonal"),
    ("rot2", lambda t: setattr(t, "rot2", torch.eye(16)[None]), "shape"),
    ("perm", lambda t: t.perm.__setitem__(0, t.perm[1].item()), "not a permutation"),
    ("perm", lambda t: setattr(t, "perm", t.perm[:-1]), "shape"),
    ("block_size", lambda t: setattr(t, "block_size", 12), "multiple"),
])
def test_validate_names_where_and_field(field, mutate, needle):
    t = make_transform(32, 8, seed=0)
    t.validate("packs.safetensors: layer a.b")
    mutate(t)
    with pytest.raises(PackError) as e:
        t.validate("packs.safetensors: layer a.b")
    msg = str(e.value)
    assert "packs.safetensors: layer a.b" in msg and f"'{field}'" in msg and needle in msg
    assert e.value.field == field
