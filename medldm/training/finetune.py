"""Starting a training run from another run's weights (``--init-from``): the parent checkpoint found and checked
against the new run (architecture, data grid, autoencoder), its weights mapped onto the new model (the context
columns of new conditions at zero, those of removed ones dropped), and the parameters outside ``train.trainable``
frozen. What is specific to each stage stays in ``autoencoder`` and ``diffusion``; this module holds what both use."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from medldm.artifacts import best_checkpoint, file_sha256
from medldm.config import ConfigError, TrainConfig, config_from_dict, to_dict
from medldm.data.io import read_json
from medldm.errors import InputError
from medldm.models.conditioning import ConditionEncoder, UnitRangeConditions, condition_width

log = logging.getLogger(__name__)

# the entry of train.trainable that stands for every weight reading the condition vector (no one substring does)
CONDITIONS = "conditions"
# the grid of the MONAI brain-LDM bundle and the shipped preprocessing config that produces it
BRAIN_LDM_SHAPE = [160, 224, 160]
BRAIN_LDM_CONFIG = "configs/preprocess/brain_ldm.yaml"


@dataclass(frozen=True)
class Init:
    """What a new run starts from: the parent's weights as the new model takes them, and what its checkpoints record
    of the parent (``checkpoint``, ``sha256``, ``imported_from``)."""

    weights: dict[str, torch.Tensor]
    record: dict[str, Any]
    scale_factor: float = 1.0  # diffusion: the parent's latent scale (the one its weights were trained on)


def parent_checkpoint(path: str | Path, stage: str) -> Path:
    """The checkpoint that ``--init-from PATH`` names: a checkpoint file, a run dir (best.pt, else latest.pt), or
    the folder `medldm import-bundle` wrote (its ``stage`` run)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "checkpoints").is_dir():
        return best_checkpoint(path, stage)
    if (path / "bundle.json").is_file() and (path / stage / "checkpoints").is_dir():
        return best_checkpoint(path / stage, stage)
    if (path / "configs" / "inference.json").is_file():
        raise InputError(f"--init-from {path} is a MONAI bundle folder: give it on the command line (`medldm train "
                         f"{stage} --init-from {path}` imports it), or import it first with `medldm import-bundle "
                         f"{path} --out RUNS` and pass --init-from RUNS")
    raise FileNotFoundError(f"--init-from {path}: not a checkpoint, a medldm run dir or a folder written by "
                            "`medldm import-bundle`")


def parent_record(path: Path, sha256: str, imported_from: dict[str, Any] | None) -> dict[str, Any]:
    """What every checkpoint of a fine-tune keeps of its parent (and what ``--resume`` compares)."""
    return {"checkpoint": str(path.resolve()), "sha256": sha256, "imported_from": imported_from}


def check_options(tc: TrainConfig, fine_tune: bool) -> None:
    """The ``train`` keys that only mean something for a run started with --init-from."""
    if fine_tune:
        return
    if tc.trainable:
        raise ConfigError(f"train.trainable={tc.trainable} freezes the other weights of a model the run starts "
                          "from: give --init-from PARENT, or remove train.trainable")
    if tc.steps == 0:
        raise ConfigError("train.steps=0 trains nothing: it writes the starting point of an --init-from run only; "
                          "set train.steps >= 1")


def check_same_parent(recorded: dict[str, Any] | None, init_from: str | Path | None, stage: str,
                      latest: Path) -> None:
    """``--resume`` wins over ``--init-from``: the run continues from its own checkpoint, which records its parent;
    an ``--init-from`` given as well must name that parent (by SHA-256), so that a mistaken one is not ignored."""
    if init_from is None:
        return
    if recorded is None:
        raise InputError(f"--resume --init-from {init_from}: {latest} is a run trained from scratch, not a fine-tune; "
                         "resume it without --init-from")
    path = parent_checkpoint(init_from, stage)
    if file_sha256(path) != recorded["sha256"]:
        raise InputError(f"--resume --init-from {init_from}: {latest} was started from {recorded['checkpoint']} "
                         f"(SHA-256 {recorded['sha256'][:12]}…), not from {path}; resume without --init-from (the run "
                         "continues from its own checkpoint) or start a new run")


def check_trainable(stage: str, saved: dict[str, Any], cfg: Any, path: Path) -> None:
    """A run resumes training the parameters it trained: its optimiser holds their moments, and only theirs."""
    was, now = list(saved.get("train", {}).get("trainable", [])), list(cfg.train.trainable)
    if was != now:
        raise ConfigError(f"--resume: {stage}.train.trainable is {now} in this config but {was} in {path}; resume "
                          "with the run's config.yaml")


def finetune_schedule(tc: TrainConfig) -> TrainConfig:
    """The train config a fine-tune runs its learning rate by: ``finetune_warmup_steps`` of warm-up."""
    return dataclasses.replace(tc, warmup_steps=tc.finetune_warmup_steps)


def check_architecture(stage: str, parent_config: dict[str, Any], cfg: Any, sections: Sequence[tuple[str, Any]],
                       parent: Path) -> None:
    """The new run's networks (and, for diffusion, noise schedule) are the parent's: its weights must fit them."""
    new, old = to_dict(cfg), to_dict(config_from_dict(stage, parent_config))
    config_yaml = parent.parent.parent / "config.yaml"
    start = f"--config {config_yaml}" if config_yaml.is_file() else "the parent's config"
    for section, keys in sections:
        for k in keys or new[section]:
            if old[section][k] != new[section][k]:
                raise ConfigError(f"--init-from: {stage}.{section}.{k} is {new[section][k]} in this config but "
                                  f"{old[section][k]} in {parent}; a fine-tune keeps the parent's architecture: start "
                                  f"from {start} and change train.* (and the conditions) with --set")


# --- the grid the data is on -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """A dataset's voxel grid: shape, spacing (mm) and the directions of its axes (None where not recorded)."""

    shape: list[int]
    spacing: list[float] | None = None
    axes: str | None = None

    @classmethod
    def of(cls, reference: Mapping[str, Any]) -> Grid:
        """The grid of a ``reference`` (``shape`` and ``affine``) as datasets and checkpoints record it."""
        affine = np.asarray(reference["affine"], dtype=float)
        spacing = [round(float(s), 4) for s in np.linalg.norm(affine[:3, :3], axis=0)]
        return cls(list(reference["shape"]), spacing, "".join(nib.aff2axcodes(affine)))

    def describe(self) -> str:
        size = "×".join(str(s) for s in self.shape)
        if self.spacing is None:
            return size
        return f"{size} at {'×'.join(f'{s:g}' for s in self.spacing)} mm ({self.axes})"

    def fits(self, other: Grid) -> bool:
        if self.shape != other.shape:
            return False
        return self.spacing is None or other.spacing is None or bool(np.allclose(self.spacing, other.spacing,
                                                                                  atol=1e-3))


def autoencoder_grid(reference: dict[str, Any] | None, image_shape: list[int], data_dir: str | None,
                     checkpoint: Path) -> Grid:
    """The grid an autoencoder was trained on: recorded in its checkpoint, else the reference of the dataset it was
    trained on (when that is still there), else that of the bundle.json `medldm import-bundle` wrote beside an
    imported one; the shape alone when none is there."""
    if reference is None and data_dir and (Path(data_dir) / "preprocess.json").is_file():
        reference = read_json(Path(data_dir) / "preprocess.json").get("reference")
    bundle = checkpoint.parent.parent.parent / "bundle.json"
    if reference is None and bundle.is_file():
        reference = read_json(bundle).get("reference")
    return Grid.of(reference) if reference else Grid(list(image_shape))


def check_grid(parent: Grid, data: Grid, parent_path: Path, data_dir: Path, parent_data: str | None) -> None:
    """A fine-tune learns on the parent's grid: a dataset of another shape or spacing is refused with the
    preprocessing that produces the right one."""
    if parent.fits(data):
        if parent.axes and data.axes and parent.axes != data.axes:
            log.warning("the parent %s learnt arrays whose axes point %s, %s's point %s: a mirror of what it "
                        "learnt (brains are near-symmetric; the fine-tune learns the new layout, and samples are "
                        "written in the new dataset's space)", parent_path, parent.axes, data_dir, data.axes)
        return
    sets = f"--set shape=[{','.join(map(str, parent.shape))}]"
    if parent.spacing is not None:
        sets += f" --set spacing=[{','.join(f'{s:g}' for s in parent.spacing)}]"
    if parent.shape == BRAIN_LDM_SHAPE and parent.spacing is not None and np.allclose(parent.spacing, 1.0):
        fix = f"`medldm preprocess RAW_DIR OUT_DIR --config {BRAIN_LDM_CONFIG}` (the MONAI brain-LDM's grid)"
    elif parent_data and (Path(parent_data) / "preprocess.json").is_file():
        fix = (f"the preprocessing config of the parent's data (\"config\" in {Path(parent_data) / 'preprocess.json'})"
               f", or at least `medldm preprocess RAW_DIR OUT_DIR --config YAML {sets}`")
    else:
        fix = f"`medldm preprocess RAW_DIR OUT_DIR --config YAML {sets}`"
    raise InputError(f"{data_dir}: its volumes are {data.describe()}, but --init-from {parent_path} was trained on "
                     f"{parent.describe()}; a fine-tune keeps the parent's grid: preprocess the scans with {fix}")


# --- freezing --------------------------------------------------------------------------------------------------------

def freeze(model: torch.nn.Module, patterns: Sequence[str], conditions: set[str], what: str) -> list[str]:
    """Switch ``requires_grad`` off for every parameter of ``model`` that no entry of ``patterns`` names (a substring
    of its name, or ``conditions``: the parameter names in ``conditions``); an entry that names none is an error.
    ``[]`` trains everything. Returns the trainable parameters' names."""
    names = [n for n, _ in model.named_parameters()]
    if not patterns:
        return names
    chosen: set[str] = set()
    for pattern in patterns:
        hits = conditions if pattern == CONDITIONS else {n for n in names if pattern in n}
        if not hits:
            hints = sorted({n.split(".")[0] for n in names} | ({CONDITIONS} if conditions else set())
                           | ({"attention"} if any("attention" in n for n in names) else set()))
            raise ConfigError(f"train.trainable: {pattern!r} names no parameter of the {what}; use substrings of "
                              f"parameter names, e.g. {hints}")
        chosen |= hits
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]


def check_trainable_names(build: Callable[[], torch.nn.Module], patterns: Sequence[str], conditions: set[str],
                          what: str) -> None:
    """``train.trainable`` checked against the network's parameter names before the run dir is written (on a build
    on the meta device: no memory, no compute)."""
    if patterns:
        with torch.device("meta"):
            freeze(build(), patterns, conditions, what)


def describe_trainable(model: torch.nn.Module, patterns: Sequence[str]) -> str:
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    which = f"train.trainable={list(patterns)}" if patterns else "all of them"
    return f"{trained / 1e6:.2f}M of {total / 1e6:.2f}M parameters trained ({which})"


# --- conditions ------------------------------------------------------------------------------------------------------

Conditions = ConditionEncoder | UnitRangeConditions


def context_consumers(build: Callable[[int], torch.nn.Module], dim: int) -> dict[str, int]:
    """The parameters of the network ``build(context_dim)`` that read the context vector, each with where the
    context columns start on its input axis (1): those whose shape changes with the context's width (the cross-
    attention keys and values; the first convolution of a hybrid UNet, after the latent channels). Found from two
    builds on the meta device (no memory, no compute), so whatever MONAI names them."""
    with torch.device("meta"):
        a, b = build(dim).state_dict(), build(dim + 1).state_dict()
    found = {}
    for name, t in a.items():
        if t.shape != b[name].shape:
            if t.dim() < 2 or b[name].shape[1] != t.shape[1] + 1 or t.shape[1] < dim:
                raise RuntimeError(f"{name}: {tuple(t.shape)} -> {tuple(b[name].shape)} with one more context slot; "
                                   "not a layer medldm knows how to map")  # a MONAI change, not the user's input
            found[name] = t.shape[1] - dim
    return found


def slots(conditions: Conditions) -> dict[str, slice]:
    """Where each condition sits in the context vector."""
    out, start = {}, 0
    for key in conditions.keys:
        width = 1 if isinstance(conditions, UnitRangeConditions) else condition_width(key)
        out[key] = slice(start, start + width)
        start += width
    return out


def map_context_columns(weights: Mapping[str, torch.Tensor], consumers: Mapping[str, int], parent: Conditions,
                        child: Conditions) -> dict[str, torch.Tensor]:
    """The parent's weights for a model with ``child``'s conditions: in every layer that reads the context, the
    columns of a kept condition move to its new place, those of a new condition are zero (so the model starts as
    the parent, whatever value the new condition has), those of a removed one are dropped (the parent's own view of
    it as unknown: an unknown condition is zeros)."""
    old, new = slots(parent), slots(child)
    out = dict(weights)
    for name, lead in consumers.items():
        w = weights[name]
        mapped = w.new_zeros((w.shape[0], lead + child.dim, *w.shape[2:]))
        mapped[:, :lead] = w[:, :lead]
        for key, at in new.items():
            if key in old:
                mapped[:, lead + at.start:lead + at.stop] = w[:, lead + old[key].start:lead + old[key].stop]
        out[name] = mapped
    return out


def finetune_conditions(parent: Conditions, keys: Sequence[str], train_rows: Sequence[Mapping[str, Any]],
                        source: str, parent_path: Path) -> Conditions:
    """The condition encoder of a fine-tune: a kept numeric condition keeps the parent's standardisation (age 70
    means to the fine-tuned model what it meant to the parent) with its range widened to the new training data's; a
    new one is fitted on the new training split. A model with unit-range conditions (an imported bundle: every
    condition always given, no 'unknown') keeps its own."""
    if isinstance(parent, UnitRangeConditions):
        if list(keys) != parent.keys:
            raise ConfigError(f"diffusion.conditioning.keys={list(keys)}, but {parent_path} takes {parent.keys} as "
                              "values in [0, 1] with no 'unknown' (an imported bundle): a new condition cannot start "
                              f"as 'unknown' there; fine-tune it with conditioning.keys={parent.keys}")
        return parent
    new = [k for k in keys if k not in parent.keys]
    kept = [k for k in keys if k in parent.numeric]
    # the new data's range of each kept numeric condition it has values for (and the values checked, by name)
    seen = ConditionEncoder.fit([k for k in kept if any(r.get(k) not in (None, "") for r in train_rows)], train_rows,
                                source).numeric
    fitted = ConditionEncoder.fit(new, train_rows, source).numeric
    numeric: dict[str, dict[str, float]] = {}
    for key in keys:
        if key in parent.numeric:
            stats = dict(parent.numeric[key])
            if key in seen:
                stats.update(min=min(stats["min"], seen[key]["min"]), max=max(stats["max"], seen[key]["max"]))
            numeric[key] = stats
        elif key in fitted:
            numeric[key] = fitted[key]
    dropped = [k for k in parent.keys if k not in keys]
    log.info("conditions %s of %s: %s", list(keys), parent_path,
             "; ".join(part for part in (f"new {new} (start at zero)" if new else "",
                                         f"removed {dropped} (seen as unknown)" if dropped else "",
                                         f"the parent's statistics kept for {kept}" if kept else "") if part)
             or "as the parent's")
    return ConditionEncoder(keys, numeric)
