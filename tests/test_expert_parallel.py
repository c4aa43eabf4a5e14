"""The expert-parallel all-to-all exchange (efftrain/model/expert_parallel.py) on 8 fake CPU devices: the
MoE layer's outputs, gradients and stats against the single-device dropless path and the per-device
capacity reference, a short training run against one device, and the config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from efftrain.config import MESH_AXES, ConfigError, ModelConfig, MoEConfig, config_warnings, from_dict
from efftrain.model import expert_parallel
from efftrain.model.moe import MoE
from efftrain.model.placement import tracing_mesh
from efftrain.train.sharding import state_shardings

from conftest import tiny_raw

B, T, D = 8, 4, 16  # N = 32 tokens: 4 per device on every 8-device mesh
E, K, H = 8, 2, 8
MESHES = {"expert8": (1, 1, 8), "data2-expert4": (2, 1, 4), "fsdp2-expert4": (1, 2, 4)}
# both routings run through the same compiled programs (the router bias is an input)
SKEW = np.array([9.0, 9.0] + [0.0] * (E - 2), np.float32)  # every token picks experts 0 and 1


def mesh_of(shape):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), MESH_AXES)


def layer_config(dispatch: str, exchange: str = "all_to_all") -> ModelConfig:
    moe = MoEConfig(enabled=True, num_routed_experts=E, top_k=K, expert_hidden=H, num_shared_experts=1,
                    dispatch=dispatch, capacity_factor=1.25, switch_aux_loss_weight=0.01, expert_exchange=exchange)
    return ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=2, mlp_hidden=32, compute_dtype="float32",
                       moe=moe)


def build(dispatch):
    layer = MoE(layer_config(dispatch), rngs=nnx.Rngs(params=0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32)
    w = jax.random.normal(jax.random.key(2), (B, T, D), jnp.float32)
    return layer, graphdef, params, rest, x, w


def with_bias(rest, bias):
    """`rest` (the router bias only) with the bias set to `bias`."""
    return jax.tree.map(lambda a: jnp.asarray(bias, a.dtype), rest)


def grad_fn(graphdef, mesh):
    """(loss, (y, stats)), (d params, d x) of sum(y·w) + aux_loss, with the layer traced on `mesh`."""

    def loss(params, rest, x, w):
        with tracing_mesh(mesh):
            y, stats = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y.astype(jnp.float32) * w) + stats["aux_loss"], (y, stats)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))


def capacity_reference_fn(graphdef, n_shards):
    """The rule of the exchange: the plain capacity path applied to each device's N/P tokens on its own
    (contiguous rows), plus the aux loss of the global routing; stats global, dropped_frac the mean."""

    def loss(params, rest, x, w):
        layer = nnx.merge(graphdef, params, rest)
        xs = x.reshape(n_shards, B // n_shards, T, D)
        ys, shard_stats = jax.vmap(layer)(xs)
        _, stats = layer(x)  # global routing: loads (before drops), aux losses, entropy
        stats = {**stats, "dropped_frac": jnp.mean(shard_stats["dropped_frac"])}
        y = ys.reshape(B, T, D)
        return jnp.sum(y * w) + stats["aux_loss"], (y, stats)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def run_all(dispatch):
    layer, graphdef, params, rest, x, w = build(dispatch)
    ref = grad_fn(graphdef, None) if dispatch == "dropless" else capacity_reference_fn(graphdef, 8)
    results = {}
    for routing, bias in (("random", np.zeros(E, np.float32)), ("skewed", SKEW)):
        r = with_bias(rest, bias)
        results[routing, "ref"] = ref(params, r, x, w)
    for name, shape in MESHES.items():
        mesh = mesh_of(shape)
        fn = grad_fn(graphdef, mesh)
        p = jax.device_put(params, state_shardings(params, mesh))  # expert kernels split as in training
        for routing, bias in (("random", np.zeros(E, np.float32)), ("skewed", SKEW)):
            results[routing, name] = fn(p, with_bias(rest, bias), x, w)
    return results


def compare(results, routing, name):
    (loss_r, (y_r, st_r)), (gp_r, gx_r) = results[routing, "ref"]
    (loss_e, (y_e, st_e)), (gp_e, gx_e) = results[routing, name]
    assert_close(y_e, y_r)
    assert sorted(st_e) == sorted(st_r)
    for key in st_r:
        np.testing.assert_allclose(np.asarray(st_e[key]), np.asarray(st_r[key]), rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(float(loss_e), float(loss_r), rtol=1e-5)
    assert_close(gx_e, gx_r)
    assert_close(gp_e, gp_r)
    return st_r


@pytest.fixture(scope="module")
def dropless_results():
    return run_all("dropless")


@pytest.fixture(scope="module")
def capacity_results():
    return run_all("capacity")


@pytest.mark.parametrize("name", list(MESHES))
@pytest.mark.parametrize("routing", ["random", "skewed"])
def test_dropless_exchange_equals_single_device(dropless_results, routing, name):
    stats = compare(dropless_results, routing, name)
    assert float(stats["dropped_frac"]) == 0.0
    if routing == "skewed":  # every assignment of every device went to experts 0 and 1: the static bound
        np.testing.assert_allclose(np.asarray(stats["load"])[:2], [0.5, 0.5])


@pytest.mark.parametrize("name", list(MESHES))
@pytest.mark.parametrize("routing", ["random", "skewed"])
def test_capacity_exchange_equals_per_device_capacity_reference(capacity_results, routing, name):
    stats = compare(capacity_results, routing, name)
    # C_l = min(ceil(1.25 · 4·2 / 8), 4) = 2 slots per (device, expert): the skewed routing sends all 4 tokens
    # of a device to experts 0 and 1, so half of the assignments are dropped
    drop = float(stats["dropped_frac"])
    assert drop == pytest.approx(0.5) if routing == "skewed" else 0 < drop < 0.5


def test_capacity_rule_differs_from_global_rule_only_as_documented(capacity_results):
    """The per-device rule drops where the global rule (C = 10 per expert over all 32 tokens) would not."""
    _, graphdef, params, rest, x, w = build("capacity")
    (_, (_, glob)), _ = grad_fn(graphdef, None)(params, with_bias(rest, np.zeros(E, np.float32)), x, w)
    (_, (_, ep)), _ = capacity_results["random", "expert8"]
    assert float(ep["dropped_frac"]) > float(glob["dropped_frac"])
    np.testing.assert_allclose(np.asarray(ep["load"]), np.asarray(glob["load"]))  # loads: before drops


def test_exchange_lowers_to_all_to_all_and_plain_path_outside_a_mesh():
    layer, graphdef, params, rest, x, w = build("dropless")
    x2d = x.reshape(B * T, D)
    r = layer.route(x2d)
    assert expert_parallel.routed(layer, x2d, r.expert_idx, r.gates) is None  # no mesh being traced
    with tracing_mesh(mesh_of((8, 1, 1))):  # a mesh without an expert axis: the plain path too
        assert expert_parallel.routed(layer, x2d, r.expert_idx, r.gates) is None
    hlo = grad_fn(graphdef, mesh_of(MESHES["data2-expert4"])).lower(params, rest, x, w).as_text()
    # forward: dispatch (rows, expert ids) and combine; backward: the transposes of the two row exchanges
    assert hlo.count("all_to_all") == 5


# ---- a short training run ------------------------------------------------------------------------------
STEPS = 3
MOE = {**tiny_raw("x")["model"], "moe": {"enabled": True, "num_routed_experts": 8, "top_k": 2,
                                          "expert_hidden": 16, "num_shared_experts": 1}}


def train_config(cache_dir, mesh=None, **moe):
    model = {**MOE, "moe": {**MOE["moe"], **moe}}
    raw = tiny_raw(cache_dir, model=model, train__max_steps=STEPS,
                   checkpoint={"tokens": [512], "resume_every": 10, "async_save": False})
    if mesh is not None:
        raw["train"] = {**raw["train"], "data_parallel": -1, "mesh": mesh}
    return from_dict(raw)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_with_all_to_all_matches_single_device(cache_dir, tmp_path):
    from efftrain.train.loop import train

    quiet = {"log": lambda *_: None}
    one = train(train_config(cache_dir), tmp_path / "one", **quiet)
    many = train(train_config(cache_dir, {"data": 2, "expert": 4}, expert_exchange="all_to_all"),
                 tmp_path / "a2a", **quiet)
    assert sorted(many.losses) == sorted(one.losses) == list(range(1, STEPS + 1))
    for step, loss in one.losses.items():
        assert many.losses[step] == pytest.approx(loss, rel=1e-5), step
    for a, b in zip(records(tmp_path / "one"), records(tmp_path / "a2a"), strict=True):
        for key in a:
            if key.startswith("moe/") or key in ("grad_norm", "ce"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # Adam's m / sqrt(v) turns last-bit differences of near-zero gradients (another summation order) into
    # differences up to its step size: the state to rtol 1e-4 / atol 1e-5 (as tests/test_distributed.py)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one.final_state),
                            jax.tree.leaves(many.final_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    w = many.final_state["params"]["blocks"][1]["ffn"]["w_up"].get_value()
    assert w.sharding.spec[0] == "expert" and w.addressable_shards[0].data.shape[0] == 2


# ---- config --------------------------------------------------------------------------------------------
def test_config_field_validation_and_hash(cache_dir):
    with pytest.raises(ConfigError, match="expert_exchange"):
        train_config(cache_dir, expert_exchange="alltoall")
    with pytest.raises(ConfigError, match=r"num_routed_experts \(8\) must be divisible by train.mesh.expert "
                                          r"\(3\) \(model.moe.expert_exchange=all_to_all"):
        train_config(cache_dir, {"data": 1, "expert": 3}, expert_exchange="all_to_all")
    with pytest.raises(ConfigError, match="needs model.moe.enabled"):
        from_dict({**tiny_raw(cache_dir), "train": {**tiny_raw(cache_dir)["train"], "data_parallel": -1,
                                                   "mesh": {"expert": 2}}})
    # without an expert axis it is a no-op, with a warning (a run may resume on one device)
    single = train_config(cache_dir, expert_exchange="all_to_all")
    assert any("expert_exchange=all_to_all has no effect" in w for w in config_warnings(single))
    on_mesh = train_config(cache_dir, {"data": 2, "expert": 4}, expert_exchange="all_to_all")
    assert not any("expert_exchange" in w for w in config_warnings(on_mesh))
    # the default is left out of the stored config: every existing config keeps its hash
    default = train_config(cache_dir)
    assert "expert_exchange" not in default.to_dict()["model"]["moe"]
    assert single.to_dict()["model"]["moe"]["expert_exchange"] == "all_to_all"
    assert from_dict(single.to_dict()) == single and from_dict(default.to_dict()) == default


# ---- the benchmark's HLO reading -----------------------------------------------------------------------
def test_exchange_benchmark_counts_collectives_and_their_result_bytes():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "bench_expert_exchange.py"
    spec = importlib.util.spec_from_file_location("bench_expert_exchange", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    hlo = """
  %all-to-all.3 = bf16[4,16,64]{2,1,0} all-to-all(bf16[4,16,64]{2,1,0} %p), channel_id=1, dimensions={0}
  %all-gather-start = (f32[8,32]{1,0}, f32[64,32]{1,0}) all-gather-start(f32[8,32]{1,0} %w), dimensions={0}
  %all-gather-done = f32[64,32]{1,0} all-gather-done((f32[8,32]{1,0}, f32[64,32]{1,0}) %all-gather-start)
  ROOT %all-reduce.1 = (f32[16]{0}, s32[8]{0}) all-reduce(f32[16]{0} %a, s32[8]{0} %b), to_apply=%sum
  %fusion.2 = f32[16]{0} fusion(f32[16]{0} %all-reduce.1), kind=kLoop, calls=%all-gather.fused
"""
    assert bench.collective_bytes(hlo) == {"all-to-all": {"count": 1, "bytes": 4 * 16 * 64 * 2},
                                           "all-gather": {"count": 1, "bytes": 64 * 32 * 4},
                                           "all-reduce": {"count": 1, "bytes": 16 * 4 + 8 * 4}}
