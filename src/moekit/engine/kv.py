"""KV-cache memory: the budget in blocks, the block pools, block tables and the cache views
the engine's two forwards run over.

The budget (tokens, or bytes of every layer's per-token state: `parse_budget`) becomes
`budget // block_size` blocks of `block_size` slots. A request holds a block table (its
blocks in position order) and grows block by block as it decodes; the sum never exceeds the
budget. Each layer cache that can be paged (paged.py) is one batch-1 pool of
(num_blocks + 1) x block_size slots, read through a slot table; a layer that cannot keeps
per-request rows of a row pool of `rows` x (min(context, budget) + 1) slots, as before paging.
Every running request also owns a row index: its row of the decode step's bucket.

`parse_budget` reads "4096" (tokens) or sizes such as "64MiB", "1.5GB" (bytes of k + v).
Legend: R rows, M blocks per row, B bucket rows, S slots, E a prefill's end slot.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..cache import Cache
from .blocks import BlockPool
from .errors import KVBudgetError
from .paged import PagedLayerCache, is_paged

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30}
TRASH = 0  # block 0: where the decode step's rows that do not decode write


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    """Bytes one token of one sequence occupies in the model's cache (every layer, of its kind)."""
    return model.new_cache(1, 1, dtype, "meta").nbytes_per_slot


def parse_budget(value: Union[str, int], model, dtype: torch.dtype) -> int:
    """A KV budget in tokens from an int / digit string (tokens) or a size with a unit (bytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        tokens = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"KV budget {value!r} is neither a token count (e.g. 8192) nor a size "
                             "(e.g. 256MiB, 1GB)")
        if unit == "":
            tokens = int(float(m.group(1)))
        else:
            tokens = int(float(m.group(1)) * _UNITS[unit]) // kv_bytes_per_token(model, dtype)
    if tokens < 1:
        raise ValueError(f"KV budget {value!r} holds no token (each token needs "
                         f"{kv_bytes_per_token(model, dtype)} bytes of k/v)")
    return tokens


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class KVPool:
    """Blocks (`self.blocks`, a BlockPool) and the tensors behind them, plus the row indices."""

    def __init__(self, model, rows: int, budget_tokens: int, block_size: int, dtype: torch.dtype, device):
        if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, int) or budget_tokens < 1:
            raise ValueError(f"kv budget must be a positive number of tokens, got {budget_tokens!r}")
        if budget_tokens < block_size:
            raise ValueError(f"KV budget of {budget_tokens} tokens holds no block of block_size={block_size} tokens")
        cfg = model.cfg
        self.block_size, self.rows, self.device = block_size, rows, torch.device(device)
        self.num_blocks = budget_tokens // block_size
        self.capacity = self.num_blocks * block_size  # tokens
        self.max_slots = min(cfg.max_seq_len, self.capacity)  # the longest a request can get
        self.bytes_per_token = kv_bytes_per_token(model, dtype)
        self.blocks = BlockPool(self.num_blocks)
        kinds = model.new_cache(1, 1, dtype, "meta").layers
        self.paged = [is_paged(layer) for layer in kinds]
        self.any_paged = any(self.paged)
        n_slots = (self.num_blocks + 1) * block_size
        # per layer: the batch-1 block pool (paged) or the row pool (one spare slot: every view of the first
        # S <= max_slots slots is then strided alike, so the compiled step never recompiles for its layout)
        self.layers = [model.layers[i].attn.new_cache(1, n_slots, dtype, self.device) if paged else
                       model.layers[i].attn.new_cache(rows, self.max_slots + 1, dtype, self.device)
                       for i, paged in enumerate(self.paged)]
        self.pools = [(layer.k[0], layer.v[0]) if paged else None for layer, paged in zip(self.layers, self.paged)]
        self.max_blocks = blocks_for(self.max_slots, block_size)
        self.table_RM = torch.full((rows, self.max_blocks), TRASH, dtype=torch.long, device=self.device)
        self.offsets = torch.arange(block_size, device=self.device)
        self.free_rows = list(range(rows))
        self.views: Dict[Tuple[int, int], tuple] = {}
        self.tables_changed = 0  # counts changes to table_RM: a view's slot table is rebuilt only after one
        self.view_built_at: Dict[Tuple[int, int], int] = {}  # (B, S) -> tables_changed when its table was built

    def persistent_tensors(self) -> List[torch.Tensor]:
        """Every tensor the pool allocated (the layers' state, the paged layers' pools: views of it)."""
        state = [t for layer in self.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        return state + [t for pool in self.pools if pool is not None for t in pool]

    @property
    def all_paged(self) -> bool:
        return all(self.paged)

    def check_fits(self, tokens: int) -> None:
        """Raise KVBudgetError when `tokens` can never fit (larger than the whole budget)."""
        if blocks_for(tokens, self.block_size) > self.num_blocks:
            raise KVBudgetError(
                f"the request needs {tokens} tokens of KV cache (prompt + max_tokens) but the server's whole "
                f"KV budget is {self.capacity} tokens; lower max_tokens or shorten the prompt", "max_tokens")

    # ------------------------------------------------------------------ rows and block tables
    def take_row(self) -> Optional[int]:
        if not self.free_rows:
            return None
        self.free_rows.sort()
        row = self.free_rows.pop(0)
        for layer, paged in zip(self.layers, self.paged):
            reset = getattr(layer, "reset_rows", None)
            if not paged and reset is not None:
                reset(row, row + 1)
        return row

    def release_row(self, row: int) -> None:
        self.table_RM[row].fill_(TRASH)
        self.tables_changed += 1
        self.free_rows.append(row)

    def set_blocks(self, row: int, first: int, blocks: List[int]) -> None:
        """Entries first.. of the row's block table."""
        if blocks:
            self.table_RM[row, first:first + len(blocks)] = torch.tensor(blocks, dtype=torch.long)
            self.tables_changed += 1

    def slot_table(self, rows: slice, slots: int) -> torch.Tensor:
        """(rows, slots) pool slots of logical slots [0, slots) of the rows, from their block tables."""
        m = blocks_for(slots, self.block_size)
        table = self.table_RM[rows, :m, None] * self.block_size + self.offsets
        return table.reshape(table.shape[0], -1)[:, :slots]

    # ------------------------------------------------------------------ the forwards' views
    def segment_cache(self, row: int, end: int) -> Cache:
        """One request's cache for a prefill chunk ending at slot `end` (batch 1)."""
        table_1E = self.slot_table(slice(row, row + 1), end)
        return Cache([PagedLayerCache(*pool, table_1E) if pool is not None else layer.rows(row, row + 1)
                      for layer, pool in zip(self.layers, self.pools)])

    def decode_view(self, B: int, S: int) -> Tuple[Cache, torch.Tensor]:
        """The decode bucket's cache and its slot table flattened, (B * S,) (the step views it as (B, S) and hands
        it to the paged layers with the pool slots they write: `paged.decoding_view`); the same objects for each
        (B, S), refreshed in place (cheaper guards under torch.compile), the slot table only after the block
        tables changed (a request grows by a block every block_size tokens)."""
        view = self.views.get((B, S))
        if view is None:
            table_BS = torch.zeros(B, S, dtype=torch.long, device=self.device)
            cache = Cache([PagedLayerCache(*pool, table_BS) if pool is not None else layer.rows(0, B).slots(S)
                           for layer, pool in zip(self.layers, self.pools)])
            view = self.views[(B, S)] = (cache, table_BS, table_BS.view(-1))
        cache, table_BS, table_N = view
        if self.any_paged and self.view_built_at.get((B, S)) != self.tables_changed:
            table_BS.copy_(self.slot_table(slice(0, B), S))
            self.view_built_at[(B, S)] = self.tables_changed
        return cache, table_N
