"""The GPU speed levers change speed and memory, never results: each is checked against the plain network."""

import copy

import pytest
import torch

from medldm.config import AutoencoderModelConfig, ConfigError, SpeedConfig, UNetConfig, load_config
from medldm.models.networks import build_autoencoder, build_unet
from medldm.models.speed import (
    apply_speed,
    autoencoder_levels,
    channels_last,
    compile_regions,
    recompute_levels,
    regions,
)

AE = AutoencoderModelConfig(channels=(8, 16, 16), num_res_blocks=1, attention_levels=(False, False, True),
                            norm_num_groups=8)
UNET = UNetConfig(channels=(16, 32), attention_levels=(False, True), num_res_blocks=1, num_head_channels=(0, 16),
                  norm_num_groups=8)


def _ae_loss_and_grads(model, x):
    torch.manual_seed(1)  # the posterior sample
    model.zero_grad()
    recon, mu, sigma = model(x)
    loss = (recon - x).abs().mean() + mu.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_recomputing_autoencoder_gives_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    plain = build_autoencoder(AE)
    fast = copy.deepcopy(plain)
    recompute_levels(fast, 2)
    assert compile_regions(fast, backend="aot_eager") == len(fast.encoder.blocks) + len(fast.decoder.blocks)
    x = torch.rand(2, 1, 16, 16, 16)
    loss, grads = _ae_loss_and_grads(plain, x)
    fast_loss, fast_grads = _ae_loss_and_grads(fast, x)
    assert torch.allclose(fast_loss, loss, rtol=1e-6)
    assert grads.keys() == fast_grads.keys()
    for name in grads:
        assert torch.allclose(fast_grads[name], grads[name], rtol=1e-4, atol=1e-7), name
    # checkpoints are unaffected: same parameter names, and they load into a plain network
    assert fast.state_dict().keys() == plain.state_dict().keys()
    build_autoencoder(AE).load_state_dict(fast.state_dict())


def test_every_region_is_compiled_also_when_recomputed():
    # torch's own forwards (nn.Sequential under MONAI's Convolution, GroupNorm) and checkpoint() called from torch
    # would silently run uncompiled: one graph per distinct block must reach the compiler either way
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    plain = build_autoencoder(AE)
    x = torch.rand(1, 1, 16, 16, 16)
    distinct = set()
    hooks = [b.register_forward_pre_hook(lambda m, a: distinct.add(
        (type(m), tuple(a[0].shape), tuple(p.shape for p in m.parameters())))) for b in regions(plain)]
    plain(x)
    for h in hooks:
        h.remove()
    for levels in (0, 1):
        torch._dynamo.reset()
        model = copy.deepcopy(plain)
        recompute_levels(model, levels)
        counter = CompileCounter()
        compile_regions(model, backend=counter)
        recon, _, _ = model(x)
        recon.mean().backward()
        assert counter.frame_count == len(distinct), levels


def _saved_bytes(model, x) -> int:
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        recon, mu, sigma = model(x)
    return sum(saved)


def test_recomputing_the_top_level_keeps_far_fewer_activations():
    torch.manual_seed(0)
    plain = build_autoencoder(AE)
    top = copy.deepcopy(plain)
    assert recompute_levels(top, 1) == sum(level == 0 for _, level in autoencoder_levels(plain))
    x = torch.rand(1, 1, 32, 32, 32)
    # the full-resolution level holds most activations; recomputed, each of its blocks keeps only its input
    assert _saved_bytes(top, x) < 0.5 * _saved_bytes(plain, x)


def test_levels_follow_the_resolution():
    model = build_autoencoder(AE)
    x = torch.rand(1, 1, 16, 16, 16)
    sizes = {}
    hooks = [b.register_forward_hook(lambda m, i, o, lvl=lvl: sizes.setdefault(lvl, set()).add(i[0].shape[-1]))
             for b, lvl in autoencoder_levels(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    # a block's input is at its level's resolution, except the resampling blocks at the edges of a level
    assert 16 in sizes[0] and max(sizes[2]) <= 8 and 4 in sizes[2]


def test_compiled_unet_with_sdpa_predicts_what_the_plain_unet_does():
    torch.manual_seed(0)
    plain = build_unet(UNET, 3, 7).eval()
    fast = build_unet(UNET, 3, 7, sdpa=True).eval()
    fast.load_state_dict(plain.state_dict())
    for p in plain.parameters():  # MONAI zero-initialises the output convolutions; make the prediction non-trivial
        if not p.any():
            p.data.normal_(0, 0.1)
    fast.load_state_dict(plain.state_dict())
    assert compile_regions(fast, backend="aot_eager") == len(regions(plain)) > 0
    x, t, c = torch.randn(2, 3, 8, 8, 8), torch.tensor([10, 900]), torch.randn(2, 1, 7)
    with torch.no_grad():
        expected = plain(x, timesteps=t, context=c)
        assert expected.abs().max() > 0
        assert torch.allclose(fast(x, timesteps=t, context=c), expected, rtol=1e-4, atol=1e-5)


def test_channels_last_layout_changes_memory_order_not_results():
    torch.manual_seed(0)
    plain = build_autoencoder(AE).eval()
    fast = copy.deepcopy(plain)
    channels_last(fast)
    assert fast.encoder.blocks[0].conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fast.reconstruct(x), plain.reconstruct(x), atol=1e-5)


def test_levers_apply_only_where_they_fit():
    cpu = torch.device("cpu")
    auto = apply_speed(build_unet(UNET, 3, None), SpeedConfig(), cpu, backend="aot_eager")
    assert auto == []  # compile "auto" is CUDA only; channels-last too
    on = apply_speed(build_unet(UNET, 3, None), SpeedConfig(compile="on", channels_last=True), cpu, backend="aot_eager")
    assert len(on) == 1 and on[0].startswith("compiled")
    ae = apply_speed(build_autoencoder(AE), SpeedConfig(compile="off", recompute_levels=1), cpu, training=False)
    assert ae == []  # recomputing is for training only


def test_speed_settings_are_checked():
    for raw, value in (("off", "off"), ("on", "on"), ("false", "off"), ("'on'", "on"), ("auto", "auto")):
        assert load_config("diffusion", None, [f"speed.compile={raw}"]).speed.compile == value  # YAML: off is false
    with pytest.raises(ConfigError, match="speed.compile='fast'"):
        load_config("autoencoder", None, ["speed.compile=fast"])
    with pytest.raises(ConfigError, match="only 3 levels"):
        load_config("autoencoder", None, ["speed.recompute_levels=4"])
    with pytest.raises(ConfigError, match="autoencoder only"):
        load_config("diffusion", None, ["speed.recompute_levels=1"])


@pytest.mark.gpu
def test_cuda_graph_replay_matches_the_eager_unet():
    from medldm.inference.cuda_graphs import GraphedUNet

    torch.manual_seed(0)
    unet = build_unet(UNET, 3, 7, sdpa=True).cuda().eval()
    for p in unet.parameters():
        if not p.any():
            p.data.normal_(0, 0.1)
    graphed = GraphedUNet(unet)
    for batch in (1, 2, 1):  # a graph per shape, and replays with new inputs
        x, t, c = (torch.randn(batch, 3, 8, 8, 8).cuda(), torch.randint(0, 1000, (batch,)).cuda(),
                   torch.randn(batch, 1, 7).cuda())
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            expected = unet(x, timesteps=t, context=c).float()
        assert torch.allclose(graphed(x, t, c).float(), expected, atol=2e-2)
    assert len(graphed.graphs) == 2
