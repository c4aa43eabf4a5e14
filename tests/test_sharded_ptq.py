"""PTQ and evaluation of sharded checkpoints on 8 fake CPU devices (efftrain.quant.placement): a run
trained on `fsdp: 4` is restored sharded, quantized one gathered block at a time and scored sharded,
with the rows of the same checkpoint on one device; the mesh choice and its errors."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from efftrain.cli import main
from efftrain.config import ConfigError, MeshConfig, from_dict
from efftrain.data import prepare_data
from efftrain.eval import eval_run, evaluate_model, val_set
from efftrain.model.transformer import build_model
from efftrain.quant import apply
from efftrain.quant.apply import QuantSettings, quantize_model
from efftrain.quant.sweep import calibration_windows, make_spec, run_ptq_sweep
from efftrain.train.checkpoint import CheckpointStore
from efftrain.train.loop import train
from efftrain.train.rundir import abstract_train_state, load_model, load_run_config
from efftrain.train.sharding import checkpoint_mesh, on_mesh, state_shardings

from conftest import tiny_raw

QUIET = {"log": lambda *_: None}
MOE = {**tiny_raw("x")["model"], "moe": {"enabled": True, "num_routed_experts": 8, "top_k": 2,
                                          "expert_hidden": 16, "num_shared_experts": 1}}
STEP = 2  # the series checkpoint at 512 tokens (256 a step)
SCORES = ("loss_16", "loss_q", "qid", "kl", "top1_agree")


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache(monkeypatch):
    """The sweep's persistent compilation cache would write to the user's cache dir: off in these tests."""
    monkeypatch.setenv("EFFTRAIN_COMPILATION_CACHE", "off")


def config(cache_dir, mesh, **sections):
    raw = tiny_raw(cache_dir, checkpoint={"tokens": [512], "resume_every": 100, "async_save": False},
                   **sections)
    raw["train"] = {**raw["train"], "max_steps": 2, "data_parallel": -1, "mesh": mesh}
    return from_dict(raw)


@pytest.fixture(scope="module")
def fsdp_run(cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("sharded-ptq") / "fsdp4"
    with pytest.MonkeyPatch.context() as mp:  # training turns the cache on too, before the autouse fixture
        mp.setenv("EFFTRAIN_COMPILATION_CACHE", "off")
        train(config(cache_dir, {"fsdp": 4}), run, **QUIET)
    return run


def on_one_device(tree) -> list[bool]:
    return [len(x.sharding.device_set) == 1 for x in jax.tree.leaves(tree)]


def restore_sharded(run):
    cfg = load_run_config(run)
    mesh = checkpoint_mesh(cfg)
    graphdef, abstract = abstract_train_state(cfg)
    store = CheckpointStore(run, read_only=True)
    try:
        state, _, _ = store.restore("series", STEP, on_mesh(abstract, mesh))
    finally:
        store.close()
    return cfg, nnx.merge(graphdef, state["params"], state["rest"])


def test_sweep_rows_of_the_sharded_checkpoint_equal_one_device(fsdp_run):
    spec = dict(methods=["rtn", "gptq"], bits=[4], group_sizes=[-1], checkpoints=[STEP], calib_samples=8,
                eval_batches=1)
    lines = []
    sharded = run_ptq_sweep(fsdp_run, make_spec(**spec), log=lines.append)
    assert "ptq: parameters sharded over data 2 x fsdp 4 x expert 1; each block gathered" in "\n".join(lines)
    (fsdp_run / "ptq.csv").unlink()
    lines.clear()
    one = run_ptq_sweep(fsdp_run, make_spec(**spec, mesh={"fsdp": 1}), log=lines.append)
    assert "ptq: parameters on one device" in lines
    assert [(r["method"], r["bits"]) for r in sharded] == [(r["method"], r["bits"]) for r in one] == \
        [("rtn", 4), ("gptq", 4)]
    for a, b in zip(sharded, one):
        assert a["kl"] > 0 and a["eval_windows"] == b["eval_windows"] == 8
        assert (a["eff_bits"], a["model_bytes"], a["n_quantized"]) == (b["eff_bits"], b["model_bytes"], b["n_quantized"])
        for key in SCORES:  # the same quantized weights; GSPMD only reorders the eval's reductions
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["method"], key)
    (fsdp_run / "ptq.csv").unlink()


def test_blocks_are_quantized_gathered_one_at_a_time_and_put_back(fsdp_run, monkeypatch):
    cfg, model = restore_sharded(fsdp_run)
    embedding = model.embed.embedding[...]
    assert embedding.sharding.spec == P("fsdp") and len(embedding.sharding.device_set) == 8
    assert embedding.addressable_shards[0].data.shape == (384 // 4, 32)  # restored split, not whole
    assert not any(on_one_device(nnx.state(model, nnx.Param)))
    shardings = jax.tree.map(lambda x: x.sharding, nnx.state(model))

    seen = []
    block_pass = apply._block_pass

    def watched(block, h, positions):
        """While a block is calibrated: which blocks (and the embedding, head) are on one device."""
        seen.append(([all(on_one_device(nnx.state(b))) for b in model.blocks],
                     on_one_device(nnx.state(model.embed)) + on_one_device(nnx.state(model.lm_head)),
                     h.sharding.device_set == block.attn.q.kernel[...].sharding.device_set))
        return block_pass(block, h, positions)

    monkeypatch.setattr(apply, "_block_pass", watched)
    calib = calibration_windows(prepare_data(cfg).train, 8, cfg.data.seq_len)
    settings = QuantSettings("awq", 4, group_size=-1, quantize_head=True)  # AWQ also folds into the norms
    report = quantize_model(model, calib, settings)
    assert seen == [([True, False], [False, False], True), ([False, True], [False, False], True)]
    after = jax.tree.map(lambda x: x.sharding, nnx.state(model))
    assert jax.tree.leaves(after) == jax.tree.leaves(shardings)  # every variable back on its sharding
    assert all(isinstance(p.codes, np.ndarray) for p, _ in report.packed.values())  # codes in host memory

    monkeypatch.setattr(apply, "_block_pass", block_pass)
    _, single, _ = load_model(fsdp_run, STEP)
    assert all(on_one_device(nnx.state(single)))
    quantize_model(single, calib, settings)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(single)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same programs on the same inputs


def test_moe_experts_split_over_expert_are_gathered_with_their_block(cache_dir):
    cfg = config(cache_dir, {"expert": 4}, model=MOE)
    mesh = checkpoint_mesh(cfg)
    assert mesh.shape == {"data": 2, "fsdp": 1, "expert": 4}
    model, single = build_model(cfg.model, seed=0), build_model(cfg.model, seed=0)
    nnx.update(model, jax.device_put(nnx.state(model), state_shardings(nnx.state(model), mesh)))
    # committed to device 0, as a restore onto one device is: the gathered blocks' programs, compiled once
    nnx.update(single, jax.device_put(nnx.state(single), jax.devices()[0]))
    shardings = jax.tree.map(lambda x: x.sharding, nnx.state(model))
    assert model.blocks[1].ffn.w_up[...].sharding.spec == P("expert")
    calib = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (8, cfg.data.seq_len))
    settings = QuantSettings("gptq", 4, group_size=-1)
    report = quantize_model(model, calib, settings)
    want = quantize_model(single, calib, settings)
    assert report.expert_tokens and report.expert_fallbacks == want.expert_fallbacks
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, nnx.state(model))) == jax.tree.leaves(shardings)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(single)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_of_the_sharded_checkpoint_equals_one_device(fsdp_run):
    cfg = load_run_config(fsdp_run)
    (row,) = eval_run(fsdp_run, steps=[STEP])
    _, model, _ = load_model(fsdp_run, STEP)
    want = evaluate_model(model, cfg, val_set(cfg))
    assert row["windows"] == want["windows"] == 16
    assert row["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert row["val_loss_se"] == pytest.approx(want["val_loss_se"], rel=1e-3)
    batch = val_set(cfg).laid_over(checkpoint_mesh(cfg)).batches()[0]
    assert batch.sharding.spec == P(("data", "fsdp", "expert")) and batch.addressable_shards[0].data.shape[0] == 2


def test_mesh_choice_and_its_errors(fsdp_run, cache_dir, capsys):
    cfg = load_run_config(fsdp_run)
    assert checkpoint_mesh(cfg).shape == {"data": 2, "fsdp": 4, "expert": 1}
    assert checkpoint_mesh(cfg, devices=jax.devices()[:6]).shape == {"data": 1, "fsdp": 4, "expert": 1}
    assert checkpoint_mesh(cfg, devices=jax.devices()[:2]) is None  # the run's mesh does not fit: one device
    assert checkpoint_mesh(cfg, MeshConfig(data=1, fsdp=2)).shape == {"data": 1, "fsdp": 2, "expert": 1}
    assert checkpoint_mesh(cfg, MeshConfig(fsdp=1)) is None
    assert checkpoint_mesh(config(cache_dir, {"data": 8})) is None  # parameters never split: one device
    with pytest.raises(ConfigError, match=r"^mesh data 4 x fsdp 4 needs 16 devices, but this process has 8$"):
        checkpoint_mesh(cfg, MeshConfig(data=4, fsdp=4))
    with pytest.raises(ConfigError, match=r"^mesh fsdp 16 needs 16 devices, but this process has 8$"):
        run_ptq_sweep(fsdp_run, make_spec(methods=["rtn"], bits=[4], mesh={"fsdp": 16}), **QUIET)
    assert main(["ptq", str(fsdp_run), "--methods", "rtn", "--bits", "4", "--mesh", "fsdp=16"]) == 2  # a config error (exit 2)
    assert main(["ptq", str(fsdp_run), "--methods", "rtn", "--bits", "4", "--mesh", "tensor=2"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: mesh fsdp 16 needs 16 devices, but this process has 8",
                   "error: invalid PTQ request: mesh: unknown mesh axis 'tensor' (axes: data, fsdp, expert)"]
    assert not (fsdp_run / "ptq.csv").exists()
