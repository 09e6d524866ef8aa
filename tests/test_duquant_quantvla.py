"""QuantVLA / openpi_duquant ``.npz`` packs: a writer in their field layout, our reader, bad packs."""
import json
import logging
import os
import re

import numpy as np
import pytest
import torch

from quantvla_fx.duquant import PackError, load_packs
from quantvla_fx.duquant import quantvla_npz
from quantvla_fx.duquant.quantvla_npz import read_quantvla_pack, sanitize_name
from quantvla_fx.duquant.transform import restore_output, rotate_weight_rows

F64 = torch.float64
GATE = "paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.gate_proj"
DOWN = "paligemma_with_expert.gemma_expert.model.layers.3.mlp.down_proj"
K, N, B, BO = 128, 64, 64, 32


# -- a writer in their layout (duquant_preprocess.pack_weight + save_pack, re-done in numpy) ----
def their_pack(w, block_size=B, block_out_size=BO, enable_permute=True, lambda_smooth=0.15, drop_in=(), drop_out=()):
    n, k = w.shape
    energy = np.mean(w ** 2, axis=0)
    energy = (1 - lambda_smooth) * energy + lambda_smooth * energy.mean()
    order = np.argsort(-energy)
    perm, lo, hi, left = [], 0, k - 1, True  # interleave from both ends of the sorted order
    while lo <= hi:
        if left:
            perm.append(order[lo])
            lo += 1
        else:
            perm.append(order[hi])
            hi -= 1
        left = not left
    perm = np.array(perm, dtype=np.int64) if enable_permute else None
    cols_of = (lambda b: perm[b * block_size:(b + 1) * block_size]) if enable_permute else (lambda b: np.arange(b * block_size, (b + 1) * block_size))
    r_in = {b: np.linalg.svd(w[:, cols_of(b)].T, full_matrices=True)[0] for b in range(k // block_size) if b not in drop_in}
    r_out = {b: np.linalg.svd(w[b * block_out_size:(b + 1) * block_out_size], full_matrices=True)[0]
             for b in range(n // block_out_size) if b not in drop_out}
    wt = w[:, perm] if enable_permute else w.copy()
    for b, r in r_in.items():
        wt[:, b * block_size:(b + 1) * block_size] = wt[:, b * block_size:(b + 1) * block_size] @ r
    data = {"weight_scale": (np.maximum(np.abs(wt).max(axis=1), 1e-8) / 7).astype(np.float32),
            "meta": json.dumps({"in_features": k, "out_features": n, "block_size": block_size,
                                "block_out_size": block_out_size, "enable_permute": enable_permute,
                                "lambda_smooth": lambda_smooth})}
    if perm is not None:
        data["perm"] = perm
    if r_in:
        data.update({f"Rin_{b}": r.astype(np.float32) for b, r in r_in.items()})
        data["R_in_blocks"] = np.array(sorted(r_in), dtype=np.int64)
    if r_out:
        data.update({f"Rout_{b}": r.astype(np.float32) for b, r in r_out.items()})
        data["R_out_blocks"] = np.array(sorted(r_out), dtype=np.int64)
    return data


def write(dirpath, fqn, data):
    path = os.path.join(dirpath, sanitize_name(fqn) + ".npz")
    np.savez(path, **data)  # np.savez pickles object arrays: used to plant one in a bad pack
    return path


def weight(seed, n=N, k=K):
    w = np.random.default_rng(seed).standard_normal((n, k))
    w[:, [3, 77]] *= 20  # energetic columns, so the permutation matters
    return w


@pytest.fixture
def pack_dir(tmp_path):
    ws = {GATE: weight(0), DOWN: weight(1)}
    write(tmp_path, GATE, their_pack(ws[GATE], drop_in=(1,)))  # a missing block = identity
    write(tmp_path, DOWN, their_pack(ws[DOWN]))
    return tmp_path, ws


def their_x_p_rin(x, data, block_size=B):
    """x P R_in exactly as their apply_input_transform does it (numpy, fp64 math)."""
    y = x[:, data["perm"]] if "perm" in data else x.copy()
    out = y.copy()
    for b in data.get("R_in_blocks", []):
        out[:, b * block_size:(b + 1) * block_size] = y[:, b * block_size:(b + 1) * block_size] @ data[f"Rin_{b}"].astype(np.float64)
    return out


def test_reader_reproduces_their_input_transform(pack_dir, caplog):
    d, ws = pack_dir
    quantvla_npz._logged_static_scales = False
    with caplog.at_level(logging.INFO, logger="quantvla_fx"):
        packs = load_packs(d)
    assert sum("static per-channel activation scales are ignored" in r.message for r in caplog.records) == 1
    assert set(packs) == {GATE, DOWN} and packs[GATE].group == GATE
    assert packs.meta["format"] == "quantvla_npz" and packs.meta["block_size"] == B
    x = np.random.default_rng(5).standard_normal((9, K))
    for fqn in (GATE, DOWN):
        lp = packs[fqn]
        data = dict(np.load(os.path.join(d, fqn + ".npz"), allow_pickle=False))
        t = lp.transform
        assert t.smooth is None and t.rot1 is None and t.rot2.shape == (K // B, B, B) and t.block_size == B
        assert lp.source == "quantvla_npz:" + os.path.join(str(d), fqn + ".npz") and lp.file.endswith(fqn + ".npz")
        ours = t.transform_activation(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ours, their_x_p_rin(x, data), rtol=0, atol=1e-12)
        np.testing.assert_array_equal(lp.weight_scale.numpy(), data["weight_scale"])
        assert lp.out_rot.shape == (N // BO, BO, BO)
    assert torch.equal(packs[GATE].transform.rot2[1], torch.eye(B))  # the dropped block


def test_their_transform_preserves_the_layer_output(pack_dir):
    d, ws = pack_dir
    packs = load_packs(d)
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((7, K)))
    for fqn, w_np in ws.items():
        lp, w = packs[fqn], torch.from_numpy(w_np)
        ref = x @ w.T
        w_in = lp.transform.transform_weight(w)
        xt = lp.transform.transform_activation(x)
        assert ((xt @ w_in.T) - ref).abs().max() <= 1e-9 * ref.abs().max()
        y = restore_output(xt @ rotate_weight_rows(w_in, lp.out_rot).T, lp.out_rot)  # "restore" mode
        assert (y - ref).abs().max() <= 1e-9 * ref.abs().max()
        # their stored scales are max|W P R_in| / 7: our weight basis is theirs
        np.testing.assert_allclose((w_in.abs().amax(1) / 7).numpy(), lp.weight_scale.numpy(), rtol=2e-5)


def test_check_model_names_the_npz_file(pack_dir):
    d, _ = pack_dir
    packs = load_packs(d)
    packs.check_model({GATE: (N, K), DOWN: (N, K)}, "pi05")
    with pytest.raises(PackError) as e:
        packs.check_model([GATE], "pi05")
    assert_names(e, os.path.join(d, DOWN + ".npz"), DOWN, "fqn")
    with pytest.raises(PackError) as e:  # wrong shape for the layer
        packs.check_model({GATE: (N, 2 * K), DOWN: (N, K)}, "pi05")
    assert_names(e, os.path.join(d, GATE + ".npz"), GATE, "in_features")
    with pytest.raises(PackError) as e:
        packs.check_model({GATE: (N, K), DOWN: (2 * N, K)}, "pi05")
    assert_names(e, os.path.join(d, DOWN + ".npz"), DOWN, "weight_scale")


def test_no_permutation_pack_loads(tmp_path):
    data = their_pack(weight(2), enable_permute=False, drop_out=(0, 1))
    path = write(tmp_path, GATE, data)
    lp = read_quantvla_pack(path)
    assert lp.transform.perm is None and lp.out_rot is None and lp.transform.rot2 is not None
    x = np.random.default_rng(0).standard_normal((3, K))
    np.testing.assert_allclose(lp.transform.transform_activation(torch.from_numpy(x)).numpy(), their_x_p_rin(x, data), atol=1e-12)


def assert_names(err, file, fqn, field):
    msg = str(err.value)
    assert os.fspath(file) in msg and fqn in msg and f"'{field}'" in msg, msg


def _set(**kv):
    return lambda d: {**d, **kv}


def _drop(*names):
    return lambda d: {k: v for k, v in d.items() if k not in names}


def _meta(**kv):
    return lambda d: {**d, "meta": json.dumps({**json.loads(str(d["meta"])), **kv})}


def _dup(p):
    p = p.copy()
    p[0] = p[1]
    return p


BAD = {
    "missing weight_scale": (_drop("weight_scale"), "weight_scale"),
    "missing meta": (_drop("meta"), "meta"),
    "missing listed Rin block": (_drop("Rin_1"), "Rin_1"),
    "missing perm": (_drop("perm"), "perm"),
    "missing block list": (_drop("R_out_blocks"), "R_out_blocks"),
    "weight_scale wrong length": (lambda d: {**d, "weight_scale": d["weight_scale"][:-1]}, "weight_scale"),
    "Rin wrong shape": (lambda d: {**d, "Rin_0": d["Rin_0"][:32, :32]}, "Rin_0"),
    "Rin not orthogonal": (lambda d: {**d, "Rin_0": d["Rin_0"] * 1.05}, "Rin_0"),
    "Rout not orthogonal": (lambda d: {**d, "Rout_1": d["Rout_1"] + 0.01}, "Rout_1"),
    "perm not a permutation": (lambda d: {**d, "perm": _dup(d["perm"])}, "perm"),
    "perm float": (lambda d: {**d, "perm": d["perm"].astype(np.float32)}, "perm"),
    "meta in_features disagrees": (_meta(in_features=2 * K), "perm"),
    "meta block size disagrees": (_meta(block_size=32), "Rin_0"),
    "meta block does not tile": (_meta(block_size=48), "meta"),
    "meta not JSON": (_set(meta="{not json"), "meta"),
    "meta missing key": (lambda d: {**d, "meta": json.dumps({"in_features": K})}, "meta"),
    "perm although permute is off": (_meta(enable_permute=False), "perm"),
    "block index out of range": (lambda d: {**d, "R_in_blocks": np.array([0, 1, 7])}, "R_in_blocks"),
    "unlisted block": (lambda d: {**d, "Rin_5": d["Rin_0"]}, "Rin_5"),
    "unknown field": (_set(extra=np.zeros(3)), "extra"),
    "pickled object": (_set(meta=np.array({"in_features": K}, dtype=object)), "meta"),
    "pickled rotation": (lambda d: {**d, "Rin_0": np.array([d["Rin_0"], None], dtype=object)}, "Rin_0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pack_is_refused_and_nothing_is_returned(tmp_path, case):
    edit, field = BAD[case]
    write(tmp_path, DOWN, their_pack(weight(1)))  # a good pack next to the bad one
    bad = write(tmp_path, GATE, edit(their_pack(weight(0))))
    with pytest.raises(PackError) as e:
        load_packs(tmp_path)
    assert_names(e, bad, GATE, field)
    if case.startswith("pickled"):
        assert "pickle" in str(e.value)


def test_not_an_npz(tmp_path):
    path = tmp_path / (GATE + ".npz")
    path.write_bytes(b"garbage, not a zip archive")
    with pytest.raises(PackError) as e:
        load_packs(path)
    assert_names(e, path, GATE, "file")


def test_sanitize_name_matches_theirs():
    assert sanitize_name(GATE) == GATE
    assert sanitize_name("a/b c..d") == "a_b_c.d"
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", sanitize_name("x[0]:y"))
