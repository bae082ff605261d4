"""Save a random-weight checkpoint of a published MoE shape, built straight on the device.

    python -m bench.gpu.make_random_model --model Qwen3-30B-A3B --out /tmp/qwen3 --device cuda \
        --dtype bfloat16 --tokenizer-from tests/zoo/tokenizer [--fit-disk] [--layers N]

For bench/gpu/calibrate_real.sh (calibration at real scale, issue 13). The config is the
published one (sere.harness.model_configs.real_config); the model is constructed inside
`with torch.device(device)`, so every weight is allocated and initialised on the device (host
memory stays small), then written with save_pretrained in safetensors shards of
--max-shard-size (the host holds about one shard while it is written). The tokenizer files of
--tokenizer-from are copied in (any tokenizer whose ids lie below the model's vocabulary will
do: the weights are random). Before building, the checkpoint's size is checked against the free
space of the output's file system (with --fit-disk the layer count is cut to what fits, and the
result says so). Prints one JSON line (sizes, times, peak host RSS and peak device memory), then the same
as one `built: ...` line.
CPU check with a short stack:  python -m bench.gpu.make_random_model --model Qwen3-30B-A3B
    --layers 1 --hidden 64 --out /tmp/q --device cpu --dtype float32
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
DISK_RESERVE = 2 * 2**30  # left free on the output's file system


def _tokenizer_vocab(folder) -> int:
    """Tokens of the tokenizer saved in `folder` (SystemExit where there is none)."""
    from transformers import AutoTokenizer

    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise SystemExit(f"make_random_model: no tokenizer files in {folder}")
    return len(AutoTokenizer.from_pretrained(folder))


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _sizes(cfg, dtype) -> tuple[int, int]:
    """(bytes of the whole checkpoint, bytes of one decoder layer on average), from a meta model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    per_layer = total = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        total += nbytes
        if ".layers." in name:
            per_layer += nbytes
    return total, per_layer // cfg.num_hidden_layers


def config_for(model: str, *, layers: int | None = None, hidden: int | None = None, vocab: int = 4096):
    """The published config of `model`, with `layers` decoder layers; `hidden` (CPU checks of
    this script only) makes a narrow model of the same structure (experts, top-k, layer kinds)
    with a `vocab`-token vocabulary."""
    from sere.harness.model_configs import real_config

    overrides = {}
    if layers:
        overrides["num_hidden_layers"] = layers
    if hidden:
        overrides.update(hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                         vocab_size=12288, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         bos_token_id=0, eos_token_id=0)
        if real_config(model).model_type == "qwen2_moe":
            overrides["shared_expert_intermediate_size"] = hidden
    return real_config(model, **overrides)


def build(args) -> dict:
    from transformers import AutoModelForCausalLM

    from sere.calibration.memory import peak_rss_bytes
    from sere.harness.model_configs import real_config

    dtype = DTYPES[args.dtype]
    tokenizer_vocab = _tokenizer_vocab(args.tokenizer_from) if args.tokenizer_from else 0
    narrow = dict(hidden=args.hidden, vocab=max(4096, tokenizer_vocab))
    cfg = config_for(args.model, layers=args.layers, **narrow)
    if tokenizer_vocab > cfg.vocab_size:
        raise SystemExit(f"make_random_model: the tokenizer of {args.tokenizer_from} has {tokenizer_vocab} tokens, "
                         f"more than {args.model}'s vocabulary of {cfg.vocab_size}")
    total, per_layer = _sizes(cfg, dtype)
    out = Path(args.out)
    free = _free_bytes(out)
    result = {"model": args.model, "layers": cfg.num_hidden_layers,
              "published_layers": real_config(args.model).num_hidden_layers, "checkpoint_bytes": total, "disk_free_before": free, "dtype": args.dtype, "device": args.device}
    if total > free - DISK_RESERVE:
        if not args.fit_disk:
            raise SystemExit(f"make_random_model: {args.model} needs {total / 2**30:.1f} GiB, {out} has "
                             f"{free / 2**30:.1f} GiB free (use --fit-disk to cut layers)")
        layers = math.floor((free - DISK_RESERVE - (total - per_layer * cfg.num_hidden_layers)) / per_layer)
        if layers < 1:
            raise SystemExit(f"make_random_model: not even one layer of {args.model} fits in {free / 2**30:.1f} GiB")
        cfg = config_for(args.model, layers=layers, **narrow)
        total, per_layer = _sizes(cfg, dtype)
        result.update(layers=layers, checkpoint_bytes=total, cut_to_fit_disk=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # every weight allocated and initialised on the device
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["param_devices"] = sorted({str(p.device) for p in model.parameters()})
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["host_rss_after_build_gib"] = round(peak_rss_bytes() / 2**30, 2)
    t0 = time.perf_counter()
    model.save_pretrained(out, max_shard_size=args.max_shard_size)
    result["save_s"] = round(time.perf_counter() - t0, 1)
    if args.tokenizer_from:
        copied = [name for name in TOKENIZER_FILES if (Path(args.tokenizer_from) / name).is_file()]
        for name in copied:
            shutil.copy(Path(args.tokenizer_from) / name, out / name)
        result["tokenizer_files"] = copied
        result["tokenizer_vocab"] = tokenizer_vocab
    result["shards"] = len(list(out.glob("*.safetensors")))
    result["disk_used_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    result["peak_host_rss_gib"] = round(peak_rss_bytes() / 2**30, 2)
    if device.type == "cuda":
        result["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.make_random_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a key of sere.harness.model_configs.REAL_MODELS")
    p.add_argument("--out", required=True, help="folder to write (created)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--tokenizer-from", help="folder whose tokenizer files are copied in")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--layers", type=int, help="num_hidden_layers (default: the published count)")
    p.add_argument("--fit-disk", action="store_true", help="cut the layer count to what fits on the disk")
    p.add_argument("--hidden", type=int, help=argparse.SUPPRESS)  # CPU checks: a narrow model
    args = p.parse_args(argv)
    result = build(args)
    print(json.dumps(result), flush=True)
    print(summary_line(result), flush=True)
    return 0


def summary_line(r: dict) -> str:
    """One line for bench/gpu/calibrate_real.sh's table."""
    cut = " CUT TO FIT THE DISK" if r.get("cut_to_fit_disk") else ""
    gpu = f"peak GPU {r['peak_gpu_allocated_gib']} GiB allocated, " if "peak_gpu_allocated_gib" in r else ""
    return (f"built: {r['params'] / 1e9:.2f}B params, {r['layers']} of {r['published_layers']} layers{cut}, "
            f"{r['checkpoint_bytes'] / 2**30:.1f} GiB in {r['shards']} shards on {', '.join(r['param_devices'])}; "
            f"build {r['build_s']} s, save {r['save_s']} s; {gpu}host RSS {r['peak_host_rss_gib']} GiB")


if __name__ == "__main__":
    sys.exit(main())
