"""The inference engine: continuous batching on a background thread.

    from moekit.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer, max_batch=32, kv_budget="256MiB").start()
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1))
    for event in handle:                 # streaming: new token ids and text deltas
        print(event.text, end="")
    handle.result()                      # Completion(token_ids, text, finish_reason, ...)
    handle.cancel()                      # frees its KV blocks at the next step boundary
    engine.metrics(); engine.stop()

KV memory is paged (kv.py, scheduler.py): the budget is `block_size`-token blocks, a request
grows block by block, and when blocks run out the newest running request is preempted and later
recomputed (same tokens and logprobs). With `prefix_caching` (default), full blocks of equal
leading tokens are shared between requests and their prefill is skipped. Layer caches opt in to
paging through the protocol in paged.py (`paged = False`: a per-request row of a row pool, as
sliding-window rings and recurrent states need); a model with such a layer runs without prefix
caching (`metrics()["prefix_caching_note"]` says why).

Bitwise batch invariance (default; docs/architecture.md): a request's tokens and logprobs are
the same whatever runs beside it (where the device's GEMMs allow it; `batch_invariant=True` insists, the
default None warns and runs plain where they do not). `batch_invariant=False` drops that for speed, as vLLM does:
plain numerics, no row padding, flash attention, the dense expert path for busy batches.
`row_quantum` (default: measured, `numerics.gemm_row_quantum`) pads the invariant policy's GEMM rows.
`compile=True` runs the decode steps through torch.compile (forward.py), paid by the first ones.

Without `start()` the engine runs synchronously: `handle.result()`, iteration and
`engine.generate(...)` drive `engine.step()` themselves (handy in scripts and tests).

Threading: `submit`/`cancel` validate on the caller's thread (errors.py) and queue the request
for the engine thread, the only one that runs the model. Events go to the handle's queue, or
only to its `on_event` callback (run on the engine thread: keep it cheap). Once `max_queue`
requests wait for admission, `submit` raises QueueFullError. Design: docs/architecture.md.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import logging
import queue
import sys
import threading
import time
import traceback
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .. import cpu_matvec
from ..numerics import PLAIN, Numerics, batch_invariant as invariant_numerics
from ..rope import rope_table
from ..sampling import choose_tokens, ends_with_stop, new_generator, top_logprobs
from .errors import ContextLengthError, EngineStoppedError, ParamError, QueueFullError
from .forward import DecodeStep, bucket_rows, prefill_forward
from .kv import KVPool, parse_budget
from .metrics import EngineMetrics
from .params import Completion, Event, SamplingParams, stop_sequences
from .scheduler import Scheduler, Sequence as Seq
from .text import TextStream

log = logging.getLogger(__name__)


class RequestHandle:
    """A submitted request: iterate for streaming events, `result()` for the Completion, `cancel()`."""

    def __init__(self, engine: "Engine", seq_id: int, on_event: Optional[Callable[[Event], None]]):
        self.engine, self.id, self._on_event = engine, seq_id, on_event
        self._events: "queue.SimpleQueue[Event]" = queue.SimpleQueue()  # (C: no Python lock per call)
        self._done = threading.Event()
        self.completion: Optional[Completion] = None
        self._seq: Optional[Seq] = None

    def _push(self, event: Event) -> None:  # engine thread
        if event.completion is not None:
            self.completion = event.completion
        if self._on_event is None:
            self._events.put(event)
        else:  # events go to the callback only (iteration is for handles without one)
            try:
                self._on_event(event)
            except Exception:  # a consumer's bug must not take the engine down
                traceback.print_exc()
        if event.completion is not None:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def next_event(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event, or None after `timeout` seconds without one (handles without on_event)."""
        if self._on_event is not None:
            raise ValueError("this request's events go to its on_event callback; it has no event queue")
        if not self.engine.threaded:
            while self._events.empty() and not self.done:
                self.engine.step()
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self):
        while True:
            event = self.next_event()  # no timeout: never None
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: Optional[float] = None) -> Completion:
        if not self.engine.threaded:
            while not self.done:
                self.engine.step()
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self.completion

    def cancel(self) -> None:
        """Stop generating; its KV blocks are freed at the next step boundary."""
        if not self.done and self._seq is not None:
            self._seq.cancel_requested = True
            self.engine._inbox.put(("cancel", self._seq))
            self.engine._wake.set()


class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch: int = 32, kv_budget: Union[int, str, None] = None,
                 prefill_chunk: int = 128, max_step_tokens: int = 1024, max_queue: int = 1024,
                 eos_token_ids: Sequence[int] = (), row_quantum: Optional[int] = None, compile: bool = False,
                 batch_invariant: Optional[bool] = None, block_size: int = 16, prefix_caching: bool = True,
                 return_routed_experts: bool = False):
        cfg = model.cfg
        for name, v, low in (("max_batch", max_batch, 1), ("prefill_chunk", prefill_chunk, 1),
                             ("max_step_tokens", max_step_tokens, 1), ("max_queue", max_queue, 1),
                             ("row_quantum", 1 if row_quantum is None else row_quantum, 1),
                             ("block_size", block_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if row_quantum is not None and row_quantum & (row_quantum - 1):
            raise ValueError(f"row_quantum must be a power of two, got {row_quantum}")
        if prefill_chunk > max_step_tokens:
            raise ValueError(f"prefill_chunk={prefill_chunk} exceeds max_step_tokens={max_step_tokens}")
        for moe in model.moe_layers():
            if moe.cfg.token_rounding is not None:
                raise ValueError("the engine needs per-token routing; token_rounding makes a token's experts "
                                 "depend on the rest of the batch")
        weight = model.embed.weight
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device, self.dtype = weight.device, weight.dtype
        for name, v in (("batch_invariant", True if batch_invariant is None else batch_invariant), ("compile", compile),
                        ("prefix_caching", prefix_caching), ("return_routed_experts", return_routed_experts)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be True or False, got {v!r}")
        self._threads = torch.get_num_threads()
        self.return_routed_experts = return_routed_experts  # every step records the sampled rows' experts
        self.numerics = self.choose_numerics(batch_invariant, row_quantum)
        cpu_matvec.prepare("f32", self.device)  # the C kernels (paged decode attention) from the first step on
        with torch.no_grad():
            self._rope = rope_table(model.inv_freq, cfg.max_seq_len, self.dtype)
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        budget = max_batch * cfg.max_seq_len if kv_budget is None else parse_budget(kv_budget, model, self.dtype)
        self.kv = KVPool(model, bucket_rows(max_batch, self.numerics.row_quantum), budget, block_size, self.dtype,
                         self.device)
        self.decode_step = DecodeStep(model, self.kv, self.numerics, self._rope, compile)
        self.prefix_caching_note = None
        if prefix_caching and not self.kv.all_paged:
            kinds = sorted({type(c).__name__ for c, p in zip(self.kv.layers, self.kv.paged) if not p})
            self.prefix_caching_note = f"prefix caching is off: layer caches {', '.join(kinds)} are not paged"
            log.info("moekit engine: %s", self.prefix_caching_note)
            prefix_caching = False
        self.prefix_caching = prefix_caching
        self.metrics_ = EngineMetrics()
        self.scheduler = Scheduler(self.kv, max_batch, prefill_chunk, max_step_tokens, prefix_caching,
                                   self.numerics.batch_invariant, self.metrics_)
        self.max_queue = max_queue
        self._inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self._ids = itertools.count()
        self._queued = 0  # submitted, not yet admitted (inbox + waiting)
        self._lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._resume = threading.Event()
        self._resume.set()
        self._wake = threading.Event()  # set on every submission and cancellation
        self.thread_error: Optional[str] = None

    def choose_numerics(self, batch_invariant: Optional[bool], row_quantum: Optional[int]) -> Numerics:
        """The policy: plain (False), bitwise batch-invariant (True: ValueError where this device's GEMMs cannot
        be made so), or invariant where they can and plain with a warning where not (None, the default).
        row_quantum None: measured (numerics.gemm_row_quantum)."""
        if batch_invariant is False:
            return PLAIN
        if row_quantum is not None:
            return Numerics(row_quantum, True)
        try:
            return invariant_numerics(self.device, self.dtype)
        except ValueError as err:
            if batch_invariant:
                raise
            log.warning("%s: running with plain numerics (a request's logits may change with what runs beside it)",
                        err)
            return PLAIN

    # ------------------------------------------------------------------ submission (any thread)
    @property
    def threaded(self) -> bool:
        return self._thread is not None

    def _make_seq(self, prompt: List[int], params: SamplingParams, on_event) -> Seq:
        cfg = self.model.cfg
        params.validate(cfg.vocab_size, self.tokenizer is not None)
        if params.return_routed_experts and not self.return_routed_experts:
            raise ParamError("return_routed_experts needs an engine built with return_routed_experts=True "
                             "(moekit serve --enable-return-routed-experts)", "return_routed_experts")
        if len(prompt) >= cfg.max_seq_len:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens; the model's context window is "
                                     f"{cfg.max_seq_len} tokens, which leaves no room to generate", "prompt")
        if len(prompt) + params.max_tokens > cfg.max_seq_len:
            raise ContextLengthError(
                f"this model's maximum context length is {cfg.max_seq_len} tokens, but {len(prompt)} prompt tokens "
                f"+ max_tokens={params.max_tokens} = {len(prompt) + params.max_tokens}; lower max_tokens to at most "
                f"{cfg.max_seq_len - len(prompt)}", "max_tokens")
        self.kv.check_fits(len(prompt) + params.max_tokens)
        stops = stop_sequences(params.stop_token_ids, () if params.ignore_eos else self.eos_token_ids, cfg.vocab_size)
        text = TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
        seq_id = next(self._ids)
        handle = RequestHandle(self, seq_id, on_event)
        generator = new_generator(params.temperature, params.seed, self.device)
        seq = Seq(seq_id, prompt, params, stops, generator, text, handle)
        handle._seq = seq
        seq.routed_experts, seq.routed_emitted = [], 0  # per fed generated token (params.py)
        return seq

    def submit(self, prompt, params: Optional[SamplingParams] = None,
               on_event: Optional[Callable[[Event], None]] = None) -> RequestHandle:
        """Queue one request; raises on invalid parameters or a full queue (nothing queued then)."""
        cb = None if on_event is None else (lambda i, event: on_event(event))
        return self.submit_n(prompt, params, 1, cb)[0]

    def submit_n(self, prompt, params: Optional[SamplingParams] = None, n: int = 1,
                 on_event: Optional[Callable[[int, Event], None]] = None) -> List[RequestHandle]:
        """n independent choices of one prompt (n sub-requests); choice i uses seed + i when a seed
        is set. `on_event(i, event)` receives the choice index with each event."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ParamError(f"n must be an integer >= 1, got {n!r}", "n")
        params = params or SamplingParams()
        prompt, seqs = self.check_prompt(prompt), []
        for i in range(n):
            p = params if params.seed is None or i == 0 else params.replace(seed=params.seed + i)
            cb = None if on_event is None else (lambda event, i=i: on_event(i, event))
            seqs.append(self._make_seq(prompt, p, cb))
        with self._lock:
            if self._stopping or self.thread_error is not None:
                raise EngineStoppedError("the engine is stopped" + (f": {self.thread_error}" if self.thread_error
                                                                    else ""))
            if self._queued + n > self.max_queue:
                self.metrics_.count("rejected_queue_full", n)
                raise QueueFullError(f"the admission queue is full ({self._queued} requests waiting, "
                                     f"max_queue={self.max_queue}); retry later")
            self._queued += n
            for seq in seqs:
                self._inbox.put(("add", seq))
        self._wake.set()
        self.metrics_.count("requests_submitted", n)
        return [s.handle for s in seqs]

    def warmup(self) -> None:
        """One request, then two (on the engine thread once started): compiles each decode-step variant. Then
        every object alive (the model, the compiled code) is moved out of the cyclic garbage collector's reach
        (`gc.freeze`, as long-running servers do): a full collection otherwise scans the compiled model's heap,
        a pause of every running request of a large fraction of a second (benchmarks/results/serve_cpu.md)."""
        for n in (1, 2):
            self.generate([[0]] * n, SamplingParams(max_tokens=2, ignore_eos=True))
        gc.collect()
        if not gc.get_freeze_count():  # the first freeze: thawed at exit, so the final collection still runs
            atexit.register(gc.unfreeze)  # (frozen extension objects are otherwise reported as leaked)
        gc.freeze()

    def check_prompt(self, prompt) -> List[int]:
        """The prompt as a list of token ids, or ParamError."""
        V = self.model.token_limit
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (list, tuple)) or not prompt:
            raise ParamError("prompt must be a non-empty list of token ids", "prompt")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                raise ParamError(f"prompt holds {t!r}, not a token id in [0, {V})", "prompt")
        if len(prompt) > self.model.cfg.max_seq_len:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens; the model's context window is "
                                     f"{self.model.cfg.max_seq_len}", "prompt")
        return list(prompt)

    def score(self, tokens: List[int], top_n: int = 0) -> Tuple[List[float], List[list]]:
        """Log-probabilities of tokens[1:] each given the tokens before it (one plain forward over the whole
        sequence, between engine steps), and with top_n > 0 the top_n most likely (id, logprob) at those
        positions: what `echo` + `logprobs` return for a prompt (lm-eval's log-likelihoods)."""
        tokens = self.check_prompt(tokens)
        with self._step_lock, torch.inference_mode():
            tokens_1T = torch.tensor([tokens], device=self.model.embed.weight.device)
            logprobs_TV = torch.log_softmax(self.model(tokens_1T)[0, :-1].float(), dim=-1)
            picked = logprobs_TV.gather(-1, tokens_1T[0, 1:, None])[:, 0].tolist()
            tops = [top_logprobs(row, top_n) for row in logprobs_TV] if top_n else []
        return picked, tops

    def generate(self, prompts, params: Union[SamplingParams, Sequence[SamplingParams], None] = None
                 ) -> List[Completion]:
        """Submit every prompt at once and wait for all (list of Completion, in order)."""
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        handles = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        return [h.result() for h in handles]

    # ------------------------------------------------------------------ engine thread
    def _drain(self) -> None:
        while not self._inbox.empty():  # (only this thread takes from the inbox: no race to an empty get)
            kind, seq = self._inbox.get_nowait()
            if kind == "add":
                if seq.cancel_requested:
                    self._dequeued(1)
                    self._finish(seq, "cancelled")
                else:
                    self.scheduler.waiting.append(seq)
            elif kind == "cancel" and seq.finish_reason is None:
                if not seq.admitted_before and seq in self.scheduler.waiting:  # still queued
                    self._dequeued(1)
                self._finish(seq, "cancelled")

    def _dequeued(self, n: int) -> None:
        with self._lock:
            self._queued -= n

    def step(self) -> bool:
        """One scheduling step: admit, run the decode step and/or one ragged prefill forward, sample.
        False when there was nothing to do."""
        with self._step_lock:
            self._drain()
            admitted = self.scheduler.admit()
            if admitted:
                self._dequeued(len(admitted))
            plan = self.scheduler.plan()
            if not plan:
                return False
            decoding = [s for s in plan if not s.in_prefill]
            prefilling = [s for s in plan if s.in_prefill]
            segments = [s.next_segment(self.scheduler.prefill_chunk, self.kv) for s in prefilling]
            prompt_tokens = sum(len(g.tokens) for g in segments)
            sampled_rows = [i for i, s in enumerate(decoding) if s.samples]  # not recomputed tokens
            routing = self.return_routed_experts
            with torch.inference_mode():  # (once: the forwards and the choice)
                try:
                    logits_RV, argmax_G, routed_R = self.step_logits(decoding, segments, sampled_rows, routing)
                except Exception as err:  # fail this step's requests, keep serving the rest
                    traceback.print_exc()
                    for s in plan:
                        self._finish(s, "error", f"{type(err).__name__}: {err}")
                    return True
                for s, g in zip(prefilling, segments):
                    s.computed += len(g.tokens)
                for s in decoding:
                    s.computed += 1
                for s in plan:
                    self.scheduler.register_computed(s)
                sampled = [decoding[i] for i in sampled_rows] + [s for s, g in zip(prefilling, segments)
                                                                 if g.want_logits]
                for s, entry in zip(sampled, routed_R or ()):  # the routing of the token each row fed
                    wanted = s.params.return_routed_experts and s.computed - 1 - len(s.prompt) == len(s.routed_experts)
                    if wanted:  # (a recomputed token's entry is known already)
                        s.routed_experts.append(entry)
                choices = self._choose(logits_RV, sampled, argmax_G)
            for s, choice in zip(sampled, choices):
                if isinstance(choice, Exception):  # only this request fails
                    self._finish(s, "error", f"{type(choice).__name__}: {choice}")
                else:
                    self._append(s, *choice)
            self.metrics_.record_step(prompt_tokens, len(sampled))
            return True

    def step_logits(self, decoding: list, segments: list, sampled_rows: list, routing: bool):
        """(R, V) logits of the rows sampled this step (the decoding rows in `sampled_rows`, then the prefill
        segments that want logits), the argmax of the first G of them (the decoding rows': computed in the decode
        step) or None, and with routing their experts (a list per row) or None."""
        logits, routed, argmax_G = [], [], None
        if decoding:  # first: its throw-away rows write above every row's computed slots
            logits_RV, argmax_G, routed_RLK = self.decode_step(decoding, self.scheduler.running, routing)
            if len(sampled_rows) < len(decoding):
                logits_RV, argmax_G = logits_RV[sampled_rows], argmax_G[sampled_rows]
                routed_RLK = None if routed_RLK is None else routed_RLK[sampled_rows]
            logits.append(logits_RV)
            routed += [routed_RLK] if routing else []
        if segments:
            out = prefill_forward(self.model, segments, self.numerics, self._rope, routing)
            logits.append(out[0] if routing else out)
            routed += [out[1]] if routing else []
        logits_RV = logits[0] if len(logits) == 1 else torch.cat(logits)
        return logits_RV, argmax_G, torch.cat(routed).tolist() if routing else None

    def _choose(self, logits_RV: torch.Tensor, sampled: list, argmax_G: Optional[torch.Tensor]) -> list:
        """(token, logprob) per row (argmax_G: of the first rows, or None); when the batched choice fails,
        each row alone, so a failure is an Exception in the row of the request it concerns and the others carry
        on."""
        try:
            return choose_tokens(logits_RV, sampled, argmax_G)
        except Exception:  # noqa: BLE001 -- find the row(s) at fault below
            traceback.print_exc()
        out = []
        for r, s in enumerate(sampled):
            try:
                out.append(choose_tokens(logits_RV[r:r + 1], [s])[0])
            except Exception as err:  # noqa: BLE001
                out.append(err)
        return out

    def _append(self, s: Seq, token: int, logprob: Optional[float], top: Optional[list] = None) -> None:
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
        s.out.append(token)
        if logprob is not None:
            s.logprobs.append(logprob)
        if top is not None:
            s.top_logprobs.append(top)
        s.generated += 1
        reason = None
        n_stop = ends_with_stop(s.out, s.stops) if s.stops else 0
        if n_stop:
            del s.out[-n_stop:]
            del s.logprobs[len(s.out):]
            del s.top_logprobs[len(s.out):]
            del s.routed_experts[len(s.out):]
            reason = "stop"
        if s.text is not None and s.text.update(s.out):
            reason = "stop"
        if reason is None and s.generated >= s.params.max_tokens:
            reason = "length"
        if reason is not None:
            self._finish(s, reason)
            return
        s.handle._push(self._event(s, s.text.delta() if s.text is not None else ""))

    def _finish(self, s: Seq, reason: str, error: Optional[str] = None) -> None:
        if s.finish_reason is not None:
            return
        self.scheduler.remove(s)
        s.finish_reason = reason
        now = time.perf_counter()
        delta, text = "", None
        if s.text is not None:
            if reason in ("cancelled", "error"):
                s.text.update(s.out)
            delta, text = s.text.delta(final=True), s.text.text
        completion = Completion(
            prompt_tokens=len(s.prompt), token_ids=list(s.out), text=text, finish_reason=reason,
            logprobs=list(s.logprobs) if s.params.logprobs else None,
            top_logprobs=list(s.top_logprobs) if s.params.top_logprobs else None, error=error,
            routed_experts=list(s.routed_experts[:len(s.out)]) if s.params.return_routed_experts else None,
            time_to_first_token=None if s.first_token_at is None else s.first_token_at - s.arrival,
            latency=now - s.arrival, generated_tokens=s.generated)
        self.metrics_.count(f"finished_{reason}")
        s.handle._push(self._event(s, delta, reason, completion))

    @staticmethod
    def _event(s: Seq, text: str, reason: Optional[str] = None, completion: Optional[Completion] = None) -> Event:
        """The tokens (with their logprobs) since the last event, and `text`."""
        a, b = s.emitted, len(s.out)
        s.emitted = b
        routed = s.routed_experts[s.routed_emitted:b]  # (they lag the tokens by one step)
        s.routed_emitted += len(routed)
        return Event(s.out[a:b], text, reason, completion, s.logprobs[a:b], s.top_logprobs[a:b], routed)

    def run_until_idle(self) -> None:
        while self.step():
            pass

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        """Run steps on a background (daemon) thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="moekit-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(self._threads)  # the creator's setting (a new thread starts at the default)
        try:
            while not self._stopping:
                if not self._resume.is_set():
                    self._resume.wait(0.05)
                    continue
                busy = self.scheduler.running or self.scheduler.waiting or not self._inbox.empty()
                if not (busy and self.step()):  # idle: sleep until a submission or cancel
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as err:  # noqa: BLE001 -- report, and refuse new work
            self.thread_error = f"{type(err).__name__}: {err}"
            traceback.print_exc(file=sys.stderr)
            self._fail_all("error", self.thread_error)

    def _fail_all(self, reason: str, error: Optional[str] = None) -> None:
        with self._step_lock:
            self._drain()
            for s in list(self.scheduler.waiting) + list(self.scheduler.running):
                self._finish(s, reason, error)
            with self._lock:
                self._queued = 0

    def pause(self) -> None:
        """Stop stepping (requests still queue); `resume()` continues. For draining and tests."""
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    def stop(self) -> None:
        """Stop the thread; unfinished requests end with finish_reason 'cancelled'."""
        with self._lock:
            self._stopping = True
        self._resume.set()
        if self._thread is not None:
            self._thread.join()
        self._fail_all("cancelled")

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict:
        running = list(self.scheduler.running)
        prompt_rate, gen_rate, totals = self.metrics_.snapshot()
        kv, blocks = self.kv, self.kv.blocks
        queried = totals.get("prefix_query_tokens", 0)
        return {
            "queue_depth": self._queued,
            "running": len(running),
            "kv_capacity_tokens": kv.capacity,
            "kv_reserved_tokens": blocks.in_use * kv.block_size,
            "kv_used_tokens": sum(s.computed for s in running),
            "kv_usage": blocks.in_use / blocks.num_blocks,
            "kv_bytes_per_token": kv.bytes_per_token,
            "kv_block_size": kv.block_size,
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_in_use": blocks.in_use,
            "kv_blocks_cached": blocks.cached,
            "kv_blocks_free": len(blocks.free),
            "prefix_caching": self.prefix_caching,
            "prefix_caching_note": self.prefix_caching_note,
            "prefix_cache_hit_rate": totals.get("prefix_hit_tokens", 0) / queried if queried else 0.0,
            "preemptions": totals.get("preemptions", 0),
            "prompt_tokens_per_s": prompt_rate,
            "generation_tokens_per_s": gen_rate,
            "totals": totals,
            "thread_alive": self._thread is not None and self._thread.is_alive(),
        }
