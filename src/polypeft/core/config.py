"""Typed configs: one validator over dataclass type hints checks every method config and CLI recipe.

MethodConfig (core/method_config.py) builds on it; the registry of methods lives above the core.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional, Sequence, Union
from typing import get_args, get_origin, get_type_hints

from .language_codes import LanguageCodes, checked_codes

class ConfigError(ValueError):
    """A configuration value or file that polypeft cannot use."""


@dataclass(frozen=True)
class Range:
    """Bounds of a number field, used as `Annotated[int, Range(1)]`."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    text: str = ""

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


PositiveInt = Annotated[int, Range(1, text="positive")]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True, text="positive")]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1, high_open=True)]
UnitInterval = Annotated[float, Range(0, 1)]
LanguageList = Annotated[list[str], LanguageCodes()]


@dataclass(frozen=True)
class Source:
    """Where a mapping's values came from: a file (with the line of each key path) and `--set` overrides."""

    name: str = ""
    lines: Mapping[str, int] = dataclasses.field(default_factory=dict)
    overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)
    prefix: str = ""

    def label(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def where(self, key: str = "") -> str:
        """`file`, `file (line 3)` or `--set key=value` for the key path `key` (inner paths look outward)."""
        path = re.sub(r"\[\d+\]", "", self.label(key)).rstrip(".")  # an item of a list is on its list's line
        while path:
            given = path if path in self.overrides else path.split(".")[0]
            if given in self.overrides:
                return f"--set {self.overrides[given]}"
            if path in self.lines:
                return f"{self.name} (line {self.lines[path]})"
            path = path.rpartition(".")[0]
        return self.name

    def child(self, key: str) -> "Source":
        return dataclasses.replace(self, prefix=f"{self.label(key)}.")


def source_of(where: Union[str, Source, None]) -> Source:
    return where if isinstance(where, Source) else Source(str(where) if where else "")


# ----------------------------------------------------------------------------- the type checker

def describe(hint: Any) -> str:
    """What a value of type `hint` looks like, in words a YAML author reads."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        ranges = [extra.describe() for extra in hint.__metadata__ if isinstance(extra, Range)]
        inner = describe(args[0])
        if ranges and ranges[0] == "positive":
            return inner.replace("an int", "a positive int").replace("a number", "a positive number")
        return " ".join([inner, *ranges])
    if origin in (Union, types.UnionType):
        # Sorted: typing caches equal Unions, so the order of `args` depends on which was spelled first.
        options = sorted(describe(a) for a in args if a is not type(None))
        text = " or ".join(options)
        return f"{text} or null" if type(None) in args else text
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple, set, SequenceABC):
        return f"a list of {plural(describe(args[0]) if args else 'value')}"
    if origin in (dict, MappingABC):
        return f"a mapping of {plural(describe(args[0]))} to {plural(describe(args[1]))}"
    if dataclasses.is_dataclass(hint):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(hint) if f.init]}"
    return {bool: "true or false (a YAML boolean, not quoted)", int: "an int", float: "a number", str: "a string",
            Any: "any value"}.get(hint, getattr(hint, "__name__", str(hint)))


def plural(text: str) -> str:
    for article in ("an ", "a "):
        if text.startswith(article):
            word, _, rest = text[len(article):].partition(" ")
            return f"{word}s {rest}".strip() if word != "true" else text
    return text


def checked(value: Any, hint: Any, key: str, source: Source, shown: Any = None) -> Any:
    """`value` if it fits `hint` (lists and nested dataclasses rebuilt), else a ConfigError that names it;
    `shown` is the type the message names (the whole `Annotated` type when its inner type is checked)."""
    origin, args = get_origin(hint), get_args(hint)

    def refuse(problem: Optional[str] = None) -> ConfigError:
        allowed = describe(shown or hint)
        if problem is None and isinstance(value, float) and not math.isfinite(value):  # NaN passes every < and >
            problem = "must be a finite number" + ("" if allowed == "a number" else f" ({allowed})")
        problem = problem or f"must be {allowed}"
        place = source.where(key)
        return ConfigError(f"{place + ': ' if place else ''}{source.label(key)}={value!r} {problem}")

    if hint is Any:
        return value
    if origin is Annotated:
        value = checked(value, args[0], key, source, shown=hint)
        for extra in hint.__metadata__:
            if isinstance(extra, Range) and value is not None and not extra.holds(value):
                raise refuse()
            if isinstance(extra, LanguageCodes) and value is not None:
                place = source.where(key)
                value = checked_codes(value, f"{place + ': ' if place else ''}{source.label(key)}", ConfigError)
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        shaped = []  # errors of the options shaped like the value (a mapping, a list): the one to report
        for option in (a for a in args if a is not type(None)):
            try:
                return checked(value, option, key, source)
            except ConfigError as error:
                if shape_of(option) is not None and isinstance(value, shape_of(option)):
                    shaped.append(error)
        raise shaped[0] if len(shaped) == 1 else refuse()
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise refuse(f"is not allowed; choose one of {list(args)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise refuse()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise refuse()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise refuse()
    if hint is str:
        if isinstance(value, str):
            return value
        raise refuse()
    if origin in (list, tuple, SequenceABC):
        if not isinstance(value, (list, tuple)):
            kind = "a string" if isinstance(value, str) else type(value).__name__
            raise refuse(f"must be {describe(hint)}, not {kind}")
        item = args[0] if args else Any
        items = [checked(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, MappingABC):
        if not isinstance(value, Mapping):
            raise refuse()
        key_hint, value_hint = args or (Any, Any)
        return {checked(k, key_hint, f"{key}.{k}", source): checked(v, value_hint, f"{key}.{k}", source)
                for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return build(hint, value, source.child(key))
        raise refuse()
    if isinstance(hint, type) and not isinstance(value, hint):
        raise refuse()
    return value


def shape_of(hint: Any) -> Optional[tuple[type, ...]]:
    """The Python types of a container hint (mapping or list), None for a scalar."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint) or origin in (dict, MappingABC):
        return (Mapping,)
    if origin in (list, tuple, SequenceABC):
        return (list, tuple)
    return shape_of(get_args(hint)[0]) if origin is Annotated else None


def field_hints(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def check_fields(config: Any, where: Union[str, Source, None] = None) -> None:
    """Check (and normalise: tuples to lists, mappings to nested dataclasses) every field of `config`."""
    source = source_of(where) if where else Source(prefix=f"{type(config).__name__}.")
    for name, hint in field_hints(type(config)).items():
        object.__setattr__(config, name, checked(getattr(config, name), hint, name, source))


def build(cls: type, data: Any, where: Union[str, Source, None] = None, error_type: Optional[type] = None) -> Any:
    """Dataclass `cls` from a mapping: unknown or missing keys and every field's type are checked before the
    class's own cross-field checks run; every message names the file (and line) the value came from."""
    try:
        return _build(cls, data, source_of(where))
    except ConfigError as error:
        raise as_error_type(error, error_type or getattr(cls, "error_type", ConfigError)) from None


def as_error_type(error: Exception, error_type: type) -> Exception:
    return error if isinstance(error, error_type) else error_type(str(error))


def _build(cls: type, data: Any, source: Source) -> Any:
    owner = source.prefix.rstrip(".") or cls.__name__
    place = source.where(source.prefix.rstrip("."))
    lead = "".join(f"{part}: " for part in (place, source.prefix.rstrip(".")) if part)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{lead}{owner} must be a mapping of keys {sorted(field_hints(cls))}, "
                          f"got {type(data).__name__} {data!r}")
    hints = field_hints(cls)
    data, source = with_moved_keys(cls, data, source, lead)
    data, source = over_defaults(cls, data, source, lead)
    unknown = sorted(str(key) for key in set(data) - set(hints))
    if unknown:
        method = f" for method {cls.method!r}" if getattr(cls, "method", "") else ""
        raise ConfigError(f"{lead}unknown keys {unknown}{method}; allowed keys are {sorted(hints)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{lead}missing keys {missing} in {owner}; allowed keys are {sorted(hints)}")
    values = {name: checked(value, hints[name], name, source) for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as error:
        # A cross-field message starts with the key it is about: name that key's line (or --set pair).
        first = re.match(r"[A-Za-z_]\w*", str(error))
        where = source.where(first.group(0) if first and first.group(0) in data else source.prefix.rstrip("."))
        if where and not str(error).startswith(source.name or where):
            raise type(error)(f"{where}: {error}") from None
        raise


def with_moved_keys(cls: type, data: Mapping[str, Any], source: Source, lead: str,
                    block_path: str = "") -> tuple[dict[str, Any], Source]:
    """`data` with the keys a class moved (`moved_keys`: old key -> new key or "block.key") in their new place and
    `source` knowing their lines, so old files still read; `block_path`: where `data` sits below `source`."""
    data, lines, overrides = dict(data), dict(source.lines), dict(source.overrides)
    for old, new in getattr(cls, "moved_keys", {}).items():
        if old not in data:
            continue
        block, _, key = new.rpartition(".")
        target = data.get(block, {}) if block else data
        if not isinstance(target, Mapping) or key in target:
            raise ConfigError(f"{lead}{old!r} and {new!r} are both given: {old!r} is the old name of {new!r}; "
                              f"keep {new!r}")
        value = data.pop(old)
        data.update({block: {**target, key: value}} if block else {key: value})
        old_path, new_path = (source.label(f"{block_path}{name}") for name in (old, new))
        if old_path in lines:
            lines[new_path] = lines[old_path]
        if old_path in overrides:
            overrides[new_path] = overrides[old_path]
    return data, dataclasses.replace(source, lines=lines, overrides=overrides)


def over_defaults(cls: type, data: dict[str, Any], source: Source, lead: str) -> tuple[dict[str, Any], Source]:
    """A nested block given as a mapping changes only the keys it names: the rest keep the field's default
    (a recipe's own defaults for its training block, not the block class's)."""
    for field in dataclasses.fields(cls):
        value = data.get(field.name)
        if not isinstance(value, Mapping) or field.default_factory is dataclasses.MISSING:
            continue
        default = field.default_factory()
        if dataclasses.is_dataclass(default):
            given, source = with_moved_keys(type(default), value, source, f"{lead}{field.name}: ", f"{field.name}.")
            data[field.name] = {**{f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init},
                                **given}
    return data, source


def recipe_from_dict(cls: type, data: Mapping[str, Any], where: Union[str, Source] = "recipe") -> Any:
    """Build recipe dataclass `cls` from `data` through the typed checks (the CLI commands' recipes)."""
    return build(cls, data, where)


class ReadsMovedKeys(type):
    """A config called with a key it moved (`TaskTrainingSettings(steps=300)`, `TrainSettings(learning_rate=...)`)
    is built as `from_values` builds it, so the names users know from YAML and transformers work as arguments too."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        fields = {field.name for field in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        moved = [key for key in kwargs if key in cls.moved_keys and key not in fields]
        if not moved:
            return super().__call__(*args, **kwargs)
        if args:  # positional arguments name the fields in order, as the dataclass's own __init__ reads them
            names = [field.name for field in dataclasses.fields(cls) if field.init]
            if len(args) > len(names):
                raise TypeError(f"{cls.__name__} takes at most {len(names)} positional arguments ({len(args)} given)")
            twice = sorted(set(names[:len(args)]) & set(kwargs))
            if twice:
                raise TypeError(f"{cls.__name__} got multiple values for {twice}")
            kwargs = {**dict(zip(names, args)), **kwargs}
        for key in moved:  # a block given as an object already holds the key: which one is meant is unclear
            block, _, inner = cls.moved_keys[key].rpartition(".")
            if block and dataclasses.is_dataclass(kwargs.get(block)):
                raise cls.error_type(f"{cls.__name__}: {key}={kwargs[key]!r} is {block}.{inner}, and {block} is "
                                     f"given too: set {inner} in that {block} (with dataclasses.replace: "
                                     f"{block}=replace(old.{block}, {inner}=...)), or leave {block} out")
        return cls.from_values(**kwargs)


class TypedConfig(metaclass=ReadsMovedKeys):
    """Base of every config and recipe dataclass: each field is checked against its type on construction.

    A small validator over type hints rather than pydantic: the configs stay plain dataclasses (asdict, replace
    and ClassVar defaults keep working), messages follow the house format, and no dependency is added.
    """

    error_type: ClassVar[type] = ConfigError  # a subclass of ConfigError, for methods with their own
    # Keys that moved (old key -> new key or "block.key"): read from mappings, so old files keep working.
    moved_keys: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        try:
            check_fields(self)
        except ConfigError as error:
            raise as_error_type(error, self.error_type) from None

    @classmethod
    def from_values(cls, **values: Any) -> Any:
        """The settings from keys as a YAML file gives them: moved keys read into their blocks, and a block's
        keys not named keep this class's defaults (`TaskTrainingSettings.from_values(steps=300)`)."""
        return build(cls, values, cls.__name__)
