"""pytest options of the tests/ folder.

--update-goldens: let tests/test_accuracy.py rewrite tests/zoo/goldens.json with the metrics
it measures, instead of comparing against them. The only way the goldens change:

    pytest -m accuracy --update-goldens tests/test_accuracy.py

The zoo folder (SERE_ZOO_DIR = tests/zoo) is set in the root conftest.py, for bench/ too.
"""


def pytest_addoption(parser):
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite the goldens instead of comparing: tests/zoo/goldens.json (tests/test_accuracy.py) and tests/goldens/routing_ids.json (tests/test_routing_goldens.py)",
    )
