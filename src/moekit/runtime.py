"""Process-level runtime settings that entry points (CLI, benchmarks) opt into explicitly.

`tune_cpu_allocator()`: glibc serves large allocations with a fresh mmap and munmaps them
on free, so each CPU MoE training step re-faults hundreds of MiB of pages, which on small
machines can cost more than the arithmetic (benchmarks/results/moe_layer_cpu.md). Keeping
freed blocks in the heap (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB) removes that cost, at the
price of holding on to the peak heap. Entry points call it unless given --no-malloc-tune.

`compiled_step(model, name, dynamic, fn=None, serial_kernels=False)`: `model.decode_step` (or `fn(model, ...)`
around it: the engine's packed-ids step) under torch.compile, for moekit's decode steps (`generate(compile=True)`,
the engine), cached on the model. Five costs of a plain torch.compile of a method are avoided:
  * guards: before every call dynamo checks each module, parameter and buffer the step touched
    (a tenth to a quarter of a CPU decode step: benchmarks/results/serve_cpu.md). Every step is compiled
    without guards on the model's modules (`torch.compiler.skip_guard_on_all_nn_modules_unsafe`) and
    checks instead, per call, what can change
    a model in place without moekit knowing: train/eval mode, the dtype and device of its weights
    (`model_state`); a change compiles the step again.
    moekit's own transforms (quantize_model, set_activations, lowp's apply_precision,
    set_experts_impl) call `forget_compiled(model)`. Nor are there guards on globals (the functions and
    modules the step's code names, the C kernels' availability flag): they are fixed once a process has
    compiled a step, and checking them was a third of the engine's guards. What stays unseen: modules or
    parameters replaced by hand, hooks added after the first call, moekit's or torch's functions replaced
    (monkeypatched) after it; call `forget_compiled(model)` after those.
  * one cache for all models: dynamo keeps one cache per code object, and every model instance's
    `decode_step` shares one. Without module guards a second model would run the first one's graph, so
    each model's step gets a code object of its own (`private_method`). Each batch size and cache-length
    bucket is still one entry; past dynamo's default of 8 a `fullgraph=True` step stops compiling
    (generate would fall back to eager speed, the engine's requests would fail), so moekit raises the
    per-code limit to DECODE_RECOMPILE_LIMIT (never lowers it) where it compiles.
  * the Python wrapper: on CPU the generated code that calls a step's kernels is C++ (inductor's
    `cpp_wrapper`), not Python: measured in benchmarks/results/serve_cpu.md.
  * number inputs: dynamo passes float attributes (a norm's eps, a scaling factor) into the graph as
    inputs and checks each in Python before every call, and under dynamic shapes ints too (`Numerics`'
    row quantum); they never change in a decode step, so each step is traced with `specialize_float=True`
    and `specialize_int=True` (constants in the graph; measured in benchmarks/results/serve_cpu.md). A
    step with dynamic shapes is traced without duck sizing (`use_duck_shape=False`): equal sizes (rows,
    heads, slots) are not tied, so a later bucket where they differ runs the same graph. These settings
    only matter while dynamo traces, so they are made then (dynamo's compile-start and -end callbacks,
    for the step this thread calls), not around every call.
  * thread teams: inductor opens an OpenMP parallel region for every CPU kernel whose work it cannot bound
    at compile time, and under dynamic shapes that is nearly all of them, the copy of one row's 256 floats
    included (it sizes a symbolic dimension by a large guess). In the engine's invariant step every product
    and the attention run in moekit's C kernels, with their own parallel loops; what is left to inductor is
    one row's elementwise glue and norms, for which waking the other threads and waiting for them at the
    region's end costs more than the work (and when the host preempts a vCPU, each region waits for it).
    That step passes serial_kernels=True: inductor's kernels are generated for one thread (`cpp.threads=1`);
    the C kernels keep their threads.
  * dynamo's call path: before the generated code runs, dynamo evaluates the step's frame, checks its guards and
    gathers the graph's inputs from the arguments (every parameter of the model, each cache tensor, the symbolic
    sizes), and afterwards rebuilds the step's result: a large share of a CPU decode step
    (benchmarks/results/serve_cpu.md). A step called again with the same argument objects (the same tensors, of the
    same shapes) as its last call replays that call instead (`Replay`): it calls the graph dynamo chose then with
    the inputs dynamo gathered then, and builds the result the same way. The decode loops keep their inputs in place
    for this (the engine's `StepInputs`, generate's token and position buffers), so after a step's first call only a
    change of bucket or batch goes through dynamo again. What a replay does not see, beyond the first point's list:
    Python attributes of the arguments changed in place (a tensor's values are read by the graph every call; a
    reassigned attribute is not). Steps whose trace changes Python objects that exist outside it (a module
    attribute) are never replayed.

`materialized(x)`: inside a compiled graph, x computed once into a buffer of its own (identity in
eager). Inductor inlines a cheap pointwise producer, such as an RMSNorm's scaling, into each of its
consumers' loops; when the consumer is a one-row matmul that inductor turns into a reduction (CPU
decode, a quantized weight's fused matvec), the producer, a square root and a division included, is
then recomputed for every output row (a large q8_0 head after the final norm took over twice as long).
Norm outputs and fused-matvec inputs pass through it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import sys
import threading
import types

import torch
import torch.utils._pytree as pytree

from . import cpu_matvec
from .numerics import thread_count

DECODE_RECOMPILE_LIMIT = 256
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_cpu_allocator(trim_threshold: int = 1 << 30) -> bool:
    """Keep freed large blocks for reuse (glibc only). Returns True when applied."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def materialized(x: torch.Tensor) -> torch.Tensor:
    """x realized as its own buffer when traced by torch.compile (see the module docstring); x itself in eager
    and where x needs a gradient (the realizing op has no backward; training's matmuls realize x anyway)."""
    if not torch.compiler.is_compiling() or x.requires_grad:
        return x
    from torch._inductor import inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
    stride, step = [], 1  # row-major: also for an expanded x (a 0 stride cannot be written to)
    for size in reversed(x.shape):
        stride.insert(0, step)
        step = step * size
    return torch.ops.prims.inductor_force_stride_order(x, stride)


def compiled_step(model, name: str, dynamic, fn=None, serial_kernels: bool = False):
    """`model.decode_step` (or `fn(model, ...)`, a function around it) compiled (see the module docstring), cached
    on the model under `name`. serial_kernels=True: inductor's own CPU kernels run on one thread (see the module
    docstring)."""
    key = "_compiled_" + name
    step = model.__dict__.get(key)
    if step is None:
        step = model.__dict__[key] = CompiledStep(model, dynamic, fn or type(model).decode_step, serial_kernels)
    return step


def forget_compiled(model) -> None:
    """Drop `model`'s compiled steps (after a change to its modules: the next call compiles again)."""
    for key in [k for k in model.__dict__ if k.startswith("_compiled_")]:
        del model.__dict__[key]


def model_state(model) -> tuple:
    """What a compiled step checks per call instead of guards: train/eval mode, the weights' dtype and device."""
    weight = model.embed.weight
    return model.training, weight.dtype, weight.device


class CompiledStep:
    """`step(model, ...)` (`Transformer.decode_step` or a function around it) compiled with fullgraph=True,
    without guards on the model's modules, on a code object of its own; compiled again when `model_state`
    changes. Python numbers passed in (a norm's eps, `Numerics.row_quantum`) are constants of the graph;
    under dynamic shapes, equal sizes are not tied (`trace_settings`)."""

    def __init__(self, model, dynamic, step, serial_kernels: bool = False):
        self.model, self.dynamic, self.step, self.serial_kernels = model, dynamic, step, serial_kernels
        self.state, self.fn, self.replay = None, None, None
        self.settings = trace_settings(dynamic)

    def __call__(self, *args):
        state = model_state(self.model)
        if state != self.state:
            self.state, self.replay = state, None
            self.fn = compile_fn(private_method(types.MethodType(self.step, self.model)), self.dynamic,
                                 self.model.embed.weight.device, self.serial_kernels)
        replay = self.replay
        if replay is not None and replay.matches(args):
            return replay()
        self.replay = None
        tracing.settings = self.settings  # what dynamo's compile-start callback applies, should this call trace
        register_trace_callbacks()  # (again after a torch._dynamo.reset(), which drops every callback)
        watching.calls = []  # the graph calls of this call (RecordedGraph)
        try:
            result = self.fn(*args)
            self.replay = Replay.of(args, watching.calls, result)
            return result
        finally:
            tracing.settings = watching.calls = None

    def release(self) -> None:
        """Drop the last call's arguments (a replay holds them: a finished generate's cache, say)."""
        self.replay = None


# per thread: the graph calls made during the dynamo call of a step in progress, or None
watching = threading.local()


class RecordedGraph:
    """A graph inductor compiled for a step, as dynamo calls it; while a step's dynamo call is in progress on this
    thread, each call's inputs and outputs are noted (for `Replay`). replayable: dynamo's trace changed no Python
    object that existed before it (only such changes would run outside the graph)."""

    def __init__(self, compiled, replayable: bool):
        self.compiled, self.replayable = compiled, replayable

    def __call__(self, *args):
        outputs = self.compiled(*args)
        calls = getattr(watching, "calls", None)
        if calls is not None:
            calls.append((self, args, outputs))
        return outputs


class Replay:
    """A step's last call through dynamo, to be made again without it (see the module docstring): the graph that
    ran, the inputs dynamo passed it, and where the step's result took the graph's outputs from. `matches(args)`:
    the same argument objects, tensors of the same shapes and strides, the same grad and inference modes."""

    def __init__(self, args, graph, graph_args, spec, leaves):
        self.args, self.graph, self.graph_args, self.spec, self.leaves = args, graph, graph_args, spec, leaves
        self.layouts = [(a.shape, a.stride()) for a in args if isinstance(a, torch.Tensor)]
        self.modes = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    @staticmethod
    def of(args, calls, result):
        """The replay of a call that made `calls` and returned `result`, or None where it cannot be replayed: not
        exactly one graph call, a trace that changed outside objects, or a result holding anything but the
        graph's output tensors and constants (in tuples, lists or dicts)."""
        if len(calls) != 1 or not calls[0][0].replayable:
            return None
        graph, graph_args, outputs = calls[0]
        values, spec = pytree.tree_flatten(result)
        leaves = []  # per value of the result: (True, index of the graph output) or (False, the constant)
        for value in values:
            if isinstance(value, torch.Tensor):
                index = next((i for i, out in enumerate(outputs) if out is value), None)
                if index is None:
                    return None
                leaves.append((True, index))
            elif value is None or isinstance(value, (bool, int, float, str)):
                leaves.append((False, value))
            else:
                return None
        return Replay(args, graph, graph_args, spec, leaves)

    def matches(self, args) -> bool:
        if len(args) != len(self.args) or any(a is not b for a, b in zip(args, self.args)):
            return False
        layouts = [(a.shape, a.stride()) for a in args if isinstance(a, torch.Tensor)]
        return layouts == self.layouts and self.modes == (torch.is_grad_enabled(), torch.is_inference_mode_enabled())

    def __call__(self):
        outputs = self.graph.compiled(*self.graph_args)
        return pytree.tree_unflatten([outputs[v] if is_output else v for is_output, v in self.leaves], self.spec)


def replayable_trace() -> bool:
    """Inside a backend: whether dynamo's trace in progress changed no Python object that existed before it
    (attributes set, lists or dicts changed; objects it made itself do not count) and added no tensor hooks."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._dynamo.variables.base import AttributeMutationNew, ValueMutationNew
        effects = InstructionTranslator.current_tx().output.side_effects
        return not effects.tensor_hooks and not any(
            effects.is_modified(v) and not isinstance(v.mutation_type, (AttributeMutationNew, ValueMutationNew))
            for v in effects.id_to_variable.values())
    except Exception:  # noqa: BLE001 -- another torch's internals: never replay
        return False


def recording_inductor(options: dict):
    """A torch.compile backend: inductor with these config patches, its graphs wrapped in `RecordedGraph`."""
    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        return RecordedGraph(compile_fx(gm, example_inputs, config_patches=options), replayable_trace())
    return backend


def trace_settings(dynamic) -> tuple:
    """The config patches a step is traced under (see the module docstring)."""
    import torch.fx.experimental._config as shape_config  # (here: importing torch._dynamo takes ~1 s)
    settings = (torch._dynamo.config.patch(specialize_float=True, specialize_int=True),)
    return settings if dynamic is False else settings + (shape_config.patch(use_duck_shape=False),)


# per thread: the trace settings of the compiled step being called, and those entered by a compile in progress
# (attributes a thread has not set read as None: getattr with a default)
tracing = threading.local()


def enter_trace_settings(*_) -> None:
    """dynamo's compile-start callback: a step's trace settings on, when the compile is one of its calls."""
    settings = getattr(tracing, "settings", None)
    if settings:
        tracing.entered = contextlib.ExitStack()
        for patch in settings:
            tracing.entered.enter_context(patch)


def exit_trace_settings(*_) -> None:
    """dynamo's compile-end callback (also after a failed compile): the settings off again."""
    entered, tracing.entered = getattr(tracing, "entered", None), None
    if entered is not None:
        entered.close()


def register_trace_callbacks() -> None:
    """Register the two callbacks with dynamo, unless they are registered (they are dropped together)."""
    if enter_trace_settings not in torch._dynamo.callback.callback_handler.start_callbacks:
        torch._dynamo.callback.on_compile_start(enter_trace_settings)
        torch._dynamo.callback.on_compile_end(exit_trace_settings)


def private_method(method):
    """A bound method like `method`, on a code object of its own (dynamo keeps one cache per code object)."""
    func = method.__func__
    code = func.__code__.replace(co_name=f"{func.__code__.co_name}_{next(_private_ids)}")
    copy = types.FunctionType(code, func.__globals__, code.co_name, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return types.MethodType(copy, method.__self__)


_private_ids = itertools.count()


def compile_fn(fn, dynamic, device, serial_kernels: bool = False):
    """torch.compile(fn, fullgraph=True, dynamic=dynamic) with room for many cache entries, without guards on
    nn modules (see the module docstring). On CPU, a one-row matmul (batch-1 decode, static shapes) becomes a
    multiply-and-sum that inductor generates (its `decompose_mm_pass`, off by default; here for any width): a
    memory-bound GEMV that reads the weight at a higher bandwidth than MKL's
    (benchmarks/results/llama_cpp_decode_cpu.md)."""
    torch.compiler.assume_constant_result(thread_count)  # marks it in place (numerics.thread_count)
    cpu_matvec.prepare("f32", device)  # build the C matvec now, outside the traced step
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, DECODE_RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * DECODE_RECOMPILE_LIMIT)
    # no size/stride/alignment checks of every buffer in the generated code (dozens a step): they check
    # inductor's own bookkeeping, which the tests compare with eager
    options = dict(size_asserts=False, alignment_asserts=False)
    if torch.device(device).type == "cpu":
        # the generated step calls its kernels from C++, not Python (`cpp_wrapper`): a decode step is dozens of
        # small kernels and custom ops, and each call from a Python wrapper costs about as much as a small kernel
        options["cpp_wrapper"] = True
        if serial_kernels:
            options["cpp.threads"] = 1  # no thread team for inductor's own kernels (see the module docstring)
        if widen_cpu_mm_decomposition():
            options["post_grad_fusion_options"] = {"decompose_mm_pass": {}}
    # module and global guards off (the invariant engine's dynamic-shape step: most of dynamo's cache lookup)
    return torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=recording_inductor(options),
                         options={"guard_filter_fn": skip_module_and_global_guards})


def skip_module_and_global_guards(entries) -> list:
    """dynamo's guard filter for the decode steps: none on nn modules, none on globals (see the module
    docstring)."""
    keep = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [kept and not entry.is_global for kept, entry in zip(keep, entries)]


def widen_cpu_mm_decomposition() -> bool:
    """Let inductor's decompose_mm_pass take one-row CPU matmuls of any width. It reads its CPU size limits
    (default: both weight dims <= 2048, so never an lm_head) from module globals fixed when it is first
    imported; they only matter to compiles that enable the pass, as compile_fn does. False where this
    torch has no such pass (then the step compiles without it)."""
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as decompose
    except ImportError:
        return False
    if not hasattr(decompose, "cpu_max_other_dimension_decomposition"):
        return False
    decompose.cpu_max_other_dimension_decomposition = max(decompose.cpu_max_other_dimension_decomposition, 1 << 30)
    return True
