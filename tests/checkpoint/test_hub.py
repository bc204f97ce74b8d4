"""Hugging Face Hub ids as checkpoint sources (checkpoint/hub.py), offline against a cache laid out the way
huggingface_hub lays it out: models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/..,
refs/<branch>}."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mistral_jax.checkpoint.hub import download_patterns, parse_hub_id, resolve_checkpoint
from mistral_jax.errors import CheckpointError

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hf_constants  # noqa: E402
from huggingface_hub import errors as hf_errors  # noqa: E402
from huggingface_hub.hf_api import RepoSibling  # noqa: E402
from huggingface_hub.utils import filter_repo_objects  # noqa: E402

REPO = "org/tiny"
MAIN = "1" * 40   # the commit refs/main names
DEV = "2" * 40    # the commit refs/dev names
ROOT = Path(__file__).resolve().parents[2]


def make_hub_cache(cache: Path, repo: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """A huggingface_hub cache folder holding `repo`: each commit's snapshot the files of a folder (blobs
    named by their sha256, snapshot entries relative symlinks to them), refs/<name> holding a commit (no
    newline, as huggingface_hub writes it). Returns the repo's storage folder."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for commit, src in snapshots.items():
        snap = storage / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            sha = hashlib.sha256(f.read_bytes()).hexdigest()
            blob = storage / "blobs" / sha
            if not blob.exists():
                shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(Path("..", "..", "blobs", sha))
    for name, commit in refs.items():
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / name).write_text(commit)
    return storage


@pytest.fixture(scope="module")
def hub_cache(hf_gqa, tmp_path_factory) -> Path:
    """A cache folder with org/tiny: main -> the hf_gqa model (config.json, model.safetensors,
    generation_config.json), dev -> its config alone."""
    cache = tmp_path_factory.mktemp("hf_cache") / "hub"
    dev = tmp_path_factory.mktemp("dev_files")
    shutil.copyfile(hf_gqa.path / "config.json", dev / "config.json")
    make_hub_cache(cache, REPO, {MAIN: hf_gqa.path, DEV: dev}, {"main": MAIN, "dev": DEV})
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    """huggingface_hub offline, its cache the hub_cache folder (its constants are read at import: patched,
    as huggingface_hub's own tests do)."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def snapshot(cache: Path, commit: str) -> Path:
    return cache / "models--org--tiny" / "snapshots" / commit


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def test_cache_is_laid_out_as_huggingface_hub_reads_it(hub_cache):
    info = huggingface_hub.scan_cache_dir(hub_cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {MAIN: {"main"}, DEV: {"dev"}}
    found = huggingface_hub.try_to_load_from_cache(REPO, "model.safetensors", cache_dir=hub_cache)
    assert Path(found) == snapshot(hub_cache, MAIN) / "model.safetensors"


def test_id_resolves_to_the_cached_snapshot(offline):
    assert resolve_checkpoint(REPO) == snapshot(offline, MAIN)
    assert resolve_checkpoint(Path(REPO)) == snapshot(offline, MAIN)


def test_revision_as_commit_or_branch(offline):
    assert resolve_checkpoint(f"{REPO}@{MAIN}") == snapshot(offline, MAIN)
    assert resolve_checkpoint(f"{REPO}@{DEV}") == snapshot(offline, DEV)
    assert resolve_checkpoint(f"{REPO}@dev") == snapshot(offline, DEV)
    assert resolve_checkpoint(f"{REPO}@main") == snapshot(offline, MAIN)
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(f"{REPO}@v9")
    assert one_line(e).startswith(f"{REPO}@v9: no such folder") and "(revision v9)" in str(e.value)
    assert str(offline) in str(e.value)


def test_local_folder_wins_over_a_hub_id(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(REPO).mkdir(parents=True)
    assert resolve_checkpoint(REPO) == Path(REPO)
    Path("org/tiny@dev").mkdir()
    assert resolve_checkpoint("org/tiny@dev") == Path("org/tiny@dev")
    assert resolve_checkpoint(tmp_path) == tmp_path           # any existing path, unchanged
    (tmp_path / "file.txt").write_text("x")
    assert resolve_checkpoint(str(tmp_path / "file.txt")) == tmp_path / "file.txt"


def test_local_path_makes_no_hub_lookup(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Hub look-up for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    monkeypatch.chdir(tmp_path)
    Path(REPO).mkdir(parents=True)
    assert resolve_checkpoint(REPO) == Path(REPO)


def test_uncached_id_offline_names_the_id_and_the_cache(offline):
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("org/absent")
    assert one_line(e) == (f"org/absent: no such folder, and the Hugging Face Hub model org/absent (revision main) "
                           f"is not in the cache {offline} (HF_HUB_OFFLINE is set)")


@pytest.mark.parametrize("text", ["org/na--me", "org/bad name", "org/-x", "org/name@", "org/name@../../x",
                                  "org/name.git"])
def test_malformed_id_is_one_line(offline, text):
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(text)
    assert one_line(e).startswith(f"{text}: no such folder, and not a valid Hugging Face Hub id (")


@pytest.mark.parametrize("text", ["nosuch", "no/such/folder", "./no/such", "/abs/missing", "~/x", "org/"])
def test_missing_path_that_is_no_id(offline, text):
    assert parse_hub_id(text) is None
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(text)
    assert one_line(e) == f"{text}: no such folder"


def test_load_params_from_an_id_equals_the_local_folder(offline, hf_gqa):
    import jax

    from mistral_jax.checkpoint.native import load_params

    cfg_hub, params_hub = load_params(resolve_checkpoint(REPO), progress=False)
    cfg_local, params_local = load_params(hf_gqa.path, progress=False)
    assert cfg_hub == cfg_local
    flat_hub = jax.tree_util.tree_flatten_with_path(params_hub)[0]
    flat_local = jax.tree_util.tree_flatten_with_path(params_local)[0]
    assert [k for k, _ in flat_hub] == [k for k, _ in flat_local]
    for (k, a), (_, b) in zip(flat_hub, flat_local):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(k))


def _allowed(files: list[str]) -> set[str]:
    allow, ignore = download_patterns(files)
    return set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))


def test_download_patterns_pick_one_layout_safetensors_first():
    tok = ["tokenizer.model", "tokenizer.model.v3", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json"]
    hf_st = ["config.json", "generation_config.json", "model.safetensors.index.json",
             "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    hf_bin = ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    mi_st, mi_pth = ["params.json", "consolidated.safetensors"], ["params.json", "consolidated.00.pth"]
    other = ["README.md", ".gitattributes", "original/consolidated.00.pth", "sub/model.safetensors",
             "training_args.bin", "optimizer.pt"]
    # like mistralai/Mistral-7B-v0.3: both layouts, HF's wins; no pickles, nothing from sub-folders
    assert _allowed(tok + hf_st + hf_bin + mi_st + other) == set(tok + hf_st)
    assert _allowed(tok + mi_st + mi_pth + other) == set(tok + mi_st)           # mistral-inference only
    assert _allowed(tok + ["config.json"] + hf_bin + mi_pth + other) == set(tok + ["config.json"] + hf_bin)
    assert _allowed(tok + mi_pth + other) == set(tok + mi_pth)                  # no safetensors: pickles
    assert _allowed(hf_bin + ["config.json"] + mi_st) == set(mi_st)             # safetensors before pickles
    native = ["config.json", "checksums.json", "params/manifest.ocdbt", "params/d/abc"]
    assert _allowed(native + other) == set(native + other)                      # native: the whole repo


def test_online_lists_then_downloads_the_chosen_files(offline, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "consolidated.safetensors", "params.json"]
    calls = []

    def model_info(self, repo_id, revision=None, **kw):
        calls.append(("list", repo_id, revision))
        return SimpleNamespace(siblings=[RepoSibling(rfilename=f) for f in files])

    def snapshot_download(repo_id, **kw):
        calls.append(("download", repo_id, kw))
        return "/cache/snap"

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_checkpoint("org/online@dev") == Path("/cache/snap")
    (_, repo, rev), (_, repo2, kw) = calls
    assert (repo, rev, repo2, kw["revision"]) == ("org/online", "dev", "org/online", "dev")
    assert not kw.get("local_files_only")
    kept = set(filter_repo_objects(files, allow_patterns=kw["allow_patterns"], ignore_patterns=kw["ignore_patterns"]))
    assert kept == {"config.json", "model.safetensors"}


def _response(status: int):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))


@pytest.mark.parametrize("error, expect", [
    (lambda: __import__("httpx2").ConnectError("connection refused"),
     "no such folder, and the Hugging Face Hub model org/absent (revision main) is not in the cache {cache} (fetching "
     "it failed: ConnectError: connection refused)"),
    (lambda: hf_errors.RepositoryNotFoundError("404 Client Error.\nRepository Not Found", response=_response(404)),
     "no such folder, and no Hugging Face Hub model org/absent (if it is private, set HF_TOKEN)"),
    (lambda: hf_errors.GatedRepoError("403 Client Error.\nGated", response=_response(403)),
     "no such folder, and the Hugging Face Hub model org/absent is gated: accept its terms on the Hub and set "
     "HF_TOKEN"),
    (lambda: hf_errors.RevisionNotFoundError("404 Client Error.\nRevision Not Found", response=_response(404)),
     "no such folder, and the Hugging Face Hub model org/absent has no revision main"),
])
def test_online_failures_are_one_line(offline, monkeypatch, error, expect):
    pytest.importorskip("httpx2")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def model_info(self, *args, **kw):
        raise error()

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("org/absent")
    assert one_line(e) == "org/absent: " + expect.format(cache=offline)


def test_listing_failure_falls_back_to_the_cache(offline, monkeypatch):
    pytest.importorskip("httpx2")
    import httpx2

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def model_info(self, *args, **kw):
        raise httpx2.ConnectError("connection refused")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    assert resolve_checkpoint(f"{REPO}@dev") == snapshot(offline, DEV)


def test_hf_token_is_read_by_huggingface_hub(monkeypatch):
    """The resolver passes no token: huggingface_hub reads HF_TOKEN itself, at request time."""
    from huggingface_hub.utils import build_hf_headers

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False, raising=False)
    assert huggingface_hub.get_token() == "hf_test_token"
    assert build_hf_headers()["authorization"] == "Bearer hf_test_token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # closed again: connections to it are refused


def _resolve_in_subprocess(env: dict[str, str], *ids: str) -> list[str]:
    """resolve_checkpoint(id) for each id in a fresh interpreter (huggingface_hub reads its environment
    variables at import): the folder, or 'error: <message>'."""
    code = ("import sys\nfrom mistral_jax.checkpoint.hub import resolve_checkpoint\nfrom mistral_jax.errors import "
            "CheckpointError\nfor i in sys.argv[1:]:\n    try:\n        print(resolve_checkpoint(i))\n"
            "    except CheckpointError as e:\n        print('error:', e)\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    out = subprocess.run([sys.executable, "-c", code, *ids], env={**base, **env}, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_environment_variables_choose_the_cache_and_offline_mode(hub_cache, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(hub_cache, home / "hub", symlinks=True)
    got = _resolve_in_subprocess({"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}, REPO, "org/absent")
    assert got == [str(snapshot(home / "hub", MAIN)),
                   f"error: org/absent: no such folder, and the Hugging Face Hub model org/absent (revision main) "
                   f"is not in the cache {home / 'hub'} (HF_HUB_OFFLINE is set)"]
    got = _resolve_in_subprocess({"HF_HOME": str(home), "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"},
                                 f"{REPO}@dev")
    assert got == [str(snapshot(hub_cache, DEV))]


def test_unreachable_hub_uses_the_cache_or_says_so(hub_cache):
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    cached, absent = _resolve_in_subprocess(env, REPO, "org/absent")
    assert cached == str(snapshot(hub_cache, MAIN))
    assert absent.startswith(f"error: org/absent: no such folder, and the Hugging Face Hub model org/absent "
                             f"(revision main) is not in the cache {hub_cache} (fetching it failed: ConnectError: ")


class FakeHub:
    """A local HTTP server answering the few Hub requests a snapshot download makes (model info, file tree,
    file resolve), for one repo at one commit; `requests` records the paths asked for."""

    def __init__(self, repo: str, commit: str, folder: Path):
        import http.server
        import json
        import threading

        files = {f.name: f.read_bytes() for f in sorted(folder.iterdir())}
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                      head: bool = False) -> None:
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj) -> None:
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head: bool = False):
                path = self.path.split("?")[0]
                hub.requests.append(f"{self.command} {path}")
                info, tree, resolve = f"/api/models/{repo}/revision/", f"/api/models/{repo}/tree/", f"/{repo}/resolve/"
                if path == info.removesuffix("/revision/") or (path.startswith(info)
                                                                and path[len(info):] in ("main", commit)):
                    return self._json({"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]})
                if path.startswith(tree) and path[len(tree):] == commit:
                    return self._json([{"type": "file", "path": f, "size": len(b),
                                        "oid": hashlib.sha1(b).hexdigest()} for f, b in files.items()])
                if path.startswith(resolve):
                    rev, _, name = path[len(resolve):].partition("/")
                    if rev in ("main", commit) and name in files:
                        body = files[name]
                        return self._send(200, body, {"X-Repo-Commit": commit,
                                                      "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}, head)
                code = "RevisionNotFound" if path.startswith(info) else "RepoNotFound"
                self._send(404, b"{}", {"X-Error-Code": code, "Content-Type": "application/json"}, head)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_online_download_fetches_only_the_chosen_files_then_works_offline(hf_gqa, tmp_path):
    repo_files = tmp_path / "repo"
    shutil.copytree(hf_gqa.path, repo_files)
    (repo_files / "pytorch_model.bin").write_bytes(b"pickle, never fetched")
    (repo_files / "README.md").write_text("card")
    hub = FakeHub(REPO, MAIN, repo_files)
    cache = tmp_path / "hub"
    try:
        env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url,
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        got = _resolve_in_subprocess(env, REPO, f"{REPO}@v9", "org/absent")
    finally:
        hub.close()
    assert got[0] == str(snapshot(cache, MAIN)), got
    assert got[1:] == [f"error: {REPO}@v9: no such folder, and the Hugging Face Hub model {REPO} has no revision v9",
                       "error: org/absent: no such folder, and no Hugging Face Hub model org/absent (if it is "
                       "private, set HF_TOKEN)"]
    assert sorted(p.name for p in snapshot(cache, MAIN).iterdir()) == sorted(p.name for p in hf_gqa.path.iterdir())
    assert not [r for r in hub.requests if "pytorch_model.bin" in r or "README" in r]
    assert (cache / "models--org--tiny" / "refs" / "main").read_text() == MAIN
    # the server is gone: offline, and with the Hub unreachable, the cached snapshot still resolves
    assert _resolve_in_subprocess({"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}, REPO) == got[:1]
    assert _resolve_in_subprocess({**env, "HF_HUB_OFFLINE": "0"}, REPO) == got[:1]
    # huggingface_hub cached the file listing: a snapshot that lost a file is refused offline, in one line
    (snapshot(cache, MAIN) / "model.safetensors").unlink()
    (line,) = _resolve_in_subprocess({"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}, REPO)
    assert line == (f"error: {REPO}: the cached snapshot {snapshot(cache, MAIN)} of the Hugging Face Hub model "
                    f"{REPO} (revision main) is incomplete (1 file(s) are missing (model.safetensors); "
                    "HF_HUB_OFFLINE is set)")
