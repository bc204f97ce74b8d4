"""native_read: params read bit-exact from orbax's storage in bounded byte ranges (one raw chunk or many,
edge chunks included) or through tensorstore (compressed); save_params writes one chunk per param."""

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from mistral_jax.checkpoint import native as checkpoint
from mistral_jax.model import transformer as model
from mistral_jax.checkpoint import native_read
from mistral_jax.errors import CheckpointError
from mistral_jax.model.config import ModelConfig

ARRAYS = {"a": ((5, 37, 19), ml_dtypes.bfloat16), "b": ((3, 300), np.float32), "c": ((7,), np.float32)}


def _save(dst: Path, target: int, compression: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tree = {k: rng.standard_normal(shape).astype(dt) for k, (shape, dt) in ARRAYS.items()}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=compression)) as c:
        c.save(dst, args=ocp.args.PyTreeSave({k: jnp.asarray(v) for k, v in tree.items()},
                                             ocdbt_target_data_file_size=target))
    return tree


def _zarray(params_dir: Path, name: str) -> str:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{params_dir.absolute()}/"}).result()
    return kv.read(f"{name}/.zarray".encode()).result().value.decode()


@pytest.mark.parametrize("target,compression", [(0, False), (2048, False), (2048, True)])
def test_reads_are_bit_exact_in_bounded_ranges(tmp_path, monkeypatch, target, compression):
    """One raw chunk, many raw chunks with uneven edges (2 KiB target), and compressed chunks (tensorstore)."""
    want = _save(tmp_path / "p", target, compression)
    if target:
        assert '"chunks":[5,37,19]' not in _zarray(tmp_path / "p", "a")    # really split into chunks
    monkeypatch.setattr(native_read, "READ_BYTES", 300)                   # many ranges per chunk
    ranges = []
    reader = native_read.ParamReader(tmp_path / "p")
    real = reader._kv.read

    def spy(key, **kw):
        if kw.get("byte_range") is not None:
            ranges.append(kw["byte_range"].stop - kw["byte_range"].start)
        return real(key, **kw)

    reader._kv = type("KV", (), {"read": staticmethod(spy), "list": real})()
    for k, (shape, dt) in ARRAYS.items():
        got = reader.read(k, shape, np.dtype(dt))
        assert got.ctypes.data % 64 == 0 and got.flags.c_contiguous
        assert got.tobytes() == want[k].tobytes(), k
    if compression:
        assert not ranges                       # compressed chunks go through tensorstore whole
    else:
        # at most READ_BYTES, or one row along a chunk's leading axis when that is larger (a: 37 x 19 x 2 bytes)
        assert ranges and max(ranges) <= 37 * 19 * 2


def test_short_data_and_wrong_shape_are_one_line_errors(tmp_path):
    _save(tmp_path / "p", 0, False)
    reader = native_read.ParamReader(tmp_path / "p")
    with pytest.raises(CheckpointError, match=r"param 'b' is stored as float32\(3, 300\), expected "):
        reader.read("b", (3, 301), np.dtype(np.float32))
    with pytest.raises(CheckpointError, match="no stored array for param 'zz'"):
        reader.read("zz", (1,), np.dtype(np.float32))
    for f in (tmp_path / "p").glob("ocdbt.process_*/d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(CheckpointError) as e:
        native_read.ParamReader(tmp_path / "p").read("a", (5, 37, 19), np.dtype(ml_dtypes.bfloat16))
    assert "\n" not in str(e.value) and str(tmp_path / "p") in str(e.value)


def test_save_params_writes_one_chunk_per_param_however_large(tmp_path, monkeypatch):
    """Orbax splits arrays over its OCDBT target file size (2 GiB) into chunks, and a chunked write copies the
    array; save_params turns the limit off. Shown with orbax's default lowered to 8 KiB."""
    from orbax.checkpoint._src.serialization import tensorstore_utils
    monkeypatch.setattr(tensorstore_utils, "_DEFAULT_OCDBT_TARGET_DATA_FILE_SIZE", 8 << 10)
    cfg = ModelConfig.preset("tiny")
    params = model.init_params(cfg, jax.random.key(0), param_dtype=jnp.bfloat16)
    checkpoint.save_params(tmp_path / "ck", cfg, params)
    w1 = params["layers"]["feed_forward"]["w1"]
    assert w1.nbytes > 8 << 10
    assert f'"chunks":{list(w1.shape)}'.replace(" ", "") in _zarray(tmp_path / "ck" / "params",
                                                                   "layers.feed_forward.w1")
    _, back = checkpoint.load_params(tmp_path / "ck", dtype=None, progress=False)
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
