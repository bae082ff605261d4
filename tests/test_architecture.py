"""The architecture, asserted: the runtime imports nothing of the harness, `import sere` stays
light, and the package's import graph has no circle.

    runtime  = sere/*.py and sere/vllm/ (what a serving process imports), with kernels/
    harness  = sere/harness/ (zoo, sweeps, fidelity, report, model tables, eval bridge, hooks)
    calibration/ builds on the runtime; the harness builds on both. Dependencies point one way:
    kernels <- runtime <- calibration <- harness (and bench/, tests/).
The static checks read every import statement, those inside functions included (deferred
imports are still dependencies); the fresh-interpreter checks read sys.modules.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGE_DIRS = {"sere": ROOT / "sere", "sere.kernels": ROOT / "kernels", "sere.calibration": ROOT / "calibration"}
HEAVY = ("transformers", "vllm", "matplotlib", "numba", "pyarrow", "tokenizers")


def module_files() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "sere" and parts[:1] in (["kernels"], ["calibration"]):
                continue  # not there; guard against a stray copy
            out[".".join([package, *parts])] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def is_harness(module: str) -> bool:
    return module == "sere.harness" or module.startswith("sere.harness.")


def is_calibration(module: str) -> bool:
    return module == "sere.calibration" or module.startswith("sere.calibration.")


def is_runtime(module: str) -> bool:
    return module.startswith("sere") and not is_harness(module) and not is_calibration(module)


def test_the_graph_was_read():
    graph = import_graph()
    assert {"sere", "sere.hf", "sere.rerouter", "sere.vllm.router", "sere.harness.methods",
            "sere.kernels.numba_cuda", "sere.calibration.calibrate"} <= set(graph)
    assert "sere.rerouter" in graph["sere.hf"] and "sere.rerouter" in graph["sere.vllm.router"]
    assert "sere.transforms" in graph["sere.harness.methods"]  # the harness registers into the runtime


def test_runtime_imports_nothing_of_the_harness_or_calibration():
    bad = {m: sorted(t for t in deps if is_harness(t) or is_calibration(t))
           for m, deps in import_graph().items() if is_runtime(m)}
    bad = {m: deps for m, deps in bad.items() if deps}
    assert not bad, f"runtime modules import the harness / calibration: {bad}"


def test_calibration_imports_nothing_of_the_harness():
    bad = {m: sorted(t for t in deps if is_harness(t)) for m, deps in import_graph().items() if is_calibration(m)}
    assert not {m: d for m, d in bad.items() if d}


def test_import_graph_has_no_circle():
    graph = import_graph()
    circles = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not circles, f"import circles: {circles}"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components (iterative enough for a few hundred modules)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_circles():
    assert [c for c in strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) if len(c) > 1] == [["a", "b", "c"]]


def fresh_modules(code: str) -> set[str]:
    """sys.modules of a fresh interpreter after running `code`."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_sere_is_light():
    loaded = fresh_modules("import sere")
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, f"`import sere` loaded {heavy}"
    assert not [m for m in loaded if is_harness(m) or is_calibration(m)]


RUNTIME_MODULES = ["sere", "sere.config", "sere.routing", "sere.validation", "sere.artifact", "sere.stats",
                   "sere.recorder", "sere.transforms", "sere.rerouter", "sere.hf", "sere.vllm",
                   "sere.vllm.plugin", "sere.vllm.settings", "sere.vllm.router", "sere.vllm.fused_topk"]


def test_runtime_modules_load_no_harness_in_a_fresh_interpreter():
    loaded = fresh_modules("import " + ", ".join(RUNTIME_MODULES))
    assert set(RUNTIME_MODULES) <= loaded
    assert not sorted(m for m in loaded if is_harness(m) or is_calibration(m))
    assert "matplotlib" not in loaded and "vllm" not in loaded


def test_every_runtime_module_is_covered_by_the_fresh_check():
    runtime = {m for m in import_graph() if is_runtime(m) and not m.startswith("sere.kernels")}
    # sere.vllm.models subclasses vLLM's model classes: it imports vLLM by design (loaded by
    # vLLM's model registry only, never by the plugin entry point).
    assert runtime - set(RUNTIME_MODULES) == {"sere.vllm.models"}


@pytest.mark.parametrize("name", ["sere.tests", "sere.conftest", "sere.bench"])
def test_the_checkout_is_not_part_of_the_package(name):
    assert importlib_fails(name), f"{name} is importable: the package reaches into the repository"


def importlib_fails(name: str) -> bool:
    import importlib

    try:
        importlib.import_module(name)
    except ImportError:
        return True
    return False


def test_no_repository_path_inside_the_package():
    """The installed package finds its data as package data or through arguments: no path
    computed from __file__ may leave the package (sere/__init__.py's checkout mapping of
    kernels/ and calibration/, which is only used uninstalled, excepted)."""
    offenders = []
    for name, path in module_files().items():
        if name == "sere":
            continue
        text = path.read_text()
        if "parents[" in text or "sys.path.insert" in text or "os.path.dirname(os.path.dirname" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


RUNTIME_ALONE = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):  # as if only the runtime were installed
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("sere.harness", "sere.calibration", "tests", "bench")):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, Absent())
import torch, transformers
import sere, sere.hf
from sere.vllm.plugin import register  # noqa: F401 (the vLLM entry point's module)
from sere.vllm.settings import read_settings

ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
sim = torch.eye(8) * 0.5 + 0.25
print(sere.reroute(ids, sim, 1, 0.1).tolist())

cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                  shared_expert_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, num_experts=8, num_experts_per_tok=4)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
with sere.hf.enable(model, {0: sim, 1: sim}, select_top_k=1, threshold=0.1) as handle:
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 3)))
print(sorted(handle.stats.summary()))
"""


def test_the_runtime_works_with_the_harness_absent():
    out = subprocess.run([sys.executable, "-c", RUNTIME_ALONE], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "[[0, 0, 0, 0], [4, 0, 0, 0]]"  # S=1: slots 1..3 move onto the primary 0 or 4
    assert lines[-1] == "[0, 1]"


# ---- the folder name kernels/ and the PyPI package `kernels` -----------------------------------
# transformers >= 5.25 requires and imports the PyPI package `kernels`; with the checkout's root on
# sys.path (pytest's root conftest, `python -m` from the root) the folder kernels/ would shadow it.

def _import_kernels_from_root(stand_in: Path | None) -> subprocess.CompletedProcess:
    """`import kernels` in a fresh interpreter started in the checkout's root, the root first on
    sys.path. With `stand_in` (a folder holding a stand-in PyPI package) that folder comes next,
    before site-packages; without, site-packages is dropped (as if no PyPI `kernels` existed)."""
    code = (
        "import sys\n"
        + (f"sys.path[:] = [{str(ROOT)!r}, {str(stand_in)!r}] + sys.path\n" if stand_in else
           f"sys.path[:] = [{str(ROOT)!r}] + [p for p in sys.path if 'site-packages' not in p]\n")
        + "import kernels; print(kernels.__file__); print(getattr(kernels, 'MARK', None))\n"
        + ("import sere.kernels.reference as r; print(r.__name__)\n" if stand_in else "")  # sere needs torch
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_kernels_folder_hands_its_top_level_name_to_the_pypi_package(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("MARK = 'pypi'\n")
    done = _import_kernels_from_root(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(tmp_path / "kernels" / "__init__.py"), "pypi", "sere.kernels.reference"]


def test_kernels_folder_stays_a_versionless_module_without_the_pypi_one():
    """No PyPI `kernels`: the import still works (transformers 5.17 imports the name to read its
    version when no metadata exists, and must not fail) and has no __version__, so transformers
    reads it as no usable kernels package."""
    done = _import_kernels_from_root(None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(ROOT / "kernels" / "__init__.py"), "None"]
    probe = subprocess.run([sys.executable, "-c", f"import sys; sys.path[:] = [{str(ROOT)!r}] + "
                            "[p for p in sys.path if 'site-packages' not in p]; import kernels; "
                            "print(getattr(kernels, '__version__', 'N/A'))"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "N/A", probe.stderr


def test_transformers_loads_a_moe_model_from_the_checkout_root():
    pytest.importorskip("transformers")
    code = ("import transformers\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            "cfg = AutoConfig.for_model('qwen2_moe', hidden_size=16, intermediate_size=16, moe_intermediate_size=8,"
            " shared_expert_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,"
            " num_experts=4, num_experts_per_tok=2, vocab_size=32)\n"
            "print(type(AutoModelForCausalLM.from_config(cfg)).__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("Qwen2MoeForCausalLM")


# Test modules with vllm-marked tests that the `-m vllm` run (conftest.py: test_vllm* and
# test_bench_vllm* only) does not collect, and where they run instead.
VLLM_RUN_ELSEWHERE = {
    "bench/test_bench_serve.py": ".ci/run names it in the vllm smoke step",
    "bench/test_bench_fused_moe.py": "GPU only: bench/gpu/run_vllm.sh's fused-pytest step on the device",
}
VLLM_MARK = re.compile(r"^\s*(@pytest\.mark\.vllm\b|pytestmark\s*=.*pytest\.mark\.vllm\b)", re.MULTILINE)


def test_every_vllm_marked_test_sits_where_a_vllm_run_collects_it():
    stray = []
    for path in sorted([*ROOT.glob("tests/test_*.py"), *ROOT.glob("bench/test_*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if path.name.startswith(("test_vllm", "test_bench_vllm")) or rel in VLLM_RUN_ELSEWHERE:
            continue
        if VLLM_MARK.search(path.read_text()):
            stray.append(rel)
    assert not stray, f"vllm-marked tests in {stray}: no CI run collects them (move them to a tests/test_vllm_* module)"
    assert "bench/test_bench_serve.py" in (ROOT / ".ci" / "run").read_text()
    assert VLLM_MARK.search("@pytest.mark.vllm\ndef test_x(): ...") and not VLLM_MARK.search("x = 'pytest.mark.vllm'")
