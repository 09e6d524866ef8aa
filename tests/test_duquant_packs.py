"""Our safetensors pack format: round trip, shared groups, and refusal of bad packs."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantvla_fx.duquant import DuQuantTransform, LayerPack, PackError, Packs, load_packs
from quantvla_fx.duquant.packs import PACK_FILENAME

GATE, UP = "m.layers.0.mlp.gate_proj", "m.layers.0.mlp.up_proj"
DOWN, O = "m.layers.0.mlp.down_proj", "m.layers.0.self_attn.o_proj"
GU = "m.layers.0.mlp.{gate_proj,up_proj}"
SHAPES = {GATE: (96, 64), UP: (96, 64), DOWN: (64, 128), O: (32, 64)}


def orthogonal(n, b, seed):
    q, _ = torch.linalg.qr(torch.randn(n, b, b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def make_packs():
    g = torch.Generator().manual_seed(0)
    shared = DuQuantTransform(64, 16, smooth=torch.rand(64, generator=g) + 0.1, rot1=orthogonal(1, 16, 1),
                              perm=torch.randperm(64, generator=g), rot2=orthogonal(1, 16, 2))
    down = DuQuantTransform(128, 16, smooth=torch.rand(128, generator=g) + 0.1, perm=torch.randperm(128, generator=g))
    o = DuQuantTransform(64, 32, rot2=orthogonal(2, 32, 3))
    layers = [
        LayerPack(GATE, shared, GU, weight_clip=0.8),
        LayerPack(UP, shared, GU, weight_clip=0.8),
        LayerPack(DOWN, down, DOWN),
        LayerPack(O, o, O, out_rot=orthogonal(2, 16, 4), weight_scale=torch.rand(32, generator=g) + 0.01, source="test"),
    ]
    return Packs(layers, meta={"format_version": 1, "block_size": 16, "alpha": 0.6, "bits": "w4a8", "source": "test"})


def assert_names(err, file, fqn, field):
    msg = str(err.value)
    assert os.fspath(file) in msg, msg
    assert fqn in msg, msg
    assert f"'{field}'" in msg, msg


def rewrite(src, dst, tensors=lambda t: t, metadata=lambda m: m):
    with safe_open(src, framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = dict(f.metadata())
    save_file(tensors(t), dst, metadata=metadata(m))
    return dst


@pytest.fixture
def saved(tmp_path):
    packs = make_packs()
    return packs, packs.save(tmp_path / "p.safetensors")


def test_round_trip_keeps_tensors_groups_and_identity(saved, tmp_path):
    packs, path = saved
    back = Packs.load(path)
    assert list(back) == list(packs) and back.meta == packs.meta and back.path == path
    assert back[GATE].transform is back[UP].transform  # one object per group after a load
    assert back[GATE].transform is not back[DOWN].transform
    assert back.groups.keys() == packs.groups.keys() and back.members(GU) == [GATE, UP]
    for fqn, lp in packs.items():
        got = back[fqn]
        assert (got.group, got.weight_clip, got.source) == (lp.group, lp.weight_clip, lp.source)
        assert (got.transform.in_features, got.transform.block_size) == (lp.transform.in_features, lp.transform.block_size)
        for name, t in lp.transform.tensors().items():
            u = got.transform.tensors()[name]
            assert (t is None and u is None) or (t.dtype == u.dtype and torch.equal(t, u)), (fqn, name)
        for name in ("out_rot", "weight_scale"):
            t, u = getattr(lp, name), getattr(got, name)
            assert (t is None and u is None) or torch.equal(t, u)
    assert back.fingerprint() == packs.fingerprint()
    # the same file through load_packs: a file path, its directory, or a Packs object
    assert load_packs(path).fingerprint() == packs.fingerprint()
    assert load_packs(tmp_path).fingerprint() == packs.fingerprint()
    assert load_packs(back) is back
    # a directory argument to save() writes the default file name
    d = tmp_path / "dir"
    d.mkdir()
    assert packs.save(d) == os.path.join(d, PACK_FILENAME)
    reloaded = Packs.load(d)
    assert reloaded[UP].transform is reloaded[GATE].transform


def test_metadata_is_plain_json(saved):
    _, path = saved
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "quantvla_fx.duquant" and meta["format_version"] == "2"  # 2: GPTQ rounding + search record
    assert (meta["block_size"], meta["alpha"], meta["bits"], meta["source"]) == ("16", "0.6", "w4a8", "test")
    assert json.loads(meta["layers"])[GATE] == {"group": GU, "weight_clip": 0.8, "source": "quantvla_fx"}
    assert f"group.{GU}.rot1" in keys and f"layer.{O}.out_rot" in keys and f"group.{DOWN}.rot1" not in keys


def test_check_model(saved):
    packs, path = saved
    back = Packs.load(path)
    back.check_model(SHAPES.keys(), "toy")
    back.check_model(SHAPES, "toy")
    with pytest.raises(PackError) as e:
        back.check_model([GATE, UP, DOWN], "toy model")
    assert_names(e, path, O, "fqn")
    assert "toy model" in str(e.value)
    with pytest.raises(PackError) as e:  # wrong shape for the layer
        back.check_model({**SHAPES, DOWN: (64, 256)}, "toy")
    assert_names(e, path, DOWN, "in_features")
    with pytest.raises(PackError) as e:
        back.check_model({**SHAPES, O: torch.nn.Linear(64, 48)}, "toy")
    assert_names(e, path, O, "weight_scale")


def _bump(name, fn):
    def edit(t):
        t[name] = fn(t[name])
        return t
    return edit


def _dup_perm(p):
    p = p.clone()
    p[0] = p[1]
    return p


BAD = {
    "non-orthogonal rotation": (dict(tensors=_bump(f"group.{GU}.rot1", lambda r: r * 1.02)), GATE, "rot1"),
    "perm not a permutation": (dict(tensors=_bump(f"group.{DOWN}.perm", _dup_perm)), DOWN, "perm"),
    "wrong perm length": (dict(tensors=_bump(f"group.{DOWN}.perm", lambda p: p[:64].contiguous())), DOWN, "perm"),
    "wrong rotation shape": (dict(tensors=_bump(f"group.{GU}.rot2", lambda r: torch.eye(8)[None])), UP, "rot2"),
    "non-orthogonal out_rot": (dict(tensors=_bump(f"layer.{O}.out_rot", lambda r: r * 0.5)), O, "out_rot"),
    "missing group": (dict(metadata=lambda m: {**m, "groups": json.dumps({k: v for k, v in json.loads(m["groups"]).items() if k != DOWN})}), DOWN, "group"),
    "missing layers map": (dict(metadata=lambda m: {k: v for k, v in m.items() if k != "layers"}), "(all layers)", "layers"),
    "unknown tensor": (dict(tensors=lambda t: {**t, f"layer.{GATE}.bias": torch.zeros(3)}), GATE, f"layer.{GATE}.bias"),
    "future version": (dict(metadata=lambda m: {**m, "format_version": "99"}), "(all layers)", "format_version"),
    "bad clip": (dict(metadata=lambda m: {**m, "layers": m["layers"].replace('"weight_clip": 0.8', '"weight_clip": 1.5', 1)}), GATE, "weight_clip"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pack_is_refused_naming_file_fqn_field(saved, tmp_path, case):
    _, path = saved
    edits, fqn, field = BAD[case]
    bad = rewrite(path, str(tmp_path / "bad.safetensors"), **edits)
    with pytest.raises(PackError) as e:
        load_packs(bad)
    assert_names(e, bad, fqn, field)


def test_constructor_refuses_inconsistent_groups():
    a, b = DuQuantTransform(16, 16), DuQuantTransform(16, 16)
    with pytest.raises(PackError, match="'group'"):
        Packs([LayerPack("x.a", a, "g"), LayerPack("x.b", b, "g")])
    with pytest.raises(PackError, match="'group'"):
        Packs([LayerPack("x.a", a, "g1"), LayerPack("x.b", a, "g2")])
    with pytest.raises(PackError, match="twice"):
        Packs([LayerPack("x.a", a, "g"), LayerPack("x.a", a, "g")])


def test_load_packs_refuses_bad_paths(tmp_path, saved):
    _, path = saved
    with pytest.raises(PackError, match="no such file"):
        load_packs(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PackError, match="no .safetensors"):
        load_packs(empty)
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(PackError, match="both"):
        load_packs(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PackError) as e:
        load_packs(junk)
    assert_names(e, junk, "(all layers)", "header")
