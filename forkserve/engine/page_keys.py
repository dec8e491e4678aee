"""Content keys of KV pages: a hash chain over token ids, the same in every process and on every run.

A page's key is blake2b over its parent page's key and the page's token ids (little-endian
int64), so equal keys mean equal prefixes up to and including that page. Host and disk tiers and
other replicas name cached pages by these keys (Python's hash() is salted per process, so it
cannot serve).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

ROOT_KEY = b"\x00" * 16  # the key "above" a sequence's first page
KEY_BYTES = 16


def page_keys(tokens: Sequence[int], page_size: int, parent_key: bytes = ROOT_KEY) -> list[bytes]:
    """The key of each full page of `tokens`, which continue the page whose key is `parent_key`."""
    data = np.asarray(tokens[:len(tokens) - len(tokens) % page_size], dtype="<i8").tobytes()
    keys, key, width = [], parent_key, page_size * 8
    for start in range(0, len(data), width):
        key = hashlib.blake2b(key + data[start:start + width], digest_size=KEY_BYTES).digest()
        keys.append(key)
    return keys
