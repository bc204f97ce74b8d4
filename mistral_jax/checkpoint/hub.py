"""Hugging Face Hub ids (`org/name`, `org/name@revision`) as checkpoint sources: an id that names no local
folder is resolved to its snapshot folder in the huggingface_hub cache, downloading only what the readers use.

huggingface_hub does the work and its settings apply, all read by huggingface_hub itself: HF_HUB_OFFLINE (no
network at all: the cache must hold the snapshot), HF_HUB_CACHE / HF_HOME (the cache folder), HF_TOKEN (or the
token file of `hf auth login`) for private and gated models, HF_ENDPOINT, and its own progress bars.

Downloaded: the configs (config.json, params.json, generation_config.json), the tokenizer files and the weights
of one layout: the Hugging Face one when config.json and HF-named weights exist (mistral-inference's
consolidated.* files are then skipped), else the mistral-inference one (params.json, consolidated.*); safetensors
only, unless the repo holds none (then pytorch_model*.bin / consolidated.*.pth). Files in sub-folders are
skipped, except for a native checkpoint of this library (checksums.json at the top), which is fetched whole.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path
from typing import Iterable, NamedTuple

from mistral_jax.errors import CheckpointError, first_line

DEFAULT_REVISION = "main"
META = ("generation_config.json", "tokenizer.model*", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json")
SAFETENSORS = (("*.safetensors",), ("*.safetensors.index.json",))                     # (weights, indexes)
PICKLES = (("pytorch_model*.bin", "consolidated.*.pth"), ("pytorch_model*.bin.index.json",))
MISTRAL_PREFIX = "consolidated"      # mistral-inference's weight files
NATIVE_FILE = "checksums.json"       # at the top of a native checkpoint (format version 3)
SUBFOLDERS = "*/*"


class HubId(NamedTuple):
    """A Hub model id and the revision asked for (None: the default branch)."""
    repo_id: str
    revision: str | None

    @property
    def shown_revision(self) -> str:
        return self.revision or DEFAULT_REVISION


def parse_hub_id(text: str) -> HubId | None:
    """`org/name` or `org/name@revision` split into a HubId; None when `text` does not look like one (more or
    fewer than one '/', an empty side, a leading '.' or '~'). CheckpointError (one line) when it looks like
    an id but huggingface_hub's validation refuses the id, or the revision is empty or climbs out ('..')."""
    repo_id, at, revision = text.partition("@")
    org, slash, name = repo_id.partition("/")
    if not slash or "/" in name or not org or not name or org[0] in ".~":
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise CheckpointError(f"{text}: no such folder, and not a valid Hugging Face Hub id "
                              f"({first_line(e)})") from None
    if at and (not revision or revision.startswith("/") or ".." in revision.split("/")):
        raise CheckpointError(f"{text}: no such folder, and not a valid Hugging Face Hub id "
                              f"(revision {revision!r} after '@')")
    return HubId(repo_id, revision if at else None)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def download_patterns(files: Iterable[str]) -> tuple[list[str] | None, list[str]]:
    """(allow_patterns, ignore_patterns) for `snapshot_download` given a repo's file list: the weights of one
    layout with its config and the tokenizer files, safetensors unless the repo holds none; (None, [])
    (everything) for a native checkpoint."""
    top = [f for f in files if "/" not in f]
    if NATIVE_FILE in top:
        return None, []
    weights, indexes = SAFETENSORS if any(_matches(f, SAFETENSORS[0]) for f in top) else PICKLES
    found = [f for f in top if _matches(f, weights)]
    kind = [*weights, *indexes]
    if "config.json" in top and any(not f.startswith(MISTRAL_PREFIX) for f in found):
        return ["config.json", *META, *kind], [SUBFOLDERS, f"{MISTRAL_PREFIX}*"]
    if "params.json" in top and any(f.startswith(MISTRAL_PREFIX) for f in found):
        return ["params.json", *META, *kind], [SUBFOLDERS]
    return ["config.json", "params.json", *META, *kind], [SUBFOLDERS]


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """The folder to read for a checkpoint argument: an existing local path unchanged (no Hub look-up),
    else the snapshot folder of the Hub model `org/name[@revision]` it names (downloaded into the
    huggingface_hub cache unless already there; from the cache alone when offline).

    CheckpointError (one line naming the argument) when it is neither a local path nor a valid Hub id, when
    the Hub has no such model or revision, or when the model is not cached and the Hub is off or unreachable
    (the line then names the cache folder).
    """
    local = Path(path_or_id)
    if local.exists():
        return local
    text = str(path_or_id)
    try:
        hub_id = parse_hub_id(text)
    except ImportError:
        raise CheckpointError(f"{text}: no such folder (Hub ids need huggingface_hub, which is not "
                              "installed)") from None
    if hub_id is None:
        raise CheckpointError(f"{text}: no such folder")
    return Path(_snapshot(text, hub_id))


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub request raises besides HfHubHTTPError: ConnectionError (OfflineModeIsEnabled among
    them), TimeoutError, and the errors of the HTTP client huggingface_hub uses (httpx2, httpx or requests,
    whichever it imported). Other OSErrors (a full disk, a read-only cache) are left to propagate."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


def _snapshot(text: str, hub_id: HubId) -> str:
    """The snapshot folder of `hub_id`: listed, then downloaded; from the cache alone when offline or when
    the listing fails (as snapshot_download itself falls back)."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        files, failure = _list_files(hub_id)
        if failure is None:
            allow, ignore = download_patterns(files)
            return huggingface_hub.snapshot_download(hub_id.repo_id, revision=hub_id.revision,
                                                     allow_patterns=allow, ignore_patterns=ignore)
        try:
            return _cached_snapshot(hub_id)
        except hf_errors.LocalEntryNotFoundError as e:
            raise _hub_error(text, hub_id, e if _incomplete(e) else failure, failure) from None
    except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, *_network_errors()) as e:
        raise _hub_error(text, hub_id, e) from None


def _list_files(hub_id: HubId) -> tuple[list[str], BaseException | None]:
    """(the repo's files, None), or ([], why the Hub could not list them: offline, unreachable, refused)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    if constants.HF_HUB_OFFLINE:
        return [], hf_errors.OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
    try:
        info = huggingface_hub.HfApi().model_info(hub_id.repo_id, revision=hub_id.revision)  # one request
        return [s.rfilename for s in info.siblings or []], None
    except hf_errors.RevisionNotFoundError:
        raise
    except (hf_errors.HfHubHTTPError, *_network_errors()) as e:
        return [], e


def _cached_snapshot(hub_id: HubId) -> str:
    """The cached snapshot folder of `hub_id`, checked against the cached file listing where huggingface_hub
    keeps one; no network."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    repo, revision = hub_id
    folder = huggingface_hub.snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=[])
    files: list[str] | None = None
    cached_listing = getattr(huggingface_hub, "get_cached_repo_tree", None)  # huggingface_hub 1.x+
    if cached_listing is not None:
        try:
            files = [f.path for f in cached_listing(repo, revision=revision)]
        except getattr(hf_errors, "CachedRepoTreeNotFoundError", LookupError):
            files = None
    if files is None:
        root = Path(folder)
        files = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
    allow, ignore = download_patterns(files)
    return huggingface_hub.snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=allow,
                                             ignore_patterns=ignore)


def _incomplete(e: BaseException) -> bool:
    from huggingface_hub import errors as hf_errors

    incomplete = getattr(hf_errors, "IncompleteSnapshotError", None)
    return incomplete is not None and isinstance(e, incomplete)


def _hub_error(text: str, hub_id: HubId, e: BaseException, failure: BaseException | None = None
               ) -> CheckpointError:
    """One line for a failed resolution of `text`: what the Hub or the cache said, naming the cache folder
    when the model is not (wholly) in it; `failure` is why the Hub was not asked (offline, unreachable)."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    repo, rev, cache = hub_id.repo_id, hub_id.shown_revision, constants.HF_HUB_CACHE
    if isinstance(e, hf_errors.GatedRepoError):
        return CheckpointError(f"{text}: no such folder, and the Hugging Face Hub model {repo} is gated: accept "
                               "its terms on the Hub and set HF_TOKEN")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return CheckpointError(f"{text}: no such folder, and no Hugging Face Hub model {repo} (if it is "
                               "private, set HF_TOKEN)")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return CheckpointError(f"{text}: no such folder, and the Hugging Face Hub model {repo} has no revision "
                               f"{rev}")
    if _incomplete(e):
        missing = re.search(r"\d+ file\(s\) (are|is) missing \([^)]*\)", str(e))
        return CheckpointError(f"{text}: the cached snapshot {getattr(e, 'snapshot_path', None) or cache} of the "
                               f"Hugging Face Hub model {repo} (revision {rev}) is incomplete "
                               f"({missing.group(0) if missing else first_line(e)}; {_why(failure or e.__cause__)})")
    if isinstance(e, hf_errors.LocalEntryNotFoundError):   # snapshot_download: not cached, Hub not answering
        e = e.__cause__ or e
    return CheckpointError(f"{text}: no such folder, and the Hugging Face Hub model {repo} (revision {rev}) is "
                           f"not in the cache {cache} ({_why(e)})")


def _why(failure: BaseException | None) -> str:
    """Why the model could not be fetched: 'HF_HUB_OFFLINE is set', or the failed request."""
    from huggingface_hub import errors as hf_errors

    if failure is None:
        return "the Hub was not asked"
    if isinstance(failure, hf_errors.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    return f"fetching it failed: {type(failure).__name__}: {first_line(failure)}"


__all__ = ["HubId", "parse_hub_id", "download_patterns", "resolve_checkpoint"]
