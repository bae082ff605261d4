"""pytest options of the tests/ folder.

--update-goldens: let tests/test_accuracy.py rewrite tests/zoo/goldens.json with the metrics
it measures, instead of comparing against them. The only way the goldens change:

    pytest -m accuracy --update-goldens tests/test_accuracy.py
"""


def pytest_addoption(parser):
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite tests/zoo/goldens.json from the current accuracy metrics (tests/test_accuracy.py)",
    )
