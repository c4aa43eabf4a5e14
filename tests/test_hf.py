"""Hugging Face interchange (efftrain.hf, docs/HF.md): export-hf -> transformers gives the same per-token
losses as efftrain's forward (Llama: MHA, GQA + tied embeddings; DeepseekV3: MLA, MLA + q_lora + DeepSeekMoE
with sigmoid routing and router bias), the exported tokenizer encodes like the run's, import-hf of transformers
checkpoints (Llama; DeepseekV3 in both expert layouts) gives HF's losses, export -> import -> export and
HF -> import -> export are bitwise, bad inputs are one-line errors, a failing export leaves nothing, and
`eval --text` scores a text file. Tiny random models (d_model 64, 2 layers, vocab 320, seq 32), float32."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from efftrain.cli import main  # noqa: E402
from efftrain.config import from_dict  # noqa: E402
from efftrain.data.tokenizer import EOT, load_tokenizer, train_tokenizer  # noqa: E402
from efftrain.hf.export import flat_variables  # noqa: E402
from efftrain.hf.importer import save_run  # noqa: E402
from efftrain.model.transformer import build_model  # noqa: E402
from efftrain.train.rundir import load_model  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(2)
VOCAB, SEQ, STEP = 320, 32, 3
SAMPLE = "def main(argv):\n    return sorted(set(argv)) + [1, 2.5]  # héllo wörld ✓ 日本語\n\tx = {'a': None}\n"

CASES = {
    "dense_mha": {},
    "gqa_tied": {"n_kv_heads": 2, "head_dim": 8, "tie_embeddings": True, "rope_theta": 5000.0},
    "mla": {"attention": "mla", "mla": {"q_lora_rank": 0, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                                        "qk_rope_head_dim": 8, "v_head_dim": 16}},
    "mla_qlora_moe_mtp": {"attention": "mla", "mla": {"q_lora_rank": 24, "kv_lora_rank": 32, "qk_nope_head_dim": 8,
                                                      "qk_rope_head_dim": 8, "v_head_dim": 24},
                          "moe": {"enabled": True, "num_routed_experts": 4, "top_k": 2, "expert_hidden": 32,
                                  "first_dense_layers": 1, "num_shared_experts": 1, "routed_scaling": 1.5},
                          "mtp": {"depth": 1}},
    "mla_moe_noshared_unnormalized": {"attention": "mla", "moe": {
        "enabled": True, "num_routed_experts": 4, "top_k": 3, "expert_hidden": 16, "first_dense_layers": 1,
        "num_shared_experts": 0, "normalize_gates": False, "aux_free_bias": False}},
}


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    texts = [SAMPLE, "import os\nprint(os.getcwd())\n", "the quick brown fox jumps over the lazy dog. " * 3] * 30
    train_tokenizer(texts, VOCAB, root / "tokenizer.json")
    return root


def config(work: Path, model: dict, **sections):
    raw = {"name": "hf-test",
           "model": {"vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden": 96,
                     "compute_dtype": "float32", **model},
           "data": {"source": "pystdlib", "max_documents": 40, "seq_len": SEQ, "val_fraction": 0.2,
                    "tokenizer_path": str(work / "tokenizer.json"), "cache_dir": str(work / "cache")},
           "train": {"batch_size": 4, "max_steps": 1, "eval_batches": 1}, **sections}
    return from_dict(raw)


def randomize(model, seed: int) -> None:
    """Every variable random and O(1) (norm scales around 1, kernels ~ 1/sqrt(fan-in), router bias small),
    so a wrong transpose, permutation or norm shows in the logits."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape, name = var[...].shape, "/".join(map(str, path))
        if name.endswith("scale"):
            value = 1 + 0.3 * rng.standard_normal(shape)
        elif name.endswith("router/bias"):
            value = 0.3 * rng.standard_normal(shape)
        elif name.endswith("embedding"):
            value = rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(shape[-2])
        var[...] = jnp.asarray(value, var[...].dtype)


def make_run(work: Path, name: str, model: dict, seed: int = 0) -> Path:
    run_dir = work / "runs" / name
    if not run_dir.exists():
        cfg = config(work, model)
        m = build_model(cfg.model, seed=seed)
        randomize(m, seed)
        save_run(run_dir, cfg, m, (work / "tokenizer.json").read_bytes(), step=STEP, tokens_seen=STEP * 128)
    return run_dir


def tokens(n: int = 2, length: int = SEQ + 1, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 300, (n, length)).astype(np.int32)


def token_losses(logits, window: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, window[:, 1:, None], axis=-1)[..., 0]


# jitted, as eval runs it (eagerly, every primitive of each model compiles on its own)
_logits = nnx.jit(lambda model, inputs: model(inputs).logits)


def efftrain_losses(model, window: np.ndarray) -> np.ndarray:
    return token_losses(_logits(model, jnp.asarray(window[:, :-1])), window)


def hf_losses(model, window: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor(window[:, :-1], dtype=torch.long)).logits
    return token_losses(logits.numpy(), window)


def hf_model(path: Path, *, complete: bool = False):
    """The checkpoint in float32; `complete`: also assert that every tensor was expected and none missing."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                                    output_loading_info=True)
    if complete:
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def exported(work: Path, capsys, case: str) -> Path:
    out = work / "export" / case
    if not out.exists():
        rc, _, err = cli(capsys, "export-hf", make_run(work, case, CASES[case]), "--out", out)
        assert rc == 0, err
    return out


# ---- export ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_with_the_same_per_token_losses(work, capsys, case):
    out = exported(work, capsys, case)
    config = json.loads((out / "config.json").read_text())
    arch = "LlamaForCausalLM" if CASES[case].get("attention", "mha") == "mha" else "DeepseekV3ForCausalLM"
    model = hf_model(out, complete=True)
    assert type(model).__name__ == arch and config["architectures"] == [arch]
    _, ours, _ = load_model(make_run(work, case, CASES[case]), STEP)
    window = tokens()
    got, want = hf_losses(model, window), efftrain_losses(ours, window)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert want.std() > 0.3  # the random model is far from uniform: the comparison means something
    meta = config["efftrain"]
    assert meta["step"] == STEP and meta["tokens_seen"] == STEP * 128 and meta["checkpoint"] == f"series/{STEP}"
    if case == "gqa_tied":
        assert config["tie_word_embeddings"] and "lm_head.weight" not in load_file(out / "model.safetensors")
        assert config["num_key_value_heads"] == 2 and config["head_dim"] == 8
    if case == "mla_qlora_moe_mtp":
        assert any("mtp" in n for n in meta["notes"]) and config["num_nextn_predict_layers"] == 0
        assert config["first_k_dense_replace"] == 1 and config["n_group"] == config["topk_group"] == 1
        bias = load_file(out / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"]
        np.testing.assert_array_equal(bias, np.asarray(flat_variables(ours)["blocks/1/ffn/router/bias"]))


def test_exported_tokenizer_encodes_like_the_runs(work, capsys):
    out = exported(work, capsys, "dense_mha")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(work / "tokenizer.json")
    eot = ours.token_to_id(EOT)
    for text in (SAMPLE, "plain words and  spaces\n\n", f"a literal {EOT} stays bytes", ""):
        assert hf_tok(text)["input_ids"] == ours.encode(text, add_special_tokens=False).ids
        assert hf_tok.decode(hf_tok(text)["input_ids"]) == text
    assert hf_tok.bos_token == hf_tok.eos_token == hf_tok.pad_token == EOT
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == eot
    generation = json.loads((out / "generation_config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == config["bos_token_id"] == eot


def test_quantized_checkpoint_exports_dequantized_and_marked(work, capsys):
    from efftrain.quant.apply import QuantSettings, quantize_model
    from efftrain.quant.sweep import save_quantized

    run_dir = make_run(work, "dense_mha", CASES["dense_mha"])
    cfg, model, _ = load_model(run_dir, STEP)
    s = QuantSettings(method="rtn", bits=4, group_size=32)
    report = quantize_model(model, tokens(4, SEQ), s)
    row = {"step": STEP, "tokens": STEP * 128, "method": "rtn", "bits": 4, "group_size": 32, "format": "int",
           "eff_bits": report.eff_bits}
    save_quantized(run_dir, row, s, report, model)
    out = work / "export" / "quantized"
    rc, _, err = cli(capsys, "export-hf", run_dir, "--quantized", "step3-rtn-w4-g32-int", "--out", out)
    assert rc == 0, err
    meta = json.loads((out / "config.json").read_text())["efftrain"]
    assert meta["quantized"]["bits"] == 4 and meta["quantized"]["dequantized"] and meta["checkpoint"].startswith("quant")
    q = load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]  # [out, in], groups of 32
    assert len(np.unique(q[0, :32])) <= 16  # 4-bit: at most 16 levels per group
    window = tokens()
    np.testing.assert_allclose(hf_losses(hf_model(out), window), efftrain_losses(model, window), atol=1e-4)


# ---- import ---------------------------------------------------------------------------------------
def hf_tokenizer(directory: Path) -> None:
    """A Llama-style tokenizer: byte-level BPE with <s> / </s>, BOS added by its post-processor, no <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SAMPLE, "hello world " * 5] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(str(directory))


@pytest.fixture(scope="module")
def hf_llama(work):
    out = work / "hf-llama"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=20000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                                   initializer_range=0.3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(out))
    hf_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def hf_deepseek(work):
    out = work / "hf-deepseek"
    torch.manual_seed(1)
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, num_nextn_predict_layers=0, routed_scaling_factor=2.0,
        max_position_embeddings=64, initializer_range=0.3)
    model = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.3)
        for layer in model.model.layers:  # norms around 1, so a misplaced one shows
            for norm in (layer.input_layernorm, layer.self_attn.kv_a_layernorm, layer.self_attn.q_a_layernorm):
                norm.weight.add_(0.3 * torch.randn_like(norm.weight))
    model.to(torch.bfloat16).save_pretrained(str(out))  # bf16 on disk
    hf_tokenizer(out)
    return out


def imported(work, capsys, src: Path, name: str, *extra) -> Path:
    out = work / "imported" / name
    if not out.exists():
        rc, _, err = cli(capsys, "import-hf", src, "--out", out, "--set", "model.compute_dtype=float32",
                         "--set", f"data.cache_dir={work / 'cache'}", "--set", "data.max_documents=40",
                         "--set", f"data.seq_len={SEQ}", "--set", "train.batch_size=4",
                         "--set", "train.eval_batches=1", *extra)
        assert rc == 0, err
    return out


@pytest.mark.parametrize("which", ["llama", "deepseek"])
def test_import_gives_hfs_losses(work, capsys, hf_llama, hf_deepseek, which):
    src = hf_llama if which == "llama" else hf_deepseek
    run_dir = imported(work, capsys, src, which)
    cfg, ours, meta = load_model(run_dir, 1)  # step 1 by default
    assert cfg.model.attention == ("mha" if which == "llama" else "mla") and meta["tokens_seen"] == 0
    window = tokens(seed=3)
    np.testing.assert_allclose(efftrain_losses(ours, window), hf_losses(hf_model(src), window), atol=1e-4)
    if which == "llama":  # the renamed eos: efftrain's document separator, same id, same text ids
        tok = load_tokenizer(run_dir / "tokenizer.json")
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(src))
        assert tok.token_to_id(EOT) == hf_tok.eos_token_id == 2
        assert tok.encode(SAMPLE, add_special_tokens=False).ids == hf_tok(SAMPLE, add_special_tokens=False)["input_ids"]


def test_import_of_non_interleaved_rope_gives_hfs_losses(work, capsys, hf_deepseek):
    src = edited(hf_deepseek, work / "hf-deepseek-halves", rope_interleave=False)  # same tensors, other RoPE rows
    _, ours, _ = load_model(imported(work, capsys, src, "deepseek-halves"), 1)
    window = tokens(seed=4)
    np.testing.assert_allclose(efftrain_losses(ours, window), hf_losses(hf_model(src), window), atol=1e-4)


def test_fused_expert_layout_imports_the_same(work, capsys, hf_deepseek):
    fused = work / "hf-deepseek-fused"
    fused.mkdir()
    tensors = load_file(hf_deepseek / "model.safetensors")
    p = "model.layers.1.mlp.experts"
    gate_up = [np.concatenate([tensors.pop(f"{p}.{e}.gate_proj.weight"), tensors.pop(f"{p}.{e}.up_proj.weight")])
               for e in range(4)]
    tensors[f"{p}.gate_up_proj"] = np.stack(gate_up)
    tensors[f"{p}.down_proj"] = np.stack([tensors.pop(f"{p}.{e}.down_proj.weight") for e in range(4)])
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    for f in hf_deepseek.iterdir():
        if f.suffix == ".json":
            (fused / f.name).write_bytes(f.read_bytes())
    a = flat_variables(load_model(imported(work, capsys, hf_deepseek, "deepseek"), 1)[1])
    b = flat_variables(load_model(imported(work, capsys, fused, "deepseek-fused", "--step", "5"), 5)[1])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def read_all(path: Path) -> dict:
    return {k: v for k, v in load_file(path / "model.safetensors").items()}


def test_round_trips_are_bitwise(work, capsys, hf_deepseek):
    # efftrain -> HF -> efftrain -> HF
    first = exported(work, capsys, "mla_qlora_moe_mtp")
    run_dir = imported(work, capsys, first, "round-trip")
    second = work / "export" / "round-trip"
    rc, _, err = cli(capsys, "export-hf", run_dir, "--out", second)
    assert rc == 0, err
    a, b = read_all(first), read_all(second)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    c1, c2 = (json.loads((d / "config.json").read_text()) for d in (first, second))
    assert {k: v for k, v in c1.items() if k != "efftrain"} == {k: v for k, v in c2.items() if k != "efftrain"}
    assert load_model(run_dir, STEP)[2]["tokens_seen"] == STEP * 128  # step and tokens carried through
    # HF (bf16 on disk, fp32 router) -> efftrain -> HF: the same tensors in the same dtypes
    again = work / "export" / "hf-deepseek-again"
    rc, _, err = cli(capsys, "export-hf", imported(work, capsys, hf_deepseek, "deepseek"), "--out", again)
    assert rc == 0, err
    a, b = read_all(hf_deepseek), read_all(again)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    assert str(b["lm_head.weight"].dtype) == "bfloat16"  # the source's dtypes, not the run's fp32 masters


def test_imported_run_works_with_info_eval_and_ptq(work, capsys, hf_llama):
    run_dir = imported(work, capsys, hf_llama, "llama")
    rc, out, err = cli(capsys, "info", run_dir)
    assert rc == 0 and "series checkpoints (1)" in out, err
    rc, out, err = cli(capsys, "eval", run_dir, "--json")
    assert rc == 0, err
    row = json.loads(out)[0]
    assert row["step"] == 1 and np.isfinite(row["val_loss"]) and row["windows"] >= 1
    rc, _, err = cli(capsys, "ptq", run_dir, "--methods", "rtn", "--bits", "4", "--group-size", "32",
                     "--eval-batches", "1", "--calib-samples", "2")
    assert rc == 0, err
    assert (run_dir / "ptq.csv").read_text().count("\n") == 2


# ---- eval --text ----------------------------------------------------------------------------------
def test_eval_text_scores_every_token_of_the_file(work, capsys):
    run_dir = make_run(work, "dense_mha", CASES["dense_mha"])
    text = work / "sample.txt"
    text.write_text(SAMPLE * 2, encoding="utf-8")
    rc, out, err = cli(capsys, "eval", run_dir, "--text", text, "--json")
    assert rc == 0, err
    row = json.loads(out)[0]
    tok = load_tokenizer(run_dir / "tokenizer.json")
    ids = np.asarray([tok.token_to_id(EOT)] + tok.encode(SAMPLE * 2, add_special_tokens=False).ids, np.int32)
    assert row["text_tokens"] == len(ids) - 1 and len(ids) - 1 > SEQ and row["step"] == STEP
    _, model, _ = load_model(run_dir, STEP)
    per_token = []
    for start in range(0, len(ids) - 1, SEQ):  # training-style windows, the last one shorter
        per_token.append(efftrain_losses(model, ids[None, start:start + SEQ + 1])[0])
    want = np.concatenate(per_token)
    assert row["windows"] == len(per_token) and want.size == row["text_tokens"]
    assert row["loss"] == pytest.approx(want.mean(), abs=1e-5)
    assert row["perplexity"] == pytest.approx(np.exp(want.mean()), rel=1e-5)
    assert row["bits_per_byte"] == pytest.approx(want.sum() / np.log(2) / len((SAMPLE * 2).encode()), rel=1e-5)
    rc, out, err = cli(capsys, "eval", run_dir, "--text", text)  # the table
    assert rc == 0 and "bits/byte" in out, err


def test_eval_text_on_an_imported_model_matches_hf(work, capsys, hf_llama):
    run_dir = imported(work, capsys, hf_llama, "llama")
    text = work / "short.txt"
    text.write_text("hello world, hello", encoding="utf-8")
    rc, out, err = cli(capsys, "eval", run_dir, "--text", text, "--json")
    assert rc == 0, err
    row = json.loads(out)[0]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_llama))
    ids = np.asarray([[hf_tok.eos_token_id] + hf_tok("hello world, hello", add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] <= SEQ + 1 and row["windows"] == 1
    assert row["loss"] == pytest.approx(hf_losses(hf_model(hf_llama), ids).mean(), abs=1e-4)


# ---- refusals and errors --------------------------------------------------------------------------
@pytest.mark.parametrize("model, needles", [
    ({"moe": {"enabled": True}}, ("model.attention=mha", "nearest supported: model.attention=mla")),
    ({"attention": "mla", "moe": {"enabled": True, "score_func": "softmax"}},
     ("model.moe.score_func=softmax", "nearest supported: model.moe.score_func=sigmoid")),
    ({"attention": "mla", "norm_eps": 1e-5}, ("model.norm_eps", "nearest supported: model.norm_eps=1e-06")),
    ({"d_model": 66, "head_dim": 16}, ("model.d_model (66)", "n_heads")),
])
def test_export_refuses_what_hf_cannot_represent(work, capsys, model, needles):
    from efftrain.train.rundir import write_config

    run_dir = work / "refused" / str(abs(hash(json.dumps(model, sort_keys=True))))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config(work, model))  # refused before any checkpoint is read
    out = work / "refused-out"
    rc, _, err = cli(capsys, "export-hf", run_dir, "--out", out)
    assert_one_line_error(rc, err, *needles)
    assert rc == 2 and not out.exists()


def test_export_is_atomic(work, capsys, monkeypatch):
    import efftrain.hf.export as export

    run_dir = make_run(work, "dense_mha", CASES["dense_mha"])
    out = work / "export" / "atomic"

    def failing_save(path, tensors):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(export, "save_tensors", failing_save)
    rc, _, err = cli(capsys, "export-hf", run_dir, "--out", out)
    assert_one_line_error(rc, err, "disk full")
    assert not out.exists() and not list(out.parent.glob(".atomic*"))
    monkeypatch.undo()
    out.mkdir()
    (out / "keep").write_text("x")
    rc, _, err = cli(capsys, "export-hf", run_dir, "--out", out)
    assert_one_line_error(rc, err, "exists and is not empty", "--force")
    rc, _, err = cli(capsys, "export-hf", run_dir, "--out", out, "--force")
    assert rc == 0 and not (out / "keep").exists() and (out / "model.safetensors").is_file(), err
    rc, _, err = cli(capsys, "export-hf", run_dir, "--out", work / "x", "--step", "99")
    assert_one_line_error(rc, err, "no series checkpoint at step(s) [99]")
    rc, _, err = cli(capsys, "export-hf", work / "nowhere", "--out", work / "x")
    assert_one_line_error(rc, err, "not a run directory")
    rc, _, err = cli(capsys, "eval", run_dir, "--text", work / "missing.txt")
    assert_one_line_error(rc, err, "missing.txt: file not found")


def edited(src: Path, dst: Path, **changes) -> Path:
    """A copy of a checkpoint directory with config.json changed (None: key removed)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_import_refuses_bad_inputs_with_one_line(work, capsys, hf_llama, hf_deepseek):
    bad = work / "bad"
    cases = [
        (edited(hf_llama, bad / "gpt2", architectures=["GPT2LMHeadModel"], model_type="gpt2"),
         ("architectures ['GPT2LMHeadModel']", "LlamaForCausalLM")),
        (edited(hf_llama, bad / "rope", rope_scaling={"rope_type": "linear", "factor": 2.0}),
         ("rope_scaling", "nearest supported")),
        (edited(hf_llama, bad / "bias", attention_bias=True), ("attention_bias", "nearest supported")),
        (edited(hf_llama, bad / "sliding", sliding_window=16), ("sliding_window",)),
        (edited(hf_llama, bad / "shape", intermediate_size=128), ("model.layers.0.mlp.gate_proj.weight has shape [96, 64]", "implies [128, 64]")),
        (edited(hf_deepseek, bad / "groups", n_group=2, topk_group=1), ("n_group (2) / topk_group (1)",)),
        (edited(hf_deepseek, bad / "softmax", scoring_func="softmax"), ("scoring_func", "sigmoid")),
    ]
    nothing = bad / "empty"
    nothing.mkdir()
    cases.append((nothing, ("config.json: not found",)))
    no_weights = edited(hf_llama, bad / "noweights")
    (no_weights / "model.safetensors").unlink()
    cases.append((no_weights, ("no model.safetensors",)))
    no_tok = edited(hf_llama, bad / "notok")
    (no_tok / "tokenizer.json").unlink()
    cases.append((no_tok, ("tokenizer.json: not found",)))
    for src, needles in cases:
        out = work / "bad-out"
        rc, _, err = cli(capsys, "import-hf", src, "--out", out)
        assert_one_line_error(rc, err, *needles)
        assert not out.exists(), src
    rc, _, err = cli(capsys, "import-hf", "some-org/some-model", "--out", work / "bad-out")
    assert_one_line_error(rc, err, "not a local directory", "nothing is downloaded")


def test_cli_errors_are_one_line_without_traceback_in_a_subprocess(work, hf_llama):
    src = edited(hf_llama, work / "bad" / "subprocess", architectures=["MistralForCausalLM"], model_type="mistral")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "efftrain.cli", "import-hf", str(src), "--out", str(work / "sp")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "MistralForCausalLM" in proc.stderr and "Traceback" not in proc.stderr
