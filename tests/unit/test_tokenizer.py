"""The budget's tokenizer loads o200k_base from the bundled vocabulary with the network blocked."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from toolmesh.sidecar.chain.stages.tokenizer import Tokenizer

# Runs in a fresh interpreter so nothing is already loaded; any socket use raises.
_OFFLINE_PROBE = r"""
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network blocked by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from toolmesh.sidecar.chain.stages.tokenizer import Tokenizer, cache_dir
t = Tokenizer()
text = "The quick brown fox jumps over the lazy dog. Ünïcödé — 東京"
print(json.dumps({"count": t.count(text), "tokens": t.encode("hello world"), "dir": str(cache_dir())}))
"""

URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


def _probe(tmp_path, cache):
    env = {"TIKTOKEN_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_PROBE], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_loads_offline_into_an_empty_cache(tmp_path):
    cache = tmp_path / "cache"
    out = _probe(tmp_path, cache)
    # o200k_base's ids for "hello world" are well known.
    assert out["tokens"] == [24912, 2375]
    assert 10 < out["count"] < 40
    assert (cache / hashlib.sha1(URL.encode()).hexdigest()).exists()


def test_a_tampered_cached_vocabulary_is_replaced_not_downloaded(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / hashlib.sha1(URL.encode()).hexdigest()).write_bytes(b"aGVsbG8= 0\n")
    out = _probe(tmp_path, cache)
    assert out["tokens"] == [24912, 2375]


def test_counts_cuts_and_decodes():
    t = Tokenizer()
    text = "word" + " word" * 99
    assert t.count(text) == 100
    head = t.head(text, 10)
    assert t.count(head) == 10
    assert text.startswith(head)
    assert t.head(text, 0) == ""


def test_an_encoding_that_is_not_bundled_is_refused_with_the_policy():
    import pytest

    from toolmesh.sidecar.chain.stages.tokenizer import TokenizerUnavailable

    with pytest.raises(TokenizerUnavailable, match="not available offline"):
        Tokenizer("p50k_base").preload()


# Loads the vocabulary as the budget stage does, at start-up (no event loop yet) or on a reload
# while serving (inside the loop), and reports whether preload() returned with it loaded and the RSS
# the load added, in MB.
_MEMORY_PROBE = r"""
import asyncio, json, sys
from toolmesh.sidecar.chain.stages.tokenizer import Tokenizer
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) // 1024
t = Tokenizer()
before = rss()
async def reload():
    t.preload()
    loaded_on_return = t.loaded
    await t.ready()
    return loaded_on_return
if sys.argv[1] == "start-up":
    t.preload()
    loaded_on_return = t.loaded
else:
    loaded_on_return = asyncio.run(reload())
t.count("hello world " * 1000)
print(json.dumps({"loaded_on_return": loaded_on_return, "mb": rss() - before}))
"""


def _load_in_probe(tmp_path, when):
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, when], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_start_up_loads_before_serving_and_keeps_rss_low(tmp_path):
    # tiktoken's Rust encoder alone holds about 41 MB; keeping its Python copy of the ranks
    # and the parsing garbage took the total to about 76 MB.
    for _ in range(2):  # the first run also fills the cache; the second loads from it, as a restarted sidecar does
        out = _load_in_probe(tmp_path, "start-up")
        assert out["loaded_on_return"] is True
        assert out["mb"] < 55, f"loading o200k_base added {out['mb']} MB"


def test_a_reload_while_serving_loads_in_the_background(tmp_path):
    out = _load_in_probe(tmp_path, "reload")
    # Loading takes a few hundred milliseconds; preload() returning before it ends means the loop never stalled.
    assert out["loaded_on_return"] is False
    assert out["mb"] < 60, f"loading o200k_base added {out['mb']} MB"


def test_counts_match_an_encoding_tiktoken_builds_itself():
    import tiktoken
    from tiktoken_ext import openai_public

    t = Tokenizer()
    t.load()  # also points TIKTOKEN_CACHE_DIR at the offline vocabulary tiktoken reads below
    reference = tiktoken.Encoding(**openai_public.o200k_base())
    assert reference is not tiktoken.get_encoding("o200k_base")
    samples = [
        "The quick brown fox jumps over the lazy dog.",
        "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n",
        "Ünïcödé — 東京タワー 🚀🚀 مرحبا بالعالم " * 20,
        " ".join(f"w{i}" for i in range(2000)),
        "<|endoftext|> is counted as text",
    ]
    for text in samples:
        assert t.encode(text) == reference.encode_ordinary(text)
        assert t.count(text) == len(reference.encode_ordinary(text))
    assert t.decode(t.encode(samples[2])) == samples[2]
