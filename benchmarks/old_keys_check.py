"""Old GenerativeModels networks against medldm's import of their state dicts (and MONAI's own converter).

    pip install --no-deps monai-generative==0.2.3     # the old networks; not a medldm dependency
    python benchmarks/old_keys_check.py

Builds the networks of the MONAI brain-LDM bundle (configs/inference.json) with the old `generative` package and
random weights, maps their state dicts with `medldm.models.old_keys.convert_old_state_dict` onto current MONAI
networks and compares outputs. Then the same for an autoencoder with self-attention blocks, where GenerativeModels
never applied its `proj_attn` layer, also against MONAI's `load_old_state_dict`. CPU, a few seconds.
"""

from __future__ import annotations

import torch
from generative.networks.nets import AutoencoderKL as OldAutoencoder
from generative.networks.nets import DiffusionModelUNet as OldUNet
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from medldm.models.old_keys import convert_old_state_dict

AE = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=3, num_res_blocks=2, norm_num_groups=32,
          norm_eps=1e-6, attention_levels=[False] * 4, with_encoder_nonlocal_attn=False,
          with_decoder_nonlocal_attn=False)
UNET = dict(spatial_dims=3, in_channels=7, out_channels=3, num_res_blocks=2, attention_levels=[False, True, True],
            norm_num_groups=32, norm_eps=1e-6, resblock_updown=True, num_head_channels=[0, 512, 768],
            with_conditioning=True, transformer_num_layers=1, cross_attention_dim=4, upcast_attention=True)


def main() -> None:
    torch.manual_seed(0)
    old_ae, new_ae = OldAutoencoder(num_channels=[64, 128, 128, 128], **AE).eval(), AutoencoderKL(
        channels=[64, 128, 128, 128], **AE).eval()
    old_unet, new_unet = OldUNet(num_channels=[256, 512, 768], **UNET).eval(), DiffusionModelUNet(
        channels=[256, 512, 768], **UNET).eval()
    with torch.no_grad():
        for p in old_unet.parameters():  # non-zero output convolutions, so the comparison means something
            p.normal_(0, 0.02)
    new_ae.load_state_dict(convert_old_state_dict(new_ae, old_ae.state_dict()))
    new_unet.load_state_dict(convert_old_state_dict(new_unet, old_unet.state_dict()))
    with torch.no_grad():
        z = torch.randn(1, 3, 8, 8, 8)
        print("bundle autoencoder, decode: max |old - medldm|",
              float((old_ae.decode_stage_2_outputs(z) - new_ae.decode_stage_2_outputs(z)).abs().max()))
        x, t, c = torch.randn(1, 7, 8, 12, 8), torch.tensor([10]), torch.rand(1, 1, 4)
        out = old_unet(x, t, context=c)
        print(f"bundle UNet: max |out| {float(out.abs().max()):.3g}, max |old - medldm|",
              float((out - new_unet(x, timesteps=t, context=c)).abs().max()))

    attn = dict(AE, norm_num_groups=8, attention_levels=[False, False, False, True], with_encoder_nonlocal_attn=True,
                with_decoder_nonlocal_attn=True)
    old = OldAutoencoder(num_channels=[32] * 4, **attn).eval()
    with torch.no_grad():
        for p in old.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours, monai_own = AutoencoderKL(channels=[32] * 4, **attn).eval(), AutoencoderKL(channels=[32] * 4, **attn).eval()
    ours.load_state_dict(convert_old_state_dict(ours, old.state_dict()))
    monai_own.load_old_state_dict(dict(old.state_dict()))
    with torch.no_grad():
        z = torch.randn(1, 3, 4, 4, 4)
        ref = old.decode_stage_2_outputs(z)
        print("autoencoder with attention, decode: max |old - medldm|",
              float((ref - ours.decode_stage_2_outputs(z)).abs().max()), "| max |old - MONAI load_old_state_dict|",
              float((ref - monai_own.decode_stage_2_outputs(z)).abs().max()))


if __name__ == "__main__":
    main()
