"""PyTorch checkpoint conversion both ways: HF and mistral-inference layouts, safety and error handling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import convert as cli
from mistral_jax import checkpoint, convert
from mistral_jax.config import ModelConfig
from mistral_jax.model import forward, param_shardings
from mistral_jax.sharding import make_mesh
from mistral_jax.weights import tensor_specs
from tests import hf_ref, mistral_ref

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
    ours = {s.path: s.to_ours(sd[s.key]) for s in tensor_specs(cfg, "hf")}
    return {s.key: torch.from_numpy(np.ascontiguousarray(s.from_ours(ours[s.path])))
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
    out = convert.write_hf(tmp_path / "out", cfg, params, max_shard_size="40KB", progress=False)
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
    convert.write_mistral(out, cfg, params, progress=False)
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
    with pytest.raises(convert.CheckpointError, match=r"consolidated\.00\.pth: refused to load"):
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
        f = convert.SafetensorsFile(folder / "model.safetensors")
        culprit = max(f.entries, key=lambda k: f.entries[k][2])  # the tensor stored last loses its tail
        f.close()
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:-100])
    return culprit


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "config", "truncated"])
def test_errors_name_culprit_and_leave_dst_clean(hf_gqa, tmp_path, capsys, case):
    culprit = _broken_hf(hf_gqa, tmp_path / "src", case)
    dst = tmp_path / "dst"
    assert cli.main([str(tmp_path / "src"), str(dst), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert f"'{culprit}'" in err or culprit in err, err
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
    assert cli.main(["--to", "mistral", str(hf_gqa.path), str(dst), "--quiet", "--force"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["consolidated.safetensors", "params.json"]
    assert _leftovers(tmp_path, "busy") == []


def test_hf_pytorch_bin_and_bf16_safetensors(hf_gqa, tmp_path):
    """bf16 tensors read the same from pytorch_model.bin (torch, mmap) and model.safetensors (raw bytes)."""
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
