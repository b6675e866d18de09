"""Models by Hugging Face Hub name: `org/name` (or `org/name:QUANT` for a GGUF repo) -> a local path.

This module owns the choice of files and the translation of Hub failures into ModelLoadErrors;
huggingface_hub does the HTTP, the cache layout (`models--org--name/{blobs,refs,snapshots}`) and the
progress bars. Only what the loader reads is fetched: config.json, generation_config.json, the
tokenizer files and the safetensors weights (never .bin pickles, never sub-folders such as
`original/`), or exactly one .gguf file of a GGUF repo.

Environment, read at call time (so a process that set it after importing huggingface_hub still
gets it): HF_ENDPOINT (mirrors), HF_TOKEN (gated and private repos), HF_HUB_OFFLINE=1 (cache only).
When the Hub cannot be reached, a snapshot already in the cache is used.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

# org/name, optionally :TAG; Hub names are letters, digits, '-', '_', '.'.
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<tag>[\w.-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# The files the loader reads next to the weights (runtime/loader/loader.py, runtime/tokenizer.py).
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
INDEX = "model.safetensors.index.json"
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def parse_repo_id(model: str) -> tuple[str, str | None] | None:
    """(repo_id, tag) when `model` reads as a Hub name, else None (a local path, a preset...)."""
    if model.startswith((".", "/", "~")) or "\\" in model or model.count("/") != 1:
        return None
    m = _REPO_ID.match(model)
    return (m["repo"], m["tag"]) if m else None


@dataclass
class HubChoice:
    files: list[str]
    """Files to fetch (paths inside the repo)."""
    gguf: str | None = None
    """The chosen .gguf file, for a GGUF repo."""


def choose_files(
    repo: str, files: list[str], gguf_file: str | None = None, tag: str | None = None
) -> HubChoice:
    """Which of a repo's files to fetch. Safetensors repos win over GGUF files in the same repo unless a
    GGUF file or quant tag was asked for; .bin-only repos are refused (we read no pickles)."""
    top = [f for f in files if "/" not in f]
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    st = sorted(f for f in top if f.endswith(".safetensors"))
    if gguf_file is None and tag is None and st and "config.json" in top:
        if len(st) > 1:
            # Mistral repos ship consolidated.safetensors (its own tensor names, the whole model again) next
            # to the HF shards; with an index, resolve_hub_model narrows the shards to its weight_map.
            st = [f for f in st if not f.startswith("consolidated")] or st
        return HubChoice([f for f in CONFIG_FILES if f in top] + ([INDEX] if INDEX in top else []) + st)
    if ggufs:
        chosen = _choose_gguf(repo, ggufs, gguf_file, tag)
        return HubChoice([chosen], gguf=chosen)
    if gguf_file or tag:
        raise ModelLoadError(
            f"{repo} has no .gguf files: drop --gguf-file / the ':{tag or gguf_file}' suffix"
        )
    pickles = [f for f in top if f.endswith(_PICKLE_WEIGHTS)]
    if pickles:
        raise ModelLoadError(
            f"{repo} has no usable weights: only PyTorch pickle files ({', '.join(pickles[:3])}); "
            "fleetserve reads safetensors or GGUF weights"
        )
    if "config.json" not in top:
        raise ModelLoadError(
            f"{repo} has no usable weights: no config.json + *.safetensors and no .gguf file"
        )
    raise ModelLoadError(f"{repo} has no usable weights: config.json but no *.safetensors files")


def _choose_gguf(repo: str, ggufs: list[str], gguf_file: str | None, tag: str | None) -> str:
    listing = ", ".join(ggufs)
    if gguf_file is not None:
        hits = [f for f in ggufs if f == gguf_file or os.path.basename(f) == gguf_file]
        if not hits:
            raise ModelLoadError(f"{repo} has no GGUF file {gguf_file!r}; it has: {listing}")
        return hits[0]
    if tag is not None:
        pat = re.compile(rf"(?<![A-Za-z0-9]){re.escape(tag)}(?![A-Za-z0-9_])", re.IGNORECASE)
        hits = [f for f in ggufs if pat.search(os.path.basename(f))]
        if not hits:
            raise ModelLoadError(f"{repo} has no GGUF file for quantization {tag!r}; it has: {listing}")
        if len(hits) > 1 and not all(_SPLIT_GGUF.search(f) for f in hits):
            raise ModelLoadError(
                f"{repo}:{tag} matches several files ({', '.join(hits)}): pick one with --gguf-file"
            )
        chosen = hits[0]
    elif len(ggufs) == 1:
        chosen = ggufs[0]
    else:
        raise ModelLoadError(
            f"{repo} holds {len(ggufs)} GGUF files ({listing}): pick one with --gguf-file FILE "
            f"or {repo}:QUANT (e.g. {repo}:Q4_K_M)"
        )
    if _SPLIT_GGUF.search(chosen):
        raise ModelLoadError(f"{repo}: {chosen} is one part of a split GGUF; split GGUFs are not supported")
    return chosen


def _narrow_to_index(repo: str, choice: HubChoice, index_path: str) -> HubChoice:
    import json

    try:
        with open(index_path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{repo}: unreadable {INDEX}: {e}") from e
    if not shards:
        raise ModelLoadError(f"{repo}: {INDEX} maps no tensors")
    return HubChoice([f for f in choice.files if not f.endswith(".safetensors")] + shards)


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value or None


def _offline() -> bool:
    return (_env("HF_HUB_OFFLINE") or "0").upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir(download_dir: str | None) -> str:
    if download_dir:
        return os.path.expanduser(download_dir)
    from huggingface_hub import constants

    return _env("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _is_connection_error(e: BaseException) -> bool:
    # huggingface_hub's HTTP stack changed (requests -> httpx -> httpx2): recognise its transport errors by name.
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(e, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    return bool(
        names
        & {
            "ConnectError",
            "TimeoutException",
            "NetworkError",
            "ConnectionError",
            "Timeout",
            "TransportError",
            "RemoteProtocolError",
        }
    )


def _cached_snapshot(cache: str, repo: str, revision: str) -> str | None:
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    commit = revision if _COMMIT.match(revision) else None
    ref = os.path.join(folder, "refs", revision)
    if commit is None and os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
    snap = os.path.join(folder, "snapshots", commit) if commit else None
    return snap if snap and os.path.isdir(snap) else None


def _local_files(snapshot: str) -> list[str]:
    out = []
    for root, _, names in os.walk(snapshot):
        rel = os.path.relpath(root, snapshot)
        out += [n if rel == "." else f"{rel}/{n}" for n in names]
    return sorted(out)


def _result(snapshot: str, choice: HubChoice) -> str:
    missing = [f for f in choice.files if not os.path.exists(os.path.join(snapshot, f))]
    if missing:
        raise ModelLoadError(f"the cached snapshot {snapshot} lacks {', '.join(missing)}")
    return os.path.join(snapshot, choice.gguf) if choice.gguf else snapshot


def _hub_error(repo: str, revision: str, endpoint: str, e: Exception) -> ModelLoadError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(e, "response", None), "status_code", None)
    has_token = _env("HF_TOKEN") is not None
    if isinstance(e, GatedRepoError):
        hint = (
            "HF_TOKEN is set but has no access: accept the model's licence on its Hub page with that account"
            if has_token
            else "set HF_TOKEN to a token of an account that accepted the model's licence"
        )
        return ModelLoadError(f"{repo} is a gated repository ({status}): {hint}")
    if isinstance(e, RevisionNotFoundError):
        return ModelLoadError(f"{repo} has no revision {revision!r} (branch, tag or commit) on {endpoint}")
    if isinstance(e, RepositoryNotFoundError):
        hint = "" if has_token else "; if it is private, set HF_TOKEN"
        return ModelLoadError(
            f"model {repo!r} not found on {endpoint} ({status}): not a local path, a preset or "
            f"a Hub repository{hint}"
        )
    if isinstance(e, HfHubHTTPError) and status in (401, 403):
        return ModelLoadError(
            f"{repo}: access denied by {endpoint} ({status}): "
            + ("check that HF_TOKEN is valid and may read this repository" if has_token else "set HF_TOKEN")
        )
    return ModelLoadError(f"{repo}: the Hub at {endpoint} answered {status or ''}: {e}".replace("  ", " "))


def resolve_hub_model(
    model: str, revision: str | None = None, download_dir: str | None = None, gguf_file: str | None = None
) -> str:
    """Fetch what the loader needs of the Hub repo `model` (org/name[:QUANT]) into the huggingface_hub cache
    (download_dir, else HF_HUB_CACHE) and return the local snapshot directory, or the .gguf file in it."""
    parsed = parse_repo_id(model)
    if parsed is None:
        raise ModelLoadError(f"{model!r} is not a Hub model name (org/name)")
    repo, tag = parsed
    revision = revision or "main"
    cache = _cache_dir(download_dir)
    endpoint = _env("HF_ENDPOINT")
    from huggingface_hub import constants

    shown = endpoint or constants.ENDPOINT
    token = _env("HF_TOKEN")
    reason = "HF_HUB_OFFLINE is set"
    if not _offline():
        from huggingface_hub import HfApi, snapshot_download

        try:
            api = HfApi(endpoint=endpoint, token=token)
            info = api.model_info(repo, revision=revision)
            files = [s.rfilename for s in (info.siblings or [])]
            choice = choose_files(repo, files, gguf_file, tag)
            if INDEX in choice.files:  # fetch exactly the shards the index maps tensors to
                from huggingface_hub import hf_hub_download

                index = hf_hub_download(
                    repo, INDEX, revision=revision, cache_dir=cache, endpoint=endpoint, token=token
                )
                choice = _narrow_to_index(repo, choice, index)
            logger.info("fetching %s@%s from %s: %s", repo, revision, shown, ", ".join(choice.files))
            snapshot = snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache,
                allow_patterns=choice.files,
                endpoint=endpoint,
                token=token,
            )
            return _result(snapshot, choice)
        except ModelLoadError:
            raise
        except Exception as e:
            if not _is_connection_error(e):
                raise _hub_error(repo, revision, shown, e) from e
            reason = f"the Hub at {shown} cannot be reached ({type(e).__name__}: {e})"
    cached = _cached_snapshot(cache, repo, revision)
    if cached is None:
        raise ModelLoadError(
            f"{repo}@{revision} is not in the model cache {cache} and {reason}: connect to the "
            "Hub (or a mirror via HF_ENDPOINT) once, or pass a local model path"
        )
    logger.info("%s: using the cached snapshot %s", reason, cached)
    return _result(cached, choose_files(repo, _local_files(cached), gguf_file, tag))
