"""Does a change touch the compiled kernels? Compile the re-route kernels of two source trees to PTX
on the CPU (no GPU needed) and compare them, kernel by kernel.

A kernel change must pass the GPU gate (`tox -e gate`) before it lands; but a change meant for one
kernel (say the merging kernel) should leave the others' code alone, and a gate run that reports a
10 % change on a kernel whose instructions did not change is noise. This tells which kernels'
instructions differ, before any device time is spent:

    python -m bench.lab.compare_ptx .gate_base            # this tree against the base tree
    python -m bench.lab.compare_ptx .gate_base --show-diff merge-sorted

Needs numba-cuda and NVIDIA's NVVM and NVRTC libraries, which pip installs without a GPU:
`pip install nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12` (about 300 MB, so not in CI). Each tree
compiles in its own process, its `sere`, `sere.kernels` and `sere.calibration` imported from its own
folders (as pyproject.toml maps them), whatever is installed. PTX is compared after dropping
comments and module-level symbol declarations of Numba's environment objects, with Numba's
per-process function numbering (`B2v7B...` in mangled names) blanked and its shared arrays
renumbered: those change with import order, not with the code. Where ptxas is at hand (the same pip
package brings it), each kernel is also assembled: its machine-code length in instructions and its
registers per thread, base and this tree side by side.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.abc
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

# (name, kernel factory, its keyword arguments, signature builder, its arguments); factories and
# builders as "module:function" under sere.kernels. E = 128, k <= 8: the bf16 similarity with 4
# columns per 32-lane group (the shapes of the three models).
VARIANTS = (
    ("plain-int32", "numba_kernels:make_kernel", dict(sim_kind="bfloat16", cols=4, threads=256, lanes=32),
     "numba_pointer:pointer_signature", ("int32", "bfloat16")),
    ("plain-int64", "numba_kernels:make_kernel", dict(sim_kind="bfloat16", cols=4, threads=256, lanes=32),
     "numba_pointer:pointer_signature", ("int64", "bfloat16")),
    ("plain-float32", "numba_kernels:make_kernel", dict(sim_kind="float32", cols=4, threads=256, lanes=32),
     "numba_pointer:pointer_signature", ("int32", "float32")),
    ("weight-order", "numba_kernels:make_kernel",
     dict(sim_kind="bfloat16", cols=4, threads=256, lanes=32, weight_kind="float32"),
     "numba_pointer:pointer_signature", ("int32", "bfloat16", "float32")),
    ("two-launch", "numba_kernels:make_kernel", dict(sim_kind="bfloat16", cols=4, threads=256, lanes=32, two_launch=True),
     "numba_pointer:after_flags_signature", ("int32", "bfloat16")),
    ("merge-sorted", "numba_kernels:make_kernel", dict(sim_kind="bfloat16", cols=8, threads=512, lanes=16, merge=True, top_k=8),
     "numba_pointer:merge_signature", ("int32", "bfloat16")),
    ("merge-weight-order", "numba_kernels:make_kernel",
     dict(sim_kind="bfloat16", cols=8, threads=512, lanes=16, merge=True, top_k=8, weight_kind="float32"),
     "numba_pointer:merge_signature", ("int32", "bfloat16")),
    ("fused-topk", "numba_topk:make_topk_reroute_kernel",  # the router's top-k and the re-route in one kernel
     dict(logit_kind="bfloat16", sim_kind="bfloat16", cols=4, threads=256, lanes=32, top_k=8),
     "numba_topk_op:_signature", ("bfloat16", "bfloat16", "int32")),
    ("fused-topk-chunk1", "numba_topk:make_topk_reroute_kernel",  # a token per block and round (T > 1, k = 8)
     dict(logit_kind="bfloat16", sim_kind="bfloat16", cols=4, threads=256, lanes=32, top_k=8, chunk=1),
     "numba_topk_op:_signature", ("bfloat16", "bfloat16", "int32")),
    ("fused-topk-merge", "numba_topk:make_topk_reroute_kernel",  # and each token's duplicate slots merged
     dict(logit_kind="bfloat16", sim_kind="bfloat16", cols=4, threads=256, lanes=32, top_k=8, merge=True),
     "numba_topk_op:_signature", ("bfloat16", "bfloat16", "int32")),
)

_ENV_DECL = re.compile(r"^\.(common|visible|extern)\s+\.global\s+.*NumbaEnv")
_FUNC_ID = re.compile(r"B\d+v\d+B")
_SMEM = re.compile(r"_cudapy_smem_\d+")


def normalize(ptx: str) -> list[str]:
    """The PTX lines that say what the kernel does: comments, blank lines and Numba environment
    declarations dropped, per-process function numbers blanked, shared arrays renumbered in order of
    first appearance (Numba numbers them per process)."""
    keep, smem = [], {}
    for line in ptx.splitlines():
        text = line.split("//", 1)[0].rstrip()
        if not text.strip() or _ENV_DECL.match(text.strip()):
            continue
        text = _SMEM.sub(lambda m: smem.setdefault(m.group(0), f"_smem{len(smem)}"), text)
        keep.append(_FUNC_ID.sub("BvB", text))
    return keep


def split_declarations(lines: list[str]) -> tuple[list[str], list[str]]:
    """(module-level declarations of shared, global and constant memory, everything else)."""
    decls, rest, in_module = [], [], True
    for line in lines:
        if line.lstrip().startswith((".visible .entry", ".entry", ".visible .func", ".func")):
            in_module = False
        is_decl = in_module and re.match(r"^\.(visible\s+|extern\s+|common\s+)?\.(shared|global|const)\b", line)
        (decls if is_decl else rest).append(line)
    return decls, rest


def digest(lines: list[str]) -> str:
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


def verdict(base: dict, this: dict) -> tuple[str, bool]:
    """(what changed, whether the instructions changed) for one kernel's two compilations."""
    if "error" in base or "error" in this:
        return f"not compared ({base.get('error') or this.get('error')})", False
    if base["code"] != this["code"]:
        return "DIFFER", True
    if base["decls"] != this["decls"]:
        added = sorted(set(this["decl_lines"]) - set(base["decl_lines"]))
        removed = sorted(set(base["decl_lines"]) - set(this["decl_lines"]))
        return (f"same instructions; declarations +{len(added)} -{len(removed)}: "
                + "; ".join(d.rstrip(";") for d in added + removed)), False
    return "identical", False


# Machine code: where ptxas is found (PATH, $CUDA_HOME/bin, or pip's nvidia-cuda-nvcc-cu12), each PTX
# file is assembled for the same architecture and its size and registers reported beside the PTX.
# A kernel's SASS length and its branches, not its PTX length, track what a tiny kernel costs
# (bench/RESULTS.md section 22); sm_70 and later encode every instruction in 16 bytes.
SASS_INSTRUCTION_BYTES = 16
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def find_ptxas() -> str | None:
    found = shutil.which("ptxas")
    if found:
        return found
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "ptxas"]
    spec = importlib.util.find_spec("nvidia.cuda_nvcc") if importlib.util.find_spec("nvidia") else None
    if spec and spec.submodule_search_locations:
        candidates += [Path(p) / "bin" / "ptxas" for p in spec.submodule_search_locations]
    return next((str(c) for c in candidates if c.is_file()), None)


def parse_ptxas_info(text: str) -> dict:
    """Registers, spill bytes and stack frame bytes from `ptxas -v` output (one kernel per file). A
    stack frame without spills is a local array that did not stay in registers (indexed by a value
    known only at run time): every access goes through local memory."""
    used, spill, stack = _PTXAS_USED.search(text), _PTXAS_SPILL.search(text), _PTXAS_STACK.search(text)
    return {"registers": int(used.group(1)) if used else None,
            "spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else None,
            "stack_bytes": int(stack.group(1)) if stack else None}


def text_bytes(elf: bytes) -> int:
    """Total size of the .text sections (the kernels' machine code) of a 64-bit little-endian ELF."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    total = 0
    for name_at, _type, _flags, _addr, _offset, size, *_ in headers:
        start = names_offset + name_at
        if elf[start:elf.index(b"\0", start)].startswith(b".text"):
            total += size
    return total


def sass_stats(ptxas: str, ptx_file: Path, cc: str) -> dict:
    """{"instructions", "registers", "spill_bytes", "stack_bytes"} of one PTX file assembled by ptxas, or {"error"}."""
    cubin = ptx_file.with_suffix(".cubin")
    proc = subprocess.run([ptxas, "-v", f"-arch=sm_{cc.replace('.', '')}", "-O3", str(ptx_file), "-o", str(cubin)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["ptxas failed"])[-1][:120]}
    return {"instructions": text_bytes(cubin.read_bytes()) // SASS_INSTRUCTION_BYTES, **parse_ptxas_info(proc.stderr)}


def sass_cell(stats: dict | None) -> str:
    if not stats or "error" in stats:
        return "-"
    spill = f", spills {stats['spill_bytes']} B" if stats.get("spill_bytes") else ""
    stack = f", stack {stats['stack_bytes']} B" if stats.get("stack_bytes") else ""
    return f"{stats['instructions']} ({stats['registers']} regs{spill}{stack})"


class TreeFinder(importlib.abc.MetaPathFinder):
    """Imports the package from one source tree, as pyproject.toml's package-dir maps it, ahead of
    any installed (or editable) copy; submodules follow their parent's folder. (sere._CheckoutFolders
    maps the same folders but comes last, so that an install wins; here the tree must win, `sere`
    included, whichever tree is installed.)"""

    def __init__(self, tree: Path):
        self.roots = {"sere": tree / "sere", "sere.kernels": tree / "kernels", "sere.calibration": tree / "calibration"}

    def find_spec(self, name, path=None, target=None):
        root = self.roots.get(name)
        if root is None:
            return None
        return importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])


def compile_tree(tree: Path, cc: str, out_dir: Path) -> dict:
    """Compile every variant of `tree` in a fresh process: {name: {"lines", "code", "decls", "decl_lines"}
    or {"error"}} (digests of the instructions and of the declarations, see verdict)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-only", str(tree), "--cc", cc, "--out", str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"compare_ptx: compiling {tree} failed: {last.removeprefix('compare_ptx: ')}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_here(cc: tuple[int, int], out_dir: Path) -> dict:
    """In the tree's own process: compile each variant, save its PTX, return its digest."""
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher

    # Device functions ask the current device for its compute capability; there is none here.
    dispatcher.get_current_device = lambda: type("NoDevice", (), {"compute_capability": cc})()
    import inspect

    def resolve(ref: str):
        module, function = ref.split(":")
        return getattr(importlib.import_module(f"sere.kernels.{module}"), function)

    result = {}
    for name, factory_ref, kwargs, sig_ref, sig_args in VARIANTS:
        try:
            factory = resolve(factory_ref)
            takes = inspect.signature(factory).parameters  # an older tree's factory lacks later keywords
            py_kernel = factory(**{key: value for key, value in kwargs.items() if key in takes})
            signature = resolve(sig_ref)(*sig_args)
            ptx, _ = cuda.compile_ptx(py_kernel, signature, cc=cc)
        except Exception as exc:  # noqa: BLE001 - a tree without this variant, or an older make_kernel
            if "DynamicLibNotFound" in type(exc).__name__ or "Nvvm" in type(exc).__name__:
                raise SystemExit("compare_ptx: NVIDIA's compiler libraries are missing (" + type(exc).__name__
                                 + "): pip install nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12") from None
            result[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
            continue
        (out_dir / f"{name}.ptx").write_text(ptx)
        decls, code = split_declarations(normalize(ptx))
        result[name] = {"lines": len(decls) + len(code), "code": digest(code), "decls": digest(decls),
                        "decl_lines": decls}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="the base tree (e.g. .gate_base, a `git archive` of the base commit)")
    parser.add_argument("--tree", type=Path, default=Path.cwd(), help="the changed tree (default: here)")
    parser.add_argument("--cc", default="9.0", help="compute capability to compile for (default 9.0, Hopper)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sere_ptx"), help="where the PTX files go")
    parser.add_argument("--show-diff", metavar="VARIANT", help="print the unified diff of one variant's PTX")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cc = tuple(int(x) for x in args.cc.split("."))
    if args.compile_only:  # the child: args.base is the tree to compile
        sys.meta_path.insert(0, TreeFinder(args.base.resolve()))
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            import numba.cuda  # noqa: F401
        except ImportError as exc:
            raise SystemExit(f"compare_ptx: numba-cuda is not importable: {exc}")
        print(json.dumps(compile_here(cc, args.out)))
        return 0

    trees = {"base": args.base.resolve(), "this": args.tree.resolve()}
    for label, tree in trees.items():
        if not (tree / "kernels" / "numba_kernels.py").is_file():
            raise SystemExit(f"compare_ptx: {tree} is not a source tree of this project (no kernels/numba_kernels.py)")
    found = {label: compile_tree(tree, args.cc, args.out / label) for label, tree in trees.items()}
    ptxas = find_ptxas()
    sass = {label: {name: sass_stats(ptxas, args.out / label / f"{name}.ptx", args.cc)
                    for name, *_ in VARIANTS if "error" not in found[label][name]} if ptxas else {}
            for label in trees}
    print(f"PTX for sm_{args.cc.replace('.', '')}, base {trees['base']} against {trees['this']}:\n")
    print("| kernel | base lines | this lines | instructions | base SASS | this SASS |")
    print("|---|---:|---:|---|---:|---:|")
    changed = 0
    for name, *_ in VARIANTS:
        b, t = found["base"][name], found["this"][name]
        text, differs = verdict(b, t)
        changed += differs
        cells = [sass_cell(sass[label].get(name)) for label in trees]
        print(f"| {name} | {b.get('lines', '-')} | {t.get('lines', '-')} | {text} | {cells[0]} | {cells[1]} |")
    if not ptxas:
        print("\n(SASS columns empty: no ptxas on PATH, in $CUDA_HOME/bin or from pip's nvidia-cuda-nvcc-cu12)")
    if args.show_diff:
        old, new = ((args.out / label / f"{args.show_diff}.ptx") for label in ("base", "this"))
        if not old.is_file() or not new.is_file():
            raise SystemExit(f"compare_ptx: no PTX for {args.show_diff!r} in both trees")
        print()
        sys.stdout.writelines(difflib.unified_diff(
            [line + "\n" for line in normalize(old.read_text())], [line + "\n" for line in normalize(new.read_text())],
            f"base/{args.show_diff}.ptx", f"this/{args.show_diff}.ptx", n=2))
    print(f"\n{changed} kernel(s) with changed instructions; PTX files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
