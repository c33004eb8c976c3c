"""Seeds from keys: the one rule by which every random stream in avpgan is made.

Randomness here is a tree of keys: (seed, stage, rank, step) for the training loop, (seed, epoch,
stream, index) for the shard stream, (seed, utterance, crop) for the embedding bank, (seed,
identity, what, n) for SynthVox. A key becomes numpy's SeedSequence, which mixes it well,
gives independent streams for different keys and the same numbers in every process and on every
platform (Python's `hash()` does neither). Key parts are non-negative ints, or strings, which
enter as their CRC-32 (stable everywhere).

Changing how a key maps to numbers changes every resumed run and every SynthVox file, so the
mapping is fixed: keep new callers on these functions rather than writing another.
"""

from __future__ import annotations

import zlib

import numpy as np

Key = int | str


def _word(part: Key) -> int:
    if isinstance(part, str):
        return zlib.crc32(part.encode())
    return int(part)


def sequence(*key: Key, spawn_key: tuple[int, ...] = ()) -> np.random.SeedSequence:
    """The SeedSequence of `key`; `spawn_key` places it in a spawn tree (as SynthVox does)."""
    return np.random.SeedSequence([_word(k) for k in key], spawn_key=spawn_key)


def rng(*key: Key, spawn_key: tuple[int, ...] = ()) -> np.random.Generator:
    """A numpy Generator for `key`: the same numbers wherever and whenever it is made."""
    return np.random.default_rng(sequence(*key, spawn_key=spawn_key))


def seed32(*key: Key) -> int:
    """A 32-bit seed for `key` (for torch.manual_seed and other 32-bit consumers)."""
    return int(sequence(*key).generate_state(1)[0])


def seed64(*key: Key) -> int:
    """A 64-bit seed for `key` (for torch.Generator, which takes 64 bits)."""
    return int(sequence(*key).generate_state(1, np.uint64)[0])
