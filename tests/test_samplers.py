"""The samplers' arithmetic against exact denoisers, rectified flow's targets, the sample score, the lr schedule."""

import pytest
import torch

from medldm.config import ConfigError, SchedulerConfig, TrainConfig, load_config
from medldm.models.networks import build_scheduler, default_sampler, set_sampling_steps
from medldm.models.ops import sample_latents
from medldm.training.diffusion import diffusion_target, training_timesteps
from medldm.training.loop import learning_rate

SHAPE = (2, 3, 4, 4, 4)


def data_point() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("steps", [1, 7, 10, 25, 50])
def test_ddim_with_an_exact_denoiser_ends_on_the_data_at_any_step_count(steps):
    # with the noise the data point implies, DDIM must land on the data however many steps it takes; MONAI's own
    # timestep spacing left each step 11 timesteps above the next one at 10 steps, and the chain ended noisy
    z0 = data_point()
    scheduler = build_scheduler(SchedulerConfig(kind="ddpm"), "ddim")
    set_sampling_steps(scheduler, steps, SHAPE[1:])
    alpha_bar = scheduler.alphas_cumprod

    def oracle(x, timesteps, context=None):
        a = alpha_bar[timesteps].view(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * z0) / (1 - a).sqrt()

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    out = sample_latents(oracle, scheduler, noise, None)
    torch.testing.assert_close(out, z0, atol=1e-4, rtol=1e-4)
    assert len(scheduler.timesteps) == steps and int(scheduler.timesteps[0]) == 999


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_rectified_flow_with_the_exact_velocity_ends_on_the_data(steps):
    cfg = SchedulerConfig(kind="rflow")
    train = build_scheduler(cfg)
    z0, noise = data_point(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([250, 750])
    noisy = train.add_noise(z0, noise, t)
    # the target is the velocity that carries a noised latent straight to the data in the remaining time
    v = diffusion_target(train, z0, noise, t)
    share = (t.float() / train.num_train_timesteps).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(noisy + share * v, z0)

    sampler = build_scheduler(cfg, default_sampler(cfg))
    set_sampling_steps(sampler, steps, SHAPE[1:])

    def oracle(x, timesteps, context=None):
        s = (timesteps.float() / sampler.num_train_timesteps).view(-1, 1, 1, 1, 1)
        return (z0 - x) / s

    out = sample_latents(oracle, sampler, noise, None)
    torch.testing.assert_close(out, z0, atol=1e-4, rtol=1e-4)
    assert int(sampler.timesteps[0]) == sampler.num_train_timesteps  # starts from pure noise


def test_rectified_flow_draws_middle_timesteps_from_its_generator():
    scheduler = build_scheduler(SchedulerConfig(kind="rflow"))
    z = torch.zeros(4000, 1, 1, 1, 1)
    t = training_timesteps(scheduler, z, torch.Generator().manual_seed(0))
    again = training_timesteps(scheduler, z, torch.Generator().manual_seed(0))
    assert torch.equal(t, again) and t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= 999
    # logit-normal: the middle half of the noise levels gets 73 % of the draws (|N(0, 1)| < logit 0.75), uniform 50 %
    middle = ((t >= 250) & (t < 750)).float().mean().item()
    assert 0.70 < middle < 0.76
    uniform = build_scheduler(SchedulerConfig(kind="rflow", timestep_sampling="uniform"))
    middle = ((training_timesteps(uniform, z, torch.Generator().manual_seed(0)) - 500).abs() < 250).float().mean()
    assert 0.46 < middle.item() < 0.54


def test_a_sampler_that_does_not_fit_the_training_is_refused():
    with pytest.raises(Exception, match="use rflow"):
        build_scheduler(SchedulerConfig(kind="rflow"), "ddim")
    with pytest.raises(Exception, match="use ddim or ddpm"):
        build_scheduler(SchedulerConfig(kind="ddpm"), "rflow")
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        load_config("diffusion", None, ["scheduler.kind=rflow", "min_snr_gamma=5"])
    with pytest.raises(ConfigError, match="always predicts the velocity"):
        load_config("diffusion", None, ["scheduler.kind=rflow", "scheduler.prediction_type=v_prediction"])
    with pytest.raises(ConfigError, match="use ddpm or rflow"):
        load_config("diffusion", None, ["scheduler.kind=flow"])


def test_cosine_schedule_warms_up_then_decays_to_its_floor():
    tc = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    lrs = [learning_rate(tc, s) for s in range(tc.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(0.55e-3)  # half-way down
    assert learning_rate(tc, tc.steps) == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    constant = TrainConfig(steps=110, lr=1e-3, warmup_steps=10)
    assert learning_rate(constant, 100) == 1e-3
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config("autoencoder", None, ["train.lr_schedule=linear"])


def test_sample_score_is_low_for_samples_on_the_data_and_high_for_noise():
    from medldm.training.diffusion import SampleScore

    cfg = load_config("diffusion", None, ["scheduler.kind=rflow", "selection.num=8", "selection.steps=4"])
    # training latents with a layout: a bright block in channel 0 whose brightness varies, channel 2 twice as spread
    gen = torch.Generator().manual_seed(0)
    train = 0.3 * torch.randn(20, 3, 6, 6, 6, generator=gen)
    train[:, 0, :3] += 1.5 + 0.2 * torch.randn(20, 1, 1, 1, generator=gen)
    train[:, 2] *= 2
    score = SampleScore(cfg, train, None, torch.device("cpu"))

    on_data = score(_Fn(lambda x, timesteps, context=None: _velocity_to(train, x, timesteps)))
    stays_noise = score(_Fn(lambda x, timesteps, context=None: torch.zeros_like(x)))
    drifts = score(_Fn(lambda x, timesteps, context=None: 0.5 * x / (timesteps.float() / 1000).view(-1, 1, 1, 1, 1)))
    assert on_data < 1.5 < 5 < stays_noise < drifts


def _velocity_to(targets, x, timesteps):
    s = (timesteps.float() / 1000).view(-1, 1, 1, 1, 1)
    nearest = targets[torch.cdist(x.flatten(1), targets.flatten(1)).argmin(1)]
    return (nearest - x) / s


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, timesteps, context=None):
        return self.fn(x, timesteps, context)

