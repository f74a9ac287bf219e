"""Validated settings of support-basis attention, stored in ``model.config.support_basis`` as a dict."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import torch

from .ops.block_support import ENGINES, BlockSettings
from .ops.polynomial import AS23_KERNEL, DEFAULT_KERNEL, KERNELS, MAX_DEGREE, check_kernel
from .ops.support_basis import DEFAULT_MAX_FEATURE_BYTES, RADIUS_LIMIT, check_buckets

INTERVALS = ("query", "fixed")
# ``block``'s entries: the block-support op's settings (sinks and local_window are the top-level fields) and the
# backend's length below which it computes exact attention (at or above: the op; measured break-even on this CPU).
BLOCK_FIELDS = tuple(f.name for f in dataclasses.fields(BlockSettings) if f.name not in ("sinks", "local_window"))
DEFAULT_EXACT_BELOW = 8192
# What a config left None means, per method: sink_window's StreamingLLM pattern; support basis with the
# non-negative Taylor kernel and no structure; AS23a with the Chebyshev fit of exp it was published with; block
# support with its op's measured defaults.
METHOD_DEFAULTS = {
    "sink_window": {"sinks": 4, "local_window": 256},
    "block_support": {"sinks": BlockSettings.sinks, "local_window": BlockSettings.local_window},
    "support_basis": {"kernel": DEFAULT_KERNEL, "sinks": 0, "local_window": 0},
    "support_basis_multi": {"kernel": DEFAULT_KERNEL, "sinks": 0, "local_window": 0},
    "as23": {"kernel": AS23_KERNEL},
}


@dataclass
class SupportBasisConfig:
    """Settings of the ``support_basis`` / ``as23`` / ``sink_window`` attention implementations.

    Attributes:
        threshold: absolute magnitude on post-RoPE query/key entries; a row is large (computed
            exactly) when any ``|entry| > threshold``. ``0``: every row exact; ``inf``: none.
        degree: degree of the Chebyshev fit of ``exp`` on the small-small pairs (0 to 12).
        interval: ``"query"`` fits each query on ``[-R_i, R_i]`` with
            ``R_i = scale * |q_i| * max |k_j|`` over the small real keys visible to it (causal, always
            covers every small-small score); ``"fixed"`` uses ``[-radius, radius]`` for every query.
        radius: the interval half-width for ``interval="fixed"``.
        chunk_size: block length of the op's chunked loops; None: each loop's measured default.
        max_feature_bytes: refuse settings whose polynomial part would need more memory.
        sketch_dim: None: exact monomial features; ``r``: degree >= 2 features sketched to ``r`` each
            (an unbiased estimate of the polynomial kernel, seeded by ``sketch_seed``).
        sketch_seed: seed of the sketch (the same seed gives the same features everywhere).
        kernel: ``"chebyshev"`` (the fit of ``exp``, signed), ``"squared"`` (the square of a
            half-degree fit of ``exp(x / 2)``: non-negative for every pair, even ``degree``) or ``"taylor"``
            (``exp(c) (1 + (x - c) / degree)^degree`` around each query's mean score ``c``: non-negative, even ``degree``).
            None: the method's default (support basis: ``"taylor"``; ``as23``: ``"chebyshev"``, as published).
        radius_limit: query rows whose interval is wider are computed exactly (the run-time guard;
            ``sb-hf calibrate`` sets it per layer from the calibration data; at most 150).
        thresholds: ``support_basis_multi``: ``T1 > T2 > ... > Tm`` (None: ``threshold`` and two evenly
            spaced below it, ``[T, 2T/3, T/3]``).
        degrees: ``support_basis_multi``: one degree per bucket (None: ``degree`` for every bucket).
        sinks: every query attends exactly to the first ``sinks`` real tokens (>= 0). None: the
            method's default (``sink_window``: 4, the support-basis methods: 0).
        local_window: query ``p`` attends exactly to the keys ``p - local_window < j <= p``. None: the
            method's default (``sink_window``: 256, >= 1; the support-basis methods: 0, none, and the
            polynomial part covers only the keys beyond the window).
        column_queries: support basis: a mean query per head, ``[[...head_dim floats] x q_heads]``
            (``sb-hf calibrate`` measures it); keys with ``scale * qbar_h . k_j > column_threshold`` for a
            head of their KV group are exact for every query. None: no columns.
        column_threshold: a number, or one per query head (needs ``column_queries``).
        kv_heads: per-KV-head overrides, ``{kv_head_index: {field: value}}`` (inside a ``layers`` entry,
            or for every layer): the query heads that share KV head ``g`` run with these settings. A KV head
            is the unit because the key columns are exact for a key's whole query group. With ``kv_heads``,
            key columns are given per KV head (``column_queries``: the rows of that KV head's query heads).
        heads: per-query-head overrides, ``{query_head_index: {field: value}}`` (like ``kv_heads``, which a
            layer cannot have as well): each query head runs with its own settings on its KV head's keys,
            its key columns its own (``column_queries``: one row).
        block: ``block_support``: the op's settings ``{"gamma", "block_size", "selection", "estimate", "far",
            "sample_stride"}`` (:class:`sb_hf.ops.block_support.BlockSettings`; unset: its defaults) and
            ``"exact_below"``, the key count below which a call computes exact attention (default 8192, the measured
            break-even on a 2-core CPU; 0: the op at every length), and ``"engine"``, what computes the op
            (:data:`sb_hf.ops.block_support.ENGINES`: ``"auto"``, the default, FlexAttention on CUDA and the chunked
            op on a CPU; ``"chunk"``; ``"flex"``). Calls with fewer queries than a block (decoding
            steps) are exact too. None: every default.
        layers: per-layer overrides, ``{layer_index: {field: value}}``.
    """

    threshold: float = 4.0
    degree: int = 2
    interval: str = "query"
    radius: float | None = None
    chunk_size: int | None = None
    max_feature_bytes: int = DEFAULT_MAX_FEATURE_BYTES
    sketch_dim: int | None = None
    sketch_seed: int = 0
    kernel: str | None = None
    radius_limit: float = RADIUS_LIMIT
    thresholds: list[float] | None = None
    degrees: list[int] | None = None
    sinks: int | None = None
    local_window: int | None = None
    column_queries: list[list[float]] | None = None
    column_threshold: float | list[float] | None = None
    kv_heads: dict[int, dict[str, Any]] = field(default_factory=dict)
    heads: dict[int, dict[str, Any]] = field(default_factory=dict)
    block: dict[str, Any] | None = None
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)
        self.kv_heads = _check_overrides(self, self.kv_heads, "kv_heads", _HEAD_FIELDS)
        self.heads = _check_overrides(self, self.heads, "heads", _HEAD_FIELDS)
        if self.kv_heads and self.heads:
            raise ValueError("give per-head settings either per KV head (kv_heads) or per query head (heads), not both "
                             "for the same layer")
        self.layers = _check_overrides(self, self.layers, "layers", _LAYER_FIELDS)

    @classmethod
    def from_dict(cls, settings: dict[str, Any] | None) -> SupportBasisConfig:
        settings = dict(settings or {})
        unknown = set(settings) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown support_basis settings {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (``inf`` threshold as the string ``"inf"``, layer keys as strings)."""
        out = _json_threshold(dataclasses.asdict(self))
        out["layers"] = {str(i): _json_threshold(dict(o)) for i, o in self.layers.items()}
        for scope in [out, *out["layers"].values()]:
            for name in ("kv_heads", "heads"):
                if name in scope:
                    scope[name] = {str(g): _json_threshold(dict(o)) for g, o in scope[name].items()}
        return out

    def for_layer(self, layer_index: int | None) -> SupportBasisConfig:
        """The settings of one layer: the defaults merged with that layer's overrides."""
        overrides = self.layers.get(parse_index(layer_index, "layers"), {}) if layer_index is not None else {}
        return dataclasses.replace(self, layers={}, **overrides)

    def for_kv_head(self, kv_head: int) -> SupportBasisConfig:
        """The settings of the query heads of one KV head (of a layer's settings, :meth:`for_layer`)."""
        return dataclasses.replace(self, layers={}, kv_heads={}, **self.kv_heads.get(kv_head, {}))

    def for_head(self, head: int) -> SupportBasisConfig:
        """The settings of one query head (of a layer's settings, :meth:`for_layer`)."""
        return dataclasses.replace(self, layers={}, heads={}, **self.heads.get(head, {}))

    def head_settings(self) -> tuple[str, dict[int, SupportBasisConfig]]:
        """A layer's own per-head settings: ``("KV", {kv_head: settings})``, ``("query", {query_head: settings})``,
        or ``("KV", {})`` when every head runs the layer's settings."""
        if self.heads:
            return "query", {h: self.for_head(h) for h in self.heads}
        return "KV", {g: self.for_kv_head(g) for g in self.kv_heads}

    def bucket_settings(self) -> dict[str, Any]:
        """Keyword arguments for :func:`sb_hf.ops.multi_threshold_attention` (``support_basis_multi``)."""
        thresholds = self.thresholds
        if thresholds is None:
            t = self.threshold
            thresholds = [t] if t == 0 or math.isinf(t) else [t, 2 * t / 3, t / 3]
        degrees = self.degrees if self.degrees is not None else [self.degree] * len(thresholds)
        kwargs = self.op_kwargs("support_basis_multi")
        del kwargs["threshold"], kwargs["degree"]
        return dict(kwargs, thresholds=list(thresholds), degrees=list(degrees))

    def method_settings(self, method: str) -> dict[str, Any]:
        """The settings whose default depends on the method, resolved for ``method`` (:data:`METHOD_DEFAULTS`):
        ``kernel``, ``sinks``, ``local_window``, and for the support-basis methods the key columns (tensors)."""
        defaults = METHOD_DEFAULTS[method]
        out = {name: defaults[name] if getattr(self, name) is None else getattr(self, name) for name in defaults}
        if method == "block_support":
            out |= self.block_settings()
        if method.startswith("support_basis"):
            out["column_queries"] = None if self.column_queries is None else torch.tensor(self.column_queries)
            out["column_threshold"] = None if self.column_threshold is None else torch.tensor(self.column_threshold)
        return out

    def block_settings(self) -> dict[str, Any]:
        """``block`` resolved: every op setting of :data:`BLOCK_FIELDS` (the op's defaults where unset) and
        ``exact_below``."""
        given = dict(self.block or {})
        return {name: given.get(name, getattr(BlockSettings, name)) for name in BLOCK_FIELDS} | {
            "exact_below": given.get("exact_below", DEFAULT_EXACT_BELOW), "engine": given.get("engine", "auto")}

    def check_method(self, method: str) -> None:
        """Raise ``ValueError`` when a layer's settings do not suit ``method`` (its default kernel needs even
        degrees; ``sink_window`` needs a ``local_window`` >= 1)."""
        if method not in METHOD_DEFAULTS:
            raise ValueError(f"method must be one of {sorted(METHOD_DEFAULTS)}, got {method!r}")
        scopes = [(index, None, None, self.for_layer(index)) for index in [None, *self.layers]]
        for index, _, _, layer in list(scopes):
            unit, heads = layer.head_settings()
            scopes += [(index, "kv_heads" if unit == "KV" else "heads", g, settings) for g, settings in heads.items()]
        for index, scope, g, layer in scopes:
            if g is not None and not method.startswith("support_basis"):
                raise ValueError(f"{scope} settings are for the support-basis methods, not {method!r}; "
                                 f"remove {scope} or use support_basis")
            resolved = layer.method_settings(method)
            where = ("" if index is None else f"layers[{index}]: ") + ("" if g is None else f"{scope}[{g}]: ")
            if "kernel" in resolved:
                degrees = layer.degrees if method == "support_basis_multi" and layer.degrees is not None else [layer.degree]
                try:
                    check_kernel(resolved["kernel"], degrees)
                except ValueError as err:
                    default = " (the default kernel of " + method + ")" if layer.kernel is None else ""
                    raise ValueError(f"{where}{err}{default}") from None
            if method == "sink_window" and resolved["local_window"] < 1:
                raise ValueError(f"{where}sink_window needs local_window >= 1 (query p attends to keys p - local_window < j <= p), "
                                 f"got {resolved['local_window']}")

    def op_kwargs(self, method: str = "support_basis") -> dict[str, Any]:
        """Keyword arguments for :func:`sb_hf.ops.support_basis_attention` (``method``'s defaults filled in)."""
        return dict(
            threshold=self.threshold,
            degree=self.degree,
            radius=self.radius if self.interval == "fixed" else None,
            chunk_size=self.chunk_size,
            max_feature_bytes=self.max_feature_bytes,
            sketch_dim=self.sketch_dim,
            sketch_seed=self.sketch_seed,
            radius_limit=self.radius_limit,
        ) | self.method_settings(method)


SETTING_FLAGS = ("threshold", "degree", "kernel", "sinks", "local_window")  # settings that have their own command-line flag


def add_settings_arguments(parser, prefix: str = "") -> None:
    """The settings options of the command lines (``--config FILE``, ``--threshold``, ``--degree``,
    ``--kernel``, ``--sinks``, ``--local-window``), each optionally prefixed (``sb-hf lm-eval`` uses ``--sb-``)."""
    parser.add_argument(f"--{prefix}config", dest="config", default=None,
                        help="JSON file of SupportBasisConfig settings (a saved settings dict, or a config.json "
                        "holding a 'support_basis' entry); the flags below override it")
    parser.add_argument(f"--{prefix}threshold", dest="threshold", type=float, default=None,
                        help="support_basis row threshold (default 4)")
    parser.add_argument(f"--{prefix}degree", dest="degree", type=int, default=None,
                        help="polynomial degree of support_basis and as23 (default 2)")
    parser.add_argument(f"--{prefix}kernel", dest="kernel", choices=KERNELS, default=None,
                        help="polynomial kernel: chebyshev (signed fit of exp), squared (square of a half-degree "
                        "fit, non-negative) or taylor (exp(c)(1+(x-c)/p)^p around the query's mean score c, "
                        "non-negative); squared and taylor need an even degree (default: taylor for support_basis, chebyshev for as23)")
    parser.add_argument(f"--{prefix}sinks", dest="sinks", type=int, default=None,
                        help="first tokens every query attends to exactly (default: sink_window 4, support_basis 0)")
    parser.add_argument(f"--{prefix}local-window", dest="local_window", type=int, default=None,
                        help="query p attends exactly to keys p - W < j <= p (default: sink_window 256, support_basis 0)")


def settings_given(args) -> bool:
    """Whether the command line set any of the options of :func:`add_settings_arguments`."""
    return getattr(args, "config", None) is not None or any(getattr(args, f, None) is not None for f in SETTING_FLAGS)


def settings_from_arguments(args) -> dict[str, Any]:
    """Validated settings from the options of :func:`add_settings_arguments` (defaults where unset)."""
    return load_settings(getattr(args, "config", None), **{f: getattr(args, f, None) for f in SETTING_FLAGS})


def load_settings(config_file: str | Path | None = None, **flags: Any) -> dict[str, Any]:
    """Validated settings (a dict) from a JSON file and flags (``None`` flags are ignored; flags win).

    The file holds SupportBasisConfig fields, or is a model's ``config.json`` with a ``support_basis`` entry."""
    settings: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path} is not valid JSON: {err}") from None
        if isinstance(data, dict) and isinstance(data.get("support_basis"), dict):
            data = data["support_basis"]  # a model's config.json
        if not isinstance(data, dict):
            raise ValueError(f"--config {path} must hold a JSON object of SupportBasisConfig settings")
        settings.update(data)
    settings.update({k: v for k, v in flags.items() if v is not None})
    return SupportBasisConfig.from_dict(settings).to_dict()


def _json_threshold(settings: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: an infinite threshold is stored as the string "inf"."""
    if isinstance(settings.get("threshold"), float) and math.isinf(settings["threshold"]):
        settings["threshold"] = "inf"
    if settings.get("thresholds") is not None:
        settings["thresholds"] = ["inf" if math.isinf(t) else t for t in settings["thresholds"]]
    return settings


_HEAD_FIELDS = {"threshold", "degree", "interval", "radius", "chunk_size", "sketch_dim", "sketch_seed", "kernel",
                "radius_limit", "thresholds", "degrees", "sinks", "local_window", "column_queries", "column_threshold"}
_LAYER_FIELDS = _HEAD_FIELDS | {"kv_heads", "heads", "block"}


def _check_overrides(config: SupportBasisConfig, overrides: dict, name: str, fields: set[str]) -> dict[int, dict]:
    """Validated ``layers``/``kv_heads`` overrides of ``config``, keyed by int: each merged into ``config``
    must be valid settings (a layer's ``kv_heads`` are checked against that layer's merged settings)."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{name} must be a dict {{index: {{field: value}}}}, got {overrides!r}")
    if name in ("kv_heads", "heads") and overrides and config.column_queries is not None:
        raise ValueError(f"with {name}, give column_queries in each {name} entry (the rows of its query heads), "
                         "not for the whole layer")
    for i, entry in overrides.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{name}[{i}] must be a dict of settings {{field: value}}, got {entry!r}")
    out = {parse_index(i, name): dict(o) for i, o in overrides.items()}
    for index, entry in out.items():
        unknown = set(entry) - fields
        if unknown:
            raise ValueError(f"{name}[{index}] has unknown fields {sorted(unknown)}; its fields are {sorted(fields)}")
        try:
            merged = dataclasses.replace(config, layers={}, **({name: {}} if name != "layers" else {}), **entry)
        except ValueError as err:
            raise ValueError(f"{name}[{index}]: {err}") from None
        out[index] = {key: getattr(merged, key) for key in entry}  # as validated ("inf" -> inf, integer keys)
    return out


def parse_index(key: Any, name: str) -> int:
    """A layer or head key of the settings (an int, or its string in JSON) as an index; ValueError naming ``name``."""
    try:
        index = int(key)
    except (TypeError, ValueError):
        raise ValueError(f"{name} keys must be indices (integers >= 0), got {key!r}") from None
    if index < 0 or str(index) != str(key).strip():
        raise ValueError(f"{name} keys must be indices (integers >= 0), got {key!r}")
    return index


def _validate(c: SupportBasisConfig) -> None:
    _check_block(c.block)
    if isinstance(c.threshold, str) and c.threshold.strip().lower() in ("inf", "infinity"):
        c.threshold = math.inf
    if isinstance(c.threshold, bool) or not isinstance(c.threshold, (int, float)) or not c.threshold >= 0:
        raise ValueError(f"threshold must be a number >= 0 (0: every row exact, inf: no row exact), got {c.threshold!r}")
    c.threshold = float(c.threshold)
    if isinstance(c.degree, bool) or not isinstance(c.degree, int) or not 0 <= c.degree <= MAX_DEGREE:
        raise ValueError(f"degree must be an integer in [0, {MAX_DEGREE}], got {c.degree!r}")
    if c.interval not in INTERVALS:
        raise ValueError(f"interval must be one of {INTERVALS}, got {c.interval!r}")
    if c.interval == "fixed":
        if isinstance(c.radius, bool) or not isinstance(c.radius, (int, float)) or not 0 < c.radius < RADIUS_LIMIT:
            raise ValueError(f"radius must be a number in (0, {RADIUS_LIMIT}) when interval='fixed', got {c.radius!r}")
    elif c.radius is not None:
        raise ValueError(f"radius is only used with interval='fixed' (interval is {c.interval!r}); remove it or set interval='fixed'")
    if c.chunk_size is not None and (isinstance(c.chunk_size, bool) or not isinstance(c.chunk_size, int) or c.chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or None (the measured defaults), got {c.chunk_size!r}")
    if isinstance(c.max_feature_bytes, bool) or not isinstance(c.max_feature_bytes, int) or c.max_feature_bytes < 1:
        raise ValueError(f"max_feature_bytes must be an integer >= 1, got {c.max_feature_bytes!r}")
    if c.sketch_dim is not None and (isinstance(c.sketch_dim, bool) or not isinstance(c.sketch_dim, int) or c.sketch_dim < 1):
        raise ValueError(f"sketch_dim must be an integer >= 1 or None (exact features), got {c.sketch_dim!r}")
    if isinstance(c.sketch_seed, bool) or not isinstance(c.sketch_seed, int) or c.sketch_seed < 0:
        raise ValueError(f"sketch_seed must be an integer >= 0, got {c.sketch_seed!r}")
    if c.thresholds is not None or c.degrees is not None:
        thresholds = c.thresholds if c.thresholds is not None else [c.threshold]
        if c.degrees is not None and c.thresholds is None:
            raise ValueError("degrees (one per bucket) needs thresholds; set thresholds=[T1, T2, ...] too")
        c.thresholds, c.degrees, _ = check_buckets(thresholds, c.degrees if c.degrees is not None else c.degree, None)
    if isinstance(c.radius_limit, bool) or not isinstance(c.radius_limit, (int, float)) or not 0 < c.radius_limit <= RADIUS_LIMIT:
        raise ValueError(f"radius_limit must be a number in (0, {RADIUS_LIMIT}], got {c.radius_limit!r}")
    c.radius_limit = float(c.radius_limit)
    if c.kernel is not None:  # None: the method's default, checked with the method (check_method)
        check_kernel(c.kernel, c.degrees if c.degrees is not None else [c.degree])
    if c.sinks is not None and (isinstance(c.sinks, bool) or not isinstance(c.sinks, int) or c.sinks < 0):
        raise ValueError(f"sinks must be an integer >= 0 or None (the method's default), got {c.sinks!r}")
    if c.local_window is not None and (
        isinstance(c.local_window, bool) or not isinstance(c.local_window, int) or c.local_window < 0
    ):
        raise ValueError(f"local_window must be an integer >= 0 (sink_window: >= 1) or None (the method's default), "
                         f"got {c.local_window!r}")
    if c.column_queries is not None:
        rows = c.column_queries
        if (not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows)
                or len({len(r) for r in rows}) != 1 or not all(_finite_number(x) for r in rows for x in r)):
            raise ValueError("column_queries must be a list of one list of head_dim finite numbers per query head")
        c.column_queries = [[float(x) for x in r] for r in rows]
        threshold = c.column_threshold
        per_head = isinstance(threshold, list) and len(threshold) == len(rows) and all(_finite_number(x) for x in threshold)
        if not (per_head or _finite_number(threshold)):
            raise ValueError(f"column_threshold must be a finite number or a list of one per query head "
                             f"({len(rows)}) with column_queries, got {threshold!r}")
        c.column_threshold = [float(x) for x in threshold] if per_head else float(threshold)
    elif c.column_threshold is not None:
        raise ValueError("column_threshold needs column_queries (the per-head mean queries); give both or neither")


def _check_block(block) -> None:
    if block is None:
        return
    if not isinstance(block, dict):
        raise ValueError(f"block must be a dict of block-support settings {{name: value}} or None, got {block!r}")
    unknown = set(block) - set(BLOCK_FIELDS) - {"exact_below", "engine"}
    if unknown:
        raise ValueError(f"block has unknown settings {sorted(unknown)}; its settings are "
                         f"{[*BLOCK_FIELDS, 'exact_below', 'engine']} "
                         "(sinks and local_window are top-level fields)")
    exact_below = block.get("exact_below", DEFAULT_EXACT_BELOW)
    if isinstance(exact_below, bool) or not isinstance(exact_below, int) or exact_below < 0:
        raise ValueError(f"block.exact_below must be an integer >= 0 (keys below which attention is exact; 0: never), "
                         f"got {exact_below!r}")
    if block.get("engine", "auto") not in ENGINES:
        raise ValueError(f"block.engine must be one of {tuple(ENGINES)} ({'; '.join(f'{k}: {v}' for k, v in ENGINES.items())}), "
                         f"got {block['engine']!r}")
    settings = BlockSettings(**{name: block[name] for name in BLOCK_FIELDS if name in block})
    settings.check(causal=True)
    if settings.selection == "last":
        raise ValueError("block.selection 'last' is the dense twin's only (sb_hf.ops.reference.block_support_attention); "
                         "the backend runs 'pooled' (the default), 'union' or 'row'")
    if settings.estimate == "oracle":
        raise ValueError("block.estimate 'oracle' scores every key (a measuring tool, slower than exact attention); "
                         "use 'sampled' (the default), 'centroid' or 'bound'")


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
