"""The expert-similarity artifact: one safetensors file of [E, E] float32 matrices per MoE layer.

    from sere.artifact import save_similarity, load_similarity
    save_similarity(model_dir, {3: sim3, 4: sim4}, {"model_type": "qwen2_moe", "method": "cka"})
    art = load_similarity(model_dir, config=model.config)   # validated against the model
    art.matrices[3]                                          # E, E float32

Layout of `sere_similarity.safetensors`: tensor keys are decimal decoder-layer indices ("3"),
only MoE layers (DeepSeek-V2's dense first layers have none). Metadata (strings, as
safetensors requires; non-strings JSON-encoded): format, format_version, num_experts, layers
(JSON list), plus what the writer adds (model_type, method, kernel, tokens, data_sha256,
created, ...). Pickle files are refused: unpickling runs arbitrary code.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from sere.validation import check_similarity_values

ARTIFACT_FILENAME = "sere_similarity.safetensors"
FORMAT_NAME = "sere-similarity"
FORMAT_VERSION = 1

# Extensions and magic bytes of pickle-based files (plain pickle, torch.save zip, numpy).
_PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".npy", ".npz", ".joblib"}
_PICKLE_MAGICS = (b"\x80", b"PK\x03\x04", b"\x93NUMPY")


class ArtifactError(ValueError):
    """A similarity artifact that is missing, unreadable, or does not fit the model."""


@dataclass
class SimilarityArtifact:
    matrices: dict[int, torch.Tensor]  # layer index -> E, E float32
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def layers(self) -> list[int]:
        return sorted(self.matrices)

    @property
    def num_experts(self) -> int:
        return next(iter(self.matrices.values())).shape[0]

    @property
    def method(self) -> str | None:
        return self.metadata.get("method")

    def device_matrices(self, layers, device) -> dict[int, torch.Tensor]:
        """{layer: [E, E] float32, contiguous, on `device`} for `layers`: what re-routers use.
        The matrices were validated when the artifact was loaded; nothing is checked again."""
        return {int(i): self.matrices[int(i)].to(device=device, dtype=torch.float32).contiguous() for i in layers}

    def to(self, device=None, dtype=None) -> "SimilarityArtifact":
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self.matrices.items()}
        return SimilarityArtifact(moved, dict(self.metadata), self.path)


def artifact_path(path: str | os.PathLike) -> Path:
    """`path` itself if it names a file, else `path/sere_similarity.safetensors`."""
    p = Path(path)
    if p.is_file():
        return p
    return p / ARTIFACT_FILENAME if p.is_dir() or p.suffix == "" else p


# ---------------------------------------------------------------------------- saving


def save_similarity(
    path: str | os.PathLike,
    matrices: Mapping[int, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write `matrices` ({layer: E x E}) and `metadata` atomically; return the file written.

    `path` is a directory (the file is named sere_similarity.safetensors) or a .safetensors
    file. Values are checked first (square, one expert count, finite), so a bad input leaves
    nothing on disk; the file appears by rename, never half-written.
    """
    from safetensors.torch import save_file

    tensors = _checked_matrices(matrices)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    layers = sorted(tensors)
    meta.update(
        format=FORMAT_NAME,
        format_version=str(FORMAT_VERSION),
        num_experts=str(next(iter(tensors.values())).shape[0]),
        layers=json.dumps(layers),
    )
    target = artifact_path(path)
    if target.suffix != ".safetensors":
        raise ArtifactError(f"similarity artifact must be a .safetensors file, got {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sere_similarity.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file({str(k): tensors[k] for k in layers}, tmp, metadata=meta)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _checked_matrices(matrices: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    if not matrices:
        raise ArtifactError("no similarity matrices given (a model needs at least one MoE layer)")
    out: dict[int, torch.Tensor] = {}
    num_experts = None
    for layer, m in matrices.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ArtifactError(f"layer keys must be non-negative ints, got {layer!r}")
        if not isinstance(m, torch.Tensor):
            raise ArtifactError(f"layer {layer}: expected a torch.Tensor, got {type(m).__name__}")
        if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
            raise ArtifactError(f"layer {layer}: similarity must be square [E, E], got {tuple(m.shape)}")
        if not m.dtype.is_floating_point:
            raise ArtifactError(f"layer {layer}: similarity must be floating point, got {m.dtype}")
        if num_experts is None:
            num_experts = m.shape[0]
        elif m.shape[0] != num_experts:
            raise ArtifactError(
                f"layer {layer} has {m.shape[0]} experts but an earlier layer has {num_experts}"
            )
        m = m.detach().to("cpu", torch.float32).contiguous()
        check_similarity_values(m, name=f"similarity of layer {layer}")
        out[layer] = m
    return out


# ---------------------------------------------------------------------------- loading


def load_similarity(
    path: str | os.PathLike,
    *,
    config=None,
    expected_num_experts: int | None = None,
    expected_layers: Iterable[int] | None = None,
    device: str | torch.device = "cpu",
) -> SimilarityArtifact:
    """Read and validate an artifact (a .safetensors file or a directory holding one).

    With `config` (a transformers config) the expert count and MoE layer indices must match
    the model; explicit `expected_num_experts` / `expected_layers` take precedence over what
    the config implies. Raises ArtifactError with the reason on any mismatch.
    """
    from safetensors import SafetensorError
    from safetensors import safe_open

    file = artifact_path(path)
    if not file.exists():
        hint = f" (looked for {ARTIFACT_FILENAME} in that directory)" if file != Path(path) else ""
        raise ArtifactError(f"similarity artifact not found: {file}{hint}; run `sere-calibrate` to create it")
    _refuse_non_safetensors(file)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ArtifactError(f"{file} is not a readable safetensors file: {e}") from e

    matrices = _parse_matrices(file, raw)
    _check_metadata(file, metadata, matrices)
    if config is not None:
        if expected_num_experts is None:
            expected_num_experts = num_experts_of(config)
        if expected_layers is None:
            expected_layers = moe_layer_indices(config)
        model_type = getattr(config, "model_type", None)
        stored_type = metadata.get("model_type")
        if model_type and stored_type and stored_type != model_type:
            raise ArtifactError(
                f"{file} was calibrated for model_type {stored_type!r}, but the model is {model_type!r}"
            )
    art = SimilarityArtifact(matrices, metadata, file)
    if expected_num_experts is not None and art.num_experts != expected_num_experts:
        raise ArtifactError(
            f"{file} has {art.num_experts} experts per layer, but the model has {expected_num_experts}"
        )
    if expected_layers is not None:
        _check_layers(file, art.layers, sorted(set(expected_layers)))
    return art.to(device) if torch.device(device).type != "cpu" else art


def _refuse_non_safetensors(file: Path) -> None:
    with open(file, "rb") as fh:
        head = fh.read(9)
    looks_pickled = file.suffix.lower() in _PICKLE_SUFFIXES or head.startswith(_PICKLE_MAGICS)
    # A safetensors file opens with an 8-byte little-endian header length, then '{'.
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if looks_pickled and not is_safetensors:
        raise ArtifactError(
            f"refusing to load {file}: it looks like a pickle / torch.save file, and unpickling "
            "can run arbitrary code. SERE reads only safetensors artifacts: re-run "
            "`sere-calibrate` (python -m sere.calibration) to write " + ARTIFACT_FILENAME
        )
    if not is_safetensors:
        raise ArtifactError(f"{file} is not a safetensors file (bad header)")


def _parse_matrices(file: Path, raw: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    if not raw:
        raise ArtifactError(f"{file} holds no similarity matrices")
    matrices: dict[int, torch.Tensor] = {}
    for key, m in raw.items():
        if not key.isdigit():
            raise ArtifactError(f"{file}: tensor key {key!r} is not a decoder layer index")
        matrices[int(key)] = m
    try:
        checked = _checked_matrices(matrices)
    except ArtifactError as e:
        raise ArtifactError(f"{file}: {e}") from None
    except ValueError as e:  # non-finite values, from sere.validation
        raise ArtifactError(f"{file}: {e}") from None
    return checked


def _check_metadata(file: Path, meta: dict[str, str], matrices: dict[int, torch.Tensor]) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{file} is not a SERE similarity artifact (metadata format={meta.get('format')!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise ArtifactError(f"{file}: bad format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{file} has format_version {version}; this sere reads up to {FORMAT_VERSION} (upgrade sere)"
        )
    num_experts = next(iter(matrices.values())).shape[0]
    if meta.get("num_experts") not in (None, str(num_experts)):
        raise ArtifactError(f"{file}: metadata says {meta['num_experts']} experts, matrices have {num_experts}")
    if "layers" in meta:
        try:
            listed = sorted(int(v) for v in json.loads(meta["layers"]))
        except (ValueError, TypeError):
            raise ArtifactError(f"{file}: metadata layers is not a JSON list of ints: {meta['layers']!r}") from None
        if listed != sorted(matrices):
            raise ArtifactError(f"{file}: metadata lists layers {listed}, tensors hold {sorted(matrices)}")


def _check_layers(file: Path, have: list[int], want: list[int]) -> None:
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    if extra or missing:
        parts = []
        if missing:
            parts.append(f"missing MoE layers {missing}")
        if extra:
            parts.append(f"has layers {extra} that are not MoE layers of the model")
        raise ArtifactError(f"{file} does not fit the model: {'; '.join(parts)} (model MoE layers: {want})")


# ---------------------------------------------------------------------------- config rules


def moe_layer_indices(config) -> list[int]:
    """Decoder-layer indices that hold a routed MoE block, read from a transformers config.

    Mirrors the layer-construction rules of the transformers modeling code (5.x) for the
    families SERE supports; for others, pass `expected_layers` explicitly.
    """
    num_layers = config.num_hidden_layers
    model_type = getattr(config, "model_type", "")
    if hasattr(config, "first_k_dense_replace"):  # deepseek_v2 / deepseek_v3: dense first layers
        return [i for i in range(num_layers) if i >= config.first_k_dense_replace]
    if hasattr(config, "decoder_sparse_step"):  # qwen2_moe / qwen3_moe
        if num_experts_of(config) <= 0:
            return []
        skip = set(getattr(config, "mlp_only_layers", None) or [])
        step = config.decoder_sparse_step
        return [i for i in range(num_layers) if i not in skip and (i + 1) % step == 0]
    if model_type in ("mixtral", "olmoe"):  # every layer is MoE
        return list(range(num_layers))
    raise ArtifactError(
        f"cannot tell the MoE layers of model_type {model_type!r} from its config; "
        "pass expected_layers=... explicitly"
    )


def num_experts_of(config) -> int:
    """Routed expert count of a transformers MoE config, whatever the family calls it."""
    for name in ("num_experts", "n_routed_experts", "num_local_experts"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError(f"{type(config).__name__} has no routed expert count (not an MoE config?)")
