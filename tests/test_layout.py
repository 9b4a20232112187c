"""The package layout: no import cycle inside cdfast, and the library never imports the experiments.

Every ``import`` statement counts, at module level or inside a function: a lazy import
that closes a cycle is still a cycle in the design.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Where each package of the installed cdfast lives in the source tree.
PACKAGE_DIRS = {"cdfast": ROOT / "cdfast", "cdfast.kernels": ROOT / "kernels"}
CORE = ("cdfast.dispatch", "cdfast._validation", "cdfast.layer", "cdfast.model", "cdfast._backends",
        "cdfast.kernels")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, base in PACKAGE_DIRS.items():
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "cdfast" and name.startswith("cdfast.kernels"):
                continue
            mods[name] = path
    return mods


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_pkg, node.level, node.module)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                # the longest known module that the imported name lies in
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_cdfast():
    graph = import_graph()
    assert "cdfast.layer.distill" in graph and "cdfast._backends.triton" in graph  # the walk saw the tree
    assert graph["cdfast"] >= {"cdfast._backends", "cdfast.layer", "cdfast.model"}
    assert _cycles(graph) == []


def test_the_cycle_check_can_fail():
    graph = import_graph()
    graph["cdfast.dispatch"].add("cdfast._backends")  # the lazy import dispatch once had
    assert _cycles(graph)


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        for w in graph.get(v, ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_library_never_imports_the_experiments():
    graph = import_graph()
    core = [m for m in graph if m.startswith(CORE)]
    assert len(core) > 15
    for m in core:
        bad = sorted(r for r in _reachable(graph, m) if r.startswith("cdfast.experiments"))
        assert not bad, f"{m} reaches {bad}"


def test_import_cdfast_loads_no_experiment_and_keeps_the_public_api():
    code = """
import sys, torch, cdfast
names = ["distill_layer", "compress", "LayerStatistics", "ChannelPrune", "WeightPrune", "NMSparsity",
         "GroupLasso", "L1", "Quantize", "LossSpec", "backends"]
assert all(callable(getattr(cdfast, n)) for n in names)
assert callable(cdfast.fskd.fskd)
conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
cdfast.compress(conv, torch.randn(4, 3, 8, 8), compression=cdfast.ChannelPrune(0.5), solver="exact",
                progress=False, verbose=False)
assert not [m for m in sys.modules if m.startswith("cdfast.experiments")], "experiments imported"
assert callable(cdfast.baselines.run)  # loaded on first use
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.parametrize("op", ["statistics", "gram_solve", "data_loss_grad", "topk_mask", "quantize"])
def test_every_op_has_a_torch_reference(op):
    from cdfast import dispatch

    assert "torch" in dispatch.implementations()[op]


def test_registering_an_unknown_op_is_an_error():
    from cdfast import dispatch

    with pytest.raises(ValueError, match="op: expected one of"):
        dispatch.register("statstics", "torch")
