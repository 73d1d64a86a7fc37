"""KV blocks: allocation with reference counts, and the prefix cache over full blocks.

Blocks are numbered 1..num_blocks (block 0 of the pool is the trash block: the decode step's
rows that do not decode write there). A block is free, in use (refcount > 0: held by running
requests, shared when a prefix hit took it), or cached (refcount 0 but registered under its
hash: kept for later hits, evicted least recently released first when no block is free).

A full block's hash chains (parent hash, its tokens) from the prompt start, so equal hashes
mean equal tokens at equal positions (a 64-bit hash; a collision is vanishingly unlikely).
"""

from __future__ import annotations

import collections
from typing import Dict, List, Optional, Sequence


def chain_hashes(tokens: Sequence[int], block_size: int, known: List[int]) -> List[int]:
    """`known` (the hashes of the first full blocks) extended to every full block of `tokens`."""
    out = list(known)
    parent = out[-1] if out else None
    for i in range(len(out), len(tokens) // block_size):
        parent = hash((parent, tuple(tokens[i * block_size:(i + 1) * block_size])))
        out.append(parent)
    return out


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: List[int] = list(range(num_blocks, 0, -1))  # pop() takes the lowest
        self.refs = [0] * (num_blocks + 1)
        self.hash_of: Dict[int, int] = {}
        self.by_hash: Dict[int, int] = {}
        self.lru: "collections.OrderedDict[int, None]" = collections.OrderedDict()  # cached, refcount 0

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached and unreferenced)."""
        return len(self.free) + len(self.lru)

    @property
    def in_use(self) -> int:
        return self.num_blocks - self.available

    @property
    def cached(self) -> int:
        return len(self.by_hash)

    def allocate(self) -> Optional[int]:
        """A block with refcount 1 (evicting the least recently used cached one if none is free), or None."""
        if self.free:
            block = self.free.pop()
        elif self.lru:
            block, _ = self.lru.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
        else:
            return None
        self.refs[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            assert self.refs[block] >= 0
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.lru[block] = None
                else:
                    self.free.append(block)

    def lookup(self, hashes: Sequence[int]) -> List[int]:
        """The cached blocks of the longest prefix of `hashes` (no references taken)."""
        hits = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def take(self, blocks: Sequence[int]) -> None:
        """One more reference to each block (prefix hits)."""
        for block in blocks:
            if self.refs[block] == 0:
                del self.lru[block]
            self.refs[block] += 1

    def register(self, block: int, h: int) -> None:
        """Make a full, computed block findable under its hash (unless an equal one already is)."""
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h
