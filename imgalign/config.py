"""One config system for every recipe: dataclass schemas, YAML files, dotted overrides, strict checks.

A recipe declares its schema as plain nested dataclasses whose fields carry a help string::

    @dataclass
    class TrainConfig:
        lr: float = cfg_field(1e-5, "Learning rate of the AdamW optimizer.")
        loss_type: Literal["sigmoid", "ipo"] = cfg_field("sigmoid", "DPO-family loss, by name.")

    @dataclass
    class DPOConfig:
        train: TrainConfig = cfg_field(TrainConfig, "Optimisation settings.")

    cfg = load_config(DPOConfig, "configs/diffusion_dpo/sd15.yaml", ["train.lr=2e-5"])

`load_config` merges, in order: the schema defaults, the YAML file, the command-line overrides (each
`dotted.key=value`, the value parsed as YAML). Relative paths in a YAML file are taken from the current folder,
or, where they exist only there, from the project folder holding `configs/` (so shipped configs run from
anywhere); relative paths on the command line are taken from the current folder. It is strict: an unknown key, a value of the wrong type, a
value outside a `Literal[...]` or a required value left unset (`MISSING`) is a `ConfigError` naming the
dotted key, where it came from and the fix. OmegaConf does the merging and type conversion (so `${...}`
interpolations work, `5000` is accepted for a float and `"1e-5"` becomes 1e-05); this module turns its
errors into messages that name the source and the closest valid key.

Literal choices need OmegaConf >= 2.4.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import platform
import re
import subprocess
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from imgalign.errors import UserError

__all__ = [
    "MISSING",
    "ConfigError",
    "cfg_field",
    "check_local_source",
    "config_help",
    "config_keys",
    "git_revision",
    "load_config",
    "package_versions",
    "save_run_info",
    "to_yaml",
]

COMMAND_LINE = "command line"


class ConfigError(UserError):
    """A config file or override is invalid; the message names the key, its source and the fix."""


# ----------------------------------------------------------------------------------------------------
# schema helpers
# ----------------------------------------------------------------------------------------------------


_CONSTRAINTS = ("ge", "gt", "le", "lt", "exists")


def cfg_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (shown by `config_help` and `--help-config`).

    Constraints, checked by `load_config` before any recipe starts: `ge`, `gt`, `le`, `lt` bounds on a number
    (or on every number of a list), and `exists="file" | "dir" | "path"` for a local path that must exist
    (None skips the check). Choices are `Literal[...]` types; cross-field checks go in `__post_init__`.

    Mutable defaults (list, dict, set, a dataclass instance) are copied for each instance through
    `default_factory`; a dataclass *class* as default means "an instance of it with its defaults".
    Pass `MISSING` as default for a value the user must set.
    """
    metadata = {**kw.pop("metadata", {}), "help": help}
    for name in _CONSTRAINTS:
        if name in kw:
            metadata[name] = kw.pop(name)
    if "default_factory" in kw:
        return dataclasses.field(metadata=metadata, **kw)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata, **kw)
    if isinstance(default, (list, dict, set)) or (
        dataclasses.is_dataclass(default) and not isinstance(default, type)
    ):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional  # noqa: UP007
    return tp, False


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _schema_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints.get(f.name, Any)) for f in dataclasses.fields(cls)]


def _type_name(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    suffix = " | None" if optional else ""
    origin = typing.get_origin(inner)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(inner)) + suffix
    if origin is not None:  # list[int], dict[str, float], ...
        args = typing.get_args(inner)
        name = getattr(origin, "__name__", str(origin))
        if args:
            return f"{name}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]" + suffix
        return name + suffix
    if inner is Any:
        return "any" + suffix
    return getattr(inner, "__name__", str(inner)) + suffix


def config_keys(schema_cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """Every dotted key of a schema as (key, type, default, help); sections come before their keys."""
    rows: list[tuple[str, Any, Any, str]] = []
    for f, tp in _schema_fields(schema_cls):
        key = prefix + f.name
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = MISSING
        inner, _ = _strip_optional(tp)
        if _is_dataclass_type(inner):
            rows.append((key, tp, None, help_text))
            rows.extend(config_keys(inner, key + "."))
            continue
        rows.append((key, tp, default, help_text))
        args = typing.get_args(inner)
        if typing.get_origin(inner) in (list, tuple) and args and _is_dataclass_type(args[0]):
            rows.extend(config_keys(args[0], key + "[]."))  # the keys of each element
    return rows


# ----------------------------------------------------------------------------------------------------
# strict key checking (before OmegaConf sees the values, so the message can name the source)
# ----------------------------------------------------------------------------------------------------


def _closest_key(bad_key: str, schema_cls: type) -> str | None:
    all_keys = [k for k, *_ in config_keys(schema_cls)]
    match = difflib.get_close_matches(bad_key, all_keys, n=1, cutoff=0.6)
    if match:
        return match[0]
    # `lr` given at the top level when it lives at `train.lr`: compare the last components.
    leaf = bad_key.rsplit(".", 1)[-1]
    by_leaf: dict[str, str] = {}
    for k in all_keys:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[match[0]] if match else None


def _check_keys(cls: type, data: Any, prefix: str, source: str, root_cls: type) -> None:
    """Raise ConfigError for the first key of `data` (a plain container) that `cls` does not define."""
    if not isinstance(data, dict):
        return
    fields = {f.name: tp for f, tp in _schema_fields(cls)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = prefix + near[0] if near else _closest_key(full, root_cls)
            msg = f"unknown config key '{full}' in {source}"
            if hint:
                msg += f"; did you mean '{hint}'?"
            else:
                section = f"under '{prefix[:-1]}'" if prefix else "at the top level"
                msg += f"; valid keys {section}: {', '.join(sorted(fields))}"
            raise ConfigError(msg)
        tp, optional = _strip_optional(fields[key])
        if typing.get_origin(tp) is Literal and isinstance(value, bool):
            # YAML 1.1 reads `no`/`off`/`yes`/`on` as booleans: give a choice spelled that way back its word
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            choice = next((a for a in typing.get_args(tp) if isinstance(a, str) and a.lower() in words), None)
            if choice is not None:
                data[key] = value = choice
        if _is_dataclass_type(tp):
            if isinstance(value, dict):
                _check_keys(tp, value, full + ".", source, root_cls)
            elif value is None and optional:
                pass
            elif isinstance(value, str) and value.startswith("${"):
                pass  # interpolation, resolved later
            else:
                raise ConfigError(
                    f"config key '{full}' in {source} is a section ({tp.__name__}), "
                    f"not a value: got {value!r}; set its keys instead, e.g. '{full}.<key>=...' "
                    f"(see --help-config)"
                )
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (list, tuple) and args and _is_dataclass_type(args[0]) and isinstance(value, list):
            for i, item in enumerate(value):
                _check_keys(args[0], item, f"{full}[{i}].", source, root_cls)
        elif origin is dict and len(args) == 2 and _is_dataclass_type(args[1]) and isinstance(value, dict):
            for k, item in value.items():
                _check_keys(args[1], item, f"{full}.{k}.", source, root_cls)


_TOKEN = re.compile(r"[^.\[\]]+|\[\d+\]")


def _key_tokens(full_key: str) -> list[str | int]:
    return [int(t[1:-1]) if t.startswith("[") else t for t in _TOKEN.findall(full_key)]


def _type_at(cls: type, full_key: str) -> Any:
    tp: Any = cls
    for tok in _key_tokens(full_key):
        inner, _ = _strip_optional(tp)
        if _is_dataclass_type(inner) and isinstance(tok, str):
            tp = dict(((f.name, t) for f, t in _schema_fields(inner))).get(tok)
        elif typing.get_origin(inner) in (list, tuple) and typing.get_args(inner):
            tp = typing.get_args(inner)[0]
        elif typing.get_origin(inner) is dict and len(typing.get_args(inner)) == 2:
            tp = typing.get_args(inner)[1]
        else:
            return None
        if tp is None:
            return None
    return tp


def _value_at(data: Any, full_key: str) -> Any:
    for tok in _key_tokens(full_key):
        try:
            data = data[tok]
        except (KeyError, IndexError, TypeError):
            return "<unknown>"
    return data


def _merge_checked(base: DictConfig, data: Any, schema_cls: type, source: str) -> DictConfig:
    if data is None:
        return base
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a config must be a mapping of keys to values, got {type(data).__name__}"
        )
    _check_keys(schema_cls, data, "", source, schema_cls)
    try:
        return OmegaConf.merge(base, data)  # type: ignore[return-value]
    except oc_errors.ValidationError as e:
        key = e.full_key or "?"
        tp = _type_at(schema_cls, key) if e.full_key else None
        value = _value_at(data, key)
        if tp is not None:
            expected = _type_name(tp)
        else:  # fall back on OmegaConf's own wording
            expected = (str(e.msg or e).splitlines() or ["see --help-config"])[0]
        raise ConfigError(
            f"invalid value for config key '{key}' in {source}: expected {expected}, "
            f"got {value!r} ({type(value).__name__})"
        ) from None
    except oc_errors.ConfigKeyError as e:  # should have been caught by _check_keys
        hint = _closest_key(e.full_key or "", schema_cls)
        raise ConfigError(
            f"unknown config key '{e.full_key}' in {source}" + (f"; did you mean '{hint}'?" if hint else "")
        ) from None
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(f"invalid config in {source}: {e}") from None


def _project_root(config_path: str) -> Path | None:
    """The folder holding `configs/` above a config file (the repository of a shipped config), if any."""
    for folder in Path(config_path).resolve().parents:
        if (folder / "configs").is_dir() and Path(config_path).resolve().is_relative_to(folder / "configs"):
            return folder
    return None


def _resolve_relative_paths(data: Any, root: Path | None) -> Any:
    """Relative paths in a config file are taken from the current folder; one that does not exist there but does
    under the project root (the folder holding configs/, e.g. `assets/toy/sd` in a shipped config) is made
    absolute, so a shipped config works from any folder. Other strings (hub ids) are left alone."""
    if root is None:
        return data
    if isinstance(data, dict):
        return {k: _resolve_relative_paths(v, root) for k, v in data.items()}
    if isinstance(data, list):
        return [_resolve_relative_paths(v, root) for v in data]
    if isinstance(data, str) and data and not data.startswith(("/", "~", "$")) and "/" in data:
        if not Path(data).exists() and (root / data).exists():
            return str(root / data)
    return data


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(
            f"command-line override {item!r} must look like dotted.key=value (e.g. train.lr=1e-5)"
        )
    key, value = item.split("=", 1)
    key = key.strip()
    if not key or not re.fullmatch(r"[A-Za-z_][\w\-]*(\.[\w\-]+)*", key):
        raise ConfigError(f"command-line override {item!r}: {key!r} is not a dotted key like train.lr")
    try:
        # from_dotlist parses the value with OmegaConf's YAML loader (1e-5 is a float there)
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={value}"]), resolve=False)
    except Exception as e:  # yaml errors come in many types
        raise ConfigError(f"command-line override {item!r}: cannot parse the value: {e}") from None
    return parsed  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------


def load_config(schema_cls: type, path: str | os.PathLike | None = None, overrides: Iterable[str] = ()):
    """Build a `schema_cls` instance from its defaults, a YAML file and `dotted.key=value` overrides.

    Raises:
        ConfigError: unknown key (with the closest valid key), wrong type or Literal choice, required
            value missing, unreadable YAML.
    """
    if not _is_dataclass_type(schema_cls):
        raise TypeError(f"load_config needs a dataclass schema, got {schema_cls!r}")
    cfg = OmegaConf.structured(schema_cls)
    if path is not None:
        path = str(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:
            raise ConfigError(f"cannot parse YAML config file {path}: {e}") from None
        data = _resolve_relative_paths(OmegaConf.to_container(file_cfg, resolve=False), _project_root(path))
        cfg = _merge_checked(cfg, data, schema_cls, path)
    for item in overrides:
        cfg = _merge_checked(cfg, _parse_override(item), schema_cls, f"{COMMAND_LINE} override {item!r}")

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        where = f"in {path}" if path else "in the YAML file"
        raise ConfigError(
            f"required config value{'s' if len(missing) > 1 else ''} not set: "
            + ", ".join(f"'{k}'" for k in missing)
            + f"; set {'them' if len(missing) > 1 else 'it'} {where} or on the command line,"
            f" e.g. {missing[0]}=<value>"
        )
    try:
        obj = OmegaConf.to_object(cfg)
    except oc_errors.InterpolationResolutionError as e:
        raise ConfigError(f"cannot resolve interpolation for config key '{e.full_key}': {e.msg}") from None
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(f"invalid config (key '{e.full_key}'): {e.msg}") from None
    except (ValueError, TypeError) as e:  # raised by a schema's __post_init__ checks
        raise ConfigError(f"invalid config: {e}") from None
    check_constraints(obj)
    return obj


def _violation(value: Any, meta: dict) -> str | None:
    """What is wrong with `value` under the field's constraints, or None."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v != v:  # NaN
            return "must be a number, not NaN"
        for name, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                               ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            if name in meta and not ok(v, meta[name]):
                return f"must be {word} {meta[name]}"
    kind = meta.get("exists")
    if kind and value not in (None, ""):
        text = str(value)
        if text.startswith("<") and text.endswith(">"):
            return f"is a placeholder of the shipped config: give your own path, e.g. path/to/{text.strip('<>')}"
        p = Path(os.path.expanduser(text))
        if kind == "file" and not p.is_file():
            return "must be an existing file" + (" (it is a folder)" if p.is_dir() else "")
        if kind == "dir" and not p.is_dir():
            return "must be an existing folder"
        if kind == "path" and not p.exists():
            return "must be an existing file or folder"
    return None


_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".tsv", ".arrow")


def check_local_source(key: str, value: str | None) -> None:
    """A data source that is plainly a local path (a known file suffix, or starting with / . ~) must exist;
    anything else may be a hub id and is resolved later. Raises ValueError naming the key."""
    if not value:
        return
    text = str(value)
    if text.startswith("<") and text.endswith(">"):
        raise ValueError(f"{key}={text} is a placeholder of the shipped config: give your own data, e.g. "
                         f"{key}=path/to/{text.strip('<>')}")
    local = text.lower().endswith(_LOCAL_SUFFIXES) or text.startswith(("/", "./", "../", "~"))
    if local and not Path(os.path.expanduser(text)).exists():
        raise ValueError(f"{key}={text!r}: no such file or folder; give an existing path (relative paths are "
                         f"taken from the current folder, {os.getcwd()}) or a hub dataset id")


def check_constraints(obj: Any, prefix: str = "") -> None:
    """Check every field's `ge/gt/le/lt/exists` constraint of a config instance; ConfigError names the key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_constraints(value, key + ".")
            continue
        problem = _violation(value, f.metadata)
        if problem:
            raise ConfigError(f"config key '{key}' = {value!r} {problem}; set another value in the YAML file or "
                              f"on the command line ({key}=...), see --help-config")


def to_yaml(cfg: Any) -> str:
    """The config (dataclass instance or DictConfig) as resolved YAML."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        node = cfg
    elif dataclasses.is_dataclass(cfg):
        node = OmegaConf.structured(cfg)
    else:
        node = OmegaConf.create(cfg)
    return OmegaConf.to_yaml(node, resolve=True)


def _format_default(value: Any) -> str:
    if isinstance(value, str) and value == MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _constraint_text(schema_cls: type, key: str) -> str:
    cls, f = schema_cls, None
    for part in key.split("."):
        if not _is_dataclass_type(cls):
            return ""
        f = next((x for x in dataclasses.fields(cls) if x.name == part), None)
        if f is None:
            return ""
        cls = _strip_optional(typing.get_type_hints(cls).get(part, Any))[0]
    meta = f.metadata if f is not None else {}
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{words[k]} {meta[k]}" for k in words if k in meta]
    if meta.get("exists"):
        parts.append(f"existing {meta['exists']}")
    return ", ".join(parts)


def config_help(schema_cls: type) -> str:
    """A plain-text table of every dotted key: type, default and help string."""
    rows = [("key", "type", "default", "help")]
    for key, tp, default, help_text in config_keys(schema_cls):
        inner, _ = _strip_optional(tp)
        bounds = _constraint_text(schema_cls, key)
        help_text = f"{help_text} [{bounds}]" if bounds else help_text
        if _is_dataclass_type(inner):
            rows.append((key + ".*", "section", "", help_text))
        else:
            rows.append((key, _type_name(tp), _format_default(default), help_text))
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in ((0, 40), (1, 30), (2, 24))]
    lines = []
    for i, (key, tname, default, help_text) in enumerate(rows):
        lines.append(
            f"{key:<{widths[0]}}  {tname:<{widths[1]}}  {default:<{widths[2]}}  {help_text}".rstrip()
        )
        if i == 0:
            lines.append("-" * (sum(widths) + 6 + 4))
    return "\n".join(lines) + "\n"


_VERSION_PACKAGES = {
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "peft": "peft",
    "open_clip": "open-clip-torch",
    "imgalign": "imgalign",
}


def _package_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        if dist == "imgalign":
            import imgalign

            return getattr(imgalign, "__version__", None)
        return None


def package_versions() -> dict[str, Any]:
    """Versions of Python, the platform and the packages a run depends on (None if not installed)."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for name, dist in _VERSION_PACKAGES.items():
        info[name] = _package_version(dist)
    return info


def git_revision(path: str | os.PathLike | None = None) -> str:
    """`<sha>` plus ` (dirty)` when the tree holding `path` (default: the imgalign sources) has local
    changes; "unknown" when it is not a git checkout or git is missing. Never raises."""
    src = Path(path) if path is not None else Path(__file__).resolve().parent
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: never touch the index lock
    try:
        sha = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
        )
        if sha.returncode != 0 or not sha.stdout.strip():
            return "unknown"
        status = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
        )
        dirty = status.returncode == 0 and bool(status.stdout.strip())
        return sha.stdout.strip() + (" (dirty)" if dirty else "")
    except Exception:
        return "unknown"


def save_run_info(cfg: Any, out_dir: str | os.PathLike) -> Path:
    """Write `config.yaml` (resolved), `versions.json` and `git_revision.txt` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "versions.json").write_text(json.dumps(package_versions(), indent=2) + "\n")
    (out / "git_revision.txt").write_text(git_revision() + "\n")
    return out
