"""Ids stay bit-identical across refactors: digests of the re-routed ids of every backend on the
zoo traces, and of the transformers integration on the tiny models and a zoo model, compared
with tests/goldens/routing_ids.json (written before the runtime/harness split, 2026-12-02).

    pytest tests/test_routing_goldens.py                    # compare
    pytest tests/test_routing_goldens.py --update-goldens   # rewrite (only for a wanted change)

A digest is the SHA-256 of the ids as int64 bytes, row-major, in call order. The Numba kernel
runs here under the CUDA simulator; the loop backends take the first rows of each trace (ROWS).
Index letters: T = tokens, k = experts per token, E = experts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import sere
import sere.hf
from sere.harness import methods  # noqa: F401 (registers the comparison methods)
from sere.harness.model_configs import TINY_ARCHS, build_tiny_model
from sere.harness.vllm_testing import random_similarity

GOLDENS = Path(__file__).parent / "goldens" / "routing_ids.json"
TRACES = Path(__file__).resolve().parents[1] / "bench" / "traces"
SETTINGS = ((1, 0.0), (2, 0.1), (1, -1.0), (2, 0.5))
ROWS = {"reference": 256, "torch": None, "numba": 32}  # rows of each trace layer per backend (loops are slow)
HF_METHODS = (("sere", {}), ("random", {"seed": 3}), ("truncate", {}), ("oea", {}))


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def load_trace_tensors(path: Path) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    from safetensors import safe_open

    ids, sims = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.endswith("topk_ids"):
                ids[int(key.split(".")[1])] = f.get_tensor(key)
            elif key.endswith("similarity"):
                sims[int(key.split(".")[1])] = f.get_tensor(key)
    return ids, sims


def backend_digests() -> dict[str, str]:
    out = {}
    for path in sorted(TRACES.glob("*.safetensors")):
        ids, sims = load_trace_tensors(path)
        assert ids and set(ids) == set(sims), f"{path}: unexpected trace keys"
        for S, rho in SETTINGS:
            for backend in ("reference", "torch", "numba"):
                rows = ROWS[backend]
                if backend == "numba":
                    from sere.kernels.numba_cuda import reroute_numba_numpy

                    def run(x, s):  # the kernel under the CUDA simulator, on NumPy arrays
                        return torch.from_numpy(reroute_numba_numpy(x.numpy(), s.float().numpy(), S, rho))
                else:
                    run = lambda x, s: sere.reroute(x, s, S, rho, backend=backend)  # noqa: E731
                layers = sorted(ids)[:2] if backend == "numba" else sorted(ids)  # the simulator is slow
                got = [run(ids[layer][:rows], sims[layer]) for layer in layers]
                out[f"trace/{path.stem}/S{S}/rho{rho}/{backend}"] = digest(got)
    return out


def hf_ids(model, similarity, input_ids, **enable_kw) -> list[torch.Tensor]:
    """The ids every router hands to its experts after SERE's hook, in call order."""
    seen: list[torch.Tensor] = []
    handle = sere.hf.enable(model, similarity, **enable_kw)
    spies = [site.module.register_forward_hook(lambda m, a, out: seen.append(out[2].clone()))
             for site in sere.hf.find_routers(model)]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for s in spies:
            s.remove()
        handle.remove()
    return seen


def hf_digests() -> dict[str, str]:
    out = {}
    for arch in TINY_ARCHS:
        model = build_tiny_model(arch, seed=2)
        layers = [s.layer for s in sere.hf.find_routers(model)]
        E = sere.hf.find_routers(model)[0].num_experts
        sim = random_similarity(E, layers, seed=5)
        input_ids = torch.randint(0, model.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(7))
        for S, rho in SETTINGS:
            for method, options in HF_METHODS:
                ids = hf_ids(model, sim, input_ids, select_top_k=S, threshold=rho, method=method,
                             method_options=options or None)
                out[f"hf/{arch}/S{S}/rho{rho}/{method}"] = digest(ids)
            ids = hf_ids(model, sim, input_ids, select_top_k=S, threshold=rho, sort_slots=True)
            out[f"hf/{arch}/S{S}/rho{rho}/sere-sorted"] = digest(ids)
    return out


def zoo_digests() -> dict[str, str]:
    from sere.harness.zoo import heldout_ids, load_zoo_model, model_dir

    out = {}
    for name in ("qwen2_moe", "deepseek_v2"):
        model, tok = load_zoo_model(name)
        text = heldout_ids(tok)[: 4 * 24].view(4, 24)
        for S, rho in ((1, 0.0), (2, 0.1)):
            ids = hf_ids(model, str(model_dir(name)), text, select_top_k=S, threshold=rho)
            out[f"zoo/{name}/S{S}/rho{rho}"] = digest(ids)
    return out


@pytest.fixture(scope="module")
def goldens(request):
    if request.config.getoption("--update-goldens"):
        return None
    if not GOLDENS.exists():
        pytest.fail(f"{GOLDENS} is missing: write it with --update-goldens")
    return json.loads(GOLDENS.read_text())


def _check(kind: str, got: dict[str, str], goldens, request) -> None:
    if goldens is None:
        data = json.loads(GOLDENS.read_text()) if GOLDENS.exists() else {}
        data = {k: v for k, v in data.items() if not k.startswith(kind + "/")} | got
        GOLDENS.parent.mkdir(exist_ok=True)
        GOLDENS.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
        return
    want = {k: v for k, v in goldens.items() if k.startswith(kind + "/")}
    assert want, f"no {kind} goldens"
    assert set(got) == set(want), f"cases differ: {sorted(set(got) ^ set(want))[:5]}"
    changed = sorted(k for k in want if got[k] != want[k])
    assert not changed, f"{len(changed)} case(s) route differently from the goldens, e.g. {changed[:5]}"


def test_backends_on_zoo_traces_route_as_before(goldens, request):
    _check("trace", backend_digests(), goldens, request)


def test_transformers_integration_on_tiny_models_routes_as_before(goldens, request):
    _check("hf", hf_digests(), goldens, request)


@pytest.mark.slow
def test_transformers_integration_on_zoo_models_routes_as_before(goldens, request):
    _check("zoo", zoo_digests(), goldens, request)
