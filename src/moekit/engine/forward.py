"""The engine's two uses of the model's one forward, under its numerics policy (numerics.py:
batch-invariant by default, so a request's logits are bitwise the same whatever else runs):

  * prefill: prompt chunks of several requests side by side in one ragged batch
    (`ForwardPlan.ragged`), each written into and attending over its own blocks (or row).
    Eager. Chunk boundaries are fixed multiples of prefill_chunk (independent of the load).
  * decode: one token for every request past its prefill, one static-shape batch (the model's static
    decode kernels, compiled or eager) over rows [0, bucket) and logical slots [0, S_bucket)
    (`Transformer.decode_step`): the batch rounded
    up to a power of two (at least 2 where the step computes each row alone, `DecodeStep.row_products`,
    else a multiple of the row quantum), the cache length to a power of two
    >= 64. Paged layers read through the bucket's slot table (from the block tables) and
    write at each row's pool slot (kv.py). Under `compile=True` with invariance: dynamic
    shapes from the start, so every bucket runs the same generated code. Rows that are not
    decoding (empty, or still in their prefill) skip the routed experts (`active_rows`), write
    throw-away state to the trash block (paged layers) or at slot S_bucket - 1 of their row
    (row-pool layers: no request has written it yet) and attend over that slot alone (`valid_BS`: no work
    over a cache they do not have); the step returns the decoding rows' logits only
    (`Transformer.active_logits`: where the head computes rows alone it multiplies those rows only).

Legend: R rows with logits, V vocab, B bucket rows, S cache slots.
"""

from __future__ import annotations

import functools
from array import array
from dataclasses import replace
from typing import List, Sequence

import torch

from ..numerics import Numerics, round_up, rows_multiplied
from ..plan import ForwardPlan, Segment, stack_routed
from ..runtime import compiled_step
from ..sampling import greedy
from .kv import TRASH
from .paged import decoding_view

PAD_ID, MIN_SLOTS = 0, 64
# the fewest rows of an invariant decode bucket whose products compute each row alone: dynamo specialises a size
# of 1, so a bucket of 1 would run other generated code (other bits) than the buckets of 2 and more
ROWWISE_MIN_ROWS = 2


def prefill_forward(model, segments: List[Segment], numerics: Numerics, rope_table, routing: bool = False):
    """(R, V) float logits of the segments with want_logits, in order; routing=True: and (R, L, K),
    the experts of those rows (the token each feeds) in the L MoE layers."""
    device = model.embed.weight.device
    tokens = [t for s in segments for t in s.tokens]
    rows = round_up(max(len(tokens), 1), numerics.row_quantum)
    tokens_1N = torch.tensor([tokens + [PAD_ID] * (rows - len(tokens))], dtype=torch.long, device=device)
    plan = ForwardPlan.ragged(segments, rows, numerics, rope_table, device)
    plan.routed_experts = [] if routing else None
    logits_RV = model.forward_plan(tokens_1N, plan)
    if not routing:
        return logits_RV
    return logits_RV, stack_routed(plan.routed_experts, (rows,), device)[plan.logits_rows]


def packed_decode_step(model, ids_4B: torch.Tensor, table_N: torch.Tensor, cache, numerics: Numerics, rope_table,
                       static: bool, rows_R: torch.Tensor, routing: bool):
    """`model.decode_step` over the engine's ids in one tensor, rows: tokens, cache slots, each row's first
    visible slot, pool slots written (paged layers), and the paged layers' slot table flattened (B * S,). One
    tensor of ids and a flat table: a compiled step then takes one size for the bucket's rows, one for the
    table (S follows), and no views' storage offsets as its inputs. Returns (logits (R, V), their argmax (R,),
    routed experts (B, L, K) or None): the greedy choice made in the step's code (an eager argmax over a
    vocabulary costs more than the rest of a greedy step's sampling)."""
    torch._check(rows_R.shape[0] >= 1)  # (the row count is unbacked under compile: see DecodeStep.__call__)
    cache = decoding_view(cache, table_N.view(ids_4B.shape[1], -1), ids_4B[3])
    valid_BS = torch.arange(cache.max_len, device=ids_4B.device)[None, :] >= ids_4B[2, :, None]
    out = model.decode_step(ids_4B[0, :, None], ids_4B[1, :, None], ids_4B[1], valid_BS, cache, numerics,
                            rope_table, static, rows_R, routing)
    logits_RV, routed_BLK = out if routing else (out, None)
    return logits_RV, greedy(logits_RV), routed_BLK


class StepInputs:
    """A decode bucket's integer inputs `ids_4B` (per row: the token fed, its cache slot, the first slot it sees,
    the pool slot it writes), written from Python without a torch call: on the CPU the tensor is a view of the
    Python array `ids`; elsewhere `sync()` copies the array over. `idle()` makes every row one that does not
    decode: a padding token at slot S - 1 that sees that slot alone and writes to the trash block (see the
    module docstring). Its first size is static under torch.compile (one symbolic size fewer to pass)."""

    def __init__(self, B: int, S: int, block_size: int, device: torch.device):
        self.idle_ids = array("q", [PAD_ID] * B + [S - 1] * B + [S - 1] * B + [TRASH * block_size] * B)
        self.ids = array("q", self.idle_ids)
        host_4B = torch.frombuffer(self.ids, dtype=torch.long).view(4, B)
        self.host_4B = None if device.type == "cpu" else host_4B
        self.ids_4B = host_4B if self.host_4B is None else host_4B.to(device)
        torch._dynamo.mark_static(self.ids_4B, 0)

    def idle(self) -> None:
        self.ids[:] = self.idle_ids

    def sync(self) -> None:
        if self.host_4B is not None:
            self.ids_4B.copy_(self.host_4B)


def bucket_rows(n: int, quantum: int) -> int:
    """The smallest power of two >= n that is a multiple of `quantum` (quantum: a power of two)."""
    return max(quantum, 1 << (max(n, 1) - 1).bit_length())


class DecodeStep:
    """One token for each decoding request, over the KV pool (see the module docstring)."""

    def __init__(self, model, kv, numerics: Numerics, rope_table, compile: bool):
        # invariant: the float projections through the per-row C matvec (a GEMM's order follows the row count,
        # so they ran padded to the row quantum through MKL, slower at a few rows). Prefill keeps the GEMM.
        numerics = replace(numerics, rowwise_linears=numerics.batch_invariant)
        self.model, self.kv, self.numerics, self.rope_table = model, kv, numerics, rope_table
        self.device = model.embed.weight.device
        self.last_rows, self.rows_R = None, None  # the last step's decoding rows, and as a tensor
        self.inputs = {}  # (B, S) -> StepInputs
        self.fn = functools.partial(packed_decode_step, model)
        self.quantum = numerics.row_quantum  # the bucket's rows are a power of two and a multiple of this
        rows_alone = numerics.batch_invariant and not self.row_products()
        if rows_alone:
            self.quantum = ROWWISE_MIN_ROWS
        if compile:
            # invariant: dynamic shapes from the start, so every bucket runs the same generated code;
            # otherwise torch's automatic dynamic shapes (the first bucket, batch 1 alone, is
            # compiled for its exact shape: the fastest code for it)
            name = "engine_step" + ("_invariant" if numerics.batch_invariant else "")
            # every product in a C kernel (rows_alone): inductor's own kernels are one row's glue, run serially
            self.fn = compiled_step(model, name, True if numerics.batch_invariant else None, packed_decode_step,
                                    serial_kernels=rows_alone)
            # what every step passes unchanged (the pools, the RoPE table) keeps static sizes: otherwise dynamo
            # guards their symbolic sizes and strides in Python before every call
            for t in (*kv.persistent_tensors(), *rope_table):
                for each in (t, t._base) if t._base is not None else (t,):
                    torch._dynamo.mark_static(each)

    def row_products(self) -> list:
        """The operators of an eager step whose bits for a row may follow the row count (`rows_multiplied`:
        GEMMs, batched GEMMs, fused attention). An empty list (on the CPU in float32, each projection through the
        C matvec and paged attention through the C kernel): every row is computed alone, so the bucket needs no
        GEMM row quantum, only ROWWISE_MIN_ROWS; otherwise its rows are a multiple of the quantum. (The
        compiled step computes rows alone wherever the eager one does.) The probe: one step of a bucket where
        row 0 feeds a padding token at slot 0, writing to the trash block (paged layers) or at slot 0 of its
        row (row pools: rewritten by the row's next prefill, recurrent state reset when the row is taken)."""
        B, S = self.numerics.row_quantum, min(MIN_SLOTS, self.kv.max_slots)
        # in inference mode, as the engine's steps run: the bucket's tensors made here are of one kind with theirs
        # (else a compiled step's guard on their dispatch keys fails when a step reuses this bucket: a recompile)
        with torch.inference_mode():
            inputs, cache, table_N = self.bucket(B, S)
            inputs.idle()
            inputs.ids[B] = inputs.ids[2 * B] = 0  # row 0: slot 0
            inputs.sync()
            rows_R = torch.zeros(1, dtype=torch.long, device=self.device)
            return rows_multiplied(lambda: packed_decode_step(self.model, inputs.ids_4B, table_N, cache,
                                                              self.numerics, self.rope_table, True, rows_R, False))

    def bucket(self, B: int, S: int):
        """(StepInputs, cache, flat slot table) of the bucket of B rows and S slots; the same objects each time."""
        inputs = self.inputs.get((B, S))
        if inputs is None:
            inputs = self.inputs[(B, S)] = StepInputs(B, S, self.kv.block_size, self.device)
        return (inputs, *self.kv.decode_view(B, S))

    def __call__(self, decoding: Sequence, running: Sequence, routing: bool = False):
        """((R, V) float logits, (R,) their argmax, (R, L, K) experts or None), R = len(decoding): `decoding`
        feed their next known token (the last one, or one being recomputed), `running` are all requests holding
        rows (for the bucket's cache length). routing=True: each one's experts in the L MoE layers."""
        last_row = computed = 0
        for s in running:  # the highest row and the longest request
            last_row, computed = max(last_row, s.row), max(computed, s.computed)
        B = bucket_rows(last_row + 1, self.quantum)
        S = min(max(MIN_SLOTS, 1 << computed.bit_length()), self.kv.max_slots)
        bs = self.kv.block_size
        inputs, cache, table_N = self.bucket(B, S)
        inputs.idle()
        ids = inputs.ids
        for s in decoding:  # per row: token, slot, first visible slot, pool slot written
            row, slot = s.row, s.computed
            ids[row], ids[B + row], ids[2 * B + row] = s.token(slot), slot, 0
            ids[3 * B + row] = s.blocks[slot // bs] * bs + slot % bs
        inputs.sync()
        rows = [s.row for s in decoding]
        order = None if len(rows) == 1 else sorted(range(len(rows)), key=rows.__getitem__)
        if order is not None:
            rows = [rows[i] for i in order]
        if rows != self.last_rows:  # (the same rows step after step while no request joins or leaves)
            self.last_rows, self.rows_R = rows, torch.tensor(rows, dtype=torch.long, device=self.device)
            if self.numerics.batch_invariant:
                # an unbacked size: dynamo makes no graph of its own for one row (a backed size of 1 is
                # specialised, and a one-row graph once summed a hybrid model's recurrent layers in another order
                # than the graph for 2 or more): every row count runs one generated code
                torch._dynamo.decorators.mark_unbacked(self.rows_R, 0)
        rows_R = self.rows_R
        # static=True eager too: the routed experts per (token, expert) pair (`experts_static`, on CPU the C
        # matvec per pair) rather than the eager invariant kernel's padded per-expert GEMMs, which cost more at
        # a few rows; no input checks or load counts (the engine validated the tokens, nothing reads them)
        # the logits of rows_R (active_rows), their argmax, every row's experts
        logits_RV, argmax_R, routed_BLK = self.fn(inputs.ids_4B, table_N, cache, self.numerics, self.rope_table, True,
                                                  rows_R, routing)
        if logits_RV.dtype != torch.float32:
            logits_RV = logits_RV.float()
        if order is not None and order != sorted(order):
            back_R = torch.argsort(torch.tensor(order, device=self.device))
            logits_RV, argmax_R = logits_RV[back_R], argmax_R[back_R]
        if not routing:
            return logits_RV, argmax_R, None
        routed_RLK = routed_BLK.index_select(0, torch.tensor([s.row for s in decoding], device=self.device))
        return logits_RV, argmax_R, routed_RLK
