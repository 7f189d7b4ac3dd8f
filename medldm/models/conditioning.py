"""Conditioning vectors for cross-attention: age, sex, diagnosis and extra numeric manifest columns.

Each condition owns its own slots of the context vector; an unknown or dropped condition leaves its
slots at zero, which is exactly the null (unconditional) context used by classifier-free guidance.
A numeric condition has two slots (the value standardised with the training split's statistics, and a
"known" flag), so a known value equal to the mean is not confused with an unknown one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch

from medldm.errors import InputError

CATEGORIES = {"sex": ("M", "F"), "diagnosis": ("CN", "MCI", "AD")}


def condition_width(key: str) -> int:
    """Slots of one condition in the context vector: one per category, or value + known flag."""
    return len(CATEGORIES[key]) if key in CATEGORIES else 2


def _number(value: Any, key: str, where: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {key}={value!r} is not a number; fix the manifest column or leave it empty "
                         "(unknown)") from None
    if not math.isfinite(number):
        raise InputError(f"{where}: {key}={value!r} is not a finite number")
    return number


def _category(value: Any, key: str, where: str) -> int:
    """The slot of a category label (sex, diagnosis) in its condition; any other value is an error."""
    allowed = CATEGORIES[key]
    if value not in allowed:
        raise InputError(f"{where}: {key}={value!r} is not one of {list(allowed)}; correct it or leave it empty "
                         "(unknown)")
    return allowed.index(value)


def _where(source: str, row: Mapping[str, Any]) -> str:
    return f"{source}, {row['image']}" if row.get("image") else source


class ConditionEncoder:
    """Turns manifest labels into context vectors of shape (B, 1, dim).

    ``numeric`` holds, per numeric key, the training split's mean, std, min and max: the mean and std
    standardise values, the range bounds what sampling may ask for.
    """

    def __init__(self, keys: Sequence[str], numeric: Mapping[str, Mapping[str, float]]) -> None:
        self.keys = list(keys)
        self.numeric = {k: dict(v) for k, v in numeric.items()}
        missing = [k for k in self.keys if k not in CATEGORIES and k not in self.numeric]
        if missing:
            raise InputError(f"numeric condition(s) {missing} have no training statistics")

    @classmethod
    def fit(cls, keys: Sequence[str], rows: Sequence[Mapping[str, Any]], source: str = "manifest.csv"
            ) -> ConditionEncoder:
        """Statistics of the numeric keys over the training ``rows``; a key no row has is an error."""
        numeric = {}
        for key in keys:
            if key in CATEGORIES:
                given = [r for r in rows if r.get(key) is not None]
                for r in given:
                    _category(r[key], key, _where(source, r))
                known = len(given)
            else:
                values = [v for r in rows if (v := _number(r.get(key), key, _where(source, r))) is not None]
                known = len(values)
                if values:
                    mean = sum(values) / len(values)
                    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
                    numeric[key] = {"mean": mean, "std": std if std > 0 else 1.0, "min": min(values),
                                    "max": max(values)}
            if not known:
                raise InputError(f"diffusion.conditioning.keys names {key!r}, but no training scan in {source} has a "
                                 f"value for it (the column is missing or empty): fill the {key!r} column or remove "
                                 f"{key!r} from conditioning.keys")
        return cls(keys, numeric)

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys, "numeric": self.numeric}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ConditionEncoder:
        if "numeric" not in state:  # checkpoints before extra numeric conditions: age only, range not recorded
            age = {"mean": state["age_mean"], "std": state["age_std"], "min": -math.inf, "max": math.inf}
            return cls(state["keys"], {"age": age} if "age" in state["keys"] else {})
        return cls(state["keys"], state["numeric"])

    @property
    def dim(self) -> int:
        return sum(condition_width(k) for k in self.keys)

    def encode_one(self, labels: Mapping[str, Any], where: str = "labels") -> torch.Tensor:
        """Vector (dim,) for one subject; missing labels are the null condition (zeros), never a value. A label
        that is neither is an error naming ``where`` it came from."""
        parts = []
        for key in self.keys:
            v = torch.zeros(condition_width(key))
            value = labels.get(key)
            if value is not None and value != "":
                if key in CATEGORIES:
                    v[_category(value, key, where)] = 1.0
                else:
                    stats = self.numeric[key]
                    # value is given, so _number returns a float (or raises)
                    v[0], v[1] = (cast(float, _number(value, key, where)) - stats["mean"]) / stats["std"], 1.0
            parts.append(v)
        return torch.cat(parts)

    def encode(self, rows: Sequence[Mapping[str, Any]], source: str = "labels") -> torch.Tensor:
        """Context (B, 1, dim) for a batch of label dicts (manifest rows: errors name ``source`` and the image)."""
        return torch.stack([self.encode_one(r, _where(source, r)) for r in rows])[:, None, :]

    def drop(self, context: torch.Tensor, prob: float, prob_all: float, generator: torch.Generator) -> torch.Tensor:
        """Null each condition of each sample with ``prob``, and all of them with ``prob_all`` (for guidance)."""
        out = context.clone()
        keep_all = torch.rand(out.shape[0], generator=generator, device=generator.device) >= prob_all
        start = 0
        for key in self.keys:
            width = condition_width(key)
            keep = (torch.rand(out.shape[0], generator=generator, device=generator.device) >= prob) & keep_all
            out[:, :, start:start + width] *= keep.to(out.device, out.dtype)[:, None, None]
            start += width
        return out

    def parse(self, conditions: Mapping[str, str], source: str = "--condition") -> dict[str, Any]:
        """Validate ``--condition key=value`` pairs into labels; unknown keys, values and ages out of range are
        errors that begin with ``source`` (the option, or a file and row)."""
        labels: dict[str, Any] = {}
        for key, raw in conditions.items():
            if key not in self.keys:
                raise InputError(f"{source} {key}=...: this model is conditioned on "
                                 f"{self.keys or 'nothing (it samples unconditionally)'}")
            value: str | float
            if key == "sex":
                value = raw.strip().upper()[:1]
                if value not in CATEGORIES["sex"]:
                    raise InputError(f"{source} sex={raw}: use M or F")
                labels[key] = value
            elif key in CATEGORIES:
                value = raw.strip().upper()
                if value not in CATEGORIES[key]:
                    raise InputError(f"{source} {key}={raw}: use one of {list(CATEGORIES[key])}")
                labels[key] = value
            else:
                try:
                    value = float(raw)
                except ValueError:
                    unit = " of years" if key == "age" else ""
                    raise InputError(f"{source} {key}={raw}: {key} must be a number{unit}") from None
                lo, hi = self.numeric[key]["min"], self.numeric[key]["max"]
                if not lo <= value <= hi:
                    raise InputError(f"{source} {key}={raw}: outside the training range {lo:g}–{hi:g}; the model "
                                     "has not seen such scans")
                labels[key] = value
        return labels


class UnitRangeConditions:
    """Conditions a model takes as values in [0, 1] (one slot each), mapped linearly from a documented range.

    This is how imported models such as the MONAI brain-LDM bundle were trained: every condition is always given
    (a missing one takes its documented default), no condition was ever dropped, so there is no null condition and
    no classifier-free guidance. ``ranges[key]`` holds ``min`` and ``max`` (the values that map to 0 and 1), and
    ``default``, ``unit`` and ``doc``; ``sex`` maps M/F through ``codes``.
    """

    scheme = "unit_range"
    guidance = False

    def __init__(self, keys: Sequence[str], ranges: Mapping[str, Mapping[str, Any]],
                 codes: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self.keys = list(keys)
        self.ranges = {k: dict(v) for k, v in ranges.items()}
        self.codes = {k: dict(v) for k, v in (codes or {}).items()}
        missing = [k for k in self.keys if k not in self.ranges and k not in self.codes]
        if missing:
            raise InputError(f"condition(s) {missing} have neither a range nor codes")

    @property
    def dim(self) -> int:
        return len(self.keys)

    def state_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "keys": self.keys, "ranges": self.ranges, "codes": self.codes}

    def describe(self) -> list[str]:
        """One line per condition: what it accepts and its default."""
        lines = []
        for key in self.keys:
            if key in self.codes:
                lines.append(f"{key}: {' or '.join(self.codes[key])} "
                             f"(default {self.ranges.get(key, {}).get('default')})")
            else:
                r = self.ranges[key]
                lines.append(f"{key}: {r['min']:g}–{r['max']:g} {r.get('unit', '')} (default {r['default']:g}); "
                             f"{r.get('doc', '')}".rstrip("; "))
        return lines

    def parse(self, conditions: Mapping[str, str], source: str = "--condition") -> dict[str, Any]:
        """Validate ``--condition key=value`` pairs; an unknown name, code or a value outside the range is an error
        that begins with ``source``."""
        labels: dict[str, Any] = {}
        for key, raw in conditions.items():
            if key not in self.keys:
                raise InputError(f"{source} {key}=...: this model takes {self.keys}")
            value: str | float
            if key in self.codes:
                value = raw.strip().upper()[:1] if key == "sex" else raw.strip()
                if value not in self.codes[key]:
                    raise InputError(f"{source} {key}={raw}: use one of {list(self.codes[key])}")
            else:
                try:
                    value = float(raw)
                except ValueError:
                    raise InputError(f"{source} {key}={raw}: must be a number") from None
                lo, hi = self.ranges[key]["min"], self.ranges[key]["max"]
                if not min(lo, hi) <= value <= max(lo, hi):
                    raise InputError(f"{source} {key}={raw}: outside the model's range {lo:g}–{hi:g} "
                                     f"{self.ranges[key].get('unit', '')}".rstrip())
            labels[key] = value
        return labels

    def filled(self, labels: Mapping[str, Any]) -> dict[str, Any]:
        """``labels`` with every condition not given set to its default (this model has no 'unknown')."""
        return {k: labels.get(k, self.ranges.get(k, {}).get("default")) for k in self.keys}

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """Context (B, 1, dim) in [0, 1]."""
        out = torch.zeros(len(rows), 1, self.dim)
        for i, row in enumerate(rows):
            for j, (key, value) in enumerate(self.filled(row).items()):
                if key in self.codes:
                    value = self.codes[key][value] if value in self.codes[key] else float(value)
                    out[i, 0, j] = value
                else:
                    lo, hi = self.ranges[key]["min"], self.ranges[key]["max"]
                    out[i, 0, j] = (float(value) - lo) / (hi - lo)
        return out


def conditions_from_state(state: Mapping[str, Any]) -> ConditionEncoder | UnitRangeConditions:
    """The condition encoder a diffusion checkpoint was saved with."""
    if state.get("scheme") == UnitRangeConditions.scheme:
        return UnitRangeConditions(state["keys"], state["ranges"], state.get("codes"))
    return ConditionEncoder.from_state_dict(state)


def with_condition_channels(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The input of a UNet that also takes its conditions by concatenation ("hybrid"): the latent plus one
    constant channel per context slot, (B, C + dim, X, Y, Z)."""
    return torch.cat([x, context[:, 0, :, None, None, None].expand(-1, -1, *x.shape[2:]).to(x.dtype)], dim=1)


def parse_labels(conditions: ConditionEncoder | UnitRangeConditions, given: Mapping[str, str] | None,
                 source: str = "--condition") -> dict[str, Any]:
    """The labels a model is given for ``key=value`` pairs (errors begin with ``source``)."""
    labels = conditions.parse(given or {}, source=source)
    if isinstance(conditions, UnitRangeConditions):  # no "unknown" conditions: the defaults stand in, and are recorded
        labels = conditions.filled(labels)
    return labels


def condition_context(conditions: ConditionEncoder | UnitRangeConditions, given: Mapping[str, str] | None,
                      device: torch.device) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The context (1, 1, dim) for ``--condition`` pairs (None for an unconditional model), and the labels used."""
    labels = parse_labels(conditions, given)
    return (conditions.encode([labels]).to(device) if conditions.keys else None), labels
