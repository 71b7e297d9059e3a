"""Benchmark suites as data: the YAML files in ``eval/`` (shipped as ``vlm_tta.eval``).

A suite names its protocol, datasets, the prompt set and view recipe per dataset (the reference
papers' choices are part of the protocol), the default methods and the seeds (stream orders of
online methods). :func:`load_suite` reads a built-in suite by name or any YAML file with the same
keys::

    name: natural_shift
    protocol: classification          # classification | ood | ntta
    seeds: [0, 1, 2]
    methods: [zeroshot, "zeroshot[score=mcm]", tda]
    defaults: {templates: single, views: crop_flip}
    datasets: [imagenet, {name: imagenet_a, views: augmix}]
    subset: {size: 1000, seed: 0}     # optional: seeded subsets (DiffTPT's protocol)
    ood: [inaturalist, sun]           # protocol ood: the OOD sets mixed with each dataset
    noisy: [inaturalist]              # protocol ntta: the noisy sets ...
    noisy_fractions: [0.5]            # ... and the fractions of noisy samples
    ood_average: [imagenet_a, ...]    # datasets averaged in the reports' "OOD avg." column
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._shipped import shipped_folder
from ..errors import VlmTtaError

PROTOCOLS = ("classification", "ood", "ntta")
_KEYS = {
    "name",
    "description",
    "protocol",
    "seeds",
    "methods",
    "defaults",
    "datasets",
    "subset",
    "ood",
    "noisy",
    "noisy_fractions",
    "ood_average",
}
_DATASET_KEYS = {"name", "templates", "views", "split"}


class SuiteError(VlmTtaError, ValueError):
    """A suite file is missing, unreadable or does not have the expected keys."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a suite with the protocol's prompt set and view recipe for it."""

    name: str
    templates: str | None = None  # a template set name (None: the toolkit's default, "single")
    views: str | None = None  # view recipe for methods with a ``views`` option (None: the method's own)
    split: str = "test"


@dataclass(frozen=True)
class Suite:
    name: str
    protocol: str
    datasets: tuple[DatasetSpec, ...]
    description: str = ""
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ("zeroshot",)
    subset: dict | None = None
    ood: tuple[str, ...] = ()
    noisy: tuple[str, ...] = ()
    noisy_fractions: tuple[float, ...] = (0.5,)
    ood_average: tuple[str, ...] = ()
    source: str = ""  # the file it was read from
    extra: dict = field(default_factory=dict)

    @property
    def dataset_names(self) -> list[str]:
        return [d.name for d in self.datasets]


def list_suites() -> list[str]:
    """Names of the built-in suites (``eval/*.yaml``)."""
    return sorted(p.name[: -len(".yaml")] for p in _suite_dir().iterdir() if p.name.endswith(".yaml"))


def _suite_dir():
    return shipped_folder("eval")


def load_suite(name_or_path: str | Path) -> Suite:
    """A built-in suite by name (``natural_shift``) or a suite from a YAML file."""
    import yaml

    text_path = str(name_or_path)
    path = Path(text_path).expanduser()
    if text_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise SuiteError(f"suite file not found: {path}")
        source, text = str(path), path.read_text(encoding="utf-8-sig")
    else:
        entry = _suite_dir() / f"{text_path}.yaml"
        if not entry.is_file():
            import difflib

            known = list_suites()
            close = difflib.get_close_matches(text_path, known, n=2)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SuiteError(f"unknown suite {text_path!r}.{hint} Built-in suites: {', '.join(known)}; or a .yaml file")
        source, text = f"vlm_tta.eval/{text_path}.yaml", entry.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SuiteError(f"{source} is not valid YAML: {err}") from None
    return parse_suite(raw, source)


def _as_tuple(raw: dict, key: str, kind: type, source: str) -> tuple:
    value = raw.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise SuiteError(f"{source}: {key!r} must be a list of {kind.__name__}; got {value!r}")
    return tuple(value)


def parse_suite(raw: Any, source: str = "suite") -> Suite:
    """A :class:`Suite` from the parsed YAML mapping, with every key checked."""
    from ..data import resolve_name

    if not isinstance(raw, dict):
        raise SuiteError(f"{source}: a suite is a mapping of keys ({', '.join(sorted(_KEYS))})")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise SuiteError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(_KEYS))}")
    protocol = raw.get("protocol", "classification")
    if protocol not in PROTOCOLS:
        raise SuiteError(f"{source}: protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - (_DATASET_KEYS - {"name"}):
        raise SuiteError(f"{source}: 'defaults' may set templates, views and split; got {defaults!r}")
    datasets = []
    for entry in raw.get("datasets") or []:
        spec = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(spec, dict) or "name" not in spec or set(spec) - _DATASET_KEYS:
            raise SuiteError(f"{source}: a dataset is a name or {{name, templates, views, split}}; got {entry!r}")
        merged = {**defaults, **spec}
        try:
            merged["name"] = resolve_name(merged["name"])
        except VlmTtaError as err:
            raise SuiteError(f"{source}: {err}") from None
        datasets.append(DatasetSpec(**merged))
    if not datasets:
        raise SuiteError(f"{source}: 'datasets' must list at least one dataset")
    seeds = _as_tuple(raw, "seeds", int, source) or (0,)
    methods = _as_tuple(raw, "methods", str, source) or ("zeroshot",)
    ood = tuple(resolve_name(n) for n in _as_tuple(raw, "ood", str, source))
    noisy = tuple(resolve_name(n) for n in _as_tuple(raw, "noisy", str, source))
    fractions = tuple(float(f) for f in (raw.get("noisy_fractions") or [0.5]))
    if any(not 0.0 <= f < 1.0 for f in fractions):
        raise SuiteError(f"{source}: noisy_fractions must lie in [0, 1); got {list(fractions)}")
    if protocol == "ood" and not ood:
        raise SuiteError(f"{source}: an 'ood' suite lists its OOD sets under 'ood'")
    if protocol == "ntta" and not noisy:
        raise SuiteError(f"{source}: an 'ntta' suite lists its noisy sets under 'noisy'")
    subset = raw.get("subset")
    if subset is not None and (
        not isinstance(subset, dict) or set(subset) - {"size", "seed"} or not isinstance(subset.get("size"), int)
    ):
        raise SuiteError(f"{source}: 'subset' is {{size: N, seed: S}}; got {subset!r}")
    return Suite(
        name=str(raw.get("name") or Path(source).stem),
        protocol=protocol,
        datasets=tuple(datasets),
        description=str(raw.get("description") or ""),
        seeds=seeds,
        methods=methods,
        subset=dict(subset) if subset else None,
        ood=ood,
        noisy=noisy,
        noisy_fractions=fractions,
        ood_average=tuple(resolve_name(n) for n in _as_tuple(raw, "ood_average", str, source)),
        source=source,
    )
