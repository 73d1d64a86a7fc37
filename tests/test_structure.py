"""Package structure: import order (fresh interpreters), no private cross-module imports, no
function-local import that hides an import cycle; and checkpoints that do not pin an
optional expert backend (experts_impl="triton" loads and generates with triton missing)."""

import ast
import importlib.util
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit import ModelConfig, Transformer, load_model, save_model
from moekit.generate import generate
from moekit.presets import MODEL_PRESETS

PACKAGE_DIR = Path(moekit.__file__).parent
PROMPTS = [[5, 17, 300, 42, 7, 99, 1], [8, 3], [250, 251, 252, 253], [11]]


# found, not imported: importing triton here (before tests/test_triton_backend.py sets
# TRITON_INTERPRET=1) would leave it in the wrong mode for the interpreter tests
TRITON = importlib.util.find_spec("triton") is not None


# ============================================================================ import structure
def module_names(skip_triton: bool = not TRITON):
    """Every module of the package (found with pkgutil, nothing imported), moekit.moe.triton*
    left out when triton is not importable."""
    names = ["moekit"]

    def walk(path: Path, prefix: str):
        for info in pkgutil.iter_modules([str(path)], prefix):
            names.append(info.name)
            if info.ispkg:
                walk(path / info.name.rsplit(".", 1)[-1], info.name + ".")

    walk(PACKAGE_DIR, "moekit.")
    if skip_triton:
        names = [n for n in names if n != "moekit.moe.triton" and not n.startswith("moekit.moe.triton.")]
    return sorted(names)


def run_imports(names, tmp_path):
    """Import `names` in this order in a fresh interpreter; the error output or ''."""
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    return "" if proc.returncode == 0 else proc.stderr[-3000:]


# orders that used to cycle (each pair both ways)
PAIRS = [("config", "presets"), ("checkpoint", "hf"), ("generate", "speculative"), ("moe.layer", "moe.balancing")]
ORDERS = [(a, b) for pair in PAIRS for a, b in (pair, pair[::-1])]


@pytest.mark.parametrize("first,second", ORDERS, ids=[f"{a}-then-{b}" for a, b in ORDERS])
def test_import_order_in_a_fresh_interpreter(first, second, tmp_path):
    err = run_imports([f"moekit.{first}", f"moekit.{second}"], tmp_path)
    assert not err, f"import moekit.{first} then moekit.{second} failed:\n{err}"


@pytest.mark.parametrize("reverse", [False, True], ids=["sorted", "reverse-sorted"])
def test_every_module_imports_in_a_fresh_interpreter(reverse, tmp_path):
    names = module_names()
    assert len(names) > 60 and "moekit.engine.engine" in names
    err = run_imports(sorted(names, reverse=reverse), tmp_path)
    assert not err, err


# ---------------------------------------------------------------------------- static analysis
def source_modules():
    """{module name: (path, is_package)} of every .py file in the package."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = source_modules()


def imported_modules(module: str, is_pkg: bool, node):
    """The moekit modules an import statement names: the `from` target first, then the names
    imported from it that are submodules (`from . import data`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "moekit"]
    if node.level:
        package = module.split(".") if is_pkg else module.split(".")[:-1]
        base = package[:len(package) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "moekit":
        return []
    return [target] + [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]


def top_level_imports(body):
    """Import statements executed when the module is imported (not inside a def, nor under
    `if TYPE_CHECKING:`)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from top_level_imports(node.orelse)  # the body never runs
        else:
            yield from top_level_imports([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)])


def with_packages(name: str):
    """Importing a.b.c runs a, a.b and a.b.c."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_graph():
    """(top-level import graph {module: moekit modules it imports on import}, function-local
    imports [(module, 'path:line', imported module)])."""
    graph, local = {}, []
    for module, (path, is_pkg) in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        top = list(top_level_imports(tree.body))
        graph[module] = {p for node in top for t in imported_modules(module, is_pkg, node)
                         for p in with_packages(t)} - {module}
        in_functions = {id(n): n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in sorted(in_functions.values(), key=lambda n: n.lineno):
            targets = imported_modules(module, is_pkg, node)
            where = f"{path.relative_to(PACKAGE_DIR.parent.parent)}:{node.lineno}"
            for target in targets[1:] or targets[:1]:  # the submodules imported, else the `from` module
                local.append((module, where, target))
    return graph, local


def path_between(graph, start: str, goal: str):
    """A chain of top-level imports start -> ... -> goal, or None."""
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for m in frontier:
            for n in sorted(graph.get(m, ())):
                if n not in prev:
                    prev[n] = m
                    if n == goal:
                        chain = [n]
                        while prev[chain[-1]] is not None:
                            chain.append(prev[chain[-1]])
                        return chain[::-1]
                    nxt.append(n)
        frontier = nxt
    return None


def private_imports():
    """'path:line name' for every import of a private (leading underscore, not dunder) name
    from another moekit module."""
    found = []
    for module, (path, is_pkg) in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = imported_modules(module, is_pkg, node)
            if not targets:
                continue
            if isinstance(node, ast.Import):
                names = [p for t in targets for p in t.split(".")]
            else:
                names = targets[0].split(".") + [a.name for a in node.names]
            bad = [n for n in names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
            if bad:
                found.append(f"{path.relative_to(PACKAGE_DIR.parent.parent)}:{node.lineno} {targets[0]}: {bad}")
    return found


def test_no_module_imports_a_private_name_of_another():
    found = private_imports()
    assert not found, "private names imported across moekit modules:\n" + "\n".join(found)


# Function-local imports of moekit modules that WOULD close an import cycle at top level, and are
# meant to stay local (module -> imported module: reason). Everything else is either not a cycle
# (harmless) or a hidden cycle, which fails the test.
LOCAL_CYCLES_ALLOWED = {
    ("moekit.moe.experts", "moekit.moe.triton"): "optional dependency: the Triton kernels import triton",
}
def hidden_cycles():
    graph, local = import_graph()
    found = []
    for module, where, target in local:
        if (module, target) in LOCAL_CYCLES_ALLOWED:
            continue
        chain = path_between(graph, target, module)
        if chain is not None:
            found.append((module, target, f"{where}: {module} imports {target} inside a function; at top level "
                                          f"that closes the cycle {' -> '.join([module] + chain)}"))
    return found


def test_the_function_local_cycle_allow_list_is_current():
    graph, local = import_graph()
    locals_ = {(m, t) for m, _, t in local}
    for module, target in LOCAL_CYCLES_ALLOWED:
        assert (module, target) in locals_, f"allow-listed local import {module} -> {target} is gone: drop the entry"
        assert path_between(graph, target, module), f"{module} -> {target} no longer closes a cycle: drop the entry"
    assert len(local) > 10  # the scan sees the package's function-local imports


def test_no_function_local_import_hides_an_import_cycle():
    found = hidden_cycles()
    assert not found, "function-local imports hiding import cycles:\n" + "\n".join(f for _, _, f in found)


# ============================================================================ optional backends in checkpoints
def generate_without_triton(ckpt) -> list:
    """Load `ckpt` and generate in a fresh interpreter where `import triton` fails, as if it were
    not installed (a subprocess: blocking it here would leave this process's triton modules,
    which the Triton tests use, in a different state)."""
    script = (
        "import json, sys\n"
        "sys.modules['triton'] = None\n"
        "from moekit import load_model\n"
        "from moekit.generate import generate\n"
        "try:\n"
        "    import triton\n"
        "    sys.exit('triton was importable')\n"
        "except ImportError:\n"
        "    pass\n"
        f"model = load_model({str(ckpt)!r})\n"
        "impls = sorted({m.experts.impl for m in model.moe_layers()})\n"
        f"print(json.dumps([impls, generate(model, {PROMPTS!r}, max_new_tokens=6)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    impls, tokens = json.loads(out.stdout.strip().splitlines()[-1])
    assert impls == ["grouped"]
    return tokens


def tiny_cfg(**moe_overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", moe={**MODEL_PRESETS["tiny"]["moe"], **moe_overrides})


def test_checkpoint_saved_with_the_triton_backend_loads_without_triton(tmp_path):
    pytest.importorskip("safetensors")
    if not TRITON:
        pytest.skip("triton is not importable here: a model with experts_impl='triton' cannot be built")
    torch.manual_seed(1234)
    model = Transformer(tiny_cfg(experts_impl="triton")).eval()
    assert {moe.experts.impl for moe in model.moe_layers()} == {"triton"}
    save_model(model, tmp_path / "ckpt")
    text = (tmp_path / "ckpt" / "moekit_config.json").read_text()
    assert "experts_impl" not in text and "grouped_layout" not in text  # runtime settings, never saved
    assert json.loads(text)["moe"]["num_experts"] == 8
    model.set_experts_impl("grouped")  # the kernels need CUDA (or the interpreter): compare on grouped
    expected = generate(model, PROMPTS, max_new_tokens=6)

    assert load_model(tmp_path / "ckpt").cfg.moe.experts_impl == "grouped"
    assert generate_without_triton(tmp_path / "ckpt") == expected


def test_old_checkpoint_naming_the_triton_backend_loads_without_triton(tmp_path):
    """Round-1 checkpoints saved experts_impl inside "moe"; it is a runtime setting now, ignored on load."""
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1234)
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg).eval()
    meta = {"format": "moekit", "version": 1, **cfg.to_dict()}
    meta["moe"]["experts_impl"] = "triton"
    ckpt = tmp_path / "old"
    ckpt.mkdir()
    (ckpt / "moekit_config.json").write_text(json.dumps(meta, indent=2))
    st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    expected = generate(model, PROMPTS, max_new_tokens=6)

    assert generate_without_triton(ckpt) == expected
