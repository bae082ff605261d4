"""Tile configurations of vLLM's Triton fused MoE for the token distribution SERE leaves (issue 14,
target 2): the device script.

vLLM picks the fused MoE kernel's tiles (BLOCK_SIZE_M/N/K, GROUP_SIZE_M, warps, stages) by token
count M alone, from a JSON file per (E, N, device) or, where none ships, from a default rule. After
re-routing the same M lands on far fewer experts with more tokens each (Qwen1.5 at T = 16: 15
experts instead of 83), so the tiles chosen for stock's distribution need not suit SERE's. This
script times one MoE layer (bench/fused_layer.py: router, SERE, vLLM's fused_experts, shared
expert) per model and token count under vLLM's own choice and under every configuration of a
grid (vLLM's `override_config`), for stock and for SERE, and writes per model the best SERE
configuration per M in vLLM's file format (stock's best in DIR/stock, the tuned baseline):

    python3 -m bench.gpu.tune_fused_moe --models Qwen1.5-MoE-A2.7B --batches 1,16,64,256 --out DIR
    export VLLM_TUNED_CONFIG_FOLDER=DIR   # vLLM reads E=..,N=..,device_name=...json from there first

Argument check and the grid without a GPU:  python3 -m bench.gpu.tune_fused_moe --list
Results: DIR/tune_fused_moe.json (every timing), DIR/tune_fused_moe.md (per model and T: vLLM's
choice vs the best of the grid, us and share of the HBM floor, for stock and SERE) and the
config files. Deadline-bound: configurations left when it passes are skipped and counted.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

from bench.gpu.vllm_fused_layer import parse_models
from sere.harness.model_configs import REAL_MODELS
from sere.harness.settings import SERE_S1, STOCK

# The grid (72 configurations): decode shapes are memory-bound, so the N x K tile and the pipeline
# depth matter most; after re-routing an expert holds ~8-10 tokens at T = 16-64, so M tiles of 16
# or 32 cover them.
GRID = {
    "BLOCK_SIZE_M": (16, 32),
    "BLOCK_SIZE_N": (32, 64, 128),
    "BLOCK_SIZE_K": (64, 128, 256),
    "GROUP_SIZE_M": (1,),
    "num_warps": (4, 8),
    "num_stages": (3, 4),
}
SETTINGS = (STOCK, SERE_S1)
TUNE_ROUNDS = 5  # replays per timing: fewer than the layer bench's, as the grid is 73 timings per case


def config_grid(grid: dict = GRID) -> list[dict]:
    """Every combination of the grid, as vLLM's config dicts (SPLIT_K 1, as vLLM's Triton path needs)."""
    keys = list(grid)
    return [dict(zip(keys, values), SPLIT_K=1) for values in itertools.product(*(grid[k] for k in keys))]


@contextlib.contextmanager
def forced_tiles(cfg: dict | None):
    """vLLM's override_config(cfg), restored also when the kernel raises: vLLM's own context manager
    has no try/finally, so a tile that does not fit (shared memory) would stay forced on every later
    call."""
    import vllm.model_executor.layers.fused_moe as vllm_fused_moe

    old = vllm_fused_moe.get_config()
    try:
        with vllm_fused_moe.override_config(cfg):
            yield
    finally:
        vllm_fused_moe._config = old


def config_file_name(E: int, N: int, device_name: str) -> str:
    """vLLM's name for a tuned unquantized fused-MoE config file (get_config_file_name): N is the
    expert intermediate size (w2's last dimension), spaces in the device name become '_'."""
    return f"E={E},N={N},device_name={device_name.replace(' ', '_')}.json"


def best_per_batch(rows: list[dict], setting: str) -> dict[int, dict]:
    """{T: the fastest timed row of `setting` among the grid's} (rows without a time are skipped)."""
    best: dict[int, dict] = {}
    for r in rows:
        if r["setting"] != setting or r["config"] is None or r.get("time_us") is None:
            continue
        if r["tokens"] not in best or r["time_us"] < best[r["tokens"]]["time_us"]:
            best[r["tokens"]] = r
    return best


# vLLM takes the config of the nearest M in the file, so a file tuned up to M = 64 alone would hand
# its M = 64 tiles to a 2048-token prefill chunk. Past the largest tuned M the file keeps vLLM's own
# default rule at these token counts.
UNTUNED_M = (128, 256, 512, 1024, 2048, 4096, 8192)


def vllm_config_file(best: dict[int, dict], default_for=None) -> dict[str, dict]:
    """vLLM's file content: {"M": config} for every tuned M, plus default_for(M) (vLLM's default
    rule) at the UNTUNED_M past the largest tuned one."""
    content = {str(T): dict(r["config"]) for T, r in sorted(best.items())}
    if default_for is not None and best:
        content.update({str(m): dict(default_for(m)) for m in UNTUNED_M if m > max(best)})
    return content


def markdown(rows: list[dict]) -> str:
    from bench.extra_info import markdown_table

    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        mine = [r for r in rows if r["model"] == model]
        for setting in (s.label for s in SETTINGS):
            chosen = {r["tokens"]: r for r in mine if r["setting"] == setting and r["config"] is None}
            best = best_per_batch(mine, setting)
            for T in sorted(chosen):
                c, b = chosen[T], best.get(T)
                if c.get("time_us") is None:
                    continue
                gain = f"{c['time_us'] / b['time_us']:.2f}x" if b else "-"
                cfg = "-" if b is None else " ".join(f"{k[0] if k.startswith('B') else k}={v}"
                                                     for k, v in b["config"].items() if k != "SPLIT_K")
                cells.append([T, setting, f"{c['experts_after']}", f"{c['time_us']:.1f}", f"{c['hbm_floor_share']:.2f}",
                              "-" if b is None else f"{b['time_us']:.1f}",
                              "-" if b is None else f"{b['hbm_floor_share']:.2f}", gain, cfg])
        lines += [f"#### {model}", ""]
        lines += markdown_table(["T", "setting", "experts", "vLLM's choice us", "floor share", "best of grid us",
                                 "floor share", "gain", "best config"], "rlrrrrrrl", cells)
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/tune_fused_moe")))
    p.add_argument("--models", default="Qwen1.5-MoE-A2.7B", help=f"comma-separated, from {', '.join(REAL_MODELS)}")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    p.add_argument("--routing", default="uniform", help="bench/routing.py spec")
    p.add_argument("--deadline", type=float, default=540, help="seconds for the whole run")
    p.add_argument("--list", action="store_true", help="print the plan and exit (no GPU needed)")
    args = p.parse_args(argv)
    started = time.perf_counter()  # the deadline counts the imports and set-up too
    models = parse_models(p, args.models)
    grid = config_grid()
    per_model = len(args.batches) * len(SETTINGS) * (1 + len(grid))
    if args.list:
        print(f"{len(grid)} configurations x {len(args.batches)} batches x {len(SETTINGS)} settings "
              f"(+ vLLM's own choice) = {per_model} timings per model; models {models}")
        return 0

    import torch

    from bench import fused_layer as fused
    from bench.timing import Deadline, measure_copy_bandwidth, time_graph_replay

    vllm_ops = fused.load_vllm_ops()

    args.out.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.deadline - (time.perf_counter() - started))
    bw = measure_copy_bandwidth("cuda")
    from vllm.model_executor.layers.fused_moe.fused_moe import get_default_config
    from vllm.platforms import current_platform

    device = current_platform.get_device_name()  # vLLM's name (NVML's), the one its config lookup uses
    rows, skipped = [], 0

    def save(model: str, shapes) -> str:
        """Every timing so far, and the model's best tiles per setting in vLLM's file format: SERE's
        in --out, stock's in --out/stock (the tuned baseline); returns the files' name. Called after
        every case, so a run cut off by a timeout keeps what it measured."""
        name = config_file_name(shapes.num_experts, shapes.moe_intermediate_size, device)

        def default_for(m):  # what vLLM picks with no file (bf16: dtype None)
            return get_default_config(m, shapes.num_experts, shapes.moe_intermediate_size, shapes.hidden_size,
                                      shapes.top_k, None)

        for setting, folder in ((SERE_S1, args.out), (STOCK, args.out / "stock")):
            best = best_per_batch([r for r in rows if r["model"] == model], setting.label)
            if best:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(json.dumps(vllm_config_file(best, default_for), indent=2) + "\n")
        result = {"device": device, "torch": torch.__version__, "copy_bw_gbps": round(bw / 1e9, 1),
                  "routing": args.routing, "grid": GRID, "skipped_timings": skipped, "rows": rows}
        (args.out / "tune_fused_moe.json").write_text(json.dumps(result, indent=2))
        return name

    for i, model in enumerate(models):
        # Each model gets an equal share of what is left, so a slow first model cannot starve the last.
        share = Deadline(deadline.left() / (len(models) - i))
        layer = fused.build_layer(model, vllm_ops)
        for T, setting in itertools.product(args.batches, SETTINGS):
            case = fused.prepare_case(layer, args.routing, T, *setting)
            _, problems = fused.check_case(layer, case)
            if problems:
                print(f"CHECK FAILED {model} T={T} {setting.label}: {problems}", flush=True)
            for cfg in [None, *grid]:  # None: vLLM's own choice for this M
                if share.refuses():
                    skipped += 1
                    continue
                row = dict(model=model, tokens=T, setting=setting.label, config=cfg)
                try:
                    with forced_tiles(cfg), torch.no_grad():
                        t = time_graph_replay(lambda: layer(case.h), calls=fused.CALLS, repeats=TUNE_ROUNDS)
                    row.update(fused.case_info(layer.shapes, case, t.median_us * 1e-6, bw))
                except Exception as exc:  # noqa: BLE001 - a tile that does not fit (shared memory) is skipped
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    torch.cuda.synchronize()
                rows.append(row)
            print(f"{model} T={T} {setting.label}: {len(grid) + 1} timed", flush=True)
            name = save(model, layer.shapes)
        print(f"wrote {args.out / name} (SERE) and the same name in stock/", flush=True)
        del layer
        torch.cuda.empty_cache()
    table = markdown(rows)
    (args.out / "tune_fused_moe.md").write_text(f"Device {device}; routing {args.routing}; {skipped} timings skipped "
                                                f"by the deadline\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
