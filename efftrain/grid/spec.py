"""Grid specs: a YAML file that expands into cells, each a fully resolved and validated run config.

    name: qid_scaling                 # the grid's name (and the default runs dir: runs/<name>)
    base: dense-25m                   # preset name or config path (relative to this file)
    set: {optim.schedule: cosine}     # dotted overrides applied to every cell
    variants:                         # optional named override sets (one factor of the product)
      dense: {}
      moe: {model.moe.enabled: true}
    axes:                             # key -> list of values; the cells are the product ...
      optim.lr: [1.0e-3, 2.0e-3]
    zip:                              # ... times each zip group: values at one index go together
      - {model.d_model: [256, 384], train.batch_size: [32, 64]}
    checkpoint: {per_decade: 4}       # merged into every cell's checkpoint section
    ptq: {methods: [rtn, gptq], bits: [3, 4]}   # efftrain.quant.sweep.PTQSpec fields, incl. recovery:
      # recovery: [{method: lora, tokens: 65536, rank: 8}, {method: qat, tokens: 65536}]  (docs/RECOVERY.md)
    runs_dir: runs/qid_scaling        # default runs/<name>, relative to the working directory
    cooldown: [1.0e7, 4.0e7]          # WSD cooldown branches at these token counts, or `series` (below)
    cooldown_fraction: 0.2            # each branch decays linearly over this fraction of T more tokens
    average: {tokens: [...], count: 4, window: 0.1}   # checkpoint averaging (LAWA) at these tokens
    seeds: [0, 1, 2]                  # replicate runs: train.seed = data.shuffle_seed = s, or decoupled:
    init_seeds: [0, 1]                #   train.seed (weight init) ...
    data_seeds: [0, 1]                #   ... x data.shuffle_seed (data order), as PolyPythias does
    max_epochs: 10                    # refuse cells that repeat their train split more often (warn above 4)

Overrides apply in this order: base, `set`, `checkpoint`, the variant, the axes, the zip groups,
the replicate seeds.

Replicates. With `seeds` (or `init_seeds` / `data_seeds`), every cell of the product expands into one
run per seed that differs from its siblings only in `train.seed` and/or `data.shuffle_seed`. The same
seeds are used for every variant, so two variants' runs with one seed form a *pair*: comparisons are
paired by seed. The cell's `replicate` is its name without the seed (the label the report groups by);
its `seed` / `data_seed` are the two seeds. Without these keys a cell has one run with the seeds of
its config, and its key is what it was before seeds existed.
Setting train.max_steps drops train.max_tokens inherited from the base, and vice versa.

Every cell is keyed by the first 12 hex digits of `Config.hash()` of its resolved config (whose
`name` is the grid's name), so a cell's key, and with it its run directory runs_dir/<key>, only
changes when its config does; renaming an axis label or reordering the spec keeps every result.

Cooldown branches (Hägele et al. 2024; Catalan-Tatjer et al. 2025). For a cell whose schedule is
`wsd` (or `constant`) and a spec with `cooldown: [T, ...]` (or `cooldown: series`: every point of
the cell's checkpoint series after the warmup), the cell's own run is trained with the
stable learning rate only (schedule `constant`: the WSD schedule before its decay), and T is added
to its checkpoint series. Each T gives a derived *branch* cell: it starts from the stable run's
series checkpoint at T (parameters, optimizer state, data-iterator position) and trains
C = round(cooldown_fraction * S) more steps (S = the checkpoint's step) with schedule `wsd`,
`decay_fraction` = C / (S + C) and `max_steps` = S + C: the learning rate is exactly the stable
run's up to step S, then decays linearly to lr * min_lr_ratio. Its only series checkpoint is its
last step. Nothing in the trainer changes: the branch is an ordinary run resumed from a copied
checkpoint with a longer schedule. With `cooldown`, every main cell (cosine ones included) also
checkpoints at the token counts where the branches end, so cosine, stable and cooled-down models
are compared at equal tokens.

Checkpoint averaging (LAWA; Kaddour 2022, Sanyal et al. 2023): for every non-branch cell and each
T in `average.tokens` (default: the cooldown tokens; `series`: every series point), `count`
checkpoints evenly spaced over the last `window` fraction of the tokens up to T are added to the
cell's series, and a derived *average* cell holds one checkpoint whose parameters are their mean (everything else from the
checkpoint at T). The window's other checkpoints are saved for this, but not PTQ-swept. A point beyond a
cell's training (e.g. a shorter cosine budget beside the WSD run) gives that cell no average.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from efftrain.config import (PRESET_DIR, Config, ConfigError, deep_merge, from_dict, list_presets, load_raw,
                             set_dotted, yaml_load)
from efftrain.quant.sweep import PTQSpec, row_formats
from efftrain.train.series import series_points, target_tokens


class GridError(ConfigError):
    """A grid problem (spec, results, fit request); the message names the file and the field.

    A ConfigError (so a ValueError): the CLI reports it as a one-line `error:` like a bad config."""


WARN_EPOCHS = 4.0  # preflight warns when a cell repeats its training data more often than this
DEFAULT_MAX_EPOCHS = 10.0  # ... and refuses above the spec's max_epochs (this by default)

MAIN, COOLDOWN, AVERAGE = "main", "cooldown", "average"


# ----------------------------------------------------------------------------------------------
# Data model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One run of the grid: its resolved config, a readable name and its key (= run dir name)."""

    key: str
    name: str
    config: Config
    run_dir: Path
    kind: str = MAIN  # main | cooldown | average
    values: dict[str, Any] = field(default_factory=dict)  # the varying values that define the cell
    schedule: str = ""  # cosine | constant | wsd-stable | wsd-cooldown | <parent>+avg ...
    parent: str | None = None  # key of the run a derived cell starts from
    branch_tokens: int | None = None  # T of a cooldown / average cell
    branch_step: int | None = None  # the parent's series step at T
    average_steps: tuple[int, ...] = ()  # the parent's steps whose parameters are averaged
    ptq_steps: tuple[int, ...] | None = None  # main cells: the series steps to quantize (None = all)
    replicate: str = ""  # the name without the seed: replicates of one cell share it
    seed: int = 0  # train.seed (weight init, dropout-free models: init only)
    data_seed: int = 0  # data.shuffle_seed (the order of training windows)

    @property
    def family(self) -> str:
        return self.parent or self.key


SERIES = "series"


@dataclass(frozen=True)
class AverageSpec:
    tokens: tuple[int, ...] | str  # token counts, or "series"
    count: int = 4
    window: float = 0.1


@dataclass
class GridSpec:
    name: str
    path: Path
    base: str
    set: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    axes: dict[str, list]
    zip: list[dict[str, list]]
    checkpoint: dict[str, Any]
    ptq: Any  # efftrain.quant.sweep.PTQSpec
    runs_dir: Path
    cooldown: tuple[int, ...] | str = ()  # token counts, or "series": every series point of the cell
    cooldown_fraction: float = 0.2
    average: AverageSpec | None = None
    description: str = ""
    replicates: tuple[tuple[int, int], ...] = ()  # (init seed, data seed) per replicate; () = the config's
    max_epochs: float = DEFAULT_MAX_EPOCHS
    _cells: list[Cell] | None = field(default=None, repr=False)

    @property
    def db_path(self) -> Path:
        return self.runs_dir / "results.sqlite"

    def cells(self) -> list[Cell]:
        if self._cells is None:
            self._cells = expand(self)
        return self._cells

    def cell(self, key: str) -> Cell:
        matches = [c for c in self.cells() if c.key == key] or \
            [c for c in self.cells() if len(key) >= 4 and c.key.startswith(key)]
        if len(matches) == 1:
            return matches[0]
        raise GridError(f"{self.path}: no cell with key '{key}' (keys: {', '.join(c.key for c in self.cells())})")

    def families(self) -> dict[str, list[Cell]]:
        """Main cells with their derived cells (parent first): the unit a worker runs."""
        out: dict[str, list[Cell]] = {}
        for c in self.cells():
            out.setdefault(c.family, []).append(c)
        return out

    def ptq_for(self, cell: Cell):
        """The PTQ spec of a cell. Derived cells hold one checkpoint, swept whatever `checkpoints` says;
        main cells skip the checkpoints that exist only to be averaged, and a list of steps applies
        to the cells whose series has them."""
        if cell.kind != MAIN:
            return self.ptq if self.ptq.checkpoints == "all" else self.ptq.model_copy(update={"checkpoints": "all"})
        if cell.ptq_steps is None and self.ptq.checkpoints == "all":
            return self.ptq
        steps = cell.ptq_steps if cell.ptq_steps is not None else tuple(expected_checkpoints(cell))
        if self.ptq.checkpoints != "all":
            steps = tuple(s for s in steps if s in set(self.ptq.checkpoints))
        return self.ptq.model_copy(update={"checkpoints": list(steps)})


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _fail(path: Path, msg: str) -> GridError:
    return GridError(f"grid spec {path}: {msg}")


def _dotted_key(key: str) -> str:
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"invalid key {key!r} (expected a dotted config key like model.d_model)")
    return key


def _variant_name(name: str) -> str:
    if not name or "," in name:
        raise ValueError(f"invalid variant name {name!r}")
    return name


def _grid_name(name: str) -> str:
    if not name.strip() or "/" in name:
        raise ValueError(f"must be a non-empty string without '/', got {name!r}")
    return name


def _unique_seeds(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"lists a seed twice: {seeds}")
    return seeds


DottedKey = Annotated[str, AfterValidator(_dotted_key)]
Overrides = dict[DottedKey, Any]
Values = Annotated[list[Any], Field(min_length=1)]
Tokens = Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)]
Seeds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), AfterValidator(_unique_seeds)]


def _must(rule: str, default: Any = ..., **constraints):
    """A spec field whose description is the rule its error message states ("'x' must be <rule>")."""
    return Field(default, description=rule, **constraints)


class _Average(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tokens: Literal["series"] | Tokens | None = _must("`series` or a non-empty list of positive token counts", None)
    count: int = _must("an integer >= 2", 4, ge=2)
    window: float = _must("a number in (0, 1)", 0.1, gt=0, lt=1)


class _Spec(BaseModel):
    """The YAML of a grid spec, typed (pydantic, strict, like efftrain.config); `load_spec` turns it
    into a GridSpec. Field meanings: the module docstring; descriptions: what an error says."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, AfterValidator(_grid_name)] = _must("a non-empty string without '/'")
    description: str = _must("a string", "")
    base: str = _must("a preset name or a config path", min_length=1)
    set: Overrides = _must("a mapping of dotted config keys to values", {})
    variants: dict[Annotated[str, AfterValidator(_variant_name)], Overrides] = _must(
        "a mapping of variant name -> {dotted key: value}", {})
    axes: dict[DottedKey, Values] = _must("a mapping of dotted config keys to non-empty lists of values", {})
    zip: list[Annotated[dict[DottedKey, Values], Field(min_length=1)]] = _must(
        "a list of mappings key -> list of values (of equal length)", [])
    checkpoint: dict[str, Any] = _must("a mapping merged into the config's checkpoint section", {})
    ptq: dict[str, Any] = _must("a mapping of PTQ settings", {})
    runs_dir: str | None = _must("a path", None, min_length=1)
    cooldown: Literal["series"] | Tokens | None = _must("`series` or a non-empty list of positive token counts", None)
    cooldown_fraction: float = _must("a number in (0, 1]", 0.2, gt=0, le=1)
    average: _Average | None = _must("a mapping with tokens, count, window", None)
    seeds: Seeds | None = _must("a non-empty list of non-negative integers", None)
    init_seeds: Seeds | None = _must("a non-empty list of non-negative integers", None)
    data_seeds: Seeds | None = _must("a non-empty list of non-negative integers", None)
    max_epochs: float = _must("a positive number", DEFAULT_MAX_EPOCHS, gt=0)

    @field_validator("zip", mode="before")
    @classmethod
    def _one_group(cls, value):
        return [value] if isinstance(value, dict) else value


TOP_LEVEL_KEYS = tuple(_Spec.model_fields)
AVERAGE_KEYS = tuple(_Average.model_fields)
RULES = {**{k: f.description for k, f in _Spec.model_fields.items()},
         **{f"average.{k}": f.description for k, f in _Average.model_fields.items()},
         "axes.*": "a non-empty list of values", "zip.*": "a non-empty list of values",
         "zip[]": "a non-empty mapping of dotted config keys to lists of values"}


def _where(loc: tuple) -> str:
    """The spec field an error location points at: 'axes.optim.lr', 'zip[0].model.d_model', 'seeds'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            if out == "zip":
                out += f"[{part}]"
            continue
        if "[" in part or part in ("function-after", "literal"):  # pydantic's tags of union members
            continue
        out = f"{out}.{part}" if out else part
    return out


def _problems(raw: dict, err: ValidationError) -> list[str]:
    unknown = [e["loc"][0] for e in err.errors() if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    if unknown:
        return [f"unknown top-level key(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(TOP_LEVEL_KEYS)})"]
    problems: dict[str, str] = {}
    for e in err.errors():
        where = _where(e["loc"])
        if where in problems:
            continue
        if e["type"] == "missing":
            problems[where] = f"'{where}' is required" + (" (a preset name or a config path)" if where == "base" else "")
        elif e["type"] == "extra_forbidden":
            parent = where.rpartition(".")[0]
            problems[where] = f"unknown key(s) [{where.rpartition('.')[2]!r}] in '{parent}'" + \
                (f" (allowed: {', '.join(AVERAGE_KEYS)})" if parent == "average" else "")
        elif e["type"] == "value_error":  # our validators' messages: "must be ...", "lists ...", "invalid ..."
            msg = e["msg"].removeprefix("Value error, ")
            problems[where] = f"'{where}' {msg}" if msg.startswith(("must", "lists")) \
                else f"'{where.split('.')[0].split('[')[0]}': {msg}"
        else:
            top = where.split(".")[0]
            key = where if where in RULES else "zip[]" if top.startswith("zip[") and "." not in where \
                else f"{top.split('[')[0]}.*"
            rule = RULES.get(key, RULES.get(top)) or e["msg"]
            problems[where] = f"'{where}' must be {rule}, got {_value_at(raw, e['loc'])!r}"
    return list(problems.values())


def _value_at(raw: dict, loc: tuple):
    """The raw value an error location points at (list items of a field report the whole list)."""
    value = raw
    for part in loc:
        if isinstance(part, int) and isinstance(value, list) and part < len(value) and loc[0] == "zip":
            value = value[part]
        elif isinstance(part, str) and isinstance(value, dict) and part in value:
            value = value[part]
        else:
            break
    return value


def _check_zip(path: Path, zips: list[dict[str, list]], axes: dict[str, list]) -> None:
    for i, group in enumerate(zips):
        lengths = {k: len(v) for k, v in group.items()}
        if len(set(lengths.values())) > 1:
            raise _fail(path, f"'zip[{i}]' lists have unequal lengths "
                              f"({', '.join(f'{k}: {n}' for k, n in lengths.items())})")
    seen: dict[str, str] = {}
    for where, keys in [("axes", axes)] + [(f"zip[{i}]", g) for i, g in enumerate(zips)]:
        for k in keys:
            if k in seen:
                raise _fail(path, f"key '{k}' varies in both {seen[k]} and {where}")
            seen[k] = where


def _tokens(value) -> tuple[int, ...] | str:
    return SERIES if value == SERIES else tuple(sorted({int(t) for t in value}))


def _resolve_base(path: Path, base: str) -> str:
    p = Path(base)
    if p.suffix in (".yaml", ".yml") or "/" in base:
        if not p.is_absolute():
            p = path.parent / p
        if not p.is_file():
            raise _fail(path, f"'base': config file not found: {p}")
        return str(p)
    if not (PRESET_DIR / f"{base}.yaml").is_file():
        raise _fail(path, f"'base': unknown preset '{base}' (presets: {', '.join(list_presets())})")
    return base


def _ptq_spec(path: Path, raw: dict):
    try:
        return PTQSpec.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append(f"ptq.{loc}: {msg}" if loc else f"ptq: {msg}")
        raise _fail(path, "; ".join(problems)) from None


def load_spec(path: str | Path, *, set_overrides: dict[str, Any] | None = None,
              runs_dir: str | Path | None = None) -> GridSpec:
    """Read and check a grid spec. `set_overrides` are merged into its `set` (applied to every cell,
    e.g. data.cache_dir); `runs_dir` replaces the spec's. Cells are expanded (and validated) lazily
    by `GridSpec.cells()`; `expand_spec` does both at once."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid spec not found: {path}")
    try:
        raw = yaml_load(path.read_text())
    except Exception as e:  # yaml.YAMLError
        raise GridError(f"grid spec {path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise _fail(path, "expected a mapping at the top level")
    raw = {k: v for k, v in raw.items() if v is not None}  # a key left empty in YAML means its default
    try:
        spec = _Spec.model_validate(raw)
    except ValidationError as e:
        raise _fail(path, "; ".join(_problems(raw, e))) from None
    if spec.seeds is not None and (spec.init_seeds is not None or spec.data_seeds is not None):
        raise _fail(path, "'seeds' sets both seeds; use either it or 'init_seeds' / 'data_seeds'")
    _check_zip(path, spec.zip, spec.axes)
    cooldown = () if spec.cooldown is None else _tokens(spec.cooldown)
    average = None
    if spec.average is not None:
        tokens = cooldown if spec.average.tokens is None else _tokens(spec.average.tokens)
        if not tokens:
            raise _fail(path, "'average.tokens' is required when there is no 'cooldown' list")
        average = AverageSpec(tokens=tokens, count=spec.average.count, window=float(spec.average.window))
    if spec.seeds is not None:
        replicates = tuple((s, s) for s in spec.seeds)
    elif spec.init_seeds is None and spec.data_seeds is None:
        replicates = ()
    else:  # a missing one of the two keeps the config's seed, marked -1
        replicates = tuple(itertools.product(spec.init_seeds or [-1], spec.data_seeds or [-1]))
    return GridSpec(name=spec.name, path=path, base=_resolve_base(path, spec.base),
                    set={**spec.set, **(set_overrides or {})}, variants=spec.variants, axes=spec.axes,
                    zip=spec.zip, checkpoint=dict(spec.checkpoint), ptq=_ptq_spec(path, spec.ptq),
                    runs_dir=Path(runs_dir if runs_dir is not None else spec.runs_dir or f"runs/{spec.name}"),
                    cooldown=cooldown, cooldown_fraction=float(spec.cooldown_fraction), average=average,
                    description=spec.description, replicates=replicates, max_epochs=float(spec.max_epochs))


def expand_spec(path: str | Path, **kwargs) -> tuple[GridSpec, list[Cell]]:
    spec = load_spec(path, **kwargs)
    return spec, spec.cells()


# ----------------------------------------------------------------------------------------------
# Expansion
# ----------------------------------------------------------------------------------------------
def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1e4:
        v = int(v)
    if isinstance(v, int) and abs(v) >= 10_000:  # token counts: 6250000 -> 6.25M
        for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
            if abs(v) >= size and round(v / size, 3) * size == v:
                return f"{v / size:g}{unit}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Shortest dotted suffix of each key that is unique among `keys` (model.d_model -> d_model)."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if all(o == k or not (o == suffix or o.endswith("." + suffix)) for o in keys):
                out[k] = suffix
                break
        else:
            out[k] = k
    return out


def config_key(cfg: Config) -> str:
    return cfg.hash()[:12]


def _factors(spec: GridSpec) -> list[list[dict[str, Any]]]:
    """Each factor of the product: the list of its choices, each a {key: value} dict ("variant" for
    the named variants, dotted config keys for axes and zip groups)."""
    factors = []
    if spec.variants:
        factors.append([{"variant": vname} for vname in spec.variants])
    for k, values in spec.axes.items():
        factors.append([{k: v} for v in values])
    for group in spec.zip:
        n = len(next(iter(group.values())))
        factors.append([{k: vals[i] for k, vals in group.items()} for i in range(n)])
    return factors


def _varying_keys(factors) -> list[str]:
    """Keys that take more than one value across the grid (they name the cells)."""
    choices: dict[str, set] = {}
    for f in factors:
        for ov in f:
            for k, v in ov.items():
                choices.setdefault(k, set()).add(json.dumps(v, sort_keys=True, default=str))
    return [k for k, vals in choices.items() if len(vals) > 1]


def _resolve(spec: GridSpec, raw: dict, cell_name: str, overrides: dict[str, Any]) -> Config:
    try:
        return from_dict(raw)
    except ConfigError as e:
        named = ", ".join(f"{k}={format_value(v)}" for k, v in overrides.items()) or "(no overrides)"
        raise ConfigError(f"grid {spec.path}, cell '{cell_name}' ({named}): {e}") from None


def _series_step(cfg: Config, tokens: int) -> int:
    return max(1, round(tokens / cfg.tokens_per_step))


def _total_steps(cfg: Config) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, -(-cfg.train.max_tokens // cfg.tokens_per_step))


def _series_steps(cfg: Config) -> list[int]:
    return [p.step for p in series_points(cfg.checkpoint, cfg.tokens_per_step, _total_steps(cfg))[0]]


def average_points(cfg: Config, tokens: int, av: AverageSpec) -> list[int]:
    """Token counts (one per distinct step) averaged for checkpoint-averaging at `tokens`."""
    points = [round(tokens * (1 - av.window * j / (av.count - 1))) for j in range(av.count)]
    by_step = {}
    for t in points:
        by_step.setdefault(_series_step(cfg, t), t)
    return [by_step[s] for s in sorted(by_step)]


def expand(spec: GridSpec) -> list[Cell]:
    """All cells of the grid: main cells in product order, each followed by its derived cells."""
    try:
        base_raw = load_raw(spec.base)
    except ConfigError as e:
        raise _fail(spec.path, f"'base': {e}") from None
    common = dict(spec.set)
    raw0 = copy.deepcopy(base_raw)
    for k, v in common.items():
        raw0 = set_dotted(raw0, k, v)
    if spec.checkpoint:
        raw0["checkpoint"] = deep_merge(raw0.get("checkpoint") or {}, spec.checkpoint)

    factors = _factors(spec)
    varying = [k for k in _varying_keys(factors) if k != "variant"]
    shorts = short_keys(varying)
    cells: list[Cell] = []
    by_key: dict[str, str] = {}

    def add(cell: Cell):
        if cell.key in by_key:
            raise _fail(spec.path, f"cells '{by_key[cell.key]}' and '{cell.name}' resolve to the same config "
                                   f"(key {cell.key}); remove the duplicate")
        by_key[cell.key] = cell.name
        cells.append(cell)

    for combo in itertools.product(*factors) if factors else [()]:
        values: dict[str, Any] = {}
        for choice in combo:
            values.update(choice)
        variant = values.get("variant")
        parts = ([variant] if variant else []) + [f"{shorts[k]}={format_value(v)}" for k, v in values.items()
                                                  if k in shorts]
        replicate = ",".join(parts) or spec.name
        for init_seed, data_seed in spec.replicates or [(-1, -1)]:
            seeds = ({} if init_seed < 0 else {"train.seed": init_seed}) | \
                    ({} if data_seed < 0 else {"data.shuffle_seed": data_seed})
            for cell in _main_cells(spec, raw0, values, replicate, seeds):
                add(cell)
    return cells


def _seed_suffix(spec: GridSpec, cfg: Config) -> str:
    """',seed=S' (coupled seeds) or ',init=I,data=J' (decoupled); '' for a grid without replicates."""
    if not spec.replicates:
        return ""
    if all(i == d for i, d in spec.replicates):
        return f",seed={cfg.train.seed}"
    return f",init={cfg.train.seed},data={cfg.data.shuffle_seed}"


def _main_cells(spec: GridSpec, raw0: dict, values: dict[str, Any], replicate: str,
                seeds: dict[str, int]) -> list[Cell]:
    """One replicate of one product cell: its main cell followed by its derived cells."""
    variant = values.get("variant")
    overrides = {**spec.variants.get(variant, {}), **{k: v for k, v in values.items() if k != "variant"}, **seeds}
    raw = copy.deepcopy(raw0)
    for k, v in overrides.items():
        try:
            raw = set_dotted(raw, k, v)
        except ConfigError as e:
            raise ConfigError(f"grid {spec.path}, cell '{replicate}': {e}") from None
    raw["name"] = spec.name
    cfg = _resolve(spec, raw, replicate, overrides)
    cell_name = replicate + _seed_suffix(spec, cfg)
    cells: list[Cell] = []
    schedule = cfg.optim.schedule
    branch_at = cooldown_tokens(spec, cfg)
    branching = bool(branch_at) and schedule in ("wsd", "constant")
    average_at = [t for t in average_tokens(spec, cfg) if t <= _total_steps(cfg) * cfg.tokens_per_step]
    averaging = bool(average_at)
    ptq_steps = None
    if branch_at or averaging:  # add the branch / averaging points to the series
        extra = set(branch_at) if branching else set()
        extra.update(t for t in cooldown_end_tokens(spec, cfg) if t <= _total_steps(cfg) * cfg.tokens_per_step)
        extra.update(average_at)
        raw["checkpoint"] = {**raw.get("checkpoint", {}),
                             "tokens": sorted(set(raw.get("checkpoint", {}).get("tokens", [])) | extra)}
        if averaging:  # the averaging windows' other checkpoints are saved, not quantized
            ptq_steps = tuple(_series_steps(_resolve(spec, raw, cell_name, overrides)))
            raw["checkpoint"]["tokens"] = sorted(set(raw["checkpoint"]["tokens"]) | {
                p for t in average_at for p in average_points(cfg, t, spec.average)})
        if branching and schedule == "wsd":
            raw = set_dotted(raw, "optim.schedule", "constant")
        cfg = _resolve(spec, raw, cell_name, overrides)
    label = {"wsd": "wsd-stable"}.get(schedule, schedule) if branching else schedule
    main = Cell(key=config_key(cfg), name=cell_name, config=cfg, run_dir=spec.runs_dir / config_key(cfg),
                kind=MAIN, values=values, schedule=label, ptq_steps=ptq_steps, replicate=replicate,
                seed=cfg.train.seed, data_seed=cfg.data.shuffle_seed)
    cells.append(main)
    if branching:
        for t in branch_at:
            cells.append(_cooldown_cell(spec, main, raw, t))
    for t in average_at:
        cells.append(_average_cell(spec, main, t))
    return cells


def cooldown_steps(spec: GridSpec, cfg: Config, tokens: int) -> tuple[int, int]:
    """(branch step S, cooldown steps C) of a cooldown at `tokens` for a run with cfg's batch."""
    step = _series_step(cfg, tokens)
    return step, max(1, round(spec.cooldown_fraction * step))


def _series_targets(cfg: Config) -> list[int]:
    return [t for t in target_tokens(cfg.checkpoint) if _series_step(cfg, t) <= _total_steps(cfg)]


def cooldown_tokens(spec: GridSpec, cfg: Config) -> list[int]:
    """Where the cell's cooldowns branch: the spec's list, or ("series") each point of the cell's
    own series after the warmup."""
    if spec.cooldown != SERIES:
        return list(spec.cooldown)
    return [t for t in _series_targets(cfg) if _series_step(cfg, t) >= cfg.optim.warmup_steps]


def average_tokens(spec: GridSpec, cfg: Config) -> list[int]:
    """Where the cell's checkpoint averages are taken ("series": each series point whose window
    spans at least two steps)."""
    if spec.average is None:
        return []
    if spec.average.tokens == SERIES:
        return [t for t in cooldown_tokens(spec, cfg) if len(average_points(cfg, t, spec.average)) >= 2] \
            if spec.cooldown == SERIES else \
            [t for t in _series_targets(cfg) if len(average_points(cfg, t, spec.average)) >= 2]
    return list(spec.average.tokens)


def cooldown_end_tokens(spec: GridSpec, cfg: Config) -> list[int]:
    """Token counts at which the cooldown branches end: every main cell checkpoints there too, so
    cosine, stable and cooled-down models are compared at equal tokens."""
    return [sum(cooldown_steps(spec, cfg, t)) * cfg.tokens_per_step for t in cooldown_tokens(spec, cfg)]


def _cooldown_cell(spec: GridSpec, main: Cell, main_raw: dict, tokens: int) -> Cell:
    cfg = main.config
    (step, cool), total, warmup = cooldown_steps(spec, cfg, tokens), _total_steps(cfg), cfg.optim.warmup_steps
    where = f"cooldown at {tokens:,} tokens (step {step}) of cell '{main.name}'"
    if step > total:
        raise _fail(spec.path, f"{where} lies beyond the end of its training ({total} steps)")
    if step < warmup:
        raise _fail(spec.path, f"{where} lies inside the warmup ({warmup} steps)")
    raw = copy.deepcopy(main_raw)
    raw = set_dotted(raw, "optim.schedule", "wsd")
    raw = set_dotted(raw, "optim.decay_shape", "linear")
    raw = set_dotted(raw, "optim.decay_fraction", cool / (step + cool))
    raw = set_dotted(raw, "train.max_steps", step + cool)
    raw["checkpoint"] = {**raw.get("checkpoint", {}), "tokens": [], "log_start": None, "log_stop": None,
                         "per_decade": 0, "include_final": True}
    name = f"{main.name},cooldown@{format_value(tokens)}"
    bcfg = _resolve(spec, raw, name, {"cooldown": tokens})
    return Cell(key=config_key(bcfg), name=name, config=bcfg, run_dir=spec.runs_dir / config_key(bcfg),
                kind=COOLDOWN, values={**main.values, "cooldown_tokens": tokens}, schedule="wsd-cooldown",
                parent=main.key, branch_tokens=tokens, branch_step=step,
                replicate=f"{main.replicate},cooldown@{format_value(tokens)}", seed=main.seed,
                data_seed=main.data_seed)


def _average_cell(spec: GridSpec, main: Cell, tokens: int) -> Cell:
    cfg = main.config
    points = average_points(cfg, tokens, spec.average)
    steps = tuple(_series_step(cfg, t) for t in points)
    where = f"average at {tokens:,} tokens of cell '{main.name}'"
    if len(steps) < 2:
        raise _fail(spec.path, f"{where}: average.window {spec.average.window} spans less than one step "
                               f"({cfg.tokens_per_step} tokens); widen it")
    if steps[-1] > _total_steps(cfg):
        raise _fail(spec.path, f"{where} lies beyond the end of its training")
    digest = hashlib.sha256(f"{main.key}:average:{steps}".encode()).hexdigest()[:12]
    return Cell(key=digest, name=f"{main.name},avg@{format_value(tokens)}", config=cfg,
                run_dir=spec.runs_dir / digest, kind=AVERAGE,
                values={**main.values, "average_tokens": tokens}, schedule=f"{main.schedule}+avg",
                parent=main.key, branch_tokens=tokens, branch_step=steps[-1], average_steps=steps,
                replicate=f"{main.replicate},avg@{format_value(tokens)}", seed=main.seed, data_seed=main.data_seed)


# ----------------------------------------------------------------------------------------------
# Expected work per cell
# ----------------------------------------------------------------------------------------------
def expected_checkpoints(cell: Cell) -> list[int]:
    """Series steps the cell's run will hold when finished."""
    if cell.kind != MAIN:
        return [cell.config.train.max_steps if cell.kind == COOLDOWN else cell.branch_step]
    return _series_steps(cell.config)


def expected_ptq_keys(spec: GridSpec, cell: Cell) -> set[tuple]:
    """(step, method, bits, group_size, format) of every PTQ row the cell should have: the plain rows
    and the recovery rows (format '<format>+<recovery label>'; efftrain.quant.sweep.row_formats)."""
    ptq = spec.ptq_for(cell)
    steps = expected_checkpoints(cell)  # (the sweep refuses listed steps that the run lacks)
    if ptq.checkpoints != "all":
        steps = [s for s in steps if s in set(ptq.checkpoints)]
    return {(s, q.method, q.bits, q.group_size, fmt) for s in steps for q, _, fmt in row_formats(ptq)}


def expected_ptq_rows(spec: GridSpec, cell: Cell) -> int:
    return len(expected_ptq_keys(spec, cell))
