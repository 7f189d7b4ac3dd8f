"""Every file one stage writes and another reads, as a typed object with ``load`` (and ``write``).

    DatasetDir           DATA/ (manifest.csv, preprocess.json, images/)        written by `medldm preprocess`
    AutoencoderRun       AE_RUN/checkpoints/{best,latest}.pt, config.yaml      `medldm train autoencoder`
      AutoencoderCheckpoint   one checkpoint of it: config, image shape, weights
    LatentCache          AE_RUN/latents/latents.pt (+ latents.json)           `medldm encode`
    DiffusionRun         LDM_RUN/checkpoints/{best,latest}.pt, config.yaml     `medldm train diffusion`
      DiffusionCheckpoint     one checkpoint of it: config, latent shape, scale, conditions, its autoencoder, grid
    LatentFile           SCAN.latent                                          `medldm compress`

A checkpoint is a dict of tensors and plain values (loaded with ``weights_only=True``). ``save_checkpoint`` is the
one writer: it stamps ``schema`` (``SCHEMA_VERSION``) and refuses a state without the keys later stages use, so no
writer can produce a file the readers cannot load. Files without ``schema`` are schema 1 (medldm 0.1.0 up to the
change that added it): they hold the same keys and load as they are (tests/test_old_runs.py keeps that true).
The rest of medldm asks these objects and never indexes a checkpoint dict itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL

from medldm.config import AutoencoderConfig, DiffusionConfig, config_from_dict
from medldm.data.dataset import read_dataset_info, read_manifest
from medldm.data.io import atomic_write, content_sha256, read_json, visible, write_json
from medldm.errors import InputError
from medldm.models.conditioning import ConditionEncoder, UnitRangeConditions, conditions_from_state
from medldm.models.networks import build_autoencoder, build_unet

# 1: no "schema" key (medldm 0.1.0 before the artifacts module); 2: "schema" recorded, latent caches carry a kind
SCHEMA_VERSION = 2

# what a checkpoint of each kind must hold to be used by the later stages, and in addition to be resumed; a file
# without them is another kind, or was written by another medldm layout, and is refused by name instead of a KeyError
USE_KEYS = {
    "autoencoder": ("config", "model", "image_shape"),
    "diffusion": ("config", "ema", "latent_shape", "conditioning", "scale_factor", "autoencoder", "reference"),
    "latents": ("mu", "rows", "scale_factor", "autoencoder_sha256", "autoencoder_checkpoint", "dataset_sha256"),
    "latent": ("mu", "autoencoder_checkpoint", "autoencoder_sha256", "affine", "shape", "source"),
}
RESUME_KEYS = {
    "autoencoder": ("optimizer", "ema", "ema_n_averaged", "step", "best_val_ssim", "rng"),
    # and the best score under the run's selection.by (best_val_loss or best_sample_score)
    "diffusion": ("model", "optimizer", "ema_n_averaged", "step", "rng"),
}
# what a reader of metadata never needs: the weights and the training state
_TRAINING_STATE = ("model", "ema", "discriminator", "optimizer", "optimizer_d", "rng")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` so that a crash leaves either the old or the new file, never half of one.

    A state of a known ``kind`` must hold that kind's ``USE_KEYS`` (a bug in the writer otherwise, caught before
    anything is written); it is stamped with ``SCHEMA_VERSION``."""
    kind = state.get("kind")
    if kind in USE_KEYS:
        missing = [k for k in USE_KEYS[kind] if k not in state]
        if missing:
            raise RuntimeError(f"a {kind} checkpoint without {missing} would not load: a bug in its writer")
        state = {**state, "schema": SCHEMA_VERSION}
    # through a Python file: a full disk is then an OSError (ENOSPC); torch's own file writer says "unexpected pos"
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False,
                    kind: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Load a medldm checkpoint safely (tensors and plain containers only); ``mmap`` maps the tensors instead of
    reading them (for a look at the metadata of a large file). With ``kind`` the file must be a checkpoint of that
    kind holding what the later stages use (and, with ``resume``, what training needs). Latent caches of schema 1
    carry no kind and are taken as ``latents``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch.load raises many types for a truncated, foreign or unsafe file
        raise InputError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); "
                         "is it a medldm checkpoint that was completely written?") from None
    return state if kind is None else check_kind(state, path, kind, resume)


def check_kind(state: Any, path: Path, kind: str, resume: bool = False) -> dict[str, Any]:
    """``state`` (loaded from ``path``) if it is a checkpoint of ``kind`` that later stages (with ``resume``: also
    training) can use; an error naming what is missing otherwise."""
    found = state.get("kind") if isinstance(state, dict) else type(state).__name__
    if found is None and kind == "latents" and isinstance(state, dict) and "mu" in state and "rows" in state:
        found = "latents"  # schema 1
    if found != kind:
        raise InputError(f"{path} is not a {kind} checkpoint (kind={found!r}): give the {kind} run")
    missing = [k for k in USE_KEYS[kind] + (RESUME_KEYS.get(kind, ()) if resume else ()) if k not in state]
    if missing:
        recorded = state.get("versions") if isinstance(state.get("versions"), dict) else {}
        made_by = recorded.get("medldm", "an unknown version")
        raise InputError(f"{path}: this {kind} checkpoint has no {missing} (written by medldm {made_by}, another "
                         f"layout, or damaged); use it with that medldm version, or train the run again"
                         + (" without --resume" if resume else ""))
    schema = state.get("schema", 1)
    if schema > SCHEMA_VERSION:
        raise InputError(f"{path} was written by a newer medldm (checkpoint schema {schema}, this one reads up to "
                         f"{SCHEMA_VERSION}): upgrade medldm")
    return state


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a checkpoint (or any) file, as runs record the autoencoder they belong to."""
    return content_sha256(path)


def best_checkpoint(run_dir: str | Path, stage: str) -> Path:
    """The checkpoint of a run that later stages use: best.pt (by validation), else latest.pt."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    for name in ("best.pt", "latest.pt"):
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: train it first with `medldm train {stage}`")


def _load_weights(model: torch.nn.Module, weights: dict[str, Any], path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise InputError(f"{path}: its weights do not fit the architecture in its own config "
                         f"({str(e).splitlines()[0]}); the file is damaged or was edited") from None


# --- the dataset -----------------------------------------------------------------------------------------------------

# the files of a dataset dir that latents belong to besides the images: the labels and splits, and the reference
# grid (affine) that samples are written in. Two preprocessings of the same scans share image names, so only the
# content of these files tells their latents apart
DATASET_FILES = ("manifest.csv", "preprocess.json")
# what of preprocess.json the latents depend on: its settings and grid, not the run's counts, paths or timings (a
# rerun of `medldm preprocess` that changed nothing rewrites those, and must not ask for a new encode)
PREPROCESS_KEYS = ("config", "template_sha256", "reference")


class _Folder:
    """A folder one stage writes and another reads, named by its path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class _RunDir(_Folder):
    """A training run: checkpoints/best.pt (by validation) and latest.pt, config.yaml."""

    stage: str

    @property
    def latest(self) -> Path:
        return self.path / "checkpoints" / "latest.pt"

    @property
    def checkpoint(self) -> Path:
        """The checkpoint later stages use (best.pt, else latest.pt)."""
        return best_checkpoint(self.path, self.stage)


class DatasetDir(_Folder):
    """The output of `medldm preprocess`: ``manifest.csv`` (one row per volume), ``preprocess.json`` (its
    settings and the reference space samples are written in), ``images/``."""

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.csv"

    def rows(self) -> list[dict[str, Any]]:
        return read_manifest(self.path)

    def info(self) -> dict[str, Any]:
        return read_dataset_info(self.path)

    def sha256(self) -> dict[str, str]:
        """SHA-256 of each of ``DATASET_FILES`` (of preprocess.json: of its ``PREPROCESS_KEYS``), as a latent cache
        records them."""
        hashes = {}
        for name in DATASET_FILES:
            path = self.path / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: is {self.path} the output of `medldm preprocess`?")
            if name == "preprocess.json":
                info = read_json(path)
                made_of = json.dumps({k: info.get(k) for k in PREPROCESS_KEYS}, sort_keys=True).encode()
                hashes[name] = hashlib.sha256(made_of).hexdigest()
            else:
                hashes[name] = file_sha256(path)
        return hashes


# --- the autoencoder -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AutoencoderRef:
    """The autoencoder checkpoint a diffusion run or a latent was made with: where it was, and its SHA-256."""

    checkpoint: str
    sha256: str
    run: str | None = None

    def find(self, where: str | Path | None = None) -> Path:
        """The checkpoint file: the recorded path, or the file in ``where`` (a run dir or a checkpoint) with the
        recorded SHA-256; a clear error when neither is that file."""
        if where is None:
            path = Path(self.checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"the autoencoder checkpoint {path} that this diffusion model was trained "
                                        "with is missing (run dirs moved?); pass --autoencoder AE_RUN")
            if file_sha256(path) != self.sha256:
                raise InputError(f"the autoencoder checkpoint {path} changed since this diffusion model was trained "
                                 "on its latents; restore that file, pass --autoencoder with a copy of it, or retrain")
            return path
        where = Path(where)
        candidates = [where] if where.is_file() else visible(where / "checkpoints", "*.pt")
        for path in candidates:
            if file_sha256(path) == self.sha256:
                return path
        raise InputError(f"--autoencoder {where}: none of {[c.name for c in candidates]} is the checkpoint this "
                         f"diffusion model was trained with (SHA-256 {self.sha256[:12]}…, was {self.checkpoint})")


class _CheckpointFile:
    """A loaded checkpoint: the file's absolute path and its SHA-256 (hashed once, when first asked)."""

    path: Path
    known_sha256: str | None

    @cached_property
    def sha256(self) -> str:
        return self.known_sha256 or file_sha256(self.path)

    @property
    def resolved(self) -> str:
        return str(self.path.resolve())


@dataclass
class AutoencoderCheckpoint(_CheckpointFile):
    """An autoencoder checkpoint as the later stages use it."""

    path: Path
    config: AutoencoderConfig
    config_dict: dict[str, Any]  # as stored: what provenance records
    image_shape: list[int]
    data_dir: str | None  # the dataset it was trained on (its preprocessing is applied to raw scans)
    weights: dict[str, torch.Tensor] | None  # the EMA weights when the run kept an EMA; None when loaded mapped
    weights_name: str  # "ema" or "model"
    known_sha256: str | None = None
    # the grid of the data it was trained on (runs trained before it was recorded, and imported ones: None)
    reference: dict[str, Any] | None = None
    imported_from: dict[str, Any] | None = None
    init_from: dict[str, Any] | None = None  # the checkpoint it was fine-tuned from (--init-from)

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None, mmap: bool = False) -> AutoencoderCheckpoint:
        """``sha256``: the file's hash when the caller has just checked it (large files are not hashed twice);
        ``mmap``: metadata only, the weights are mapped and not kept."""
        path = Path(path)
        state = load_checkpoint(path, mmap=mmap, kind="autoencoder")
        weights_name = "ema" if state.get("ema") else "model"
        return cls(path=path, config=config_from_dict("autoencoder", state["config"]), config_dict=state["config"],
                   image_shape=list(state["image_shape"]), data_dir=state.get("data_dir"),
                   weights=None if mmap else state[weights_name], weights_name=weights_name, known_sha256=sha256,
                   reference=state.get("reference"), imported_from=state.get("imported_from"),
                   init_from=state.get("init_from"))

    @property
    def ref(self) -> AutoencoderRef:
        return AutoencoderRef(checkpoint=self.resolved, sha256=self.sha256)

    @property
    def latent_shape(self) -> list[int]:
        f = self.config.model.downsample_factor
        return [self.config.model.latent_channels, *(s // f for s in self.image_shape)]

    def model(self, device: torch.device | str = "cpu") -> AutoencoderKL:
        """The autoencoder in eval mode on ``device``."""
        if self.weights is None:
            raise RuntimeError(f"{self.path} was loaded for its metadata only (mmap)")
        model = build_autoencoder(self.config.model, sdpa=self.config.speed.sdpa)
        _load_weights(model, self.weights, self.path)
        return model.to(device).eval()


class AutoencoderRun(_RunDir):
    """AE_RUN/: checkpoints/best.pt and latest.pt, config.yaml, latents/ (the cache `medldm encode` writes)."""

    stage = "autoencoder"

    @property
    def latents(self) -> Path:
        return self.path / "latents" / "latents.pt"

    def load(self, mmap: bool = False) -> AutoencoderCheckpoint:
        return AutoencoderCheckpoint.load(self.checkpoint, mmap=mmap)

    @staticmethod
    def at(path: str | Path, mmap: bool = False) -> AutoencoderCheckpoint:
        """The autoencoder of a run dir, or a checkpoint file given directly."""
        path = Path(path)
        return AutoencoderCheckpoint.load(path, mmap=mmap) if path.is_file() else AutoencoderRun(path).load(mmap)


# --- the latent cache ------------------------------------------------------------------------------------------------

@dataclass
class LatentCache:
    """μ of every volume of a dataset under one autoencoder, the scale factor, and what they were made from."""

    mu: torch.Tensor
    rows: list[dict[str, Any]]  # the manifest rows, in order (labels and splits for the diffusion stage)
    scale_factor: float
    autoencoder: AutoencoderRef
    data_dir: str
    dataset_sha256: dict[str, str]  # content, not path: data dirs move and get rebuilt

    def write(self, path: Path) -> None:
        """``latents.pt`` and its readable summary ``latents.json`` (each atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        train = torch.tensor([r["split"] == "train" for r in self.rows])
        summary = {"scale_factor": self.scale_factor, "autoencoder_sha256": self.autoencoder.sha256,
                   "autoencoder_checkpoint": self.autoencoder.checkpoint, "data_dir": self.data_dir,
                   "dataset_sha256": self.dataset_sha256}
        save_checkpoint(path, {"kind": "latents", "mu": self.mu, "images": [r["image"] for r in self.rows],
                               "rows": self.rows, **summary})
        write_json(path.with_suffix(".json"), summary | {
            "count": len(self.rows), "latent_shape": list(self.mu.shape[1:]), "train_std": self.mu[train].std().item()})

    @classmethod
    def load(cls, path: Path) -> LatentCache:
        return cls.from_state(load_checkpoint(path, kind="latents"))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LatentCache:
        return cls(mu=state["mu"], rows=state["rows"], scale_factor=state["scale_factor"],
                   autoencoder=AutoencoderRef(state["autoencoder_checkpoint"], state["autoencoder_sha256"]),
                   data_dir=state.get("data_dir", "another dataset"), dataset_sha256=state["dataset_sha256"])

    @classmethod
    def checked(cls, ae_run: str | Path, data_dir: str | Path) -> LatentCache:
        """The cache of ``ae_run``, checked against the run's current checkpoint and against the dataset
        ``data_dir`` (by the content of its manifest.csv and preprocess.json: two preprocessings of the same scans
        share image names, and the reference grid that samples are written in comes from ``data_dir``)."""
        run, data_dir = AutoencoderRun(ae_run), Path(data_dir)
        path = run.latents
        again = f"run `medldm encode --data {data_dir} --autoencoder {ae_run}` again"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `medldm encode --data {data_dir} --autoencoder {ae_run}` "
                                    "first")
        state = load_checkpoint(path)
        if isinstance(state, dict) and "mu" in state and state.get("dataset_sha256") is None:
            raise InputError(f"{path} does not record which dataset it was encoded from (an older medldm wrote it): "
                             f"{again}")
        cache = cls.from_state(check_kind(state, path, "latents"))
        if cache.autoencoder.sha256 != file_sha256(run.checkpoint):
            raise InputError(f"{path} was encoded with another autoencoder checkpoint than {run.checkpoint}: {again}")
        changed = [name for name, sha in DatasetDir(data_dir).sha256().items()
                   if cache.dataset_sha256.get(name) != sha]
        if changed:
            files = " and ".join(str(data_dir / name) for name in changed)
            if Path(cache.data_dir) == data_dir.resolve():
                raise InputError(f"{path} was encoded from {cache.data_dir}, and {files} changed since: {again}")
            raise InputError(f"{path} was encoded from {cache.data_dir}, not from {data_dir} ({files} "
                             f"{'differs' if len(changed) == 1 else 'differ'} from what it was encoded with): {again}")
        return cache


# --- the diffusion model ---------------------------------------------------------------------------------------------

@dataclass
class DiffusionCheckpoint(_CheckpointFile):
    """A diffusion checkpoint as sampling uses it: the EMA UNet and everything needed to turn latents into volumes."""

    path: Path
    config: DiffusionConfig
    config_dict: dict[str, Any]
    latent_shape: list[int]
    scale_factor: float
    conditions: ConditionEncoder | UnitRangeConditions
    autoencoder: AutoencoderRef
    reference: dict[str, Any]  # the grid samples are written in
    data_dir: str | None
    weights: dict[str, torch.Tensor] | None  # the EMA weights; None when loaded mapped
    imported_from: dict[str, Any] | None = None
    known_sha256: str | None = field(default=None, repr=False)
    init_from: dict[str, Any] | None = None  # the checkpoint it was fine-tuned from (--init-from)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = False) -> DiffusionCheckpoint:
        path = Path(path)
        state = load_checkpoint(path, mmap=mmap, kind="diffusion")
        trained_with = state["autoencoder"]
        return cls(path=path, config=config_from_dict("diffusion", state["config"]), config_dict=state["config"],
                   latent_shape=list(state["latent_shape"]), scale_factor=state["scale_factor"],
                   conditions=conditions_from_state(state["conditioning"]),
                   autoencoder=AutoencoderRef(trained_with["checkpoint"], trained_with["sha256"],
                                              trained_with.get("run")),
                   reference=state["reference"], data_dir=state.get("data_dir"),
                   weights=None if mmap else state["ema"], imported_from=state.get("imported_from"),
                   init_from=state.get("init_from"))

    @property
    def hybrid(self) -> bool:
        return self.config.conditioning.hybrid

    @property
    def context_dim(self) -> int | None:
        return self.conditions.dim if self.conditions.keys else None

    def unet(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The EMA UNet in eval mode on ``device``."""
        if self.weights is None:
            raise RuntimeError(f"{self.path} was loaded for its metadata only (mmap)")
        model = build_unet(self.config.model, self.latent_shape[0], self.context_dim, sdpa=self.config.speed.sdpa,
                           hybrid=self.hybrid)
        _load_weights(model, self.weights, self.path)
        return model.to(device).eval()

    def load_autoencoder(self, where: str | Path | None = None) -> AutoencoderCheckpoint:
        """The autoencoder this model was trained with (see :meth:`AutoencoderRef.find`), its hash checked."""
        return AutoencoderCheckpoint.load(self.autoencoder.find(where), sha256=self.autoencoder.sha256)


class DiffusionRun(_RunDir):
    """LDM_RUN/: checkpoints/best.pt and latest.pt, config.yaml."""

    stage = "diffusion"

    def load(self, mmap: bool = False) -> DiffusionCheckpoint:
        return DiffusionCheckpoint.load(self.checkpoint, mmap=mmap)


def run_kind(run_dir: str | Path) -> str | None:
    """"autoencoder" or "diffusion": what the run's checkpoint holds (its metadata only is read)."""
    return load_checkpoint(best_checkpoint(run_dir, "autoencoder or diffusion"), mmap=True).get("kind")


# --- one scan's latent -----------------------------------------------------------------------------------------------

@dataclass
class LatentFile:
    """SCAN.latent: the posterior mean of one scan, its autoencoder and the geometry to decode it onto."""

    mu: torch.Tensor  # (C, X, Y, Z), float32 or float16
    autoencoder: AutoencoderRef
    affine: list[list[float]]  # the model grid's
    shape: list[int]
    source: dict[str, Any]  # path, shape, affine, preprocessed_here, registered
    preprocess: str | None  # the dataset whose preprocessing was applied
    versions: dict[str, Any] = field(default_factory=dict)

    def write(self, path: str | Path) -> None:
        save_checkpoint(path, {"kind": "latent", "mu": self.mu, "autoencoder_checkpoint": self.autoencoder.checkpoint,
                               "autoencoder_sha256": self.autoencoder.sha256, "affine": self.affine,
                               "shape": self.shape, "source": self.source, "preprocess": self.preprocess,
                               "versions": self.versions})

    @classmethod
    def load(cls, path: str | Path) -> LatentFile:
        path = Path(path)
        state = load_checkpoint(path)
        if not isinstance(state, dict) or state.get("kind") != "latent":
            found = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise InputError(f"{path} is not a medldm latent (kind={found!r}); write one with `medldm compress`")
        state = check_kind(state, path, "latent")
        return cls(mu=state["mu"], autoencoder=AutoencoderRef(state["autoencoder_checkpoint"],
                                                              state["autoencoder_sha256"]),
                   affine=state["affine"], shape=list(state["shape"]), source=state["source"],
                   preprocess=state.get("preprocess"), versions=state.get("versions", {}))
