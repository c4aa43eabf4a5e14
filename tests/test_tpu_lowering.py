"""TPU: the default path has nothing GPU-only. The train step of each technique, traced for 'tpu'
(`make_train_step(..., platform="tpu")`), is lowered on this CPU with jax.export for platforms=["tpu"]
- nothing runs - and its StableHLO calls no GPU kernel (cuDNN attention, Pallas' Triton or Mosaic GPU
kernels, cuBLAS/cuSOLVER, CUDA threefry). jax.export already refuses custom calls without a
compatibility guarantee (Triton and Mosaic GPU kernels among them); the scan of the custom-call
targets makes the reason explicit. The models compute in bf16, where a GPU picks cuDNN or Pallas.

A real TPU has never run these programs: lowering proves the step is expressible for TPU, not that
XLA:TPU compiles it within memory or fast (docs/SCALING.md, "TPU").
"""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from efftrain import xla
from efftrain.model import attention
from efftrain.model.transformer import build_model
from efftrain.train.optimizer import make_optimizer
from efftrain.train.step import init_state, make_train_step, split_model

# What a GPU program calls that no TPU has: cuDNN (fused attention, `__cudnn$fmha...`), Pallas' Triton
# kernels (`__gpu$xla.gpu.triton`), Mosaic GPU (`mosaic_gpu...`), CUDA libraries (`cublas`, `cusolver`,
# `cu_threefry2x32`, `cu_lu_pivots_to_permutation`), ROCm's (`hip...`).
GPU_ONLY = re.compile(r"cudnn|__gpu|triton|mosaic_gpu|cublas|cusolver|cusparse|cufft|cu_|hip|rocm|cuda",
                      re.IGNORECASE)
CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w.$-]+)|call_target_name = \"([^\"]+)\"")

BF16 = {"model__compute_dtype": "bfloat16"}
MLA = {"model__attention": "mla", "model__mla": {"kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                                  "qk_rope_head_dim": 8, "v_head_dim": 8}}


def _moe(dispatch: str, **extra) -> dict:
    return {"model__moe": {"enabled": True, "num_routed_experts": 4, "num_shared_experts": 1, "top_k": 2,
                           "expert_hidden": 32, "first_dense_layers": 1, "dispatch": dispatch, **extra}}


MTP = {"model__mtp": {"depth": 1}}
# The full V3 recipe (FP8Config's defaults: E4M3, 1x128 / 128x128 scales, 14-bit accumulator promoted
# every 128) on 128-aligned GEMMs (micro-batches of 4 x 32 tokens, d_model 128), where a GPU takes the
# one-pass Pallas quantizer and the Triton / Mosaic accumulator kernels; one block (lowering time).
FP8 = {"fp8__enabled": True, "model__d_model": 128, "model__mlp_hidden": 128, "model__n_layers": 1}

TECHNIQUES = {
    "dense": {},
    "mla": MLA,
    "moe-dropless-tiles": _moe("dropless"),
    "moe-dropless-ragged": _moe("dropless", dropless_impl="ragged"),
    "moe-capacity": _moe("capacity"),
    "mtp": MTP,
    "fp8": FP8,
    # deepseek-tiny's combination with FP8 in MLA's, the experts' (vmapped over tiles) and MTP's GEMMs
    "deepseek-fp8": {**MLA, **_moe("dropless", first_dense_layers=0), **MTP, **FP8},
}
# train.deterministic (the default; a GPU takes Pallas' flash attention and the scatter-free embedding
# gradient) with two micro-batches (grad_accum's lax.scan) for every technique; false (a GPU takes
# cuDNN attention) once: it changes no other choice.
CASES = [(name, True) for name in TECHNIQUES] + [("dense", False)]


def custom_call_targets(mlir: str) -> set[str]:
    return {a or b for a, b in CUSTOM_CALL.findall(mlir)}


def lower_train_step(cfg, platform: str, disabled_checks=()):
    """jax.export of cfg's train step traced for `platform`, from the state's shapes (nothing is
    initialised, compiled or run)."""
    tx = make_optimizer(cfg.optim, 10)
    graphdef = split_model(nnx.eval_shape(lambda: build_model(cfg.model, cfg.fp8, seed=0)))[0]
    state = jax.eval_shape(lambda: init_state(build_model(cfg.model, cfg.fp8, seed=0), tx)[1])
    step = make_train_step(graphdef, cfg, tx, platform=platform)
    accum, T = cfg.train.grad_accum, cfg.data.seq_len
    batch = jax.ShapeDtypeStruct((accum, cfg.train.batch_size // accum, T + 1), jnp.int32)
    tokens_seen = jax.ShapeDtypeStruct((), jnp.int32)
    platforms = ["cuda" if platform == "gpu" else platform]
    return jax.export.export(step, platforms=platforms, disabled_checks=disabled_checks)(state, batch, tokens_seen)


@pytest.mark.parametrize(("technique", "deterministic"), CASES,
                         ids=[f"{name}-{'deterministic' if det else 'nondeterministic'}" for name, det in CASES])
def test_train_step_lowers_for_tpu_without_gpu_kernels(tiny_config, technique, deterministic):
    cfg = tiny_config(**BF16, **TECHNIQUES[technique], train__deterministic=deterministic,
                      train__grad_accum=2 if deterministic else 1)
    exported = lower_train_step(cfg, "tpu")
    assert exported.platforms == ("tpu",)
    mlir = exported.mlir_module()
    gpu_only = sorted(t for t in custom_call_targets(mlir) if GPU_ONLY.search(t))
    assert not gpu_only, f"{technique}: the TPU step calls GPU-only kernels {gpu_only}"
    assert not re.search(r"cudnn|triton|mosaic_gpu", mlir)


def test_kernel_choices_follow_the_target_platform_not_the_host(monkeypatch, tmp_path):
    """On this CPU host, the platform the step is traced for decides: cuDNN / Pallas attention, the
    Pallas FP8 kernels and the GPU compile options for 'gpu' (also jax.export's 'cuda'), XLA and no
    options for 'tpu' and 'cpu'."""
    from efftrain.config import FP8Config, ModelConfig
    from efftrain.fp8.matmul import kernels_in_effect
    from efftrain.model.layers import deterministic_gradients

    monkeypatch.setenv("EFFTRAIN_AUTOTUNE_CACHE", str(tmp_path))
    model, fp8 = ModelConfig(), FP8Config(enabled=True)
    for platform, gpu in (("gpu", True), ("cuda", True), ("tpu", False), ("cpu", False)):
        with xla.for_platform(platform):
            assert xla.on_gpu() is gpu and xla.target_platform() == ("gpu" if gpu else platform)
            assert attention.attention_implementation(model, jnp.bfloat16) == ("cudnn" if gpu else "xla")
            token = deterministic_gradients.set(True)
            try:
                assert attention.attention_implementation(model, jnp.bfloat16) == ("pallas" if gpu else "xla")
            finally:
                deterministic_gradients.reset(token)
            kernels = kernels_in_effect(fp8)
            assert (kernels["quantize"], kernels["accumulate"]) == (("pallas",) * 2 if gpu else ("xla",) * 2)
            autotune = {"xla_gpu_per_fusion_autotune_cache_dir": str(tmp_path)}
            assert xla.step_options(True) == (autotune if gpu else {})
            assert xla.ptq_options() == ({"xla_gpu_enable_triton_gemm": False, **autotune} if gpu else {})
    assert xla.target_platform() == jax.default_backend()  # outside: the host's backend again


def test_the_scan_sees_the_gpu_kernels_of_a_gpu_step(tiny_config):
    """The same lowering for 'cuda' (the deterministic bf16 step: Pallas' Triton flash attention) is
    refused by jax.export for its Triton custom calls, and with that check waived the scan finds them:
    the TPU test above would fail if the choice followed the CPU host rather than the target."""
    cfg = tiny_config(**BF16, train__deterministic=True)
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility guarantees"):
        lower_train_step(cfg, "gpu")
    waived = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    targets = custom_call_targets(lower_train_step(cfg, "gpu", waived).mlir_module())
    assert [t for t in targets if GPU_ONLY.search(t)] == ["__gpu$xla.gpu.triton"]


def _assert_tpu_clean(fn, *args) -> None:
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    gpu_only = sorted(t for t in custom_call_targets(exported.mlir_module()) if GPU_ONLY.search(t))
    assert not gpu_only, gpu_only


def test_ptq_programs_lower_for_tpu():
    """PTQ's ptq_jit programs (inlined into one jit here, as inside any jitted caller) lower for TPU:
    the calibration Hessian and GPTQ's on-device solve (Cholesky, cho_solve, the blocked column loop),
    of one matrix with act_order and of a stack of MoE experts; AWQ's scale search and clip + RTN."""
    from efftrain.quant import awq, gptq
    from efftrain.quant.formats import kernel_format, make_format

    f32 = jnp.float32
    x = jax.ShapeDtypeStruct((100, 64), f32)
    w = jax.ShapeDtypeStruct((64, 32), f32)
    _assert_tpu_clean(lambda x, w: gptq.gptq_on_device(w, gptq.hessian_from_inputs(x), bits=4, group_size=32,
                                                       act_order=True), x, w)
    stack, hessians = jax.ShapeDtypeStruct((4, 64, 32), f32), jax.ShapeDtypeStruct((4, 64, 64), f32)
    _assert_tpu_clean(lambda w, H: gptq.gptq_on_device(w, H, bits=3, group_size=64), stack, hessians)

    fs, maxq = kernel_format(make_format(4, "int"))

    def awq_one(x, w):
        G, sx = awq.gram(x), jnp.mean(jnp.abs(x), axis=0)
        s = awq.best_scales(w, G, sx, None, jnp.linspace(0, 1, 5), maxq, f=fs, g=32)
        return awq.clip_quantize(w * s[:, None], G, jnp.asarray(True), jnp.linspace(1, 0.5, 4), maxq,
                                 f=fs, g=32, clip=True)

    _assert_tpu_clean(awq_one, x, w)
