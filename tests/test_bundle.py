"""A MONAI latent diffusion bundle (the brain-LDM's format, tiny networks, weights in the old GenerativeModels
naming) imports into medldm runs that sample, with hybrid conditioning, exactly as the bundle's own sampler would."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from medldm.cli import main
from medldm.inference.bundle import BRAIN_LDM_AFFINE, BundleError, import_bundle
from medldm.inference.sample import sample_run
from medldm.models.old_keys import convert_old_state_dict

AE_DEF = {"_target_": "monai.networks.nets.AutoencoderKL", "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
          "latent_channels": 3, "channels": [8, 16, 16], "num_res_blocks": 1, "norm_num_groups": 8, "norm_eps": 1e-06,
          "attention_levels": [False, False, True], "with_encoder_nonlocal_attn": False,
          "with_decoder_nonlocal_attn": False}
UNET_DEF = {"_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 3, "in_channels": 7,
            "out_channels": 3, "channels": [16, 32], "num_res_blocks": 1, "attention_levels": [False, True],
            "norm_num_groups": 8, "norm_eps": 1e-06, "resblock_updown": True, "num_head_channels": [0, 16],
            "with_conditioning": True, "transformer_num_layers": 1, "cross_attention_dim": 4,
            "upcast_attention": True, "use_flash_attention": False}
SCHEDULER = {"_target_": "monai.networks.schedulers.DDIMScheduler", "beta_start": 0.0015, "beta_end": 0.0205,
             "num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "clip_sample": False}


def _networks():
    """The networks as GenerativeModels ran them: self-attention without an output projection (include_fc=False)."""
    torch.manual_seed(0)
    kw = {k: v for k, v in AE_DEF.items() if k != "_target_"}
    ae = AutoencoderKL(**kw, include_fc=False).eval()
    unet = DiffusionModelUNet(**{k: v for k, v in UNET_DEF.items() if k != "_target_"}).eval()
    with torch.no_grad():
        for p in unet.parameters():  # MONAI zero-initialises the output convolutions: make predictions non-trivial
            if not p.any():
                p.normal_(0, 0.05)
    return ae, unet


def _old_naming(state):
    """GenerativeModels' key names for a current MONAI state dict (the reverse of what the import maps)."""
    old = {}
    for key, value in state.items():
        key = key.replace(".attn.to_q.", ".to_q.").replace(".attn.to_k.", ".to_k.").replace(".attn.to_v.", ".to_v.")
        key = key.replace(".out_proj.", ".to_out.0.").replace(".postconv.", ".conv.")
        old[key] = value
    for key in [k for k in old if k.endswith(".to_q.weight") and ".attn1." not in k and ".attn2." not in k]:
        block = key.removesuffix(".to_q.weight")  # the old self-attention block's unused projection
        old[f"{block}.proj_attn.weight"] = torch.randn_like(old[key])
        old[f"{block}.proj_attn.bias"] = torch.randn(old[key].shape[0])
    return old


def write_bundle(tmp_path):
    """A bundle folder in the brain-LDM's layout; returns it with the networks its weights come from."""
    ae, unet = _networks()
    root = tmp_path / "brain_image_synthesis_latent_diffusion_model"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = {
        "load_old": 1, "model_dir": "$@bundle_root + '/models'", "gender": 0.0, "age": 0.1, "ventricular_vol": 0.2,
        "brain_vol": 0.4,
        "conditioning": "$torch.tensor([[@gender, @age, @ventricular_vol, @brain_vol]]).to(@device).unsqueeze(1)",
        "autoencoder_def": AE_DEF, "load_autoencoder_path": "$@model_dir + '/autoencoder.pt'",
        "diffusion_def": UNET_DEF, "load_diffusion_path": "$@model_dir + '/model.pt'", "scheduler": SCHEDULER,
        "noise": "$torch.randn((1, 3, 8, 8, 8)).to(@device)",
        "set_timesteps": "$@scheduler.set_timesteps(num_inference_steps=50)",
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    meta = {"version": "1.0.0", "network_data_format": {"outputs": {"pred": {"spatial_shape": [32, 32, 32]}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    torch.save(_old_naming(ae.state_dict()), root / "models" / "autoencoder.pt")
    torch.save(_old_naming(unet.state_dict()), root / "models" / "model.pt")
    return root, ae, unet


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path)


def test_old_key_names_load_into_monai_networks_that_compute_what_the_old_ones_did(bundle):
    root, ae, unet = bundle
    new_ae = AutoencoderKL(**{k: v for k, v in AE_DEF.items() if k != "_target_"}).eval()  # with out_proj
    old_ae = torch.load(root / "models" / "autoencoder.pt", weights_only=True)
    new_ae.load_state_dict(convert_old_state_dict(new_ae, old_ae))
    z = torch.randn(1, 3, 8, 8, 8)
    with torch.no_grad():
        assert torch.allclose(new_ae.decode(z), ae.decode(z), atol=1e-6)
    new_unet = DiffusionModelUNet(**{k: v for k, v in UNET_DEF.items() if k != "_target_"}).eval()
    old_unet = torch.load(root / "models" / "model.pt", weights_only=True)
    new_unet.load_state_dict(convert_old_state_dict(new_unet, old_unet))
    x, c = torch.randn(2, 7, 8, 8, 8), torch.rand(2, 1, 4)
    with torch.no_grad():
        assert torch.equal(new_unet(x, timesteps=torch.tensor([5, 700]), context=c),
                           unet(x, timesteps=torch.tensor([5, 700]), context=c))
    # weights that do not fit are an error naming them, not a silent partial load
    broken = torch.load(root / "models" / "model.pt", weights_only=True)
    broken.pop("out.2.conv.weight")
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 weight\(s\) missing \(e.g. \['out.2.conv.weight'\]\), 1 unexpected"):
        convert_old_state_dict(new_unet, broken, "model.pt")


def _bundle_sampler(ae, unet, noise, conditioning, steps):
    """The bundle's own scripts/sampler.py: conditions concatenated as channels and given by cross-attention; on
    the DDIM grid medldm uses (evenly spaced by 1000 // steps, as MONAI's step assumes; MONAI's own set_timesteps
    spaces them by 999 / (steps - 1), which leaves noise after the last step), and ending on the predicted clean
    latent as medldm's last step does (alpha_bar[0] = 1: the grid never visits t = 0 itself)."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015,
                              beta_end=0.0205, clip_sample=False)
    scheduler.set_timesteps(steps)
    scheduler.timesteps = 999 - torch.arange(steps) * (1000 // steps)
    scheduler.alphas_cumprod[0] = 1.0
    cond = conditioning.squeeze(1)[..., None, None, None].expand(-1, -1, *noise.shape[2:])
    image = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(torch.cat((image, cond), dim=1), timesteps=torch.Tensor((t,)).long(), context=conditioning)
            image, _ = scheduler.step(out, t, image)
        return ae.decode_stage_2_outputs(image)


def test_imported_bundle_samples_like_the_bundles_own_sampler(bundle, tmp_path):
    root, ae, unet = bundle
    runs = import_bundle(root, tmp_path / "imported")
    info = json.loads((tmp_path / "imported" / "bundle.json").read_text(encoding="utf-8"))
    assert info["load_old"] and info["conditioning_mode"] == "hybrid" and len(info["conditions"]) == 4
    out = tmp_path / "samples"
    conditions = {"age": "70", "sex": "F", "ventricular_volume": "0.3", "brain_volume": "0.6"}
    paths = sample_run(runs["diffusion"], out, num=2, steps=3, seed=5, conditions=conditions, device="cpu")
    # the same noise through the bundle's loop: age 70 is (70 - 44) / 38 on the bundle's scale, F is 0
    noise = torch.randn([3, 8, 8, 8], generator=torch.Generator().manual_seed(6))[None]
    expected = _bundle_sampler(ae, unet, noise, torch.tensor([[[0.0, 26 / 38, 0.3, 0.6]]]), 3).clamp(0, 1)[0, 0]
    img = nib.load(paths[1])
    assert img.shape == (32, 32, 32)
    np.testing.assert_allclose(img.affine, BRAIN_LDM_AFFINE, atol=1e-5)
    np.testing.assert_allclose(img.get_fdata(), expected.numpy(), atol=1 / 4095)
    assert img.header["descrip"].tobytes().startswith(b"SYNTHETIC")
    sidecar = json.loads(paths[1].with_suffix("").with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["conditions"] == {"sex": "F", "age": 70.0, "ventricular_volume": 0.3, "brain_volume": 0.6}
    # a condition not given takes the bundle's default, and says so in the sidecar
    sample_run(runs["diffusion"], out, num=1, steps=2, conditions={"age": "60"}, device="cpu", overwrite=True)
    sidecar = json.loads((out / "sample_0000.json").read_text(encoding="utf-8"))
    assert sidecar["conditions"] == {"sex": "F", "age": 60.0, "ventricular_volume": 0.2, "brain_volume": 0.4}


def test_bundle_conditions_and_files_are_checked(bundle, tmp_path):
    root, _, _ = bundle
    runs = import_bundle(root, tmp_path / "imported")
    for conditions, message in (({"age": "90"}, "outside the model's range 44–82 years"),
                                ({"sex": "X"}, "use one of \\['F', 'M'\\]"),
                                ({"diagnosis": "AD"}, "this model takes")):
        with pytest.raises(ValueError, match=message):
            sample_run(runs["diffusion"], tmp_path / "s", num=1, steps=2, conditions=conditions, device="cpu")
    with pytest.raises(ValueError, match="no unconditional prediction"):
        sample_run(runs["diffusion"], tmp_path / "s", num=1, steps=2, conditions={"age": "60"}, guidance=3.0,
                   device="cpu")
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_bundle(root, tmp_path / "imported")
    # another grid for the samples, from a reference NIfTI of the model's shape
    affine = np.diag([-0.9, 0.9, 0.9, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), affine), tmp_path / "ref.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 30), np.float32), affine), tmp_path / "small.nii.gz")
    with pytest.raises(ValueError, match=r"its grid \[32, 32, 30\] is not the model's \[32, 32, 32\]"):
        import_bundle(root, tmp_path / "other", reference_image=tmp_path / "small.nii.gz")
    # an RAS template on the same grid would mirror the samples: the model's arrays are LAS
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), np.eye(4)), tmp_path / "ras.nii.gz")
    with pytest.raises(ValueError, match="its voxel axes point RAS, the model's LAS"):
        import_bundle(root, tmp_path / "other", reference_image=tmp_path / "ras.nii.gz")
    assert main(["import-bundle", str(root), "--out", str(tmp_path / "other"), "--reference",
                 str(tmp_path / "ref.nii.gz"), "--age-range", "40", "80"]) == 0
    paths = sample_run(tmp_path / "other" / "diffusion", tmp_path / "s2", num=1, steps=2, device="cpu")
    np.testing.assert_allclose(nib.load(paths[0]).affine, affine)
    with pytest.raises(ValueError, match="outside the model's range 40–80 years"):
        sample_run(tmp_path / "other" / "diffusion", tmp_path / "s3", num=1, conditions={"age": "85"}, device="cpu")
    (root / "models" / "model.pt").unlink()
    with pytest.raises(BundleError, match=r"model.pt \(the unet weights\) is missing: .*monai.bundle download"):
        import_bundle(root, tmp_path / "again")
    assert main(["import-bundle", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


def test_sampling_straight_from_the_bundle_folder_imports_it_once(bundle, tmp_path):
    root, _, _ = bundle
    paths = sample_run(root, tmp_path / "a", num=1, steps=2, conditions={"age": "70"}, device="cpu")
    record = root / "medldm_runs" / "bundle.json"
    assert paths[0].is_file() and record.is_file()
    stamp = record.stat().st_mtime_ns
    sample_run(root, tmp_path / "b", num=1, steps=2, device="cpu")
    assert record.stat().st_mtime_ns == stamp  # the same weights: not imported again
    moved = root.rename(tmp_path / "moved")  # the import moves with the folder and still finds its autoencoder
    assert sample_run(moved, tmp_path / "c", num=1, steps=2, device="cpu")[0].is_file()


def test_an_imported_run_is_not_trained_over(bundle, dataset, ae_run, tmp_path):
    from medldm.config import load_config
    from medldm.training.diffusion import train_diffusion

    root, _, _ = bundle
    runs = import_bundle(root, tmp_path / "imported")
    before = (runs["diffusion"] / "checkpoints" / "best.pt").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run"):
        train_diffusion(dataset, ae_run, runs["diffusion"], load_config("diffusion", None, ["train.steps=1"]))
    with pytest.raises(FileNotFoundError, match="cannot be trained further"):
        train_diffusion(dataset, ae_run, runs["diffusion"], load_config("diffusion", None, ["train.steps=1"]),
                        resume=True)
    assert (runs["diffusion"] / "checkpoints" / "best.pt").read_bytes() == before
