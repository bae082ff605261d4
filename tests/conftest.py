"""pytest options of the tests/ folder.

--update-goldens: let tests/test_accuracy.py rewrite tests/zoo/goldens.json with the metrics
it measures, instead of comparing against them. The only way the goldens change:

    pytest -m accuracy --update-goldens tests/test_accuracy.py

The zoo folder (SERE_ZOO_DIR = tests/zoo) is set in the root conftest.py, for bench/ too.

Fixture `vllm_world`: vLLM's process groups for this one process (gloo, world size 1), as a
worker holds them; the tests that build a FusedMoE layer outside an engine need them.
"""
import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite the goldens instead of comparing: tests/zoo/goldens.json (tests/test_accuracy.py) and tests/goldens/routing_ids.json (tests/test_routing_goldens.py)",
    )


@pytest.fixture(scope="module")
def vllm_world(tmp_path_factory):
    pytest.importorskip("vllm", reason="needs vllm (the `vllm` tox env: .ci/setup-vllm-env)")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (cleanup_dist_env_and_memory, ensure_model_parallel_initialized,
                                                 init_distributed_environment)

    cleanup_dist_env_and_memory()
    init_file = tmp_path_factory.mktemp("dist") / "init"
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"file://{init_file}",
                                     local_rank=0, backend="gloo")
        ensure_model_parallel_initialized(1, 1)
    yield
    cleanup_dist_env_and_memory()
