"""The benchmark suites and their shared code, imported as `bench.*` from the repository root
(pytest puts the root on sys.path; scripts run as `python -m bench.gpu.vllm_decode`). Not
installed: nothing in the `sere` package imports it. Keep this file empty of imports: the vLLM
run collects bench/ and must not load Numba (see the root conftest.py)."""
