"""Config validation: every bad input fails before compilation with a message naming the field."""

import pytest

from efftrain.config import (ConfigError, apply_override, config_diff, from_dict, list_presets, load_config,
                             resume_blocking_diff)

OK = {"train": {"max_steps": 10}}


def merged(**overrides):
    raw = {"train": {"max_steps": 10}}
    for k, v in overrides.items():
        raw = apply_override(raw, f"{k.replace('__', '.')}={v}")
    return raw


BAD_CASES = [
    (merged(model__d_modle=3), "model.d_modle: unknown key"),
    (merged(train__batch_size="'many'"), "train.batch_size"),
    (merged(train__batch_size=0), "train.batch_size"),
    (merged(model__d_model=100, model__n_heads=3), "divisible by model.n_heads"),
    (merged(model__n_kv_heads=3), "model.n_kv_heads"),
    (merged(model__moe__enabled="true", model__moe__top_k=9), "model.moe.top_k (9) exceeds"),
    (merged(model__moe__enabled="true", model__moe__num_routed_experts=0), "num_routed_experts is 0"),
    (merged(model__attention="mla", model__mla__kv_lora_rank=1000), "model.mla.kv_lora_rank (1000) exceeds"),
    (merged(model__attention="mla", model__mla__qk_rope_head_dim=15), "qk_rope_head_dim (15) must be even"),
    (merged(model__mtp__depth=300), "model.mtp.depth (300) must be smaller than data.seq_len"),
    (merged(model__attention="gqa"), "model.attention"),
    (merged(fp8__fmt="e9m9"), "fp8.fmt 'e9m9' is not a known format"),
    (merged(fp8__accum_bits=30), "fp8.accum_bits (30)"),
    (merged(fp8__promote_every=48), "fp8.promote_every (48)"),
    (merged(data__source="files"), "data.source=files needs data.paths"),
    (merged(train__batch_size=10, train__grad_accum=3), "divisible by train.grad_accum"),
    ({"train": {}}, "set one of train.max_tokens or train.max_steps"),
    (merged(checkpoint__log_start=100), "must be set together"),
    (merged(optim__schedule="exponential"), "optim.schedule"),
]


@pytest.mark.parametrize("raw,message", BAD_CASES)
def test_bad_config_names_the_field(raw, message):
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert message in str(err.value)


def test_every_preset_loads_and_validates():
    names = list_presets()
    assert {"dense-tiny", "mla-tiny", "moe-tiny", "mtp-tiny", "deepseek-tiny", "fp8-tiny"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_preset_inheritance_and_overrides():
    cfg = load_config("deepseek-tiny", ["train.batch_size=32", "model.d_model=256", "optim.lr=1e-3"])
    assert cfg.model.attention == "mla" and cfg.model.moe.enabled and cfg.model.mtp.depth == 1
    assert cfg.train.batch_size == 32 and cfg.model.d_model == 256 and cfg.optim.lr == 1e-3
    assert cfg.data.seq_len == 128  # inherited from dense-tiny


def test_unknown_preset_and_bad_override():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config("dense-tiny", ["train.batch_size"])
    with pytest.raises(ConfigError, match="train.batchsize: unknown key"):
        load_config("dense-tiny", ["train.batchsize=3"])


def test_resume_diff_allows_logging_but_not_architecture():
    a = from_dict(OK)
    b = from_dict({**OK, "logging": {"progress": False}, "train": {"max_steps": 10, "eval_every": 7}})
    assert config_diff(a, b) and not resume_blocking_diff(a, b)
    c = from_dict({**OK, "model": {"d_model": 512}})
    assert [d[0] for d in resume_blocking_diff(a, c)] == ["model.d_model"]


def test_hash_is_stable_and_sensitive():
    assert from_dict(OK).hash() == from_dict(OK).hash()
    assert from_dict(OK).hash() != from_dict({"train": {"max_steps": 11}}).hash()


def test_overriding_training_length_replaces_the_presets_other_length():
    assert load_config("dense-tiny", ["train.max_steps=7"]).train.max_steps == 7
    cfg = load_config("dense-tiny", ["train.max_steps=7", "train.max_tokens=4096"])
    assert cfg.train.max_tokens == 4096 and cfg.train.max_steps is None
