"""What the calibration command checks and loads before any model work: the device, the
tokenizer, and the model, read from its files straight onto the device.

    device = resolve_device("cuda:0")            # CalibrationError naming the problem
    tokenizer = load_tokenizer(model_path)       # refuses a folder without tokenizer files
    model, how = load_model(model_path, device, torch.bfloat16)

Why straight onto the device: `from_pretrained(...).to(device)` first materialises every weight
in host memory (a 14.3B-parameter bf16 model took 50 GB of host RSS), and a 30B-class model
needs more host memory than many GPU hosts give a job. With a one-device `device_map`,
transformers reads each tensor of the safetensors files and places it on the device at once.
transformers refuses any `device_map` unless `accelerate` is installed, although for a map of
one device it calls nothing of accelerate (the whole placement is its own loading loop; only
several devices or disk offload are dispatched through accelerate). Without accelerate the
gate is passed for that one call (see `_one_device_gate_open`); if that is not possible in the
installed transformers, the model is loaded on the host and moved, with a notice.

Why read, not map: transformers opens every shard with safetensors' default memory map, and
every page it copies to the device stays mapped (and counted in the process's RSS) until all
shards are closed at the end: a 57 GiB checkpoint peaked at 58 GiB of host RSS although only
1.3 GiB of it was anonymous memory (H200, 2026-12-02). safetensors >= 0.7 can read a tensor with
pread instead (`backend="pread"`, what transformers itself does on Windows and MPS): each tensor
then passes through a host buffer that is freed once it is on the device, and the file pages
stay in the page cache, outside the process. `_read_not_mapped` asks for that for the loading
call; where transformers or safetensors lack the hook, loading maps as before.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from sere.calibration.calibrate import CalibrationError

# File names a transformers tokenizer is saved as (any one of them makes a tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model")
_PROBE_TEXT = "In the beginning God created the heaven and the earth."


def resolve_device(name: str | None) -> torch.device:
    """The torch device of `--device` (default: cuda if available, else cpu), or a
    CalibrationError phrased as argparse phrases argument errors."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        hint = " (did you mean cuda?)" if name.strip().lower().startswith("gpu") else ""
        raise CalibrationError(f"argument --device: invalid device {name!r}{hint}; use cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise CalibrationError("argument --device: meta holds no data; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CalibrationError(f"argument --device: {name} is not available ({why}, torch {torch.__version__}); "
                                   "use --device cpu")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= count:
            raise CalibrationError(f"argument --device: {name} is not available ({count} CUDA device(s) visible)")
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise CalibrationError(f"argument --device: {name} is not available here; use --device cpu")
    return device


def load_tokenizer(model_path: Path):
    """The model folder's tokenizer. transformers builds an empty tokenizer for a folder without
    tokenizer files (it encodes every text to no tokens): that is an error here, named as such."""
    from transformers import AutoTokenizer

    found = [name for name in TOKENIZER_FILES if (model_path / name).is_file()]
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError) as e:
        if not found:
            raise CalibrationError(_no_tokenizer(model_path)) from None
        raise CalibrationError(f"cannot load a tokenizer from {model_path}: {e}") from None
    if not tokenizer(_PROBE_TEXT)["input_ids"]:
        if not found:
            raise CalibrationError(_no_tokenizer(model_path))
        raise CalibrationError(f"the tokenizer at {model_path} ({', '.join(found)}) encodes text to no tokens")
    return tokenizer


def _no_tokenizer(model_path: Path) -> str:
    return (f"the tokenizer is missing: {model_path} has none of {', '.join(TOKENIZER_FILES[:3])}, ...; "
            "copy the tokenizer files of the model it was made from into that folder")


def load_model(model_path: Path, device: torch.device, dtype: torch.dtype):
    """(model in eval mode on `device`, how it was loaded: "direct" or "via host"). On an
    accelerator the weights go from the files straight onto it (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    if device.type == "cpu":
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval(), "direct"
    try:
        with _one_device_gate_open(), _read_not_mapped():
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": device})
        return model.eval(), "direct"
    except _GateClosed as e:
        print(f"sere-calibrate: {e}; loading the model on the host first (host memory will hold all of it: "
              "pip install accelerate to load it straight to the device)", file=sys.stderr)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval(), "via host"


class _GateClosed(RuntimeError):
    pass


def pread_supported() -> bool:
    """Whether the installed safetensors reads tensors without a memory map (backend="pread")."""
    import inspect

    from safetensors import safe_open

    try:
        return "backend" in inspect.signature(safe_open).parameters
    except (TypeError, ValueError):  # no readable signature: assume the old, mapping-only one
        return False


@contextlib.contextmanager
def _read_not_mapped():
    """For this call, transformers' safetensors shards are opened with backend="pread" where it
    asked for the default memory map (see the module docstring). A no-op where transformers
    does not open shards through its module-level `safe_open` or safetensors has no pread."""
    try:
        import transformers.modeling_utils as loader
    except ImportError:
        yield
        return
    original = getattr(loader, "safe_open", None)
    if original is None or not pread_supported():
        yield
        return

    def safe_open_pread(filename, framework, device="cpu", **kw):
        if kw.get("backend", "mmap") == "mmap":
            kw["backend"] = "pread"
        return original(filename, framework, device, **kw)

    loader.safe_open = safe_open_pread
    try:
        yield
    finally:
        loader.safe_open = original


@contextlib.contextmanager
def _one_device_gate_open():
    """With accelerate installed: nothing to do. Without: transformers' device_map check
    (transformers.integrations.accelerate.check_and_set_device_map, 5.x) asks
    `is_accelerate_available()` in its own module; answer yes there, for this one call of a
    one-device map, which transformers places itself. Raises _GateClosed where that module or
    name is not there (another transformers layout), or where transformers still asks for
    accelerate."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        pass
    else:
        yield
        return
    try:
        import transformers.integrations.accelerate as gate
    except ImportError:
        raise _GateClosed("accelerate is not installed") from None
    if not callable(getattr(gate, "is_accelerate_available", None)):
        raise _GateClosed("accelerate is not installed")
    before = gate.is_accelerate_available
    gate.is_accelerate_available = lambda *a, **k: True
    try:
        yield
    except (ImportError, NameError) as e:  # transformers reached for accelerate after all
        raise _GateClosed(f"accelerate is not installed ({e})") from None
    except ValueError as e:
        if "accelerate" in str(e):
            raise _GateClosed("accelerate is not installed") from None
        raise
    finally:
        gate.is_accelerate_available = before
