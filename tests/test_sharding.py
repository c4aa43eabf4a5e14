"""Meshes (data x fsdp x expert) on 8 fake CPU devices: logical axes and rules, FSDP and expert-parallel
training equal to one device, checkpoints moving between meshes, and the mesh errors."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from efftrain.config import ConfigError, from_dict
from efftrain.train.loop import train
from efftrain.train.sharding import RULES, logical_axes, make_mesh, partition_spec, path_names, state_specs

from conftest import tiny_raw

MOE = {**tiny_raw("x")["model"], "moe": {"enabled": True, "num_routed_experts": 8, "top_k": 2,
                                          "expert_hidden": 16, "num_shared_experts": 1}}
STEPS = 3
quiet = {"log": lambda *_: None}


def config(cache_dir, mesh=None, **sections):
    raw = tiny_raw(cache_dir, train__max_steps=STEPS, checkpoint={"tokens": [512], "resume_every": 2,
                                                                 "async_save": False}, **sections)
    if mesh is not None:
        raw["train"] = {**raw["train"], "data_parallel": -1, "mesh": mesh}
    return from_dict(raw)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(ref, other, ref_dir, other_dir):
    """Equal losses (and MoE statistics) step by step and equal final state, to float32 tolerance."""
    assert sorted(other.losses) == sorted(ref.losses) == list(range(1, STEPS + 1))
    for step, loss in ref.losses.items():
        assert other.losses[step] == pytest.approx(loss, rel=1e-5), step
    for a, b in zip(records(ref_dir), records(other_dir), strict=True):
        for key in a:
            if key.startswith("moe/") or key in ("grad_norm", "ce"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # atol 1e-5: Adam divides by sqrt(v), so an element whose gradient is ~0 moves by rounding-level
    # differences of its tiny gradient (seen: 4e-6 on one w_down element on some CPUs); a wrong layout
    # moves parameters by the size of an update (up to lr = 3e-3 here) and fails
    for a, b in zip(leaves(ref.final_state), leaves(other.final_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory):
    return tmp_path_factory.mktemp("sharding-runs")


@pytest.fixture(scope="module")
def dense_single(cache_dir, runs):
    return train(config(cache_dir), runs / "dense-1", **quiet)


# ---- logical axes and rules ---------------------------------------------------------------------
def test_every_parameter_has_logical_axes_and_moments_follow_their_params(cache_dir):
    from efftrain.train.rundir import abstract_train_state

    model = {**MOE, "attention": "mla", "mtp": {"depth": 1},
             "mla": {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                     "v_head_dim": 8}}
    _, state = abstract_train_state(config(cache_dir, model=model))
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
        axes = logical_axes(path, leaf.ndim)
        assert None not in axes and all(a in RULES for a in axes), path_names(path)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "expert"))
    specs = state_specs(state, mesh)
    p = specs["params"]
    assert p["embed"]["embedding"].get_value() == P("fsdp")  # [vocab 384, embed 32]: the larger one
    assert p["lm_head"]["kernel"].get_value() == P(None, "fsdp")
    moe = p["blocks"][1]["ffn"]
    assert moe["w_up"].get_value() == P("expert", "fsdp") and moe["w_down"].get_value() == P("expert", None, "fsdp")
    assert moe["router"]["kernel"].get_value() == P("fsdp")  # its expert axis ("routes") is never split
    assert p["final_norm"]["scale"].get_value() == P()
    assert specs["rest"]["blocks"][1]["ffn"]["router"]["bias"].get_value() == P()
    adam = specs["opt"][1]
    assert jax.tree.leaves(adam.mu) == jax.tree.leaves(p) == jax.tree.leaves(adam.nu)
    assert adam.count == P()


def test_partition_spec_rules():
    assert partition_spec(("embed", "mlp"), (32, 64), {"fsdp": 4}) == P(None, "fsdp")
    assert partition_spec(("embed", "mlp"), (32, 62), {"fsdp": 4}) == P("fsdp")  # largest divisible
    assert partition_spec(("embed", "mlp"), (30, 62), {"fsdp": 4}) == P()  # none: replicated
    assert partition_spec(("experts", "embed", "expert_mlp"), (8, 32, 16), {"expert": 8, "fsdp": 1}) == P("expert")
    assert partition_spec(("experts", "embed", "expert_mlp"), (8, 32, 16), {"fsdp": 8}) == P(None, "fsdp")
    assert partition_spec(("embed", "mlp"), (32, 64), {"data": 8}) == P()  # data never shards params
    assert partition_spec((None,), (64,), {"fsdp": 2}) == P()


# ---- training on meshes equals one device -----------------------------------------------------------
def test_default_single_device_path_is_the_plain_jitted_step(cache_dir, dense_single):
    """train.data_parallel=1 (no mesh options) runs exactly the step it ran before meshes: bitwise the
    losses and state of make_train_step's jitted step fed the same batches on one device."""
    from efftrain.data import make_train_iterator, prepare_data
    from efftrain.model.transformer import build_model
    from efftrain.train.optimizer import make_optimizer
    from efftrain.train.step import init_state, make_train_step

    cfg = config(cache_dir)
    cache = prepare_data(cfg)
    it = make_train_iterator(cache.train, seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size,
                             seed=cfg.data.shuffle_seed)
    tx = make_optimizer(cfg.optim, STEPS)
    graphdef, state = init_state(build_model(cfg.model, cfg.fp8, seed=cfg.train.seed), tx)
    step_fn = make_train_step(graphdef, cfg, tx)
    losses = {}
    for step in range(STEPS):
        batch = np.asarray(next(it)).reshape(1, cfg.train.batch_size, cfg.data.seq_len + 1)
        state, metrics = step_fn(state, jax.numpy.asarray(batch),
                                 jax.numpy.asarray(step * cfg.tokens_per_step, jax.numpy.float32))
        losses[step + 1] = float(metrics["loss"])
    assert losses == dense_single.losses
    for a, b in zip(leaves(state), leaves(dense_single.final_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fsdp_matches_single_device(cache_dir, runs, dense_single):
    fsdp = train(config(cache_dir, mesh={"fsdp": 8}), runs / "dense-fsdp8", **quiet)
    assert_same_training(dense_single, fsdp, runs / "dense-1", runs / "dense-fsdp8")
    embedding = fsdp.final_state["params"]["embed"]["embedding"].get_value()
    assert embedding.sharding.spec == P("fsdp")
    assert embedding.addressable_shards[0].data.shape == (384 // 8, 32)  # really sharded
    mu = fsdp.final_state["opt"][1].mu["embed"]["embedding"].get_value()
    assert mu.sharding.spec == P("fsdp")  # the optimizer state is sharded like its parameter
    run_info = json.loads((runs / "dense-fsdp8" / "run.json").read_text())
    assert run_info["mesh"] == {"data": 1, "fsdp": 8, "expert": 1}


def test_checkpoint_of_one_mesh_resumes_on_another_and_loads_on_one_device(cache_dir, runs, dense_single):
    """Saved on data 2 x fsdp 4 at step 2, resumed on one device (train.data_parallel=1): training
    continues as the uninterrupted single-device run; eval/ptq's load_model reads it onto one device."""
    from efftrain.train.rundir import load_model

    run = runs / "dense-moved"
    first = train(config(cache_dir, mesh={"data": 2, "fsdp": 4}), run, stop_at_step=2, **quiet)
    assert first.steps == 2
    second = train(config(cache_dir), run, **quiet)  # data_parallel=1: a single device
    assert min(second.losses) == 3
    assert second.losses[3] == pytest.approx(dense_single.losses[3], rel=1e-5)
    for a, b in zip(leaves(dense_single.final_state), leaves(second.final_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    _, model, _ = load_model(run, 2)  # the series checkpoint at 512 tokens, written on the 8-device mesh
    from flax import nnx

    for a, b in zip(leaves(nnx.state(model, nnx.Param)), leaves(first.final_state["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert {d for x in jax.tree.leaves(nnx.state(model, nnx.Param)) for d in x.devices()} == {jax.devices()[0]}


@pytest.mark.parametrize("dispatch, mesh", [("capacity", {"data": 2, "fsdp": 2, "expert": 2}),
                                            ("dropless", {"data": 2, "expert": 4})])
def test_expert_parallel_moe_matches_single_device(cache_dir, runs, dispatch, mesh):
    model = {**MOE, "moe": {**MOE["moe"], "dispatch": dispatch}}
    one = train(config(cache_dir, model=model), runs / f"moe-{dispatch}-1", **quiet)
    many = train(config(cache_dir, mesh=mesh, model=model), runs / f"moe-{dispatch}-mesh", **quiet)
    assert_same_training(one, many, runs / f"moe-{dispatch}-1", runs / f"moe-{dispatch}-mesh")
    w = many.final_state["params"]["blocks"][1]["ffn"]["w_up"].get_value()
    assert w.sharding.spec[0] == "expert" and w.addressable_shards[0].data.shape[0] == 8 // mesh["expert"]
    if dispatch == "capacity":
        assert any(r["moe/dropped_frac"] > 0 for r in records(runs / f"moe-{dispatch}-1"))  # drops compared too


# ---- errors ---------------------------------------------------------------------------------------------
def test_bad_meshes_are_one_line_config_errors(cache_dir):
    def error(mesh, **sections):
        with pytest.raises(ConfigError) as e:
            make_mesh(config(cache_dir, mesh=mesh, **sections))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "data 2 x fsdp 2 x expert 1 = 4 devices, but 8 are available" in error({"data": 2, "fsdp": 2})
    assert "fsdp 3 x expert 1 = 3 does not divide the 8 devices" in error({"fsdp": 3}, train__batch_size=24)
    assert "num_routed_experts (8) must be divisible by train.mesh.expert (3)" in error(
        {"data": 1, "expert": 3}, model=MOE)
    assert "needs model.moe.enabled" in error({"expert": 2})
    assert "micro-batch (train.batch_size / train.grad_accum = 4) must be divisible by the mesh's 8" in error(
        {"fsdp": 8}, train__batch_size=4)
    assert "must be divisible by the mesh's 8 batch shards" in error({"data": -1}, train__batch_size=4)
    assert "unknown mesh axis 'tensor' (axes: data, fsdp, expert)" in error({"tensor": 2})
    with pytest.raises(ConfigError, match="train.data_parallel .2. and train.mesh are both set"):
        from_dict(tiny_raw(cache_dir, train={**tiny_raw(cache_dir)["train"], "data_parallel": 2,
                                             "mesh": {"data": 2}}))
    assert make_mesh(config(cache_dir, mesh={"fsdp": 4})).shape == {"data": 2, "fsdp": 4, "expert": 1}
