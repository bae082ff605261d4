"""The SERE summary table printed at the end of `pytest bench` (bench/conftest.py), last of all.

    lines = summary_lines(infos, on_cpu=True)   # infos: the extra_info of every case with a `setting`

One row per stock / SERE case: activated experts before and after (and the share saved), time,
GB/s, share of the HBM floor, speed-up against stock of the same run. The heading says what a
CPU run can and cannot show; the columns are explained once under the table.
"""
from __future__ import annotations

COLUMNS = (
    ("model", "model"), ("routing", "routing"), ("tokens", "T"), ("setting", "setting"),
    ("experts_before", "exp. before"), ("experts_after", "exp. after"), ("saved", "saved"),
    ("time_us", "time us"), ("gbps", "GB/s"), ("hbm_floor_share", "floor share"),
    ("speedup_vs_stock", "speed-up"),
)
TITLE = "SERE vs stock: activated experts and speed-up (same run)"
CPU_CAVEAT = ("CPU smoke run: its times do not model a GPU's memory bandwidth (on a GPU a decode step's time follows\n"
              "the expert weights it reads), so SERE can be slower than stock here; what does hold on the CPU is the\n"
              "activated experts before / after (and the share saved).")
FLOATFMT = ("", "", "", "", ".3g", ".3g", "", ".1f", ".3g", ".3g", ".3g")  # one per column


def saved_share(info: dict) -> float | None:
    """1 - experts after / before, or None where either is unknown."""
    before, after = info.get("experts_before"), info.get("experts_after")
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or not before:
        return None
    return 1 - after / before


def is_cpu(info: dict) -> bool:
    return str(info.get("device", "")).startswith("cpu")


def summary_rows(infos: list[dict], label=None) -> list[list]:
    rows = []
    for info in infos:
        row = [info.get(key) for key, _ in COLUMNS]
        row[0] = label(info) if label is not None else info.get("model")
        saved = saved_share(info)
        row[6] = None if saved is None else f"{saved:.0%}"
        rows.append(row)
    return rows


def legend_lines(infos: list[dict]) -> list[str]:
    bandwidths = sorted({info["copy_bw_gbps"] for info in infos if info.get("copy_bw_gbps")})
    measured = f", {' / '.join(f'{b:g}' for b in bandwidths)} GB/s here" if bandwidths else ""
    return [
        "columns: T = tokens per call (a decode step's batch); setting = stock or S<s>-rho<r> (SERE keeping "
        "each token's top-s experts, threshold rho)",
        "  exp. before / after = distinct experts the call activates in the router's ids / after SERE; "
        "saved = 1 - after / before",
        "  GB/s = bytes of expert weights read / time; floor share = the HBM floor (those bytes / the copy "
        f"bandwidth measured this session{measured}) / time, 1 = at the memory floor",
        "  speed-up = stock time / this time (same model, routing and T, same run)",
    ]


def summary_lines(infos: list[dict], *, on_cpu: bool, label=None) -> list[str]:
    """The heading (with the CPU caveat on a CPU run), the table and the legend."""
    from tabulate import tabulate

    table = tabulate(summary_rows(infos, label), headers=[h for _, h in COLUMNS], floatfmt=FLOATFMT,
                     missingval="-")
    heading = CPU_CAVEAT.splitlines() if on_cpu else []
    return [*heading, *table.splitlines(), *legend_lines(infos)]
