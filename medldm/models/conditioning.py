"""Conditioning vectors for cross-attention: age, sex and diagnosis, with "unknown" as the null condition.

Each condition owns its own slots of the context vector; an unknown or dropped condition leaves its
slots at zero, which is exactly the null (unconditional) context used by classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

SEXES = ("M", "F")
DIAGNOSES = ("CN", "MCI", "AD")
# slots per condition: age = (value normalised with train statistics, known flag)
WIDTHS = {"age": 2, "sex": len(SEXES), "diagnosis": len(DIAGNOSES)}


class ConditionEncoder:
    """Turns manifest labels into context vectors of shape (B, 1, dim)."""

    def __init__(self, keys: Sequence[str], age_mean: float = 70.0, age_std: float = 10.0) -> None:
        unknown = [k for k in keys if k not in WIDTHS]
        if unknown:
            raise ValueError(f"unknown condition(s) {unknown}; choose from {list(WIDTHS)}")
        self.keys = list(keys)
        self.age_mean = float(age_mean)
        self.age_std = float(age_std) if age_std > 0 else 1.0

    @classmethod
    def fit(cls, keys: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> ConditionEncoder:
        """Age normalisation from the training rows that have an age."""
        ages = [float(r["age"]) for r in rows if r.get("age") is not None]
        mean = sum(ages) / len(ages) if ages else 70.0
        std = math.sqrt(sum((a - mean) ** 2 for a in ages) / len(ages)) if len(ages) > 1 else 10.0
        return cls(keys, mean, std)

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys, "age_mean": self.age_mean, "age_std": self.age_std}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ConditionEncoder:
        return cls(state["keys"], state["age_mean"], state["age_std"])

    @property
    def dim(self) -> int:
        return sum(WIDTHS[k] for k in self.keys)

    def encode_one(self, labels: Mapping[str, Any]) -> torch.Tensor:
        """Vector (dim,) for one subject; missing labels are the null condition (zeros), never a value."""
        parts = []
        for key in self.keys:
            v = torch.zeros(WIDTHS[key])
            value = labels.get(key)
            if key == "age" and value is not None:
                v[0], v[1] = (float(value) - self.age_mean) / self.age_std, 1.0
            elif key == "sex" and value is not None:
                v[SEXES.index(value)] = 1.0
            elif key == "diagnosis" and value is not None:
                v[DIAGNOSES.index(value)] = 1.0
            parts.append(v)
        return torch.cat(parts)

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """Context (B, 1, dim) for a batch of label dicts."""
        return torch.stack([self.encode_one(r) for r in rows])[:, None, :]

    def drop(self, context: torch.Tensor, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Zero each condition of each sample independently with probability ``prob`` (for guidance)."""
        out = context.clone()
        start = 0
        for key in self.keys:
            width = WIDTHS[key]
            u = torch.rand(out.shape[0], generator=generator, device=generator.device if generator else "cpu")
            out[u.to(out.device) < prob, :, start : start + width] = 0.0
            start += width
        return out

    def parse(self, conditions: Mapping[str, str]) -> dict[str, Any]:
        """Validate ``--condition key=value`` pairs into labels; unknown keys and values are errors."""
        labels: dict[str, Any] = {}
        for key, raw in conditions.items():
            if key not in self.keys:
                raise ValueError(f"--condition {key}=...: this model is conditioned on {self.keys or 'nothing'}")
            if key == "age":
                try:
                    labels["age"] = float(raw)
                except ValueError:
                    raise ValueError(f"--condition age={raw}: age must be a number of years") from None
            elif key == "sex":
                value = raw.strip().upper()[:1]
                if value not in SEXES:
                    raise ValueError(f"--condition sex={raw}: use M or F")
                labels["sex"] = value
            else:
                value = raw.strip().upper()
                if value not in DIAGNOSES:
                    raise ValueError(f"--condition diagnosis={raw}: use one of {list(DIAGNOSES)}")
                labels["diagnosis"] = value
        return labels
