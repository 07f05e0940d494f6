"""GGUF export: the file llama.cpp reads holds exactly our weights under llama.cpp's names and layout
(read back with gguf's own reader), at f32, f16 and q8_0, with our tokenizer."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from modularforge.cli import main  # noqa: E402
from modularforge.config import ModelConfig  # noqa: E402
from modularforge.errors import ConfigError, DataError  # noqa: E402
from modularforge.export import export  # noqa: E402
from modularforge.inference import AssembledFolder, open_model  # noqa: E402
from modularforge.model.layers import apply_rotary, permute_rotary, rotary_tables, unpermute_rotary  # noqa: E402

DTYPES = ("f32", "f16", "q8_0")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {d: gguf.GGUFReader(export(trained_run.model_dir, "gguf", out / f"m.{d}.gguf", d)) for d in DTYPES}


@pytest.fixture(scope="module")
def ours(trained_run):
    folder = AssembledFolder(trained_run.model_dir)
    model, config = open_model(folder), folder.config
    return {k: v.detach().float() for k, v in model.state_dict().items()}, config


def _field(reader, key):
    return reader.fields[key].contents()


def _tensors(reader) -> dict:
    """name -> float32 numpy array in numpy (row-major) order, dequantised."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors}


def _as_hf(ours, config) -> dict:
    """Our tensors under their GGUF names, with q/k rows permuted and experts stacked, as numpy float32."""
    state, _ = ours
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"],
           "output.weight": state["lm_head.weight"]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[f"blk.{i}.attn_norm.weight"] = state[p + "input_layernorm.weight"]
        out[f"blk.{i}.attn_q.weight"] = permute_rotary(state[p + "self_attn.q_proj.weight"], heads)
        out[f"blk.{i}.attn_k.weight"] = permute_rotary(state[p + "self_attn.k_proj.weight"], kv_heads)
        out[f"blk.{i}.attn_v.weight"] = state[p + "self_attn.v_proj.weight"]
        out[f"blk.{i}.attn_output.weight"] = state[p + "self_attn.o_proj.weight"]
        out[f"blk.{i}.ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        out[f"blk.{i}.ffn_gate_inp.weight"] = state[p + "block_sparse_moe.gate.weight"]
        for w, kind in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            experts = [state[p + f"block_sparse_moe.experts.{e}.{w}.weight"] for e in range(config["num_local_experts"])]
            out[f"blk.{i}.ffn_{kind}_exps.weight"] = torch.stack(experts)
    return {k: v.numpy() for k, v in out.items()}


def test_architecture_and_hyperparameters_are_llamas_with_experts(exported, trained_run):
    m = trained_run.cfg.model
    for dtype, reader in exported.items():
        assert _field(reader, "general.architecture") == "llama"
        expected = {
            "llama.block_count": m.num_layers, "llama.context_length": m.max_seq_len,
            "llama.embedding_length": m.hidden_size, "llama.feed_forward_length": m.intermediate_size,
            "llama.attention.head_count": m.num_heads, "llama.attention.head_count_kv": m.kv_heads,
            "llama.rope.dimension_count": m.head_dim, "llama.expert_count": m.num_experts,
            "llama.expert_used_count": m.top_k,
        }
        assert {k: _field(reader, k) for k in expected} == expected
        assert _field(reader, "llama.rope.freq_base") == pytest.approx(m.rope_theta)
        assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(m.norm_eps, rel=1e-6)
        assert _field(reader, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]


def test_tensor_names_shapes_and_types_are_what_llama_cpp_loads(exported, ours):
    expected = _as_hf(ours, ours[1])
    Q = gguf.GGMLQuantizationType
    for dtype, reader in exported.items():
        tensors = {t.name: t for t in reader.tensors}
        assert set(tensors) == set(expected)
        for name, t in tensors.items():
            assert tuple(reversed(t.shape.tolist())) == expected[name].shape, name
            vector_or_router = expected[name].ndim == 1 or name.endswith("ffn_gate_inp.weight")
            want = Q.F32 if vector_or_router or dtype == "f32" else {"f16": Q.F16, "q8_0": Q.Q8_0}[dtype]
            assert t.tensor_type == want, (dtype, name)


def test_f32_tensors_equal_ours_exactly_with_qk_permuted_back(exported, ours):
    state, config = ours
    got = _tensors(exported["f32"])
    for name, want in _as_hf(ours, config).items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    q = torch.from_numpy(got["blk.0.attn_q.weight"].copy())
    assert torch.equal(unpermute_rotary(q, config["num_attention_heads"]), state["model.layers.0.self_attn.q_proj.weight"])


def test_f16_tensors_are_ours_rounded_to_f16(exported, ours):
    got = _tensors(exported["f16"])
    for name, want in _as_hf(ours, ours[1]).items():
        stored_f32 = want.ndim == 1 or name.endswith("ffn_gate_inp.weight")
        expected = want if stored_f32 else want.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got[name], expected, err_msg=name)


def test_q8_0_tensors_are_within_one_quantisation_step(exported, ours):
    got = _tensors(exported["q8_0"])
    for name, want in _as_hf(ours, ours[1]).items():
        if want.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            np.testing.assert_array_equal(got[name], want, err_msg=name)
            continue
        blocks = want.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # q8_0: 32 values share one scale
        error = np.abs(got[name].reshape(-1, 32) - blocks)
        # half a step of rounding, plus up to 127 times the f16 rounding (2^-11 relative) of the stored scale
        assert (error <= step * (0.5 + 127 * 2**-11) * (1 + 1e-6)).all(), name


def test_tokenizer_tokens_merges_and_special_ids(exported, trained_run):
    tokenizer = json.loads((trained_run.model_dir / "tokenizer.json").read_text())
    config = json.loads((trained_run.model_dir / "config.json").read_text())
    vocab = {i: t for t, i in tokenizer["model"]["vocab"].items()} | {a["id"]: a["content"] for a in tokenizer["added_tokens"]}
    eos = config["eos_token_id"]
    for reader in exported.values():
        assert _field(reader, "tokenizer.ggml.model") == "gpt2"
        assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
        tokens = _field(reader, "tokenizer.ggml.tokens")
        assert tokens == [vocab[i] for i in range(config["vocab_size"])]
        types = _field(reader, "tokenizer.ggml.token_type")
        assert types == [3 if i == eos else 1 for i in range(len(tokens))]  # CONTROL for <|endoftext|>, else NORMAL
        assert tokens[eos] == "<|endoftext|>"
        assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in tokenizer["model"]["merges"]]
        for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
            assert _field(reader, f"tokenizer.ggml.{key}") == eos
        assert _field(reader, "tokenizer.ggml.add_bos_token") is False


def test_permuted_rotary_rotates_interleaved_pairs_to_the_same_attention_scores():
    """What llama.cpp's `llama` RoPE does on permuted rows equals our rotate_half RoPE on the original rows."""
    heads, head_dim, hidden, T = 2, 8, 16, 5
    torch.manual_seed(0)
    wq, wk, x = torch.randn(heads * head_dim, hidden), torch.randn(heads * head_dim, hidden), torch.randn(T, hidden)
    cos, sin = rotary_tables(ModelConfig(hidden_size=hidden, num_heads=heads, head_size=head_dim, max_seq_len=8))
    cos, sin = cos[:T], sin[:T]

    def ours(w):  # (heads, T, head_dim) after rotate_half RoPE
        return apply_rotary((x @ w.T).view(T, heads, head_dim).transpose(0, 1), cos, sin)

    def interleaved(w):  # pairs (2j, 2j + 1) rotated by angle j, as ggml's "normal" rope does
        y = (x @ w.T).view(T, heads, head_dim // 2, 2).transpose(0, 1)
        c, s = cos[:, : head_dim // 2, None], sin[:, : head_dim // 2, None]
        rotated = torch.stack((y[..., 0] * c[..., 0] - y[..., 1] * s[..., 0], y[..., 0] * s[..., 0] + y[..., 1] * c[..., 0]), -1)
        return rotated.flatten(-2)

    scores = ours(wq) @ ours(wk).transpose(1, 2)
    theirs = interleaved(permute_rotary(wq, heads)) @ interleaved(permute_rotary(wk, heads)).transpose(1, 2)
    torch.testing.assert_close(theirs, scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(unpermute_rotary(permute_rotary(wq, heads), heads), wq)


def test_export_reads_each_tensor_once_and_plans_from_headers_alone(trained_run, tmp_path, monkeypatch):
    from modularforge import export as export_module

    reads = []
    original = AssembledFolder.read
    monkeypatch.setattr(AssembledFolder, "read", lambda self, name: reads.append(name) or original(self, name))
    model = AssembledFolder(trained_run.model_dir)
    plan = export_module.tensor_plan(model, "f16", gguf)
    assert reads == [] and len(plan) == len({p.name for p in plan})
    export(trained_run.model_dir, "gguf", tmp_path / "m.gguf", "f16")
    assert sorted(reads) == sorted(set(model.files))


def test_cli_export_writes_beside_the_model_folder_by_default(run_copy, capsys):
    assert main(["export", "--run-dir", str(run_copy.dir), "--format", "gguf", "--dtype", "q8_0"]) == 0
    path = run_copy.dir / "model.q8_0.gguf"
    assert capsys.readouterr().out.strip() == str(path)
    assert _field(gguf.GGUFReader(path), "general.architecture") == "llama"


def test_a_folder_that_is_not_an_assembled_model_is_a_one_line_error(run_copy, tmp_path, capsys):
    with pytest.raises(DataError, match="no config.json"):
        export(tmp_path, "gguf", None, "f16")
    with pytest.raises(ConfigError, match="unknown GGUF dtype"):
        export(run_copy.model_dir, "gguf", None, "q4_k")
    index = run_copy.model_dir / "model.safetensors.index.json"
    table = json.loads(index.read_text())
    del table["weight_map"]["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    index.write_text(json.dumps(table))
    assert main(["export", "--model", str(run_copy.model_dir), "--run-dir", str(run_copy.dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"error: {run_copy.model_dir} lacks tensor model.layers.1.block_sparse_moe.experts.2.w3.weight; "
                    "is it a complete assembled model folder?")]
