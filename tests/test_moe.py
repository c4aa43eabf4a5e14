"""DeepSeekMoE (efftrain/model/moe.py): routing, dispatch paths, balancing, aux losses, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efftrain.config import ModelConfig, MoEConfig
from efftrain.model.layers import MLP
from efftrain.model.moe import (
    MoE,
    RouterBias,
    bias_update,
    capacity_dispatch,
    capacity_of,
    combine_rows,
    dispatch_rows,
    tile_dispatch,
    tile_matmul,
    moe_modules,
    update_router_bias,
)

D, E, H, K = 32, 8, 16, 2


def make_cfg(d_model=D, **moe) -> ModelConfig:
    base = dict(enabled=True, num_routed_experts=E, num_shared_experts=1, top_k=K, expert_hidden=H,
                first_dense_layers=0)
    base.update(moe)
    return ModelConfig(d_model=d_model, n_layers=2, n_heads=2, vocab_size=64, compute_dtype="float32",
                       param_dtype="float32", moe=MoEConfig(**base))


def make_moe(seed=0, impl=None, tile_rows=None, **moe) -> MoE:
    return MoE(make_cfg(**moe), rngs=nnx.Rngs(seed), dropless_impl=impl, tile_rows=tile_rows)


@nnx.jit
def fwd(m: MoE, x):
    """m(x) compiled once per configuration (eager op-by-op dispatch is slow on CPU)."""
    return m(x)


@nnx.jit
def route(m: MoE, x2d):
    return m.route(x2d)


def inputs(seed=1, shape=(2, 64, D), offset=0.0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) + offset


def skew_router(m: MoE, strength=0.3, expert=0):
    """Tilt expert `expert`'s centroid towards the all-ones direction (inputs get a positive offset)."""
    m.router.kernel[...] = m.router.kernel[...].at[:, expert].add(strength)


def dense_gates(routing, n_experts=E):
    n = routing.expert_idx.shape[0]
    g = np.zeros((n, n_experts))
    np.put_along_axis(g, np.asarray(routing.expert_idx), np.asarray(routing.gates), axis=1)
    return g


# ----------------------------------------------------------------------------------------------
# float64 brute-force reference: loop over tokens in order, then over the selected experts
# ----------------------------------------------------------------------------------------------
def _silu(z):
    return z / (1.0 + np.exp(-z))


def reference(m: MoE, x, capacity: int | None = None):
    """Returns (y [B,T,D], dropped assignments, loads [E]) computed in numpy float64."""
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    xs = f64(x).reshape(-1, m.d_model)
    logits = xs @ f64(m.router.kernel[...])
    if m.score_func == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-logits))
    else:
        z = np.exp(logits - logits.max(-1, keepdims=True))
        s = z / z.sum(-1, keepdims=True)
    b = f64(m.router.bias[...]) if m.router.bias is not None else np.zeros(m.n_experts)
    wg, wu, wd = f64(m.w_gate[...]), f64(m.w_up[...]), f64(m.w_down[...])
    used = np.zeros(m.n_experts, int)
    counts = np.zeros(m.n_experts)
    dropped = 0
    y = np.zeros_like(xs)
    for n in range(xs.shape[0]):
        sel = np.argsort(-(s[n] + b), kind="stable")[: m.top_k]
        g = s[n, sel] / (s[n, sel].sum() if m.normalize_gates else 1.0) * m.routed_scaling
        for gi, e in zip(g, sel):
            counts[e] += 1
            if capacity is not None and used[e] >= capacity:
                dropped += 1
                continue
            used[e] += 1
            y[n] += gi * ((_silu(xs[n] @ wg[e]) * (xs[n] @ wu[e])) @ wd[e])
    if m.shared is not None:
        sh = m.shared
        k = lambda lin: f64(lin.kernel[...])  # noqa: E731
        y += (_silu(xs @ k(sh.gate)) * (xs @ k(sh.up))) @ k(sh.down)
    return y.reshape(np.shape(x)), dropped, counts / counts.sum()


# ----------------------------------------------------------------------------------------------
# routing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_top_k_respected_and_gates_sum_to_scaling(score_func):
    m = make_moe(score_func=score_func, routed_scaling=2.5, top_k=3)
    r = route(m, inputs().reshape(-1, D))
    g = dense_gates(r)
    assert ((g != 0).sum(axis=1) == 3).all()  # exactly K experts per token, all distinct
    np.testing.assert_allclose(g.sum(axis=1), 2.5, rtol=1e-6)
    # the selected experts are the top-3 affinities (no bias here)
    top = np.sort(np.argsort(-np.asarray(r.scores), axis=1)[:, :3], axis=1)
    np.testing.assert_array_equal(np.sort(np.asarray(r.expert_idx), axis=1), top)


def test_unnormalized_gates_are_raw_affinities():
    m = make_moe(normalize_gates=False, routed_scaling=2.0, score_func="softmax")
    r = route(m, inputs().reshape(-1, D))
    np.testing.assert_allclose(r.gates, 2.0 * np.take_along_axis(np.asarray(r.scores), r.expert_idx, 1),
                               rtol=1e-6)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_single_expert_top1_equals_dense_swiglu(dispatch):
    m = make_moe(num_routed_experts=1, top_k=1, num_shared_experts=0, normalize_gates=True,
                 dispatch=dispatch, capacity_factor=1.0)
    mlp = MLP(D, H, cfg=make_cfg(num_routed_experts=1, top_k=1), rngs=nnx.Rngs(5))
    mlp.gate.kernel[...] = m.w_gate[...][0]
    mlp.up.kernel[...] = m.w_up[...][0]
    mlp.down.kernel[...] = m.w_down[...][0]
    x = inputs()
    y, stats = fwd(m, x)
    np.testing.assert_allclose(y, nnx.jit(lambda f, v: f(v))(mlp, x), rtol=1e-5, atol=1e-6)
    assert float(stats["dropped_frac"]) == 0.0 and float(stats["max_vio"]) == 1.0


@pytest.mark.parametrize("score_func,normalize,scaling,dispatch", [
    ("sigmoid", True, 1.0, "dropless"),
    ("softmax", False, 2.0, "dropless"),
    ("sigmoid", True, 2.5, "capacity"),
    ("softmax", True, 1.0, "capacity"),
])
def test_matches_bruteforce_reference(score_func, normalize, scaling, dispatch):
    m = make_moe(score_func=score_func, normalize_gates=normalize, routed_scaling=scaling,
                 dispatch=dispatch, capacity_factor=float(E))
    m.router.bias[...] = jax.random.normal(jax.random.key(3), (E,)) * 0.05  # bias in the selection too
    m.router.kernel[...] = m.router.kernel[...] * 20.0  # spread the affinities
    x = inputs()
    y, stats = fwd(m, x)
    y_ref, dropped, load = reference(m, x)
    assert dropped == 0
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["load"], load, atol=1e-7)
    np.testing.assert_allclose(stats["max_vio"], load.max() * E, rtol=1e-6)


def test_dropless_paths_equal_capacity_when_ample():
    x = inputs(shape=(2, 96, D))
    ref = make_moe(dispatch="capacity", capacity_factor=float(E))
    skew_router(ref, 0.05)  # unequal loads, so the tile padding differs per expert
    _, ref_state = nnx.split(ref)

    def run(m):
        nnx.update(m, ref_state)
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(p):
            y, st = nnx.merge(graphdef, p, rest)(x)
            return jnp.sum(y * jnp.cos(y)) + st["aux_loss"], (y, st)

        (_, (y, st)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return y, st, g

    y0, st0, g0 = run(ref)
    assert float(st0["dropped_frac"]) == 0.0
    for impl, tile in [("tiles", None), ("tiles", 64), ("ragged", None)]:
        y, st, g = run(make_moe(dispatch="dropless", impl=impl, tile_rows=tile))
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-6, err_msg=f"{impl}/{tile}")
        for key in st0:
            np.testing.assert_allclose(st[key], st0[key], rtol=1e-6, atol=1e-7, err_msg=key)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g, g0)


def test_capacity_drops_match_bruteforce():
    m = make_moe(dispatch="capacity", capacity_factor=0.75)
    skew_router(m, 0.3)
    x = inputs(offset=0.5)
    y, stats = fwd(m, x)
    n_tokens = x.shape[0] * x.shape[1]
    C = capacity_of(n_tokens, K, E, 0.75)
    assert C == int(np.ceil(0.75 * n_tokens * K / E))
    y_ref, dropped, _ = reference(m, x, capacity=C)
    assert dropped > 0
    np.testing.assert_allclose(stats["dropped_frac"], dropped / (n_tokens * K), rtol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-6)  # earliest tokens keep their slots


# ----------------------------------------------------------------------------------------------
# aux-loss-free bias
# ----------------------------------------------------------------------------------------------
def test_bias_changes_selection_not_gates():
    m = make_moe()
    m.router.kernel[...] = m.router.kernel[...] * 20.0
    x = inputs()
    x2d = x.reshape(-1, D)
    r0 = route(m, x2d)
    y0, _ = fwd(m, x)

    # a constant bias changes no selection: identical routing and output
    m.router.bias[...] = jnp.full((E,), 0.7)
    r1 = route(m, x2d)
    np.testing.assert_array_equal(r1.expert_idx, r0.expert_idx)
    np.testing.assert_array_equal(r1.gates, r0.gates)
    np.testing.assert_array_equal(fwd(m, x)[0], y0)

    # a large bias on one expert puts it in every token's selection, gated by its raw affinity
    m.router.bias[...] = jnp.zeros((E,)).at[5].set(10.0)
    r2 = route(m, x2d)
    assert (np.asarray(r2.expert_idx) == 5).any(axis=1).all()
    assert not (np.asarray(r0.expert_idx) == 5).any(axis=1).all()
    s = np.asarray(r2.scores)
    sel_s = np.take_along_axis(s, np.asarray(r2.expert_idx), axis=1)
    np.testing.assert_allclose(r2.gates, sel_s / sel_s.sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(r2.scores, r0.scores)  # the bias never enters the affinities


def test_bias_update_rule():
    b = jnp.zeros((4,))
    load = jnp.array([0.4, 0.1, 0.25, 0.25])
    new = bias_update(b, load, 0.01)
    # overloaded expert 0 goes down, underloaded 1 up, balanced ones only shift with the mean
    np.testing.assert_allclose(new, np.array([-0.01, 0.01, 0.0, 0.0]), atol=1e-8)
    new = bias_update(jnp.array([1.0, 2.0, 3.0, 6.0]), load, 0.5)
    np.testing.assert_allclose(new, np.array([0.5, 2.5, 3.0, 6.0]) - 3.0, atol=1e-6)
    assert abs(float(jnp.mean(new))) < 1e-6


def test_aux_free_bias_update_balances_skewed_router():
    m = make_moe(seq_aux_loss_weight=0.0)
    # affinities must spread by more than a few gamma for sign updates to settle (scale 10 -> ~0.3)
    m.router.kernel[...] = m.router.kernel[...] * 10.0
    skew_router(m, 0.3)
    graphdef, state = nnx.split(m)

    @jax.jit
    def step(state, key):
        model = nnx.merge(graphdef, state)
        _, st = model(jax.random.normal(key, (4, 64, D)) + 0.5)
        update_router_bias(model, st["load"][None], 0.01)
        return nnx.state(model), st["max_vio"]

    @jax.jit
    def max_vio(state, key):
        return nnx.merge(graphdef, state)(jax.random.normal(key, (16, 64, D)) + 0.5)[1]["max_vio"]

    before = float(max_vio(state, jax.random.key(123)))
    for key in jax.random.split(jax.random.key(0), 200):
        state, _ = step(state, key)
    after = float(max_vio(state, jax.random.key(123)))
    bias = nnx.merge(graphdef, state).router.bias[...]
    assert before > 2.0, before
    assert after < 1.3, (before, after)
    assert abs(float(jnp.mean(bias))) < 1e-6
    assert float(bias[0]) < -0.1  # the favoured expert was pushed down


class _Stack(nnx.Module):
    def __init__(self, n):
        self.layers = nnx.List([make_moe(seed=i) for i in range(n)])


def test_update_router_bias_under_jit_on_merged_model():
    model = _Stack(11)  # > 10 layers: list order must be numeric, not lexicographic
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loads = jax.random.dirichlet(jax.random.key(0), jnp.ones(E), (11,))

    @jax.jit
    def step(params, rest, loads):
        mm = nnx.merge(graphdef, params, rest)
        update_router_bias(mm, loads, 0.01)
        _, p, r = nnx.split(mm, nnx.Param, ...)
        return p, r

    new_params, new_rest = step(params, rest, loads)
    updated = nnx.merge(graphdef, new_params, new_rest)
    for i, layer in enumerate(updated.layers):
        np.testing.assert_allclose(layer.router.bias[...], bias_update(jnp.zeros(E), loads[i], 0.01), atol=1e-8)
    jax.tree.map(np.testing.assert_array_equal, new_params, params)  # params untouched
    assert len(jax.tree.leaves(nnx.state(updated, RouterBias))) == 11
    with pytest.raises(ValueError, match="11 MoE layers"):
        update_router_bias(model, loads[:3], 0.01)


def test_transformer_stats_feed_update_router_bias():
    from efftrain.model.transformer import build_model

    cfg = make_cfg(first_dense_layers=1).model_copy(update={"n_layers": 3})
    model = build_model(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, tokens):
        mm = nnx.merge(graphdef, params, rest)
        out = mm(tokens)
        update_router_bias(mm, out.moe["load"], 0.01)
        return nnx.split(mm, nnx.Param, ...)[2], out.moe

    rest2, moe = step(params, rest, jax.random.randint(jax.random.key(0), (2, 16), 0, 64))
    assert moe["load"].shape == (2, E) and moe["aux_loss"].shape == (2,)
    biases = jax.tree.leaves(nnx.state(nnx.merge(graphdef, params, rest2), RouterBias))
    assert len(biases) == 2 and all(float(jnp.abs(b).sum()) > 0 for b in biases)

    # with MTP, its MoE blocks come after the main blocks: the order the train step concatenates stats
    from efftrain.config import MTPConfig

    with_mtp = build_model(cfg.model_copy(update={"mtp": MTPConfig(depth=2)}))
    paths = [p for p, _ in moe_modules(with_mtp)]
    assert [p[:2] for p in paths] == [("blocks", 1), ("blocks", 2), ("mtp", "layers"), ("mtp", "layers")]
    assert [p[2] for p in paths[2:]] == [0, 1]


# ----------------------------------------------------------------------------------------------
# aux losses
# ----------------------------------------------------------------------------------------------
def test_sequence_aux_loss_hand_computed():
    e, k, d = 4, 2, 8
    m = MoE(make_cfg(d_model=d, num_routed_experts=e, top_k=k, seq_aux_loss_weight=1.0,
                     switch_aux_loss_weight=0.0, aux_free_bias=False), rngs=nnx.Rngs(0))
    m.router.kernel[...] = jnp.eye(d, e)  # logits = first 4 input features
    logits = np.array([[[2.0, 1.0, 0.0, -1.0], [0.5, 3.0, 1.0, 0.0], [1.0, 0.0, 2.0, 0.2]],
                       [[0.0, 0.0, 1.0, 2.0], [1.5, -1.0, 0.0, 1.0], [0.3, 0.2, 0.1, 0.0]]])
    x = jnp.concatenate([jnp.asarray(logits, jnp.float32), jnp.ones((2, 3, d - e))], axis=-1)
    _, stats = fwd(m, x)
    total = 0.0
    for b in range(2):
        s = 1 / (1 + np.exp(-logits[b]))  # [T, E]
        f = np.zeros(e)
        for t in range(3):
            for i in np.argsort(-s[t])[:k]:
                f[i] += e / (k * 3)
        p = (s / s.sum(1, keepdims=True)).mean(0)
        total += (f * p).sum() / 2
    np.testing.assert_allclose(stats["aux_loss"], total, rtol=1e-6)

    # uniform affinities give exactly 1 (Σ_i f_i = E, P_i = 1/E)
    _, stats = fwd(m, jnp.zeros((2, 3, d)))
    np.testing.assert_allclose(stats["aux_loss"], 1.0, rtol=1e-6)

    # the Switch loss alone: E · Σ load_i · mean softmax_i
    m.seq_aux_weight, m.switch_aux_weight = 0.0, 1.0
    _, stats = fwd(m, x)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(stats["aux_loss"], e * (np.asarray(stats["load"]) * p.reshape(-1, e).mean(0)).sum(),
                               rtol=1e-6)


def test_stats_shapes_entropy_and_bias_norm():
    m = make_moe()
    m.router.bias[...] = jnp.array([3.0, -4.0] + [0.0] * (E - 2))
    _, st = fwd(m, inputs())
    assert set(st) == {"load", "max_vio", "dropped_frac", "router_entropy", "aux_loss", "bias_norm"}
    assert all(v.dtype == jnp.float32 for v in st.values())
    np.testing.assert_allclose(float(jnp.sum(st["load"])), 1.0, rtol=1e-6)
    np.testing.assert_allclose(st["bias_norm"], 5.0, rtol=1e-6)
    # near-zero router weights -> near-uniform affinities -> entropy ~ log E
    m.router.kernel[...] = m.router.kernel[...] * 1e-4
    np.testing.assert_allclose(fwd(m, inputs())[1]["router_entropy"], np.log(E), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
def _plain_dispatch(x, slot_assign, k):
    xp = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    return xp[jnp.minimum(slot_assign // k, x.shape[0])]


def _plain_combine(out, gates, assign_slot, k):
    op = jnp.concatenate([out, jnp.zeros((1, out.shape[1]), out.dtype)])
    rows = op[jnp.minimum(assign_slot, out.shape[0])].reshape(gates.shape[0], k, -1)
    return jnp.einsum("nkd,nk->nd", rows, gates)


@pytest.mark.parametrize("layout", ["capacity_with_drops", "tiles"])
def test_gather_only_vjps_match_autodiff(layout):
    n, d = 40, 6
    kx, kg, ke, kw = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (n, d))
    gates = jax.random.uniform(kg, (n, K))
    expert = jnp.argsort(jax.random.uniform(ke, (n, E)), axis=1)[:, :K].reshape(-1).astype(jnp.int32)
    disp = capacity_dispatch(expert, E, 6) if layout.startswith("capacity") else tile_dispatch(expert, E, 4)
    if layout.startswith("capacity"):
        assert int((disp.assign_slot >= E * 6).sum()) > 0
    w = jax.random.normal(kw, (d, d))

    def f(x, gates, dispatch, combine):
        buf = dispatch(x)
        return jnp.sum(jnp.tanh(combine(jnp.tanh(buf @ w), gates)) ** 2)

    ours = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=(2, 3))(
        x, gates, lambda x: dispatch_rows(x, disp.slot_assign, disp.assign_slot, K),
        lambda o, g: combine_rows(o, g, disp.slot_assign, disp.assign_slot, K))
    plain = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=(2, 3))(
        x, gates, lambda x: _plain_dispatch(x, disp.slot_assign, K),
        lambda o, g: _plain_combine(o, g, disp.assign_slot, K))
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_sum", ["onehot", "scatter"])
def test_tile_matmul_vjp_matches_autodiff(grad_sum, monkeypatch):
    import efftrain.model.dispatch as dispatch_mod

    monkeypatch.setattr(dispatch_mod, "TILE_WEIGHT_GRAD_SUM", grad_sum)
    ka, kw, kr = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, (7, 4, 5))
    w = jax.random.normal(kw, (E, 5, 3))
    group_expert = jnp.array([0, 0, 2, 3, 3, 3, 7], jnp.int32)  # sorted, experts 1/4/5/6 unused
    r = jax.random.normal(kr, (7, 4, 3))
    ours = jax.grad(lambda a, w: jnp.sum(tile_matmul(a, w, group_expert) * r), argnums=(0, 1))(a, w)
    plain = jax.grad(lambda a, w: jnp.sum(jnp.einsum("grk,gkn->grn", a, w[group_expert]) * r),
                     argnums=(0, 1))(a, w)
    for x, y in zip(ours, plain):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_take_tiles_vjp_matches_autodiff():
    from efftrain.model.moe import take_tiles

    w = jax.random.normal(jax.random.key(0), (E, 5, 3))
    group_expert = jnp.array([0, 0, 2, 3, 3, 3, 7], jnp.int32)  # sorted, experts 1/4/5/6 unused
    r = jax.random.normal(jax.random.key(1), (7, 5, 3))
    ours = jax.grad(lambda w: jnp.sum(take_tiles(w, group_expert, E) * r))(w)
    plain = jax.grad(lambda w: jnp.sum(w[group_expert] * r))(w)
    np.testing.assert_allclose(ours, plain, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(ours[1]).max()) == 0


def primitives_of(jaxpr, found=None) -> set[str]:
    """Names of every primitive in a jaxpr and its sub-jaxprs (jit bodies, custom-VJP rules, scans)."""
    import jax.extend as jex

    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, (jex.core.ClosedJaxpr, jex.core.Jaxpr)):
                    primitives_of(getattr(sub, "jaxpr", sub), found)
    return found


@pytest.mark.parametrize("dispatch,impl", [("capacity", None), ("dropless", "tiles"), ("dropless", "ragged")])
def test_grads_finite_and_router_learns_through_gates(dispatch, impl):
    m = make_moe(dispatch=dispatch, impl=impl, seq_aux_loss_weight=0.0, capacity_factor=1.0)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    x = inputs()

    def loss(p):
        y, st = nnx.merge(graphdef, p, rest)(x)
        return jnp.mean((y - 0.1) ** 2) + st["aux_loss"]  # aux_loss is 0: only the gates reach the router

    g = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(g)
    assert all(bool(jnp.isfinite(v).all()) for v in leaves)
    assert float(jnp.abs(g["router"]["kernel"][...]).max()) > 0
    for name in ("w_gate", "w_up", "w_down"):
        assert float(jnp.abs(g[name][...]).max()) > 0
    # with the sequence-wise loss on, it reaches the router too (and only the router)
    m2 = make_moe(dispatch=dispatch, impl=impl, seq_aux_loss_weight=1.0)
    gd2, p2, r2 = nnx.split(m2, nnx.Param, ...)
    g_aux = jax.jit(jax.grad(lambda p: nnx.merge(gd2, p, r2)(x)[1]["aux_loss"]))(p2)
    assert float(jnp.abs(g_aux["router"]["kernel"][...]).max()) > 0
    assert all(bool(jnp.isfinite(v).all()) for v in jax.tree.leaves(g_aux))
    assert float(jnp.abs(g_aux["w_up"][...]).max()) == 0


def test_fp8_expert_gemms_close_to_high_precision():
    """Simulated-FP8 expert GEMMs (tile path; the capacity path shares MoE._bmm) stay close to the fp32
    layer and give finite gradients; the router stays high precision unless fp8.router is set."""
    from efftrain.config import FP8Config

    fp8 = FP8Config(enabled=True, act_block=(1, 16), weight_block=(16, 16), k_step=16, promote_every=16)
    cfg = make_cfg(dispatch="dropless")
    m_fp8 = MoE(cfg, rngs=nnx.Rngs(0), fp8=fp8)
    m_ref = MoE(cfg, rngs=nnx.Rngs(0))
    assert m_fp8.router.fp8 is None and m_fp8.fp8 is not None  # router stays high precision by default
    x = inputs()
    y8, y = fwd(m_fp8, x)[0], fwd(m_ref, x)[0]
    rel = float(jnp.linalg.norm(y8 - y) / jnp.linalg.norm(y))
    assert 0 < rel < 0.1, rel
    graphdef, params, rest = nnx.split(m_fp8, nnx.Param, ...)
    grad = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x)[0] ** 2))
    g = jax.jit(grad)(params)
    assert all(bool(jnp.isfinite(v).all()) for v in jax.tree.leaves(g))
    # the tiles' expert weights are summed back without a scatter-add (deterministic, no bf16 atomics)
    from efftrain.model.layers import deterministic_gradients

    token = deterministic_gradients.set(True)
    try:
        assert "scatter-add" not in primitives_of(jax.make_jaxpr(grad)(params).jaxpr)
    finally:
        deterministic_gradients.reset(token)
