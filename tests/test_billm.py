"""BiLLM (efftrain.quant.billm): residual binarization, the OBC update against its least-squares definition,
output error below plain binarization, the bit accounting, and the method inside quantize_model."""

import jax.numpy as jnp
import numpy as np
import pytest

from efftrain.config import from_dict
from efftrain.model.layers import cross_entropy
from efftrain.model.transformer import build_model
from efftrain.quant.apply import QuantSettings, linears_of, quantize_model
from efftrain.quant.billm import binarize_sign_mean, obc_update, quantize_billm, residual_binarize

from conftest import tiny_raw


def two_level_columns(rng, rows: int = 8, cols: int = 5):
    """Columns a_j·s1 + b_j·s2 with a_j > b_j > 0 and every sign pair (s1, s2) equally often."""
    signs = np.array([(s1, s2) for s1 in (1, -1) for s2 in (1, -1)] * (rows // 4), np.float64)
    a, b = rng.uniform(1.0, 2.0, cols), rng.uniform(0.1, 0.5, cols)
    return signs[:, :1] * a + signs[:, 1:] * b


@pytest.mark.parametrize("mean_shift", [True, False])
def test_residual_binarization_is_exact_on_two_binary_planes(mean_shift):
    rng = np.random.default_rng(0)
    everywhere = jnp.ones((8, 5), bool)
    pm = np.where(rng.random((8, 5)) < 0.5, 1.0, -1.0) * rng.uniform(0.5, 2.0, 5)  # ±a_j
    pm[:4], pm[4:] = np.abs(pm[:4]), -np.abs(pm[4:])  # balanced, so the mean shift is 0 too
    np.testing.assert_allclose(residual_binarize(jnp.asarray(pm), everywhere, 1, mean_shift), pm, atol=1e-6)
    w = two_level_columns(rng)
    one = np.asarray(residual_binarize(jnp.asarray(w), everywhere, 1, mean_shift))
    assert np.abs(one - w).max() > 0.1  # one plane cannot hold four levels
    np.testing.assert_allclose(residual_binarize(jnp.asarray(w), everywhere, 2, mean_shift), w, atol=1e-6)
    # outside the mask: zero, and the masked rows alone decide α, μ
    half = jnp.asarray(np.arange(8)[:, None] < 4).repeat(5, axis=1)
    got = np.asarray(residual_binarize(jnp.asarray(w), half, 2, mean_shift))
    assert (got[4:] == 0).all()
    if not mean_shift:  # without the shift ±a is exact whatever the sign counts (the paper's α = ‖w‖₁/m)
        lopsided = np.array([[1.5], [1.5], [1.5], [-1.5]])
        np.testing.assert_allclose(residual_binarize(jnp.asarray(lopsided), jnp.ones((4, 1), bool), 1, False),
                                   lopsided, atol=1e-6)


@pytest.mark.parametrize("i1", [0, 4])
def test_exact_obc_update_is_the_least_squares_compensation(i1):
    rng = np.random.default_rng(1)
    n, beta = 12, 4
    x = rng.standard_normal((40, n))
    H = 2 * x.T @ x
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper, H⁻¹ = UᵀU
    W = rng.standard_normal((n, 3))
    delta = rng.standard_normal((beta, 3))  # W_b − Ŵ_b
    got = np.asarray(obc_update(jnp.asarray(W, jnp.float32), jnp.asarray(U, jnp.float32), i1, beta,
                                jnp.asarray(delta, jnp.float32), exact=True))
    # rows still free at this point: F = i1.. ; GPTQ's U rows from i1 on factor (H_FF)⁻¹
    F = H[i1:, i1:]
    b, r = slice(0, beta), slice(beta, None)
    want = W[i1 + beta:] + np.linalg.solve(F[r, r], F[r, b] @ delta)
    np.testing.assert_allclose(got[i1 + beta:], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[:i1], W[:i1].astype(np.float32))  # earlier rows are untouched


def problem(n_in=256, n_out=64, seed=0):
    """A Gaussian weight and the Hessian of correlated inputs with uneven channel scales."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    x = rng.standard_normal((1024, n_in)) @ (np.eye(n_in) + 0.3 * rng.standard_normal((n_in, n_in)) / np.sqrt(n_in))
    x *= np.exp(rng.standard_normal(n_in))
    return w, (2 * x.T @ x).astype(np.float32)


def output_error(w, w_hat, H) -> float:
    """trace((W − Ŵ)ᵀ H (W − Ŵ)) in float64."""
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.trace(d.T @ H.astype(np.float64) @ d))


@pytest.mark.parametrize("options", [{}, {"search": "weights", "exact_compensation": True, "mean_shift": False}])
def test_billm_beats_plain_binarization_with_the_papers_bits(options):
    w, H = problem()
    w_hat, eff_bits, info = quantize_billm(w, H, 128, return_info=True, **options)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype and isinstance(w_hat, np.ndarray)
    plain = output_error(w, binarize_sign_mean(w, 128), H)
    assert output_error(w, w_hat, H) < 0.6 * plain
    r = info["salient_fraction"]
    assert 0 < r * 256 <= 2 * 49 and float(r * 256).is_integer()  # whole rows, 1..49 per block of 128
    assert eff_bits == pytest.approx(1 + r + 1 / 64)
    scales = 8 if options.get("mean_shift", True) else 4
    assert info["storage_bits"] == pytest.approx(eff_bits + (1 - r) + scales * 16 / 128)
    if not options:  # the reference's search keeps few salient rows here: the paper's ~1.1 bits
        assert 1.0 <= eff_bits <= 1.2
    # each output column of a block holds at most 4 (salient) + 2 + 2 (the two groups) values
    assert max(len(np.unique(w_hat[:128, j])) for j in range(64)) <= 8


def test_billm_checks_its_inputs():
    w, H = problem(n_in=64, n_out=8)
    with pytest.raises(ValueError, match="block must be -1"):
        quantize_billm(w, H, 48)
    with pytest.raises(ValueError, match="Hessian must be"):
        quantize_billm(w, H[:32, :32], 32)
    with pytest.raises(ValueError, match="search must be one of"):
        quantize_billm(w, H, 32, search="columns")
    with pytest.raises(ValueError, match="bits must be 1"):
        QuantSettings(method="billm", bits=2)


def test_billm_in_quantize_model():
    # every block matrix 32 x 32 (mlp_hidden = expert_hidden = d_model): two BiLLM programs to compile,
    # one matrix and one expert stack (the kernel's shapes are test_billm_beats_plain_binarization's)
    cfg = from_dict(tiny_raw("unused", train={"max_steps": 1},
                             model={"vocab_size": 384, "d_model": 32, "n_layers": 2, "n_heads": 2,
                                    "mlp_hidden": 32, "compute_dtype": "float32",
                                    "moe": {"enabled": True, "num_routed_experts": 4, "top_k": 2,
                                            "expert_hidden": 32, "first_dense_layers": 1}}))
    tokens = np.random.default_rng(0).integers(0, 384, (16, 32))  # ~256 tokens per expert >= 2 x 32
    model = build_model(cfg.model)
    report = quantize_model(model, tokens, QuantSettings(method="billm", bits=1, group_size=-1))
    x = jnp.asarray(tokens)
    loss = float(cross_entropy(model(x[:, :-1]).logits, x[:, 1:]))
    assert np.isfinite(loss)
    assert report.method_label == "billm"
    assert report.n_weights == (4 + 3) + (4 + 3) + 3 * 4  # attention + (shared) MLP per block, routed experts
    assert 1.0 < report.published_eff_bits < 1.5 < report.eff_bits  # the paper's count vs full storage
    for _, lin in linears_of(model.blocks[0]):  # binary planes: few values per output column
        k = np.asarray(lin.kernel[...])
        assert max(len(np.unique(k[:, j])) for j in range(k.shape[1])) <= 8
    starved = quantize_model(build_model(cfg.model), tokens, QuantSettings(method="billm", bits=1, group_size=-1,
                                                                           min_expert_tokens=10**6))
    assert starved.expert_fallbacks == 4 and starved.method_label == "billm+identity-hessian-fallback"
