"""The calibration command end to end on tiny random models, its pieces, and its errors.

    pytest tests/test_calibration_cli.py            # add -m "not slow" to skip the subprocess check

Models are built from configs (sere.harness.model_configs, no hub) and saved with a byte-level
tokenizer (256 tokens, the tiny vocabulary) so the command loads them like real checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sere.artifact import ARTIFACT_FILENAME, load_similarity
from sere.calibration import __main__ as cli
from sere.calibration.calibrate import CalibrationError, calibrate
from sere.calibration.data import DEFAULT_DATA, DataError, read_texts, token_sequences
from sere.calibration.experts import all_expert_outputs, find_moe_layers
from sere.calibration.loading import load_model, resolve_device
from sere.calibration.metrics import similarity_matrix
from sere.calibration.report import heatmap_figure
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
    data = tmp_path / "short.txt"
    data.write_text("In the beginning.\n\nAnd the earth was without form, and void.\n")
    rc, _, err = run_cli(capsys, "--model_path", model_dirs["qwen2_moe"], "--output_path", tmp_path / "o",
                         "--data_path", data, "--max_len", 100, "--no_progress")
    assert rc == 2 and "none of the 2 texts has 100 tokens (the longest has 41)" in err
    assert not (tmp_path / "o").exists()


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


# ---------------------------------------------------------------------------- rough edges (issue 13)


def test_max_len_is_cut_to_the_model_context(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "short_ctx", "qwen2_moe", max_position_embeddings=48)
    rc, _, err = run_cli(capsys, "--model_path", model_dir, "--output_path", tmp_path / "o",
                         "--similarity_method", "cosine", "--max_tokens", 96, "--batch_size", 2, "--no_progress")
    assert rc == 0, err
    notice = [line for line in err.splitlines() if "--max_len" in line and "context" in line]
    assert notice == ["sere-calibrate: --max_len 512 exceeds the model's context of 48 tokens "
                      "(max_position_embeddings); using --max_len 48"]
    assert "sequences of 48 tokens" in err
    assert load_similarity(tmp_path / "o").metadata["max_len"] == "48"
    # within the context: no notice, the value as given
    rc, _, err = run_cli(capsys, "--model_path", model_dir, "--output_path", tmp_path / "o2",
                         "--similarity_method", "cosine", "--max_tokens", 64, *FAST)
    assert rc == 0 and "context" not in err and "sequences of 32 tokens" in err


@pytest.mark.parametrize("device,match", [
    ("gpu", "argument --device: invalid device 'gpu' (did you mean cuda?)"),
    ("tpu9", "argument --device: invalid device 'tpu9'"),
    ("meta", "argument --device: meta holds no data"),
    ("cuda", "argument --device: cuda is not available"),
    ("cuda:0", "argument --device: cuda:0 is not available"),
])
def test_bad_device_is_a_one_line_error(model_dirs, tmp_path, capsys, device, match):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc, out, err = run_cli(capsys, "--model_path", model_dirs["qwen2_moe"], "--output_path", tmp_path / "o",
                           "--device", device, *FAST)
    assert rc == 2 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith(f"sere-calibrate: error: {match}"), err
    assert not (tmp_path / "o").exists()


def test_bad_device_from_the_command_line_has_no_traceback(model_dirs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "sere.calibration", "--model_path", str(model_dirs["qwen2_moe"]),
                           "--output_path", str(tmp_path / "o"), "--device", "gpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["sere-calibrate: error: argument --device: invalid device 'gpu' "
                                                "(did you mean cuda?); use cpu, cuda or cuda:N"]


def test_resolve_device_defaults_and_normalises():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_model_folder_without_tokenizer_says_so(tmp_path, capsys):
    model_dir = tmp_path / "no_tok"
    build_tiny_model("qwen2_moe").save_pretrained(model_dir)
    rc, _, err = run_cli(capsys, "--model_path", model_dir, "--output_path", tmp_path / "o", *FAST)
    assert rc == 2, err
    assert "the tokenizer is missing" in err and str(model_dir) in err and "the longest has 0" not in err
    assert not (tmp_path / "o").exists()


def test_without_matplotlib_the_heatmap_is_skipped_with_a_notice(model_dirs, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "sere_similarity.png").write_bytes(b"an older run's picture")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    rc, _, err = run_cli(capsys, "--model_path", model_dirs["qwen3_moe"], "--output_path", out_dir,
                         "--similarity_method", "cosine", "--max_tokens", 64, *FAST)
    assert rc == 0, err
    notice = [line for line in err.splitlines() if "heatmap" in line]
    assert notice == ["sere-calibrate: no heatmap (matplotlib is not installed): pip install 'sere[calibration]' "
                      "to get sere_similarity.png"]
    assert {p.name for p in out_dir.iterdir()} == {ARTIFACT_FILENAME}  # the stale picture is gone too


def test_pyproject_extra_named_in_the_notice_has_matplotlib():
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(dep.split(">")[0].split("=")[0].strip() == "matplotlib" for dep in extras["calibration"])


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_are_readable_as_the_umask_allows(model_dirs, tmp_path, capsys, umask, mode):
    before = os.umask(umask)
    try:
        rc, _, err = run_cli(capsys, "--model_path", model_dirs["qwen2_moe"], "--output_path", tmp_path,
                             "--similarity_method", "cosine", "--max_tokens", 64, *FAST)
    finally:
        os.umask(before)
    assert rc == 0, err
    for name in (ARTIFACT_FILENAME, "sere_similarity.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


@pytest.mark.parametrize("failure", ["no-moe-layer", "empty-data", "bad-device"])
def test_a_failed_run_leaves_no_output_folder(model_dirs, tmp_path, capsys, failure):
    keep = tmp_path / "existing"
    keep.mkdir()
    target = keep / "new" / "deeper"
    model_dir, extra = model_dirs["qwen2_moe"], []
    if failure == "no-moe-layer":
        model_dir = save_tiny(tmp_path / "dense", "qwen2_moe", mlp_only_layers=[0, 1])
    elif failure == "empty-data":
        (tmp_path / "empty.txt").write_text("")
        extra = ["--data_path", tmp_path / "empty.txt"]
    else:
        extra = ["--device", "gpu"]
    rc, _, err = run_cli(capsys, "--model_path", model_dir, "--output_path", target, *extra, *FAST)
    assert rc == 2, err
    assert keep.is_dir() and list(keep.iterdir()) == []  # what was there stays, what the run made is gone


def test_a_successful_run_creates_the_output_folder(model_dirs, tmp_path, capsys):
    target = tmp_path / "a" / "b"
    rc, _, err = run_cli(capsys, "--model_path", model_dirs["qwen2_moe"], "--output_path", target,
                         "--similarity_method", "cosine", "--max_tokens", 64, *FAST)
    assert rc == 0, err
    assert (target / ARTIFACT_FILENAME).is_file()


def test_the_last_line_reports_peak_memory(model_dirs, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--model_path", model_dirs["qwen2_moe"], "--output_path", tmp_path,
                         "--similarity_method", "cosine", "--max_tokens", 64, *FAST)
    assert rc == 0, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("peak memory: host RSS ") and " GiB" in last
    if sys.platform == "linux":
        assert "anonymous" in last and "file-backed" in last


def test_the_model_is_loaded_straight_onto_the_device(tmp_path, monkeypatch):
    """On an accelerator, from_pretrained gets a one-device device_map (the weights go from the
    files onto the device; host memory never holds the model) and no .to() follows."""
    import transformers

    calls = []

    class Loaded:
        def eval(self):
            return self

        def to(self, *a, **k):
            raise AssertionError("the model was moved after loading")

    def fake_from_pretrained(path, **kwargs):
        calls.append(kwargs)
        return Loaded()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    device = torch.device("cuda", 0)
    model, how = load_model(tmp_path, device, torch.bfloat16)
    assert how == "direct" and isinstance(model, Loaded)
    assert calls == [{"dtype": torch.bfloat16, "device_map": {"": device}}]


def test_one_device_map_loads_without_accelerate(tmp_path):
    """The path load_model takes on a GPU, run here with the CPU as the one device: transformers
    loads the checkpoint through its own loop (without accelerate installed, through the
    opened gate), bit for bit."""
    from transformers import AutoModelForCausalLM

    from sere.calibration.loading import _one_device_gate_open

    model_dir = save_tiny(tmp_path / "m", "qwen3_moe")
    stock = AutoModelForCausalLM.from_pretrained(model_dir)
    with _one_device_gate_open():
        got = AutoModelForCausalLM.from_pretrained(model_dir, device_map={"": torch.device("cpu")})
    want = stock.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in got.state_dict().items()) and len(want) == len(got.state_dict())
    import transformers.integrations.accelerate as gate

    try:
        import accelerate  # noqa: F401
    except ImportError:
        assert not gate.is_accelerate_available()  # put back after the call


def test_shards_are_read_not_mapped_while_loading_onto_the_device(tmp_path):
    """On the device path the shards are opened with safetensors' pread backend (no memory map:
    mapped pages stayed in RSS until all shards closed, 58 GiB for a 57 GiB checkpoint), the
    weights come out bit for bit, and transformers' own safe_open is put back afterwards."""
    import transformers.modeling_utils as loader
    from transformers import AutoModelForCausalLM

    from sere.calibration.loading import _one_device_gate_open, _read_not_mapped, pread_supported

    if not pread_supported():
        pytest.skip("this safetensors has no pread backend (safetensors >= 0.7 has)")
    model_dir = save_tiny(tmp_path / "m", "qwen2_moe")
    stock = AutoModelForCausalLM.from_pretrained(model_dir)
    original = loader.safe_open
    backends = []

    def spy(filename, framework, device="cpu", **kw):
        backends.append(kw.get("backend", "mmap"))
        return original(filename, framework, device, **kw)

    loader.safe_open = spy
    try:
        with _one_device_gate_open(), _read_not_mapped():
            got = AutoModelForCausalLM.from_pretrained(model_dir, device_map={"": torch.device("cpu")})
        assert loader.safe_open is spy  # the patch is undone, whoever had installed what
    finally:
        loader.safe_open = original
    assert backends and set(backends) == {"pread"}
    want = stock.state_dict()
    assert len(want) == len(got.state_dict()) and all(torch.equal(v, want[k]) for k, v in got.state_dict().items())


def test_load_model_reads_shards_without_a_map_on_an_accelerator(tmp_path, monkeypatch):
    """load_model's device path runs from_pretrained inside _read_not_mapped."""
    import transformers
    import transformers.modeling_utils as loader

    from sere.calibration.loading import pread_supported

    if not pread_supported():
        pytest.skip("this safetensors has no pread backend")
    seen = []

    class Loaded:
        def eval(self):
            return self

    def fake_from_pretrained(path, **kwargs):
        seen.append(loader.safe_open.__name__)
        return Loaded()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    load_model(tmp_path, torch.device("cuda", 0), torch.bfloat16)
    assert seen == ["safe_open_pread"] and loader.safe_open.__name__ != "safe_open_pread"


def test_without_the_gate_the_model_is_loaded_on_the_host_with_a_notice(tmp_path, capsys, monkeypatch):
    try:
        import accelerate  # noqa: F401
        pytest.skip("accelerate is installed: the gate is never needed")
    except ImportError:
        pass
    import transformers
    import transformers.integrations.accelerate as gate

    monkeypatch.delattr(gate, "is_accelerate_available")  # another transformers layout
    moved = []

    class Loaded:
        def eval(self):
            return self

        def to(self, device):
            moved.append(device)
            return self

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: Loaded())
    _, how = load_model(tmp_path, torch.device("cuda", 0), torch.bfloat16)
    assert how == "via host" and moved == [torch.device("cuda", 0)]
    assert "pip install accelerate" in capsys.readouterr().err


def test_heatmap_names_its_axes_and_shows_no_empty_panels():
    matrices = {i: torch.rand(6, 6, generator=torch.Generator().manual_seed(i)) for i in (1, 2, 3)}
    fig = heatmap_figure(matrices, title="t")
    panels = [ax for ax in fig.axes if ax.get_title().startswith("layer ")]
    assert [ax.get_title() for ax in panels] == ["layer 1", "layer 2", "layer 3"]
    assert len(fig.axes) == 3 + 1  # the 2 x 2 grid's fourth cell is removed; one colour bar
    assert {ax.get_ylabel() for ax in panels if ax.get_ylabel()} == {"moved expert (row)"}
    assert {ax.get_xlabel() for ax in panels if ax.get_xlabel()} == {"target expert (column)"}
    assert panels[0].get_ylabel() and panels[2].get_ylabel()  # the left column
    assert panels[1].get_xlabel() and panels[2].get_xlabel()  # the lowest panel of each column
    assert "row expert" in fig.axes[-1].get_ylabel()


README_LOAD = """
import sys
import sere
assert "sere.artifact" not in sys.modules and "transformers" not in sys.modules   # import sere stays light
from transformers import AutoConfig
art = sere.artifact.load_similarity(sys.argv[1], config=AutoConfig.from_pretrained(sys.argv[1]))
print(type(art).__name__, art.layers, art.num_experts, sorted(art.matrices) == art.layers, art.metadata["method"])
print(sere.stats.RerouteStats.__name__, sere.config.SereConfig.__name__, callable(sere.hf.enable))
"""


def test_the_readme_load_call_works_as_written(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "m", "qwen2_moe")
    rc, _, err = run_cli(capsys, "--model_path", model_dir, "--similarity_method", "cosine", "--max_tokens", 64, *FAST)
    assert rc == 0, err
    done = subprocess.run([sys.executable, "-c", README_LOAD, str(model_dir)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["SimilarityArtifact [0, 1] 8 True cosine", "RerouteStats SereConfig True"]


@pytest.mark.slow
def test_the_real_scale_builder_on_a_narrow_model(tmp_path, monkeypatch, capsys):
    """bench/gpu/make_random_model.py (used by bench/gpu/calibrate_real.sh) on the CPU: a narrow
    2-layer Qwen3-30B-A3B-structured checkpoint with the zoo tokenizer that the command
    calibrates; with --fit-disk and too little free space the layer count is cut."""
    from bench.gpu import make_random_model as mk

    zoo_tok = Path(__file__).resolve().parent / "zoo" / "qwen2_moe"  # what bench/gpu/calibrate_real.sh copies
    args = ["--model", "Qwen3-30B-A3B", "--layers", "2", "--hidden", "64", "--device", "cpu", "--dtype", "float32",
            "--tokenizer-from", str(zoo_tok)]
    assert mk.main([*args, "--out", str(tmp_path / "m")]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["layers"] == 2 and result["published_layers"] == 48 and result["param_devices"] == ["cpu"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(result["tokenizer_files"])
    rc, _, err = run_cli(capsys, "--model_path", tmp_path / "m", "--output_path", tmp_path / "o",
                         "--similarity_method", "cka", "--max_len", 64, "--max_tokens", 128, "--no_progress")
    assert rc == 0, err
    assert load_similarity(tmp_path / "o").num_experts == 128
    vocab = max(4096, result["tokenizer_vocab"])  # the narrow model's vocabulary holds the tokenizer's ids
    total, per_layer = mk._sizes(mk.config_for("Qwen3-30B-A3B", layers=2, hidden=64, vocab=vocab), torch.float32)
    assert total == result["checkpoint_bytes"]
    monkeypatch.setattr(mk, "_free_bytes", lambda path: mk.DISK_RESERVE + total - per_layer)  # one layer fits
    assert mk.main([*args, "--out", str(tmp_path / "cut"), "--fit-disk"]) == 0
    cut = json.loads(capsys.readouterr().out.splitlines()[0])
    assert cut["layers"] == 1 and cut["cut_to_fit_disk"] is True
    with pytest.raises(SystemExit, match="use --fit-disk"):
        mk.main([*args, "--out", str(tmp_path / "nofit")])
