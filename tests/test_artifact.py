"""The similarity artifact: safetensors round trip, refusal of pickles, validation against a model.

    pytest tests/test_artifact.py
"""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sere.artifact import (
    ARTIFACT_FILENAME,
    ArtifactError,
    load_similarity,
    moe_layer_indices,
    save_similarity,
)
from sere.calibration.experts import find_moe_layers
from sere.harness.model_configs import TINY_ARCHS, build_tiny_model, num_experts_of, tiny_config

# (arch, config overrides): every tiny family, plus layer patterns with dense layers.
LAYER_RULE_CASES = [(arch, {}) for arch in TINY_ARCHS] + [
    ("qwen2_moe", dict(num_hidden_layers=4, decoder_sparse_step=2)),
    ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[1])),
    ("deepseek_v2", dict(num_hidden_layers=4, first_k_dense_replace=2)),
]


def sims(layers, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        a = torch.rand(e, e, generator=g)
        out[layer] = ((a + a.T) / 2).fill_diagonal_(1.0)  # E, E
    return out


def test_round_trip_into_a_directory(tmp_path):
    matrices = sims([1, 2, 5])
    path = save_similarity(tmp_path, matrices, {"model_type": "deepseek_v2", "method": "cka", "tokens": 4096})
    assert path == tmp_path / ARTIFACT_FILENAME and path.is_file()
    art = load_similarity(tmp_path)
    assert art.layers == [1, 2, 5] and art.num_experts == 8 and art.method == "cka"
    for layer, m in matrices.items():
        assert torch.equal(art.matrices[layer], m)
        assert art.matrices[layer].dtype == torch.float32
    assert art.metadata["tokens"] == "4096"  # non-strings JSON-encoded
    assert art.metadata["format"] == "sere-similarity" and art.metadata["format_version"] == "1"
    assert json.loads(art.metadata["layers"]) == [1, 2, 5]
    assert art.metadata["num_experts"] == "8"
    assert [p.name for p in tmp_path.iterdir()] == [ARTIFACT_FILENAME]  # no temp file left


def test_round_trip_to_a_named_file_and_float64_input(tmp_path):
    target = tmp_path / "sub" / "custom.safetensors"
    m = {0: torch.eye(3, dtype=torch.float64)}
    assert save_similarity(target, m) == target
    art = load_similarity(target, expected_num_experts=3, expected_layers=[0])
    assert torch.equal(art.matrices[0], torch.eye(3))


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ArtifactError, match="not found.*sere-calibrate"):
        load_similarity(tmp_path)


@pytest.mark.parametrize(
    "writer",
    [
        lambda p, obj: torch.save(obj, p),
        lambda p, obj: p.write_bytes(pickle.dumps(obj, protocol=4)),
        lambda p, obj: p.write_bytes(pickle.dumps(obj, protocol=0)),
    ],
    ids=["torch.save", "pickle4", "pickle0"],
)
@pytest.mark.parametrize("name", ["similarity.pkl", "sim.pt", ARTIFACT_FILENAME])
def test_pickle_files_are_refused(tmp_path, writer, name):
    path = tmp_path / name
    writer(path, {3: torch.eye(4)})
    if name == ARTIFACT_FILENAME and path.read_bytes()[:1] not in (b"\x80", b"P"):
        expect = "not a safetensors file"  # protocol-0 pickle in a .safetensors name: no magic, still refused
    else:
        expect = "refusing to load .*pickle"
    with pytest.raises(ArtifactError, match=expect):
        load_similarity(path)


def test_garbage_and_foreign_safetensors_are_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        load_similarity(tmp_path / "junk.safetensors")
    save_file({"3": torch.eye(4)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ArtifactError, match="not a SERE similarity artifact"):
        load_similarity(tmp_path / "foreign.safetensors")


def _raw(tmp_path, tensors, **meta):
    path = tmp_path / "raw.safetensors"
    metadata = {"format": "sere-similarity", "format_version": "1", **meta}
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "tensors,meta,match",
    [
        ({"3": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}, {}, "non-finite"),
        ({"3": torch.tensor([[1.0, float("inf")], [0.0, 1.0]])}, {}, "non-finite"),
        ({"3": torch.ones(2, 3)}, {}, "square"),
        ({"3": torch.ones(2, 2), "4": torch.ones(3, 3)}, {}, "experts but an earlier layer"),
        ({"mlp.3": torch.ones(2, 2)}, {}, "not a decoder layer index"),
        ({"3": torch.ones(2, 2, dtype=torch.int32)}, {}, "floating point"),
        ({"3": torch.ones(2, 2)}, {"format_version": "9"}, "upgrade sere"),
        ({"3": torch.ones(2, 2)}, {"num_experts": "4"}, "metadata says 4 experts"),
        ({"3": torch.ones(2, 2)}, {"layers": "[3, 4]"}, r"metadata lists layers \[3, 4\]"),
    ],
    ids=["nan", "inf", "not-square", "mixed-E", "bad-key", "int", "future-version", "meta-E", "meta-layers"],
)
def test_bad_contents_are_refused(tmp_path, tensors, meta, match):
    with pytest.raises(ArtifactError, match=match):
        load_similarity(_raw(tmp_path, tensors, **meta))


@pytest.mark.parametrize(
    "matrices,match",
    [
        ({}, "no similarity matrices"),
        ({-1: torch.eye(2)}, "non-negative ints"),
        ({"1": torch.eye(2)}, "non-negative ints"),
        ({1: torch.eye(2), 2: torch.eye(3)}, "earlier layer"),
        ({1: torch.full((2, 2), float("nan"))}, "non-finite"),
    ],
    ids=["empty", "negative", "str-key", "mixed-E", "nan"],
)
def test_save_rejects_bad_matrices_and_writes_nothing(tmp_path, matrices, match):
    with pytest.raises(ValueError, match=match):
        save_similarity(tmp_path, matrices)
    assert list(tmp_path.iterdir()) == []


def test_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    save_similarity(tmp_path, sims([1]))
    before = (tmp_path / ARTIFACT_FILENAME).read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_similarity(tmp_path, sims([1], seed=1))
    assert (tmp_path / ARTIFACT_FILENAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [ARTIFACT_FILENAME]


# ---------------------------------------------------------------------------- against a model


@pytest.mark.parametrize("arch,overrides", LAYER_RULE_CASES, ids=lambda v: str(v) if isinstance(v, dict) else v)
def test_config_layer_rule_matches_the_built_model(arch, overrides):
    config = tiny_config(arch, **overrides)
    model = build_tiny_model(arch, **overrides)
    assert moe_layer_indices(config) == [layer.index for layer in find_moe_layers(model)]


@pytest.mark.parametrize("arch", ("qwen2_moe", "qwen3_moe", "deepseek_v2"))
def test_validation_against_config(tmp_path, arch):
    config = tiny_config(arch)
    layers = moe_layer_indices(config)
    e = num_experts_of(config)
    save_similarity(tmp_path, sims(layers, e), {"model_type": arch})
    art = load_similarity(tmp_path, config=config)
    assert art.layers == layers and art.num_experts == e

    save_similarity(tmp_path, sims(layers, e + 2), {"model_type": arch})
    with pytest.raises(ArtifactError, match=f"has {e + 2} experts per layer, but the model has {e}"):
        load_similarity(tmp_path, config=config)

    save_similarity(tmp_path, sims(layers[:-1], e), {"model_type": arch})
    with pytest.raises(ArtifactError, match=rf"missing MoE layers \[{layers[-1]}\]"):
        load_similarity(tmp_path, config=config)

    save_similarity(tmp_path, sims(layers + [7], e), {"model_type": arch})
    with pytest.raises(ArtifactError, match=r"has layers \[7\] that are not MoE layers"):
        load_similarity(tmp_path, config=config)

    other = "qwen3_moe" if arch != "qwen3_moe" else "qwen2_moe"
    save_similarity(tmp_path, sims(layers, e), {"model_type": other})
    with pytest.raises(ArtifactError, match=f"calibrated for model_type '{other}'"):
        load_similarity(tmp_path, config=config)


def test_dense_layer_key_is_refused_for_deepseek(tmp_path):
    config = tiny_config("deepseek_v2")  # layer 0 is dense
    save_similarity(tmp_path, sims([0, 1, 2]), {"model_type": "deepseek_v2"})
    with pytest.raises(ArtifactError, match=r"has layers \[0\] that are not MoE layers"):
        load_similarity(tmp_path, config=config)


def test_explicit_expectations_override_the_config(tmp_path):
    config = tiny_config("qwen2_moe")
    save_similarity(tmp_path, sims([1], 8), {"model_type": "qwen2_moe"})
    art = load_similarity(tmp_path, config=config, expected_layers=[1])
    assert art.layers == [1]
    with pytest.raises(ArtifactError, match="but the model has 16"):
        load_similarity(tmp_path, expected_num_experts=16)


def test_unknown_family_needs_explicit_layers():
    class Cfg:
        model_type = "brand_new_moe"
        num_hidden_layers = 2

    with pytest.raises(ArtifactError, match="pass expected_layers"):
        moe_layer_indices(Cfg())
