"""What a bench case records beside its time, computed one way in every bench and device script.

    from bench.extra_info import StockTimes, floor_info, layer_expert_bytes
    speedup = stock_times.speedup_vs_stock(key, seconds, stock=setting.is_stock)
    info = dict(expert_bytes=b, **floor_info(b, seconds, copy_bandwidth), speedup_vs_stock=speedup)

- `StockTimes`: the stock time of each case key of one run, and the speed-up of a case against
  it (a ratio only means something within one run on one machine, so stock cases run first).
- `layer_expert_bytes`: bytes of expert weights one MoE layer call reads.
- `floor_info`: GB/s, the HBM floor (bytes / measured copy bandwidth) and its share of the time.
- `markdown_table`: the lines of a GitHub table, for the device scripts' summaries.
"""
from __future__ import annotations


class StockTimes(dict):
    """case key -> stock seconds, filled by stock cases, read by the SERE cases of the same key."""

    def speedup_vs_stock(self, key, seconds: float | None, *, stock: bool) -> float | None:
        """Record `seconds` as the key's stock time if this is the stock case; the case's speed-up
        against the key's stock time (None without a time or a stock time)."""
        if stock and seconds is not None:
            self[key] = seconds
        base = self.get(key)
        return None if seconds is None or base is None else round(base / seconds, 3)


def layer_expert_bytes(shapes, experts: int, dtype) -> int:
    """Bytes of expert weights one call of the layer reads: `experts` routed experts and the
    shared expert (router weights left out); shapes: sere.harness.model_configs.LayerShapes,
    dtype: the weights' torch dtype."""
    return (experts * shapes.expert_params() + shapes.shared_params()) * dtype.itemsize


def floor_info(bytes_read: int | None, seconds: float | None, bandwidth: float) -> dict:
    """extra_info of a case that reads `bytes_read` bytes in `seconds` (either None: unknown):
    the copy bandwidth, the HBM floor (the time those bytes take at that bandwidth), the
    measured time, the achieved GB/s and the floor's share of the measured time."""
    floor_s = None if bytes_read is None else bytes_read / bandwidth
    timed = seconds is not None
    return dict(
        copy_bw_gbps=round(bandwidth / 1e9, 1),
        hbm_floor_us=None if floor_s is None else round(floor_s * 1e6, 2),
        time_us=round(seconds * 1e6, 2) if timed else None,
        gbps=round(bytes_read / seconds / 1e9, 1) if timed and floor_s is not None else None,
        hbm_floor_share=round(floor_s / seconds, 3) if timed and floor_s is not None else None,
    )


def markdown_table(header: list[str], align: str, rows: list[list]) -> list[str]:
    """The lines of a GitHub table; `align` has one letter per column: "l" left, "r" right."""
    if len(align) != len(header):
        raise ValueError(f"{len(header)} columns but alignment {align!r}")
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return [_row(header), rule, *(_row(r) for r in rows)]


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
