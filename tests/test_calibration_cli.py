"""The calibration command end to end on tiny random models, its pieces, and its errors.

    pytest tests/test_calibration_cli.py            # add -m "not slow" to skip the subprocess check

Models are built from configs (sere.harness.model_configs, no hub) and saved with a byte-level
tokenizer (256 tokens, the tiny vocabulary) so the command loads them like real checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from sere.artifact import ARTIFACT_FILENAME, load_similarity
from sere.calibration import __main__ as cli
from sere.calibration.calibrate import CalibrationError, calibrate
from sere.calibration.data import DEFAULT_DATA, DataError, read_texts, token_sequences
from sere.calibration.experts import all_expert_outputs, find_moe_layers
from sere.calibration.metrics import similarity_matrix
from sere.harness.model_configs import build_tiny_model

FAST = ["--max_len", "32", "--batch_size", "3", "--no_progress"]
# (arch, method, kernel, max_tokens): every architecture, every method and kernel once.
E2E_CASES = (
    ("qwen2_moe", "cka", "linear", 200),
    ("qwen3_moe", "cosine", "linear", 150),
    ("deepseek_v2", "frobenius", "linear", 100),
    ("deepseek_v2", "cka", "rbf", 96),
    ("qwen3_moe", "cka", "polynomial", 64),
)


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}  # 256 byte symbols
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny(path, arch, **overrides):
    build_tiny_model(arch, **overrides).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny(root / arch, arch) for arch in ("qwen2_moe", "qwen3_moe", "deepseek_v2")}


def run_cli(capsys, *args):
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("arch,method,kernel,max_tokens", E2E_CASES, ids=lambda v: str(v))
def test_command_end_to_end(model_dirs, tmp_path, capsys, arch, method, kernel, max_tokens):
    from transformers import AutoConfig

    rc, out, err = run_cli(
        capsys,
        "--model_path", model_dirs[arch], "--output_path", tmp_path, "--model_type", arch,
        "--similarity_method", method, "--kernel", kernel, "--max_tokens", max_tokens, *FAST,
    )
    assert rc == 0, err
    config = AutoConfig.from_pretrained(model_dirs[arch])
    art = load_similarity(tmp_path, config=config)  # validated: expert count and MoE layers
    meta = art.metadata
    assert meta["model_type"] == arch and meta["method"] == method
    assert meta["kernel"] == (kernel if method == "cka" else "none")
    assert int(meta["tokens"]) == max_tokens
    assert meta["data_sha256"] == hashlib.sha256(DEFAULT_DATA.read_bytes()).hexdigest()
    assert meta["data_source"] == DEFAULT_DATA.name and meta["created"].endswith("+00:00")
    for m in art.matrices.values():
        assert torch.isfinite(m).all() and torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.ones(8))
        assert 0 <= m.min() and m.max() <= 1
        assert m.masked_fill(torch.eye(8, dtype=torch.bool), 0).max() > 0  # the experts were compared
    assert (tmp_path / "sere_similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in tmp_path.iterdir()} == {ARTIFACT_FILENAME, "sere_similarity.png"}
    assert "best>=0.1" in out and "median" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == len(art.layers)
    if method == "cka":
        assert f"holds at most {max_tokens} tokens per layer" in err


def test_output_defaults_to_the_model_directory(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "m", "qwen2_moe")
    weights_before = {p.name: p.read_bytes() for p in model_dir.glob("*.safetensors")}
    rc, _, err = run_cli(capsys, "--model_path", model_dir, "--similarity_method", "cosine", "--max_tokens", 64, *FAST)
    assert rc == 0, err
    assert load_similarity(model_dir).layers == [0, 1]
    # No model re-save: the weights are untouched.
    assert {p.name: p.read_bytes() for p in model_dir.glob("*.safetensors") if p.name != ARTIFACT_FILENAME} == weights_before


def test_parquet_data(model_dirs, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["x" * 10, "the quick brown fox " * 5, None, "jumps " * 20], "id": [1, 2, 3, 4]}), data)
    out_dir = tmp_path / "out"
    rc, _, err = run_cli(
        capsys, "--model_path", model_dirs["qwen3_moe"], "--output_path", out_dir, "--data_path", data,
        "--similarity_method", "frobenius", *FAST,
    )
    assert rc == 0, err
    meta = load_similarity(out_dir).metadata
    assert int(meta["tokens"]) == 2 * 32  # two texts have >= 32 tokens; all data used by frobenius
    assert meta["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert "1 shorter than --max_len left out" in err


# ---------------------------------------------------------------------------- the pieces


def test_all_expert_outputs_equal_each_expert_applied_by_hand():
    model = build_tiny_model("qwen2_moe")
    layer = find_moe_layers(model)[1]
    x = torch.randn(7, 64)
    ex = layer.experts
    gate, up = torch.einsum("th,eih->eti", x, ex.gate_up_proj).chunk(2, dim=-1)  # E, T, I each
    expected = torch.einsum("eti,ehi->eth", ex.act_fn(gate) * up, ex.down_proj)  # E, T, H
    got = all_expert_outputs(layer, x, max_elements=8 * 3 * 64)  # 3-token chunks, ragged end
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def _layer_inputs(model, token_ids):
    """Each MoE layer's experts input over all tokens, captured independently of calibrate()."""
    layers = find_moe_layers(model)
    got = {layer.index: [] for layer in layers}
    hooks = [
        layer.experts.register_forward_pre_hook(lambda m, a, i=layer.index: got[i].append(a[0].detach().clone()))
        for layer in layers
    ]
    with torch.no_grad():
        model(input_ids=token_ids)
    for h in hooks:
        h.remove()
    return layers, {i: torch.cat(v) for i, v in got.items()}


@pytest.mark.parametrize("method,kernel", (("cka", "rbf"), ("cosine", "linear"), ("frobenius", "linear")))
def test_calibrate_compares_each_layers_own_inputs(method, kernel):
    model = build_tiny_model("deepseek_v2")
    token_ids = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    result = calibrate(model, token_ids, method=method, kernel=kernel, batch_size=2, progress=False)
    layers, inputs = _layer_inputs(model, token_ids)
    assert sorted(result.matrices) == [1, 2] and result.tokens == 60 and result.num_experts == 8
    for layer in layers:
        expected = similarity_matrix(all_expert_outputs(layer, inputs[layer.index]), method, kernel)
        torch.testing.assert_close(result.matrices[layer.index], expected, atol=1e-5, rtol=0)
    assert not torch.equal(result.matrices[1], result.matrices[2])
    assert all(not m.experts._forward_pre_hooks for m in layers)  # hooks removed


def test_max_tokens_caps_the_tokens_of_every_layer():
    model = build_tiny_model("qwen3_moe")
    token_ids = torch.randint(0, 256, (6, 10), generator=torch.Generator().manual_seed(1))
    capped = calibrate(model, token_ids, method="cka", batch_size=4, max_tokens=25, progress=False)
    assert capped.tokens == 25
    layers, inputs = _layer_inputs(model, token_ids[:3])  # the first 25 tokens lie in 3 sequences
    for layer in layers:
        expected = similarity_matrix(all_expert_outputs(layer, inputs[layer.index][:25]), "cka")
        torch.testing.assert_close(capped.matrices[layer.index], expected, atol=1e-5, rtol=0)
    assert calibrate(model, token_ids, method="cosine", progress=False).tokens == 60  # no cap: all data


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("a.txt", "first para\nstill first\n\n\nsecond\n  \nthird", ["first para\nstill first", "second", "third"]),
        ("a.jsonl", '{"text": "one"}\n\n"two"\n{"text": "three", "x": 1}\n', ["one", "two", "three"]),
    ],
)
def test_read_texts_formats(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    source = read_texts(path)
    assert source.texts == expected and source.source == name
    assert source.sha256 == hashlib.sha256(content.encode()).hexdigest()


def test_shipped_text_is_the_default():
    source = read_texts(None)
    assert source.source == "kjv_genesis.txt" and len(source.texts) == 50
    assert source.texts[0].startswith("In the beginning God created the heaven and the earth.")
    assert (DEFAULT_DATA.parent / "README.md").read_text().count("public domain") >= 1


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.txt", "\n \n\n", "contains no text"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
        ("nofield.jsonl", '{"body": "x"}\n', "no `text` field"),
        ("num.jsonl", '{"text": 3}\n', "must be a string"),
        ("latin1.txt", b"caf\xe9", "not UTF-8"),
    ],
)
def test_read_texts_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        read_texts(path)


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="no `text` column"):
        read_texts(tmp_path / "x.parquet")


def test_token_sequences_keep_long_texts_and_name_the_longest():
    tok = byte_tokenizer()
    seqs = token_sequences(tok, ["abc", "abcdefgh", "xy", "0123456789"], max_len=5)
    assert seqs.ids.tolist() == [list(tok("abcde")["input_ids"]), list(tok("01234")["input_ids"])]
    assert (seqs.scanned, seqs.too_short) == (4, 2)
    assert token_sequences(tok, ["abcdefgh", "0123456789"], max_len=5, max_sequences=1).ids.shape == (1, 5)
    with pytest.raises(DataError, match=r"none of the 2 texts has 50 tokens \(the longest has 8\)"):
        token_sequences(tok, ["abc", "abcdefgh"], max_len=50)


def test_calibrate_without_moe_layers_raises():
    dense = build_tiny_model("qwen2_moe", mlp_only_layers=[0, 1])
    with pytest.raises(CalibrationError, match="has no MoE layer"):
        calibrate(dense, torch.zeros(1, 4, dtype=torch.long), progress=False)


@pytest.mark.parametrize("tokens,given,expected", [(100, None, None), (20000, None, 2048), (20000, 0, None), (10, 64, 64)])
def test_rbf_features_choice(tokens, given, expected):
    args = cli.build_parser().parse_args(["--model_path", "m", "--kernel", "rbf"] + (["--rbf_features", str(given)] if given is not None else []))
    assert cli._rbf_features(args, tokens) == expected


# ---------------------------------------------------------------------------- command errors


def _no_outputs(*dirs):
    return all(not (d / ARTIFACT_FILENAME).exists() and not (d / "sere_similarity.png").exists() for d in dirs)


def test_error_empty_data(model_dirs, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    rc, _, err = run_cli(capsys, "--model_path", model_dirs["qwen2_moe"], "--output_path", tmp_path / "o",
                         "--data_path", tmp_path / "empty.jsonl", *FAST)
    assert rc == 2 and "contains no text" in err
    assert _no_outputs(tmp_path / "o", model_dirs["qwen2_moe"])


def test_error_no_text_long_enough(model_dirs, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--model_path", model_dirs["qwen2_moe"], "--output_path", tmp_path,
                         "--max_len", 100000, "--no_progress")
    assert rc == 2 and "none of the 50 texts has 100000 tokens (the longest has 9179)" in err
    assert _no_outputs(tmp_path)


def test_error_model_without_moe_layer(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "dense", "qwen2_moe", mlp_only_layers=[0, 1])
    rc, _, err = run_cli(capsys, "--model_path", model_dir, *FAST)
    assert rc == 2 and "has no MoE layer" in err
    assert _no_outputs(model_dir)


def test_error_model_type_contradicts_config(model_dirs, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--model_path", model_dirs["qwen2_moe"], "--output_path", tmp_path,
                         "--model_type", "deepseek_v2", *FAST)
    assert rc == 2 and "--model_type deepseek_v2 contradicts the model config" in err and "'qwen2_moe'" in err
    assert _no_outputs(tmp_path)


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_error_output_path_not_writable(model_dirs, tmp_path, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = blocker / "sub" if where == "under-a-file" else blocker
    rc, _, err = run_cli(capsys, "--model_path", model_dirs["qwen2_moe"], "--output_path", target, *FAST)
    assert rc == 2 and ("cannot write to --output_path" in err or "is not a directory" in err)
    assert blocker.read_text() == "x"


def test_error_missing_model(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--model_path", tmp_path / "nothing", "--output_path", tmp_path / "o", *FAST)
    assert rc == 2 and "config.json not found" in err


def test_error_bad_numbers(model_dirs, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--model_path", model_dirs["qwen2_moe"], "--output_path", tmp_path, "--batch_size", 0)
    assert rc == 2 and "--batch_size must be a positive integer" in err


@pytest.mark.slow
def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "sere.calibration", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--model_type", "--model_path", "--output_path", "--data_path", "--similarity_method",
                 "--kernel", "--batch_size", "--max_len", "--device", "--dtype", "--max_tokens"):
        assert flag in done.stdout
    assert json.dumps("qwen2_moe")[1:-1] in done.stdout
