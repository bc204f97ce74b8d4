"""PyTorch checkpoint conversion both ways: HF and mistral-inference layouts, safety and error handling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.cli import convert as cli
from mistral_jax.checkpoint import native as checkpoint
from mistral_jax.checkpoint import torch_write
from mistral_jax.checkpoint.native_meta import read_native_meta
from mistral_jax.errors import CheckpointError
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.param_tree import flat_params
from mistral_jax.model.transformer import forward, param_shardings
from mistral_jax.model.sharding import make_mesh
from mistral_jax.checkpoint.weights import tensor_specs
from tests import hf_ref
from tests import mistral_ref

SEQ = 48  # longer than the sliding window (16) of the reference models
TOL = 1e-4


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(2, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_logits(hf_gqa, tokens) -> np.ndarray:
    return hf_gqa.logits(tokens)


def _jax_logits(cfg: ModelConfig, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(forward(params, jnp.asarray(tokens), cfg))


def _hf_from_pretrained_logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    import torch
    from transformers import MistralForCausalLM
    model = MistralForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _mistral_state_dict(hf: hf_ref.HFRef, cfg: ModelConfig) -> dict:
    """The HF reference's weights in the mistral-inference layout, mapped through weights.tensor_specs."""
    import torch
    sd = hf.state_dict()
    ours = {(s.path, s.layer): s.to_ours(sd[s.key]) for s in tensor_specs(cfg, "hf")}
    return {s.key: torch.from_numpy(np.ascontiguousarray(s.from_ours(ours[s.path, s.layer])))
            for s in tensor_specs(cfg, "mistral")}


@pytest.fixture(scope="module")
def mistral_dirs(hf_gqa, tmp_path_factory) -> dict[str, Path]:
    """The HF reference written in the mistral-inference layout as .safetensors and as .pth.

    Both params.json files lack rope_theta (as v0.1's does) and give the window as a string."""
    import safetensors.torch
    import torch
    cfg = ModelConfig.from_hf_config(hf_gqa.path / "config.json")
    sd = _mistral_state_dict(hf_gqa, cfg)
    params_json = cfg.to_params_json()
    del params_json["rope_theta"]
    params_json["sliding_window"] = str(cfg.sliding_window)
    dirs = {}
    for kind in ("safetensors", "pth"):
        d = tmp_path_factory.mktemp(f"mistral_{kind}")
        (d / "params.json").write_text(json.dumps(params_json))
        if kind == "pth":
            torch.save(sd, d / "consolidated.00.pth")
        else:
            safetensors.torch.save_file(sd, d / "consolidated.safetensors")
        dirs[kind] = d
    return dirs


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---------- 1. HF round trip ----------

def test_hf_single_file_round_trip(hf_gqa, tokens, hf_logits, tmp_path, capsys):
    assert (hf_gqa.path / "model.safetensors").is_file()
    native, out = tmp_path / "native", tmp_path / "hf_out"
    assert cli.main([str(hf_gqa.path), str(native), "--quiet"]) == 0
    cfg, params = checkpoint.load_params(native)
    assert cfg.sliding_window == 16 and cfg.rope_theta == 10000.0
    np.testing.assert_allclose(_jax_logits(cfg, params, tokens), hf_logits, atol=TOL, rtol=0)
    assert cli.main(["--to", "hf", str(native), str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["dtype"] == hf_cfg["torch_dtype"] == "float32"  # transformers 5 and 4.x names
    np.testing.assert_allclose(_hf_from_pretrained_logits(out, tokens), hf_logits, atol=TOL, rtol=0)
    assert _leftovers(tmp_path, "native") == [] and _leftovers(tmp_path, "hf_out") == []


def test_hf_sharded_round_trip_onto_mesh(tmp_path, tokens):
    hf = hf_ref.make_hf_model(tmp_path / "src", n_heads=8, n_kv_heads=2, window=16, seed=3,
                              max_shard_size="40KB")
    assert (hf.path / "model.safetensors.index.json").is_file()
    want = hf.logits(tokens)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    cfg, params = checkpoint.load_params(hf.path, mesh=mesh, progress=False)
    expected = param_shardings(cfg, mesh)
    for got, sh in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
        assert got.sharding.is_equivalent_to(sh, got.ndim)
    np.testing.assert_allclose(_jax_logits(cfg, params, tokens), want, atol=TOL, rtol=0)
    out = torch_write.write_hf(tmp_path / "out", cfg, params, max_shard_size="40KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    np.testing.assert_allclose(_hf_from_pretrained_logits(out, tokens), want, atol=TOL, rtol=0)


def test_native_round_trip_bfloat16_sharded(hf_gqa, tmp_path):
    """A native checkpoint restores straight into shardings and a different dtype."""
    cfg, params = checkpoint.load_params(hf_gqa.path, dtype=jnp.bfloat16, progress=False)
    checkpoint.save_params(tmp_path / "n", cfg, params)
    assert json.loads((tmp_path / "n" / "config.json").read_text())["param_dtype"] == "bfloat16"
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg2, back = checkpoint.load_params(tmp_path / "n", mesh=mesh, dtype=None)
    assert cfg2 == cfg
    expected = param_shardings(cfg, mesh)
    for a, b, sh in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back),
                        jax.tree_util.tree_leaves(expected)):
        assert b.dtype == jnp.bfloat16 and b.sharding.is_equivalent_to(sh, b.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, wide = checkpoint.load_params(tmp_path / "n", mesh=mesh)  # verified in bfloat16, then cast per param
    for a, b, sh in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(wide),
                        jax.tree_util.tree_leaves(expected)):
        assert b.dtype == jnp.float32 and b.sharding.is_equivalent_to(sh, b.ndim)
        np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b))


# ---------- 2. mistral-inference layout ----------

@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_mistral_layout_in(mistral_dirs, kind, tokens, hf_logits, tmp_path, capsys):
    src = mistral_dirs[kind]
    assert cli.main([str(src), str(tmp_path / "n"), "--quiet"]) == 0
    assert "inferred 10000.0" in capsys.readouterr().out  # v0.1 rule, reported to the user
    cfg, params = checkpoint.load_params(tmp_path / "n")
    assert cfg.rope_theta == 10000.0 and cfg.sliding_window == 16
    np.testing.assert_allclose(_jax_logits(cfg, params, tokens), hf_logits, atol=TOL, rtol=0)


def test_mistral_inference_oracle_and_export(mistral_dirs, tokens, hf_logits, tmp_path):
    src = tmp_path / "with_theta"  # mistral-inference would default a missing rope_theta to 1e6
    shutil.copytree(mistral_dirs["safetensors"], src)
    pj = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps(pj | {"rope_theta": 10000.0, "sliding_window": 16}))
    mi = mistral_ref.mi_logits(mistral_ref.load_mi(src), tokens.tolist())
    np.testing.assert_allclose(np.stack(mi), hf_logits, atol=TOL, rtol=0)
    chunked = mistral_ref.mi_logits(mistral_ref.load_mi(src), tokens.tolist(), chunk_size=10)
    np.testing.assert_allclose(np.stack(chunked), hf_logits, atol=TOL, rtol=0)

    cfg, params = checkpoint.load_params(mistral_dirs["pth"], progress=False)
    out = tmp_path / "mistral_out"
    torch_write.write_mistral(out, cfg, params, progress=False)
    assert json.loads((out / "params.json").read_text())["rope_theta"] == 10000.0
    back = mistral_ref.mi_logits(mistral_ref.load_mi(out), tokens.tolist())
    np.testing.assert_allclose(np.stack(back), hf_logits, atol=TOL, rtol=0)


# ---------- 3. malicious pickle ----------

class _Payload:
    """Unpickling this calls Path.touch(marker): harmless, but it is code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pth_is_refused(mistral_dirs, tmp_path):
    import torch
    live, marker = tmp_path / "live_marker", tmp_path / "marker"
    torch.save({"x": _Payload(live)}, tmp_path / "live.pth")
    torch.load(tmp_path / "live.pth", weights_only=False)  # proves the payload really runs when unpickled
    assert live.exists()

    src = tmp_path / "evil"
    src.mkdir()
    shutil.copy(mistral_dirs["pth"] / "params.json", src / "params.json")
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": _Payload(marker)}, src / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: refused to load"):
        checkpoint.load_params(src, progress=False)
    assert not marker.exists()
    assert cli.main([str(src), str(tmp_path / "dst"), "--quiet"]) == 1
    assert not marker.exists() and not (tmp_path / "dst").exists()


# ---------- 4. errors name the culprit and leave DST clean ----------

def _broken_hf(hf: hf_ref.HFRef, folder: Path, case: str) -> str:
    """Writes a broken copy of the HF reference into `folder`; returns the culprit the error must name."""
    import safetensors.torch
    import torch
    folder.mkdir()
    sd = {k: torch.from_numpy(v) for k, v in hf.state_dict().items()}
    config = json.loads((hf.path / "config.json").read_text())
    culprit = ""
    if case == "missing":
        culprit = "model.layers.1.mlp.up_proj.weight"
        del sd[culprit]
    elif case == "unexpected":
        culprit = "model.layers.0.self_attn.q_proj.bias"
        sd[culprit] = torch.zeros(128)
    elif case == "shape":
        culprit = "model.layers.1.self_attn.k_proj.weight"
        sd[culprit] = torch.zeros(16, 64)
    elif case == "config":
        config["intermediate_size"] = 96  # tensors say 128
        culprit = "model.layers.0.mlp.gate_proj.weight"
    safetensors.torch.save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    if case == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        header.pop("__metadata__", None)
        culprit = max(header, key=lambda k: header[k]["data_offsets"][1])  # the tensor stored last loses its tail
        (folder / "model.safetensors").write_bytes(data[:-100])
    return culprit


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "config", "truncated"])
def test_errors_name_culprit_and_leave_dst_clean(hf_gqa, tmp_path, capsys, case):
    culprit = _broken_hf(hf_gqa, tmp_path / "src", case)
    dst = tmp_path / "dst"
    assert cli.main([str(tmp_path / "src"), str(dst), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert f"'{culprit}'" in err, err
    if case == "config":
        assert "config" in err
    if case == "truncated":
        assert "truncated" in err and "model.safetensors" in err
    assert not dst.exists() and _leftovers(tmp_path, "dst") == []


def test_truncated_pth_and_existing_dst(mistral_dirs, hf_gqa, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(mistral_dirs["pth"], src)
    data = (src / "consolidated.00.pth").read_bytes()
    (src / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    assert cli.main([str(src), str(tmp_path / "dst"), "--quiet"]) == 1
    assert "consolidated.00.pth" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()

    dst = tmp_path / "busy"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert cli.main(["--to", "mistral", str(hf_gqa.path), str(dst), "--quiet"]) == 1
    assert "not empty" in capsys.readouterr().err and (dst / "keep.txt").exists()
    # --force replaces only a folder that is itself a checkpoint
    assert cli.main(["--to", "mistral", str(hf_gqa.path), str(dst), "--quiet", "--force"]) == 1
    err = capsys.readouterr().err
    assert "not a checkpoint folder" in err and str(dst) in err and (dst / "keep.txt").exists()
    shutil.copytree(mistral_dirs["pth"], dst, dirs_exist_ok=True)  # now it is a mistral-inference checkpoint
    assert cli.main(["--to", "mistral", str(hf_gqa.path), str(dst), "--quiet", "--force"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["consolidated.safetensors", "params.json"]
    assert _leftovers(tmp_path, "busy") == []


def test_hf_pytorch_bin_and_bf16_safetensors(hf_gqa, tmp_path):
    """bf16 tensors read the same from pytorch_model.bin (torch, mmap) and model.safetensors (library)."""
    import ml_dtypes
    import safetensors.torch
    import torch
    sd = {k: torch.from_numpy(v).bfloat16() for k, v in hf_gqa.state_dict().items()}
    for name in ("bin", "st"):
        (tmp_path / name).mkdir()
        shutil.copy(hf_gqa.path / "config.json", tmp_path / name / "config.json")
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    safetensors.torch.save_file(sd, tmp_path / "st" / "model.safetensors", metadata={"format": "pt"})
    cfg, ref = checkpoint.load_params(hf_gqa.path, progress=False)
    for name in ("bin", "st"):
        _, got = checkpoint.load_params(tmp_path / name, dtype=None, progress=False)
        for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
            assert b.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(a).astype(ml_dtypes.bfloat16), np.asarray(b))


# ---------- 5. destinations: containment, symlinks, cwd, interrupts, permissions ----------

def test_force_never_deletes_the_source(hf_gqa, tmp_path, capsys):
    """DST that contains SRC (directly or through a symlink) or lies inside it is refused, --force or not."""
    m = tmp_path / "m"
    shutil.copytree(hf_gqa.path, m / "src")
    (m / "notes.txt").write_text("keep")
    (tmp_path / "link").symlink_to(m)
    before = sorted(p.name for p in (m / "src").iterdir())
    for dst, word in ((m, "contains"), (tmp_path / "link", "contains"), (m / "src", "contains"),
                      (m / "src" / "out", "lies inside")):
        assert cli.main([str(m / "src"), str(dst), "--quiet", "--force"]) == 1
        err = capsys.readouterr().err
        assert f"{dst}: destination {word} the source" in err, err
    assert sorted(p.name for p in (m / "src").iterdir()) == before and (m / "notes.txt").exists()


@pytest.fixture(scope="module")
def native_ckpt(hf_gqa, tmp_path_factory) -> Path:
    """The HF reference as a native float32 checkpoint (copy it before changing it)."""
    dst = tmp_path_factory.mktemp("native") / "n"
    assert cli.main([str(hf_gqa.path), str(dst), "--quiet"]) == 0
    return dst


def test_dangling_symlink_and_symlink_to_dir_are_written_through(native_ckpt, tmp_path):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "real" / "ckpt")  # target and its parent do not exist yet
    assert cli.main(["--to", "mistral", str(native_ckpt), str(dangling), "--quiet"]) == 0
    assert dangling.is_symlink() and (tmp_path / "real" / "ckpt" / "params.json").is_file()

    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert cli.main(["--to", "hf", str(native_ckpt), str(link), "--quiet"]) == 0
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    assert cli.main(["--to", "hf", str(native_ckpt), str(link), "--quiet", "--force"]) == 0  # replace again
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    hidden = [p.name for d in (tmp_path, tmp_path / "real") for p in d.iterdir() if p.name.startswith(".")]
    assert hidden == []


def test_dot_as_dst_with_force(native_ckpt, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(native_ckpt, work)  # an existing checkpoint, so --force may replace it
    monkeypatch.chdir(work)
    assert cli.main(["--to", "mistral", str(native_ckpt), ".", "--quiet", "--force"]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["consolidated.safetensors", "params.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("where", ["orbax_save", "orbax_wait", "final_rename"])
def test_interrupt_leaves_no_hidden_folder(native_ckpt, tmp_path, monkeypatch, where):
    """Ctrl-C during the orbax save (after it, or while the main thread waits on orbax's writer thread)
    or during the final rename: no temp folder is left and an old DST survives."""
    import threading

    import orbax.checkpoint as ocp
    cfg, params = checkpoint.load_params(native_ckpt, progress=False)
    dst = tmp_path / "dst"
    shutil.copytree(native_ckpt, dst)
    if where == "orbax_save":
        real_save = ocp.Checkpointer.save

        def save(self, *a, **kw):
            real_save(self, *a, **kw)
            raise KeyboardInterrupt
        monkeypatch.setattr(ocp.Checkpointer, "save", save)
    elif where == "orbax_wait":  # as a real SIGINT: the main thread's join is interrupted, the writer goes on
        real_join, hit = threading.Thread.join, []

        def join(self, *a, **kw):
            if not hit and threading.current_thread() is threading.main_thread():
                hit.append(self)
                raise KeyboardInterrupt
            return real_join(self, *a, **kw)
        monkeypatch.setattr(threading.Thread, "join", join)
    else:
        real_replace = os.replace

        def replace(a, b):
            if Path(a).name.startswith(".dst.tmp-"):
                raise KeyboardInterrupt
            return real_replace(a, b)
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_params(dst, cfg, params, force=True)
    monkeypatch.undo()
    if where == "orbax_wait":
        assert hit, "the save never waited on a thread"
        for t in threading.enumerate():  # writer threads a broken fix left running must not hide a leak
            if t is not threading.main_thread() and not t.daemon and t.is_alive():   # (started)
                t.join(timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    checkpoint.load_params(dst, progress=False)  # the old checkpoint is intact


def test_output_mode_follows_umask(native_ckpt, tmp_path):
    old = os.umask(0o027)
    try:
        checkpoint.save_params(tmp_path / "a", *checkpoint.load_params(native_ckpt, progress=False))
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o750


# ---------- 6. integrity: checksums, NaN/inf, float16 range ----------

def _corrupt_value(folder: Path, param: str, cfg: ModelConfig, params, value: float) -> None:
    """Overwrites the first element of `param` inside the orbax data files (stored raw, uncompressed)."""
    x = np.asarray(flat_params(params)[param])
    raw = x.tobytes()
    hits = [f for f in (folder / "params").rglob("*") if f.is_file() and raw in f.read_bytes()]
    assert len(hits) == 1, hits
    data = bytearray(hits[0].read_bytes())
    i = data.find(raw)
    data[i:i + x.itemsize] = np.array([value], x.dtype).tobytes()
    hits[0].write_bytes(bytes(data))


@pytest.mark.parametrize("value", [0.123, float("nan")])
def test_native_checksum_catches_corruption(native_ckpt, tmp_path, value, capsys):
    src = tmp_path / "n"
    shutil.copytree(native_ckpt, src)
    cfg, params = checkpoint.load_params(src, progress=False)
    param = "layers/feed_forward/w3"
    _corrupt_value(src, param, cfg, params, value)
    with pytest.raises(CheckpointError, match=f"param '{param}' does not match its sha256 checksum"):
        checkpoint.load_params(src, progress=False)
    # orbax/tensorstore do not notice: without our checksums the changed value loads
    if value == value:
        _, got = checkpoint.load_params(src, progress=False, verify=False)
        assert float(np.asarray(got["layers"]["feed_forward"]["w3"]).reshape(-1)[0]) == pytest.approx(value)
    else:
        with pytest.raises(CheckpointError, match=f"tensor '{param}' holds 1 non-finite"):
            checkpoint.load_params(src, progress=False, verify=False)
        checkpoint.load_params(src, progress=False, verify=False, allow_nonfinite=True)
    assert cli.main([str(src), str(tmp_path / "out"), "--quiet"]) == 1
    assert param in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("version", [1, 2, 4, "3", True, None])
def test_other_format_versions_are_refused_in_one_line(native_ckpt, tmp_path, capsys, version):
    """Only native format version 3 is read: any other value of the marker (the unreleased per-layer versions
    1-2 included) is refused naming the field and the version read, verified or not."""
    old = tmp_path / "old"
    shutil.copytree(native_ckpt, old)
    meta = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(meta | {"mistral_jax_format": version}))
    want = f"{old / 'config.json'}: field 'mistral_jax_format' is {version!r}, this library reads version(s) 3"
    for verify in (True, False):
        with pytest.raises(CheckpointError) as e:
            checkpoint.load_params(old, progress=False, verify=verify)
        assert str(e.value) == want
    assert cli.main([str(old), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "field 'mistral_jax_format'" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_nonfinite_source_refused_unless_allowed(hf_gqa, tmp_path, capsys):
    import safetensors.torch
    import torch
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(hf_gqa.path / "config.json", src / "config.json")
    sd = {k: torch.from_numpy(v) for k, v in hf_gqa.state_dict().items()}
    culprit = "model.layers.1.mlp.down_proj.weight"
    sd[culprit][3, 5] = float("inf")
    safetensors.torch.save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    assert cli.main([str(src), str(tmp_path / "dst"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"tensor '{culprit}' holds 1 non-finite" in err and "--allow-nonfinite" in err
    assert not (tmp_path / "dst").exists()
    assert cli.main([str(src), str(tmp_path / "dst"), "--quiet", "--allow-nonfinite"]) == 0
    _, params = checkpoint.load_params(tmp_path / "dst", progress=False, allow_nonfinite=True)
    w2 = np.asarray(params["layers"]["feed_forward"]["w2"])
    assert np.isinf(w2).sum() == 1 and np.isinf(w2[1, 5, 3])   # layer 1's (out=3, in=5), transposed


def test_float16_overflow_refused(native_ckpt, tmp_path, capsys):
    cfg, params = checkpoint.load_params(native_ckpt, progress=False)
    params["layers"]["attention"]["wv"] = params["layers"]["attention"]["wv"].at[0, 0, 0, 0].set(1e5)
    big = tmp_path / "big"
    checkpoint.save_params(big, cfg, params)
    for to in ("hf", "mistral", "native"):
        assert cli.main(["--to", to, str(big), str(tmp_path / to), "--dtype", "float16", "--quiet"]) == 1
        err = capsys.readouterr().err
        assert "max |value| 100000" in err and "float16" in err and not (tmp_path / to).exists(), err
        assert "layers/attention/wv" in err
    for write, key in ((torch_write.write_hf, "model.layers.0.self_attn.v_proj.weight"),
                       (torch_write.write_mistral, "layers.0.attention.wv.weight")):
        with pytest.raises(CheckpointError, match=rf"tensor '{key}' has max \|value\| 100000.*float16"):
            write(tmp_path / "w", cfg, params, dtype="float16", progress=False)
        assert not (tmp_path / "w").exists()
    assert cli.main(["--to", "hf", str(big), str(tmp_path / "hf"), "--dtype", "float16", "--quiet",
                     "--allow-nonfinite"]) == 0


# ---------- 7. tokenizer files in exports ----------

@pytest.fixture(scope="module")
def tiny_32k() -> tuple[ModelConfig, dict]:
    """A one-layer model with Mistral's v1 vocab (32000), random float32 params."""
    from flax import linen as nn

    from mistral_jax.model.transformer import abstract_params
    cfg = ModelConfig.preset("tiny").replace(n_layers=1, dim=16, n_heads=2, n_kv_heads=1, head_dim=8, hidden_dim=32)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: (rng.standard_normal(a.shape) * 0.02).astype(np.float32),
                                    nn.unbox(abstract_params(cfg)))
    return cfg, params


def test_hf_export_tokenizer_loads_in_transformers(tiny_32k, tmp_path, monkeypatch):
    import sentencepiece as spm
    from transformers import AutoTokenizer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, params = tiny_32k
    out = torch_write.write_hf(tmp_path / "hf", cfg, params, progress=False)
    assert {"tokenizer.model", "tokenizer_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    sp = spm.SentencePieceProcessor(model_file=str(torch_write.tokenizer_for_vocab(32000)))
    text = "Hello world, this is Mistral."
    want = [sp.bos_id()] + sp.encode(text)
    assert want[:3] == [1, 22557, 1526]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(text)["input_ids"] == want
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert [p.name for p in out.iterdir() if p.name.startswith(".") or p.is_dir()] == []

    mistral = torch_write.write_mistral(tmp_path / "mi", cfg, params, progress=False)
    assert (mistral / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    none = torch_write.write_hf(tmp_path / "none", cfg, params, progress=False, tokenizer=None)
    assert not (none / "tokenizer.model").exists()


def test_tokenizer_choice_by_vocab_and_cli_note(hf_gqa, tmp_path, capsys):
    assert torch_write.tokenizer_for_vocab(32000).name == "tokenizer.model.v1"
    assert torch_write.tokenizer_for_vocab(32768).name == "mistral_instruct_tokenizer_240323.model.v3"
    assert torch_write.tokenizer_for_vocab(256) is None
    assert cli.main(["--to", "hf", str(hf_gqa.path), str(tmp_path / "o"), "--quiet"]) == 0
    assert "no known tokenizer for vocab 256" in capsys.readouterr().out
    assert cli.main(["--to", "hf", str(hf_gqa.path), str(tmp_path / "o2"), "--quiet", "--tokenizer",
                     str(torch_write.tokenizer_for_vocab(32000))]) == 1
    assert "32000 pieces, more than the model's vocab of 256" in capsys.readouterr().err


# ---------- 8. old CLI name ----------

@pytest.mark.slow   # one of the everyday subset's longest (issue 20, point 7)
def test_infer_convert_alias(hf_gqa, tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    help_text = subprocess.run([sys.executable, "-m", "infer.convert", "--help"], cwd=root, env=env,
                               capture_output=True, text=True, check=True).stdout
    assert help_text.startswith("usage: python -m infer.convert ")
    proc = subprocess.run([sys.executable, "-m", "infer.convert", str(hf_gqa.path), str(tmp_path / "n"), "--quiet"],
                          cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert read_native_meta(tmp_path / "n")[0].vocab_size == 256


def test_orbax_in_flight_budget_fits_the_largest_stacked_tensor():
    """Orbax refuses to move a tensor larger than its byte budget; a stacked 7B w1 is 3.76 GB in bf16."""
    import jax
    import ml_dtypes

    w1 = jax.ShapeDtypeStruct((32, 4096, 14336), ml_dtypes.bfloat16)
    small = jax.ShapeDtypeStruct((64, 64), np.float32)
    assert checkpoint._in_flight_gb({"w1": w1, "n": small}) == 4
    assert checkpoint._in_flight_gb({"w1": w1}, itemsize=4) == 8
    assert checkpoint._in_flight_gb({"n": small}) == 1


def test_wait_for_threads_waits_for_a_thread_still_starting(monkeypatch):
    """A writer thread orbax has start()ed but that is not running yet is waited for, not a RuntimeError
    (which would replace the user's KeyboardInterrupt: CI saw it once)."""
    import threading
    import time

    finished = []
    late = threading.Thread(target=lambda: (time.sleep(0.2), finished.append(True)))
    never = threading.Thread(target=lambda: None)
    monkeypatch.setattr(threading, "enumerate", lambda: [threading.main_thread(), late])
    starter = threading.Timer(0.1, late.start)
    starter.daemon = True
    starter.start()
    checkpoint._wait_for_threads(set(), limit_s=30)
    assert finished == [True]
    monkeypatch.setattr(threading, "enumerate", lambda: [never])
    t0 = time.monotonic()
    checkpoint._wait_for_threads(set(), limit_s=0.3)  # one that never starts: given up at the limit
    assert time.monotonic() - t0 < 10
