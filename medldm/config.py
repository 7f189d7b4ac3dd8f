"""Typed, strict configs: YAML files plus ``key=value`` overrides.

An unknown key, a wrong type or an impossible value is a :class:`ConfigError` that names the key,
raised before any work starts. The dataclass defaults are the tiny CPU settings and are identical to
``configs/<stage>/tiny.yaml``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from medldm.errors import InputError, not_utf8

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)
T = TypeVar("T", bound="DataclassInstance")


class ConfigError(InputError):
    """A config file or override that cannot be used; the message names the key and the fix."""


# ----------------------------------------------------------------------------------------------
# Stage configs


@dataclass
class SplitConfig:
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    # keep the diagnosis mix of every split close to the cohort's (subject-level)
    stratify: bool = True

    def validate(self, prefix: str) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{prefix}.{name}={v}: must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"{prefix}: val_fraction + test_fraction must leave scans for training")


@dataclass
class N4Config:
    """N4 bias-field correction (SimpleITK): fitted on a shrunk image, applied at full resolution."""

    enabled: bool = True
    shrink_factor: int = 2
    iterations: tuple[int, ...] = (50, 50, 30)
    convergence_threshold: float = 1e-4

    def validate(self, prefix: str) -> None:
        if self.shrink_factor < 1:
            raise ConfigError(f"{prefix}.shrink_factor must be >= 1")
        if any(i < 1 for i in self.iterations):
            raise ConfigError(f"{prefix}.iterations: every fitting level needs >= 1 iteration")


@dataclass
class RegistrationConfig:
    """Affine registration to a template (SimpleITK, Mattes mutual information, multi-resolution)."""

    enabled: bool = False
    # "mni152": the ICBM152 2009 template that the optional nilearn package ships (the [mni] extra:
    # pip install -e ".[mni]" in a clone, or pip install nilearn); or a path to any T1 template NIfTI
    template: str = "mni152"
    # brain mask in the template's space: "" = the mni152 GM+WM+CSF mask, or a path (needed for a custom template)
    template_mask: str = ""
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    iterations: int = 100
    sampling_fraction: float = 0.02
    seed: int = 0
    # every orientation a scanner (or a wrong header) can produce is tried at low resolution from the brain masks'
    # centres and moments; the `starts` best are fitted coarsely (similarity) and the best of those gets the full
    # affine fit. The choice is made by the correlation with the template, which means the same on every scan
    starts: int = 3
    # an affine whose scales (mm per template mm) leave this range, or that stretches one axis this much more
    # than another, is not a head meeting a template: it is refused (the similarity fit is kept, or the scan fails QC)
    scale_range: tuple[float, float] = (0.7, 1.45)
    max_anisotropy: float = 1.35

    def validate(self, prefix: str) -> None:
        if len(self.shrink_factors) != len(self.smoothing_sigmas):
            raise ConfigError(f"{prefix}: shrink_factors and smoothing_sigmas need one entry per level")
        if any(f < 1 for f in self.shrink_factors) or any(s < 0 for s in self.smoothing_sigmas):
            raise ConfigError(f"{prefix}: shrink factors must be >= 1 and smoothing sigmas >= 0")
        if self.starts < 1:
            raise ConfigError(f"{prefix}.starts must be >= 1")
        if not 0 < self.scale_range[0] < 1 < self.scale_range[1] or self.max_anisotropy < 1:
            raise ConfigError(f"{prefix}: scale_range needs 0 < low < 1 < high and max_anisotropy >= 1")
        if self.iterations < 1 or not 0.0 < self.sampling_fraction <= 1.0:
            raise ConfigError(f"{prefix}: iterations >= 1 and 0 < sampling_fraction <= 1 are required")
        if not self.template:
            raise ConfigError(f"{prefix}.template: give 'mni152' or a path to a template NIfTI")


BRAIN_EXTRACTION_METHODS = ("auto", "deepbet", "rough")


@dataclass
class BrainExtractionConfig:
    """The scan's own brain mask, which registration starts from and the skull strip keeps."""

    # deepbet: a trained network (Fisch et al. 2024; pip install -e ".[deepbet]"; its weights ship in its wheel);
    # rough: erode the head until the brain comes apart from the scalp (no extra, but it fails on some scans);
    # auto: deepbet where it is installed, rough with a warning where not
    method: str = "auto"
    # deepbet's mask threshold on its probability map, and the side of the cube its network sees the brain at
    # (256 as published; 192 is 2.3x faster, masks within Dice 0.985-0.99 of 256 on IXI)
    threshold: float = 0.5
    network_size: int = 256

    def validate(self, prefix: str) -> None:
        if self.method not in BRAIN_EXTRACTION_METHODS:
            raise ConfigError(f"{prefix}.method={self.method!r}: use one of {', '.join(BRAIN_EXTRACTION_METHODS)}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"{prefix}.threshold={self.threshold}: must be in (0, 1)")
        if self.network_size < 64 or self.network_size % 32:
            raise ConfigError(f"{prefix}.network_size={self.network_size}: use a multiple of 32, >= 64 "
                              "(256 as published)")


@dataclass
class QCConfig:
    """Registration QC: which scans fail, and whether failures stay out of the splits."""

    # absolute floors on the registered scan: Pearson correlation with the template inside its brain mask, and
    # Dice of the scan's own (registered) brain mask with the template's. Below either the scan fails.
    min_correlation: float = 0.5
    min_dice: float = 0.8
    # robust z (median / MAD over the cohort): a registration this much worse than the cohort's fails too;
    # other statistics (brain volume, mean intensity) this far out are flagged as warnings
    z_limit: float = 3.5
    # failed scans stay in manifest.csv with split "excluded" (false: they keep their split, still marked failed)
    exclude_failed: bool = True

    def validate(self, prefix: str) -> None:
        if not -1.0 <= self.min_correlation < 1.0 or not 0.0 <= self.min_dice < 1.0:
            raise ConfigError(f"{prefix}: min_correlation must be in [-1, 1) and min_dice in [0, 1)")
        if self.z_limit <= 0:
            raise ConfigError(f"{prefix}.z_limit must be > 0")


@dataclass
class PreprocessConfig:
    """Per-scan pipeline: check, orient, resample, N4, register, mask, normalise, crop/pad."""

    orientation: str = "RAS"
    spacing: tuple[float, float, float] = (6.0, 6.0, 6.0)
    shape: tuple[int, int, int] = (32, 32, 32)
    # the models halve the volume this many times: shape must be a multiple of it
    shape_multiple: int = 8
    n4: N4Config = field(default_factory=N4Config)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    brain_extraction: BrainExtractionConfig = field(default_factory=BrainExtractionConfig)
    # skull strip (needs registration): keep the scan's own brain mask (deepbet), or the template's (rough)
    brain_mask: bool = False
    qc: QCConfig = field(default_factory=QCConfig)
    # robust intensity window (percentiles inside the head, or the brain when masked) mapped to [0, 1]
    percentiles: tuple[float, float] = (0.5, 99.5)
    output_dtype: str = "float32"
    # input checks: a scan coarser than this (any axis, mm) is refused as too low-resolution
    max_input_spacing: float = 3.0
    # a 4D input: use its first volume (true) or refuse it (false)
    use_first_volume_of_4d: bool = False
    # IDA / ADNIMERGE groups -> diagnosis used by medldm (CN, MCI, AD); unmapped groups become unknown
    diagnosis_map: dict[str, str] = field(
        default_factory=lambda: {"CN": "CN", "SMC": "CN", "EMCI": "MCI", "LMCI": "MCI", "MCI": "MCI", "AD": "AD",
                                 "DEMENTIA": "AD"}
    )
    # scan descriptions kept from an ADNI download (case-insensitive substrings, in order of preference;
    # empty keeps all)
    description_patterns: list[str] = field(default_factory=lambda: ["MPRAGE", "MP-RAGE", "IR-SPGR", "T1"])
    # IDA image types in order of preference when a visit has several scans (empty: no preference)
    preferred_types: list[str] = field(default_factory=lambda: ["Original"])
    one_scan_per_visit: bool = True
    split: SplitConfig = field(default_factory=SplitConfig)

    def validate(self, prefix: str = "preprocess") -> None:
        if len(self.orientation) != 3 or set(self.orientation.upper()) - set("RLAPSI"):
            raise ConfigError(f"{prefix}.orientation={self.orientation!r}: use three axis codes such as 'RAS'")
        if any(s <= 0 for s in self.spacing):
            raise ConfigError(f"{prefix}.spacing={list(self.spacing)}: spacings must be positive (mm)")
        if self.shape_multiple < 1 or any(s < 8 or s % self.shape_multiple for s in self.shape):
            raise ConfigError(f"{prefix}.shape={list(self.shape)}: every side must be >= 8 and a multiple of "
                              f"shape_multiple={self.shape_multiple} (the models' downsampling)")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ConfigError(f"{prefix}.percentiles={list(self.percentiles)}: need 0 <= low < high <= 100")
        if self.output_dtype not in ("float32", "uint8"):
            raise ConfigError(f"{prefix}.output_dtype={self.output_dtype!r}: use float32 or uint8")
        if self.max_input_spacing <= 0:
            raise ConfigError(f"{prefix}.max_input_spacing must be > 0 (mm)")
        if self.brain_mask and not self.registration.enabled:
            raise ConfigError(f"{prefix}.brain_mask needs registration.enabled=true (the mask lives in template space)")
        if self.brain_mask and self.registration.template != "mni152" and not self.registration.template_mask:
            raise ConfigError(f"{prefix}.brain_mask with a custom registration.template needs "
                              "registration.template_mask")
        bad = sorted(set(self.diagnosis_map.values()) - {"CN", "MCI", "AD"})
        if bad:
            raise ConfigError(f"{prefix}.diagnosis_map: targets {bad} are not CN, MCI or AD")
        self.n4.validate(f"{prefix}.n4")
        self.registration.validate(f"{prefix}.registration")
        self.brain_extraction.validate(f"{prefix}.brain_extraction")
        self.qc.validate(f"{prefix}.qc")
        self.split.validate(f"{prefix}.split")


@dataclass
class AutoencoderModelConfig:
    channels: tuple[int, ...] = (8, 16, 16)
    num_res_blocks: int = 1
    latent_channels: int = 3
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = 8
    with_nonlocal_attn: bool = False
    # recompute activations in the backward pass: less GPU memory, about a third more compute
    activation_checkpointing: bool = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def validate(self, prefix: str) -> None:
        if len(self.attention_levels) != len(self.channels):
            raise ConfigError(f"{prefix}.attention_levels needs one entry per channels entry ({len(self.channels)})")
        for c in self.channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"{prefix}.channels={list(self.channels)}: each must be divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")
        if self.latent_channels < 1:
            raise ConfigError(f"{prefix}.latent_channels must be >= 1")


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 2
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    num_workers: int = 0
    seed: int = 0
    # bf16 autocast is used on CUDA only; the CPU always runs float32
    amp: bool = True
    # micro-batches per optimiser step (effective batch = batch_size x grad_accum x GPUs)
    grad_accum: int = 1
    # stop cleanly (validate, write latest.pt) after this many minutes, e.g. a SLURM wall time; 0 = no limit
    time_limit_minutes: float = 0.0
    # linear learning-rate warm-up from 0 over this many optimiser steps
    warmup_steps: int = 0
    # after the warm-up: constant, or cosine decay to lr x min_lr_ratio at train.steps (a run stopped by the
    # time limit has not decayed fully: set train.steps to what the limit allows)
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.01
    # a run started from another run's weights (--init-from, docs/training.md): the parameters it trains, as
    # substrings of their names ("attention", "attn2", "decoder", ...) or "conditions" (every weight that reads the
    # condition vector); the others keep the parent's values. [] = train every parameter
    trainable: list[str] = field(default_factory=list)
    # the learning-rate warm-up of an --init-from run, in place of warmup_steps: its AdamW moments start from zero
    # on trained weights, and full-rate first steps with such moments throw away part of what the parent learnt
    finetune_warmup_steps: int = 100

    def validate(self, prefix: str) -> None:
        # steps = 0 writes the starting point of an --init-from run and trains nothing (refused without one)
        if self.steps < 0:
            raise ConfigError(f"{prefix}.steps must be >= 0 (0: only with --init-from)")
        for name in ("batch_size", "val_every", "checkpoint_every", "log_every", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr must be > 0")
        # clip_grad_norm_ with max_norm 0 zeroes every gradient and a negative one reverses them
        if self.grad_clip <= 0:
            raise ConfigError(f"{prefix}.grad_clip must be > 0 (a large value such as 1e9 leaves the gradients "
                              "unclipped)")
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers must be >= 0")
        if self.time_limit_minutes < 0:
            raise ConfigError(f"{prefix}.time_limit_minutes must be >= 0 (0 = no limit)")
        if self.warmup_steps < 0 or self.finetune_warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps and {prefix}.finetune_warmup_steps must be >= 0")
        if any(not pattern.strip() for pattern in self.trainable):
            raise ConfigError(f"{prefix}.trainable={self.trainable}: an empty entry names every parameter; remove it")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"{prefix}.lr_schedule={self.lr_schedule!r}: choose constant or cosine")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{prefix}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


@dataclass
class SpeedConfig:
    """GPU speed levers. None changes the weights, so a run may resume with other settings; benchmarks/gpu_bench.py
    measures each one against plain MONAI. The CPU always runs eager float32 unless compile is "on"."""

    # torch.compile of the network's repeated blocks (regional: each block shape compiles once, in seconds, and the
    # kernels are cached on disk): "auto" = on a CUDA GPU that Triton supports, "on" (also true), "off" (also false:
    # YAML reads a bare on/off as true/false)
    compile: bool | str = "auto"
    # the sampler replays the UNet as a CUDA graph (one launch per step instead of about a thousand); CUDA only
    cuda_graphs: bool = True
    # torch's scaled_dot_product_attention (flash / memory-efficient kernels) in the attention blocks
    sdpa: bool = True
    # NDHWC ("channels last 3D") memory layout for the convolutions (CUDA only)
    channels_last: bool = False
    # autoencoder only: recompute the blocks of the N highest-resolution levels in the backward pass instead of
    # keeping their activations (most of the training memory is there); 0 = keep everything
    recompute_levels: int = 0

    def validate(self, prefix: str) -> None:
        if isinstance(self.compile, bool):
            self.compile = "on" if self.compile else "off"
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"{prefix}.compile={self.compile!r}: use auto (CUDA only), on or off")
        if self.recompute_levels < 0:
            raise ConfigError(f"{prefix}.recompute_levels must be >= 0 (0 = off)")


@dataclass
class DiscriminatorConfig:
    # MONAI PatchDiscriminator (instance norm: independent of the batch size, nothing to sync across GPUs)
    channels: int = 8
    num_layers: int = 3
    lr: float = 1e-3

    def validate(self, prefix: str) -> None:
        if self.channels < 1 or self.num_layers < 1:
            raise ConfigError(f"{prefix}.channels and {prefix}.num_layers must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr must be > 0")


@dataclass
class SlidingWindowConfig:
    # window for full-volume validation and encoding; empty = the training patch_size (whole volume without patches)
    roi_size: list[int] = field(default_factory=list)
    overlap: float = 0.25
    batch_size: int = 4

    def validate(self, prefix: str) -> None:
        if self.roi_size and len(self.roi_size) != 3:
            raise ConfigError(f"{prefix}.roi_size needs 3 values (or [] for the training patch size)")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"{prefix}.overlap must be in [0, 1)")
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size must be >= 1")


@dataclass
class AutoencoderConfig:
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=800, lr=1e-3, val_every=200,
                                                                   checkpoint_every=200))
    # train on random patches of this size (voxels, each a multiple of the downsampling); [] = whole volumes
    patch_size: list[int] = field(default_factory=list)
    sliding_window: SlidingWindowConfig = field(default_factory=SlidingWindowConfig)
    # fraction of the training volumes held in memory (float32); lower it for cohorts larger than RAM
    cache_rate: float = 1.0
    # KL weight against the *mean* L1 (the KL is summed over latent voxels): the literature's 1e-6 collapsed the
    # posterior towards a mean brain in short runs (benchmarks/RESULTS.md); 1e-8 keeps the latent informative
    kl_weight: float = 1e-8
    # least-squares patch-adversarial term, switched on at step adversarial_start (0 = off)
    adversarial_weight: float = 0.01
    adversarial_start: int = 400
    # MONAI PerceptualLoss (fake-3D ResNet-50); needs a local torchvision ResNet-50 state dict, never downloads
    perceptual_weight: float = 0.001
    perceptual_weights: str = ""
    perceptual_state_dict_key: str = ""
    # optional SSIM loss term (1 - SSIM), an alternative to the perceptual loss; its Gaussian window (sigma 1.5)
    # is ssim_window voxels wide: 11 (the metric's usual width) costs 1.8 s a step at the small scale on 2 CPU
    # cores, 7 costs 0.3 s
    ssim_weight: float = 0.0
    ssim_window: int = 7
    # EMA of the autoencoder weights, used for validation, best.pt and encoding; 0 = off
    ema_decay: float = 0.0
    # probability of mirroring a training volume left-right (array axis 0, RAS x): twice the anatomy for a
    # small cohort; brains are near-symmetric, and the encoder has to handle both sides alike anyway
    flip_prob: float = 0.0
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def validate(self, prefix: str = "autoencoder") -> None:
        if not 0 <= self.flip_prob <= 1:
            raise ConfigError(f"{prefix}.flip_prob={self.flip_prob} must be in [0, 1]")
        if self.ssim_window < 3 or self.ssim_window % 2 == 0:
            raise ConfigError(f"{prefix}.ssim_window={self.ssim_window} must be odd and >= 3")
        self.model.validate(f"{prefix}.model")
        self.discriminator.validate(f"{prefix}.discriminator")
        self.train.validate(f"{prefix}.train")
        self.sliding_window.validate(f"{prefix}.sliding_window")
        self.speed.validate(f"{prefix}.speed")
        if self.speed.recompute_levels > len(self.model.channels):
            raise ConfigError(f"{prefix}.speed.recompute_levels={self.speed.recompute_levels}: the autoencoder has "
                              f"only {len(self.model.channels)} levels")
        f = self.model.downsample_factor
        if self.patch_size and (len(self.patch_size) != 3 or any(p < f or p % f for p in self.patch_size)):
            raise ConfigError(f"{prefix}.patch_size={self.patch_size}: needs 3 sizes, each a multiple of the "
                              f"autoencoder's downsampling ({f}), or [] for whole volumes")
        if any(p < f or p % f for p in self.sliding_window.roi_size):
            raise ConfigError(f"{prefix}.sliding_window.roi_size={self.sliding_window.roi_size}: each size must be "
                              f"a multiple of the autoencoder's downsampling ({f})")
        for name in ("kl_weight", "adversarial_weight", "perceptual_weight", "ssim_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name} must be >= 0")
        if self.adversarial_start < 0:
            raise ConfigError(f"{prefix}.adversarial_start must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{prefix}.ema_decay must be in [0, 1) (0 = no EMA)")
        if not 0.0 <= self.cache_rate <= 1.0:
            raise ConfigError(f"{prefix}.cache_rate must be in [0, 1]")
        if self.perceptual_weight > 0 and self.perceptual_weights and not Path(self.perceptual_weights).is_file():
            raise ConfigError(f"{prefix}.perceptual_weights: {self.perceptual_weights} does not exist; give a local "
                              "torchvision ResNet-50 state dict, or set it to '' to train without the perceptual loss")


@dataclass
class UNetConfig:
    channels: tuple[int, ...] = (32, 64)
    attention_levels: tuple[bool, ...] = (False, True)
    num_res_blocks: int = 1
    num_head_channels: tuple[int, ...] = (0, 16)
    norm_num_groups: int = 8
    # residual blocks (instead of strided convolutions / interpolation) for down- and upsampling
    resblock_updown: bool = False
    # attention scores in float32 even under bf16 autocast
    upcast_attention: bool = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def validate(self, prefix: str) -> None:
        n = len(self.channels)
        if len(self.attention_levels) != n or len(self.num_head_channels) != n:
            raise ConfigError(f"{prefix}: attention_levels and num_head_channels need {n} entries (one per channel)")
        for c, a, h in zip(self.channels, self.attention_levels, self.num_head_channels):
            if c % self.norm_num_groups:
                raise ConfigError(f"{prefix}.channels={list(self.channels)}: each must be divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")
            if a and (h <= 0 or c % h):
                raise ConfigError(f"{prefix}.num_head_channels={list(self.num_head_channels)}: an attention level "
                                  "needs a positive head size that divides its channels")


@dataclass
class SchedulerConfig:
    # ddpm: the DDPM noise schedule below, sampled with DDIM (or DDPM); rflow: rectified flow (MONAI's
    # RFlowScheduler, as in MAISI v2): the UNet predicts the straight-line velocity from noise to data and sampling
    # takes Euler steps, 10 of them as good as DDIM's 50 at the small scale (benchmarks/RESULTS.md)
    kind: str = "rflow"
    num_train_timesteps: int = 1000
    # ddpm only: the noise schedule and what the UNet predicts
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0205
    prediction_type: str = "epsilon"
    # rflow only: training times drawn logit-normal (more of the middle noise levels; Esser et al. 2024) or uniform
    timestep_sampling: str = "logit-normal"
    # rflow only: MONAI's resolution shift of the timesteps, towards more noise for latents with more voxels than
    # transform_base_numel (and less for fewer): for latents much larger than the 3x12x14x12 of the small scale
    timestep_transform: bool = False
    transform_base_numel: int = 32 * 32 * 32

    def validate(self, prefix: str) -> None:
        if self.kind not in ("ddpm", "rflow"):
            raise ConfigError(f"{prefix}.kind={self.kind!r}: use ddpm or rflow")
        if self.timestep_sampling not in ("logit-normal", "uniform"):
            raise ConfigError(f"{prefix}.timestep_sampling={self.timestep_sampling!r}: use logit-normal or uniform")
        if self.transform_base_numel < 1:
            raise ConfigError(f"{prefix}.transform_base_numel must be >= 1")
        if self.kind == "rflow" and self.prediction_type != "epsilon":
            raise ConfigError(f"{prefix}.prediction_type={self.prediction_type!r} applies to kind ddpm: rectified "
                              "flow always predicts the velocity; remove the key")
        if self.num_train_timesteps < 2:
            raise ConfigError(f"{prefix}.num_train_timesteps must be >= 2")
        if self.schedule not in ("linear_beta", "scaled_linear_beta"):
            raise ConfigError(f"{prefix}.schedule={self.schedule!r}: use linear_beta or scaled_linear_beta")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"{prefix}: need 0 < beta_start < beta_end < 1")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"{prefix}.prediction_type={self.prediction_type!r}: use epsilon or v_prediction")


@dataclass
class ConditioningConfig:
    # manifest columns the UNet is conditioned on (cross-attention); empty = unconditional. age, sex and
    # diagnosis are built in; any other name is a numeric manifest column (e.g. a ventricle volume you added)
    keys: list[str] = field(default_factory=lambda: ["age", "sex", "diagnosis"])
    # classifier-free guidance: each condition is dropped on its own with drop_prob (so sampling can give
    # only some conditions), and all of them together with drop_all_prob (the unconditional model)
    drop_prob: float = 0.15
    drop_all_prob: float = 0.1
    # how the UNet sees the conditions: "crossattn" (cross-attention only) or "hybrid" (also concatenated to the
    # latent as constant channels, like the MONAI brain-LDM bundle)
    mode: str = "crossattn"

    @property
    def hybrid(self) -> bool:
        """The UNet also takes the conditions as constant input channels (see ``with_condition_channels``)."""
        return self.mode == "hybrid"

    def validate(self, prefix: str) -> None:
        bad = [k for k in self.keys if not k or not k.replace("_", "a").isalnum()]
        if bad:
            raise ConfigError(f"{prefix}.keys: {bad} are not manifest column names (letters, digits, _)")
        if len(set(self.keys)) != len(self.keys):
            raise ConfigError(f"{prefix}.keys lists a condition twice")
        for name in ("drop_prob", "drop_all_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{prefix}.{name} must be in [0, 1)")
        if self.mode not in ("crossattn", "hybrid"):
            raise ConfigError(f"{prefix}.mode={self.mode!r}: use crossattn or hybrid")
        if self.mode == "hybrid" and not self.keys:
            raise ConfigError(f"{prefix}.mode=hybrid concatenates the conditions, but keys is empty")


@dataclass
class PreviewConfig:
    """DDIM samples decoded to images in TensorBoard, same seeds and conditions every time."""

    # every this many steps (0 = never); the conditions are those of the first validation scans
    every: int = 250
    num: int = 2
    ddim_steps: int = 10
    guidance: float = 1.0

    def validate(self, prefix: str) -> None:
        if self.every < 0 or self.num < 1 or self.ddim_steps < 1:
            raise ConfigError(f"{prefix}: every must be >= 0 (0 = off), num and ddim_steps >= 1")
        if self.guidance < 0:
            raise ConfigError(f"{prefix}.guidance must be >= 0")


@dataclass
class SelectionConfig:
    """Which validated checkpoint becomes best.pt."""

    # samples: the EMA model draws `num` fixed-seed latents in `steps` steps of its sampler, and best.pt is the
    # checkpoint whose samples' latent statistics (per-channel spread and coarse layout) sit closest to the training
    # latents' (lower is better; 1 is where training latents themselves score). val_loss: the denoising loss at
    # fixed noise (medldm before issue 22), which is noisy and blind to drift off the latent distribution
    by: str = "samples"
    num: int = 16
    steps: int = 10

    def validate(self, prefix: str) -> None:
        if self.by not in ("samples", "val_loss"):
            raise ConfigError(f"{prefix}.by={self.by!r}: use samples or val_loss")
        if self.num < 2 or self.steps < 1:
            raise ConfigError(f"{prefix}: num must be >= 2 and steps >= 1")


@dataclass
class DiffusionConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000, batch_size=8, lr=1e-3, val_every=250,
                                                                   checkpoint_every=250))
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    ema_decay: float = 0.999
    # Min-SNR-gamma loss weighting (Hang et al. 2023); 5 is the paper's value, 0 = plain MSE
    min_snr_gamma: float = 0.0
    # where the latent cache lives during training: "device" (GPU memory), "host" (pinned CPU memory, a
    # copy per batch) or "auto" (device when it takes under a quarter of the free GPU memory)
    latents_on: str = "auto"
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def validate(self, prefix: str = "diffusion") -> None:
        self.model.validate(f"{prefix}.model")
        self.scheduler.validate(f"{prefix}.scheduler")
        self.conditioning.validate(f"{prefix}.conditioning")
        self.train.validate(f"{prefix}.train")
        self.preview.validate(f"{prefix}.preview")
        self.selection.validate(f"{prefix}.selection")
        self.speed.validate(f"{prefix}.speed")
        if self.speed.recompute_levels:
            raise ConfigError(f"{prefix}.speed.recompute_levels applies to the autoencoder only; set it to 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{prefix}.ema_decay must be in [0, 1)")
        if self.min_snr_gamma < 0:
            raise ConfigError(f"{prefix}.min_snr_gamma must be >= 0 (0 = off)")
        if self.min_snr_gamma and self.scheduler.kind == "rflow":
            raise ConfigError(f"{prefix}.min_snr_gamma weights the DDPM loss; with scheduler.kind=rflow the timestep "
                              "sampling does the weighting: set min_snr_gamma=0")
        if self.latents_on not in ("auto", "device", "host"):
            raise ConfigError(f"{prefix}.latents_on={self.latents_on!r}: use auto, device or host")


@dataclass
class EvaluateConfig:
    # MS-SSIM Gaussian kernel; the number of scales is the most (up to 5) that the volume size allows
    kernel_size: int = 3
    kernel_sigma: float = 0.5
    # random pairs for the diversity (pairwise MS-SSIM) estimate; all pairs when there are fewer
    diversity_pairs: int = 1000
    seed: int = 0
    # memorisation: a pre-filter (volumes average-pooled by prefilter_factor, L2) keeps nearest_candidates training
    # volumes per query for exact SSIM; samples closer than this percentile of real test volumes are flagged
    prefilter_factor: int = 4
    nearest_candidates: int = 5
    memorisation_percentile: float = 99.0
    # plausibility: a sample is off the data manifold when its nearest-training SSIM is below both this percentile
    # of the real test volumes' and their median minus plausibility_z robust SDs, or when one of its intensity and
    # tissue statistics lies more than plausibility_z robust SDs (median/MAD) from the training volumes'
    plausibility_percentile: float = 1.0
    plausibility_z: float = 3.5
    # tissue classes inside the brain for morphometry: otsu (scikit-image multi-Otsu) or gmm (EM from it)
    morphometry_method: str = "otsu"
    # FID on MedicalNet ResNet features: a local .pth (nothing is downloaded); empty = FID skipped, as the report says
    fid_weights: str = ""
    fid_depth: int = 10

    def validate(self, prefix: str = "evaluate") -> None:
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ConfigError(f"{prefix}.kernel_size={self.kernel_size}: must be odd and >= 3")
        if self.kernel_sigma <= 0:
            raise ConfigError(f"{prefix}.kernel_sigma must be > 0")
        if self.diversity_pairs < 1:
            raise ConfigError(f"{prefix}.diversity_pairs must be >= 1")
        if self.prefilter_factor < 1 or self.nearest_candidates < 1:
            raise ConfigError(f"{prefix}.prefilter_factor and {prefix}.nearest_candidates must be >= 1")
        if not 0 < self.memorisation_percentile <= 100:
            raise ConfigError(f"{prefix}.memorisation_percentile must be in (0, 100]")
        if not 0 <= self.plausibility_percentile < 50 or self.plausibility_z <= 0:
            raise ConfigError(f"{prefix}.plausibility_percentile must be in [0, 50) and {prefix}.plausibility_z > 0")
        if self.morphometry_method not in ("otsu", "gmm"):
            raise ConfigError(f"{prefix}.morphometry_method={self.morphometry_method!r}: use otsu or gmm")


STAGES: dict[str, type[Any]] = {
    "preprocess": PreprocessConfig,
    "autoencoder": AutoencoderConfig,
    "diffusion": DiffusionConfig,
    "evaluate": EvaluateConfig,
}


# ----------------------------------------------------------------------------------------------
# Parsing


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(typing.cast(type, tp), value, key)  # a dataclass type here, never an instance
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type that takes the value
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads 1e-4 (no dot) as a string; users write it that way, so accept it
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # nan passes every range check (nan <= 0 is false) and poisons the run later; inf means "none" for no knob
        # (0 does, e.g. train.time_limit_minutes). Both are refused here, for every float field at once
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {float(value)} is not a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            if not value:
                raise ConfigError(f"{key}: must not be empty")
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({list(value)})")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{key} key"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp} at {key}")  # a bug in this module, not user input


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    return _apply(cls(), data, prefix)


def _apply(obj: T, data: dict[str, Any], prefix: str) -> T:
    # nested sections update the parent's own defaults (e.g. autoencoder.train.lr), not the section class's
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix or cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
            _apply(typing.cast("DataclassInstance", current), value, key)
        else:
            setattr(obj, name, _coerce(value, hints[name], key))
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain (YAML/JSON-safe) dict of a config; tuples become lists."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.steps=10", "model.channels=[8,16]"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        _set_path(out, key.strip(), value)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(stage: str, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load the config of ``stage`` from YAML ``path`` (tiny defaults when None) with overrides."""
    cls = STAGES[stage]
    data: dict[str, Any] = {}
    if path is None:
        log.info("no --config for %s: using the built-in tiny defaults (= configs/%s/tiny.yaml)", stage, stage)
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise not_utf8(path, e) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of keys")
    data = _merge(data, parse_overrides(overrides))
    try:
        cfg = from_dict(cls, data, stage)
        cfg.validate(stage)
    except ConfigError as e:
        where = f" (in {path})" if path else ""
        raise ConfigError(f"{e}{where}") from None
    return cfg


# keys added after runs were first saved whose default changed since: a saved config without the key was trained
# with this value, not with today's default
BEFORE_THE_KEY = {"diffusion": {("scheduler", "kind"): "ddpm", ("selection", "by"): "val_loss"}}


def as_saved_before_the_key(stage: str, cfg: Any, saved: dict[str, Any]) -> Any:
    """``cfg`` for resuming a run whose saved config predates keys of ``BEFORE_THE_KEY``: those keys keep the value
    the run was trained with (its config.yaml lacks them too, so today's default would switch the run over)."""
    for (section, key), value in BEFORE_THE_KEY.get(stage, {}).items():
        if key not in saved.get(section, {}) and getattr(getattr(cfg, section), key) != value:
            log.info("resuming a run saved before %s.%s existed: keeping %s.%s=%s", section, key, section, key, value)
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{key: value})})
    return cfg


def config_from_dict(stage: str, data: dict[str, Any]) -> Any:
    """Rebuild a stage config saved in a checkpoint or output dir."""
    data = dict(data)
    for (section, key), value in BEFORE_THE_KEY.get(stage, {}).items():
        if key not in data.get(section, {}):
            data[section] = {**data.get(section, {}), key: value}
    cfg = from_dict(STAGES[stage], data, stage)
    cfg.validate(stage)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML, atomically (a killed run never leaves half a config.yaml to resume from)."""
    # imported here: config sits below every other medldm module (DESIGN.md), and data.io pulls in nibabel
    from medldm.data.io import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
