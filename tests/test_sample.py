import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medldm import __version__
from medldm.artifacts import DiffusionRun
from medldm.data.dataset import read_dataset_info
from medldm.data.io import load_volume
from medldm.inference.sample import sample_run
from medldm.models.networks import build_scheduler, default_sampler, set_sampling_steps
from medldm.models.ops import sample_latents

from .conftest import train_age_range

LEVEL = 1 / 4095  # one int16 step of the exported intensities


def volume(path):
    return np.asanyarray(nib.load(path).dataobj)


def test_same_seed_same_volume_and_batch_size_does_not_matter(ldm_run, tmp_path, monkeypatch):
    import medldm.inference.sample as sampling

    denoised = []  # the latents of every reverse-process call sample_run makes, one tensor per batch
    real = sampling.sample_latents

    def recording(*args, **kwargs):
        z = real(*args, **kwargs)
        denoised.append(z.clone())
        return z

    monkeypatch.setattr(sampling, "sample_latents", recording)

    def run(name, num=4, seed=11, batch_size=4):
        denoised.clear()
        paths = sample_run(ldm_run, tmp_path / name, num=num, steps=5, seed=seed, batch_size=batch_size)
        return paths, [z.shape[0] for z in denoised], torch.cat(denoised)

    a, batches_a, za = run("a")
    again, _, z_again = run("again")
    b, batches_b, zb = run("b", batch_size=1)
    r, batches_r, zr = run("r", batch_size=3)  # a full batch, then a batch of one
    c, _, zc = run("c", num=1, seed=12)
    assert (batches_a, batches_b, batches_r) == ([4], [1, 1, 1, 1], [3, 1]) and len(a) == len(b) == len(r) == 4
    torch.testing.assert_close(z_again, za, rtol=0, atol=0)  # bit-identical on the CPU
    # batched and one-by-one differ only by float rounding, far below what tells two samples apart
    for other in (zb, zr):
        torch.testing.assert_close(other, za, rtol=0, atol=1e-4)
    torch.testing.assert_close(zc[0], za[1], rtol=0, atol=1e-4)  # seed 12 = sample 1 of seed 11
    assert min((za[i] - za[j]).abs().max() for i in range(4) for j in range(i)) > 0.1
    for x, y, z, w in zip(a, again, b, r):
        np.testing.assert_array_equal(volume(x), volume(y))
        # the exported volumes: at most one stored level apart
        np.testing.assert_allclose(volume(x), volume(z), atol=LEVEL * 1.01)
        np.testing.assert_allclose(volume(x), volume(w), atol=LEVEL * 1.01)
    assert not np.allclose(volume(a[0]), volume(a[1]), atol=0.05)
    np.testing.assert_allclose(volume(a[1]), volume(c[0]), atol=LEVEL * 1.01)


def test_stochastic_ddim_is_reproducible(ddpm_run, tmp_path):
    a = sample_run(ddpm_run, tmp_path / "a", num=2, steps=4, eta=1.0, seed=5, batch_size=2)
    again = sample_run(ddpm_run, tmp_path / "again", num=2, steps=4, eta=1.0, seed=5, batch_size=2)
    b = sample_run(ddpm_run, tmp_path / "b", num=2, steps=4, eta=1.0, seed=5, batch_size=1)
    deterministic = sample_run(ddpm_run, tmp_path / "d", num=2, steps=4, eta=0.0, seed=5, batch_size=2)
    for x, y, z, d in zip(a, again, b, deterministic):
        np.testing.assert_array_equal(volume(x), volume(y))
        np.testing.assert_allclose(volume(x), volume(z), atol=LEVEL * 1.01)  # per-sample step noise
        assert not np.allclose(volume(x), volume(d), atol=1e-3)  # eta really adds noise


def test_ddpm_runs_every_timestep_reproducibly_and_refuses_a_short_chain(short_schedule_run, tmp_path):
    a = sample_run(short_schedule_run, tmp_path / "a", num=2, sampler="ddpm", seed=3, batch_size=2)
    again = sample_run(short_schedule_run, tmp_path / "again", num=2, sampler="ddpm", seed=3, batch_size=2)
    one = sample_run(short_schedule_run, tmp_path / "one", num=1, sampler="ddpm", seed=4, batch_size=1)
    np.testing.assert_array_equal(volume(a[0]), volume(again[0]))
    np.testing.assert_allclose(volume(a[1]), volume(one[0]), atol=LEVEL * 1.01)
    side = json.loads((tmp_path / "a" / "sample_0003.json").read_text(encoding="utf-8"))
    assert side["sampler"] == "DDPM" and side["steps"] == 20 and side["eta"] is None
    ddim = sample_run(short_schedule_run, tmp_path / "ddim", num=1, steps=20, seed=3)
    assert not np.allclose(volume(ddim[0]), volume(a[0]), atol=1e-2)  # DDPM's step noise: another sampler
    with pytest.raises(ValueError, match="runs all 20 training timesteps"):
        sample_run(short_schedule_run, tmp_path / "x", num=1, sampler="ddpm", steps=10)
    with pytest.raises(ValueError, match="more than the 20 timesteps"):
        sample_run(short_schedule_run, tmp_path / "y", num=1, steps=50)


def test_nifti_has_the_reference_geometry_for_nibabel_and_simpleitk(dataset, ldm_run, tmp_path):
    paths = sample_run(ldm_run, tmp_path / "s", num=1, steps=3, seed=0)
    floats = sample_run(ldm_run, tmp_path / "f", num=1, steps=3, seed=0, dtype="float32")
    ref = read_dataset_info(dataset)["reference"]
    real = nib.load(dataset / ref["image"])
    img = nib.load(paths[0])
    assert img.get_data_dtype() == np.int16 and img.shape == real.shape == tuple(ref["shape"])
    np.testing.assert_allclose(img.affine, real.affine, atol=1e-6)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S") == nib.aff2axcodes(real.affine)
    np.testing.assert_allclose(img.header.get_zooms(), ref["spacing"], atol=1e-6)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    data = img.get_fdata()
    assert 0.0 <= data.min() and data.max() <= 1.0 + 1e-6  # scl_slope is a float32
    np.testing.assert_allclose(data, nib.load(floats[0]).get_fdata(), atol=LEVEL / 2 + 1e-6)  # int16 = rounding only

    itk = sitk.ReadImage(str(paths[0]))
    np.testing.assert_allclose(itk.GetSpacing(), ref["spacing"], atol=1e-5)
    corners = [(0, 0, 0), (img.shape[0] - 1, 0, 0), (0, img.shape[1] - 1, img.shape[2] - 1), (5, 7, 9)]
    for ijk in corners:
        ras = real.affine @ [*ijk, 1]
        lps = itk.TransformIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose([-lps[0], -lps[1], lps[2]], ras[:3], atol=1e-4)  # same world point
    np.testing.assert_allclose(sitk.GetArrayFromImage(itk).transpose(2, 1, 0), data, atol=1e-6)


def test_dicom_series_reads_back_as_the_same_volume_and_says_synthetic(dataset, ldm_run, tmp_path):
    age = max(train_age_range(dataset))
    out = tmp_path / "s"
    paths = sample_run(ldm_run, out, num=2, steps=3, seed=0, fmt="both", conditions={"age": str(age), "sex": "F"})
    ref = read_dataset_info(dataset)["reference"]
    uids = set()
    for p in paths:
        folder = p.with_name(p.name.replace(".nii.gz", "_dicom"))
        data, affine = load_volume(folder)  # SimpleITK series reader, positions checked, RAS affine
        np.testing.assert_allclose(affine, ref["affine"], atol=1e-4)
        np.testing.assert_array_equal(data, nib.load(p).dataobj.get_unscaled())  # the same integers, slice by slice
        files = sorted(folder.glob("*.dcm"))
        assert len(files) == ref["shape"][2]
        header = sitk.ImageFileReader()
        header.SetFileName(str(files[0]))
        header.ReadImageInformation()
        tag = header.GetMetaData
        assert tag("0010|0010").strip() == "SYNTHETIC^MEDLDM" and tag("0010|0020").startswith("SYNTH-")
        assert tag("0008|0060").strip() == "MR" and tag("0008|0016").strip() == "1.2.840.10008.5.1.4.1.1.4"
        assert "SYNTHETIC" in tag("0008|103e") and "SYNTHETIC" in tag("0008|0008")
        assert tag("0010|0040").strip() == "F" and tag("0010|1010").strip() == f"{round(age):03d}Y"
        side = json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text(encoding="utf-8"))
        assert side["dicom"]["series_instance_uid"] == tag("0020|000e").strip("\0 ")
        uids.update({tag("0020|000d").strip("\0 "), tag("0020|000e").strip("\0 ")})
    assert len(uids) == 4  # a new study and series per volume
    assert "sample_0000_dicom" in (out / "samples.csv").read_text(encoding="utf-8")


@pytest.mark.parametrize("run, sampler, eta", [("ldm_run", "RFLOW", None), ("ddpm_run", "DDIM", 0.5)])
def test_sidecar_and_header_record_provenance(request, dataset, run, sampler, eta, tmp_path):
    ldm_run = request.getfixturevalue(run)
    out = tmp_path / "s"
    age = max(train_age_range(dataset))
    paths = sample_run(ldm_run, out, num=2, steps=3, eta=eta or 0.0, seed=7, conditions={"age": str(age), "sex": "F"},
                       guidance=2.0)
    for p, seed in zip(paths, (7, 8)):
        assert p.name == f"sample_{seed:04d}.nii.gz"
        assert nib.load(p).header["descrip"].tobytes().decode().rstrip("\0") == f"SYNTHETIC medldm {__version__}"
        side = json.loads(p.with_name(f"sample_{seed:04d}.json").read_text(encoding="utf-8"))
        assert side["synthetic"] is True and side["seed"] == seed and side["file"] == p.name
        assert (side["sampler"], side["steps"], side["eta"], side["guidance"]) == (sampler, 3, eta, 2.0)
        assert side["conditions"] == {"age": age, "sex": "F"}
        assert len(side["diffusion_sha256"]) == 64 and len(side["autoencoder_sha256"]) == 64
        assert side["diffusion_config"]["scheduler"]["num_train_timesteps"] == 1000
        assert "channels" in side["autoencoder_config"]["model"]
        assert {"medldm", "torch", "monai", "nibabel"} <= set(side["versions"]) and side["created"]
        assert "4095" in side["intensity"] and side["dtype"] == "int16"
        assert p.with_name(f"sample_{seed:04d}.png").is_file()
    rows = (out / "samples.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "file,dicom,seed,conditions" and len(rows) == 3 and rows[1].startswith("sample_0007.nii.gz")
    assert (out / "contact_sheet.png").is_file()


def test_existing_samples_are_kept_unless_overwrite(ldm_run, tmp_path):
    out = tmp_path / "s"
    sample_run(ldm_run, out, num=3, steps=2, seed=0)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        sample_run(ldm_run, out, num=1, steps=2, seed=0)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    sample_run(ldm_run, out, num=1, steps=2, seed=5, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    # the earlier samples are gone (a stale sample_0001 would pass as part of this run), the user's file is not
    assert names == ["contact_sheet.png", "notes.txt", "plan.csv", "sample_0005.json", "sample_0005.nii.gz",
                     "sample_0005.png", "samples.csv", "sampling.json"]


def test_unwritable_output_and_bad_options_fail_before_sampling(ldm_run, tmp_path, monkeypatch):
    import medldm.inference.sample as sample_module

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(sample_module, "sample_latents", no_sampling)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot write there"):
        sample_run(ldm_run, blocker / "out", num=1)
    with pytest.raises(ValueError, match="--format"):
        sample_run(ldm_run, tmp_path / "f", num=1, fmt="png")
    with pytest.raises(ValueError, match="--sampler"):
        sample_run(ldm_run, tmp_path / "g", num=1, sampler="euler")
    # a rectified-flow model: DDIM does not fit it, and its Euler steps draw no noise for --eta
    with pytest.raises(ValueError, match="trained with scheduler.kind=rflow; use --sampler rflow"):
        sample_run(ldm_run, tmp_path / "h", num=1, sampler="ddim")
    with pytest.raises(ValueError, match="--eta applies to DDIM only"):
        sample_run(ldm_run, tmp_path / "i", num=1, eta=0.5)


def test_decoding_on_another_device_gives_the_same_volume(ldm_run, tmp_path):
    here = sample_run(ldm_run, tmp_path / "a", num=1, steps=3, seed=2)[0]
    cpu = sample_run(ldm_run, tmp_path / "b", num=1, steps=3, seed=2, decode_device="cpu")[0]
    # identical on a CPU-only machine; with a GPU the default decode runs in bf16
    np.testing.assert_allclose(volume(here), volume(cpu), atol=0.05 if torch.cuda.is_available() else 0)
    side = json.loads(cpu.with_name("sample_0002.json").read_text(encoding="utf-8"))
    assert side["decode_device"] == "cpu"
    with pytest.raises(ValueError, match="--decode-device 'gpu'"):
        sample_run(ldm_run, tmp_path / "c", num=1, decode_device="gpu")
    assert not (tmp_path / "c").exists()  # a bad option leaves no folder behind


def test_unknown_or_out_of_range_conditions_are_refused_before_sampling(dataset, ldm_run, tmp_path):
    with pytest.raises(ValueError, match="use M or F"):
        sample_run(ldm_run, tmp_path / "a", num=1, steps=2, conditions={"sex": "X"})
    with pytest.raises(ValueError, match="outside the training range"):
        sample_run(ldm_run, tmp_path / "b", num=1, steps=2, conditions={"age": str(max(train_age_range(dataset)) + 1)})
    with pytest.raises(ValueError, match="conditioned on"):
        sample_run(ldm_run, tmp_path / "c", num=1, steps=2, conditions={"height": "180"})
    assert not any(p.name.startswith("sample") for d in tmp_path.iterdir() for p in d.iterdir())


def test_guidance_moves_samples_and_no_condition_is_unconditional(dataset, ldm_run, tmp_path):
    ldm = DiffusionRun(ldm_run).load()
    unet = ldm.unet()
    scheduler = build_scheduler(ldm.config.scheduler, default_sampler(ldm.config.scheduler))
    set_sampling_steps(scheduler, 4, ldm.latent_shape)
    noise = torch.randn([2, *ldm.latent_shape], generator=torch.Generator().manual_seed(0))
    enc = ldm.conditions
    context = enc.encode([{"age": max(train_age_range(dataset)), "diagnosis": "AD"}] * 2)
    plain = sample_latents(unet, scheduler, noise, context, guidance=1.0)
    guided = sample_latents(unet, scheduler, noise, context, guidance=3.0)
    null = sample_latents(unet, scheduler, noise, enc.encode([{}] * 2), guidance=1.0)
    assert not torch.allclose(plain, guided, atol=1e-4)  # guidance extrapolates away from the null prediction
    # guided = null + 3 (cond - null) at every step; at guidance 0 it is the unconditional model
    torch.testing.assert_close(sample_latents(unet, scheduler, noise, context, guidance=0.0), null)
    side = sample_run(ldm_run, tmp_path / "u", num=1, steps=4, seed=0)[0].with_name("sample_0000.json")
    assert json.loads(side.read_text(encoding="utf-8"))["conditions"] == {}


def test_moved_runs_find_their_autoencoder_by_hash(ae_run, ldm_run, tmp_path):
    import shutil

    from medldm.artifacts import load_checkpoint

    moved = tmp_path / "moved"
    shutil.copytree(ae_run, moved / "ae")
    shutil.copytree(ldm_run, moved / "ldm")
    for ckpt in (moved / "ldm" / "checkpoints").glob("*.pt"):  # as if trained where the AE no longer is
        state = load_checkpoint(ckpt)
        state["autoencoder"]["checkpoint"] = str(tmp_path / "gone" / "best.pt")
        torch.save(state, ckpt)
    with pytest.raises(FileNotFoundError, match="pass --autoencoder AE_RUN"):
        sample_run(moved / "ldm", tmp_path / "a", num=1, steps=2)
    path = sample_run(moved / "ldm", tmp_path / "b", num=1, steps=2, seed=1, autoencoder_run=moved / "ae")[0]
    np.testing.assert_array_equal(volume(path), volume(sample_run(ldm_run, tmp_path / "c", num=1, steps=2, seed=1)[0]))
    other = moved / "other_ae"
    (other / "checkpoints").mkdir(parents=True)
    state = load_checkpoint(moved / "ae" / "checkpoints" / "best.pt")
    state["step"] += 1  # another autoencoder: different bytes
    torch.save(state, other / "checkpoints" / "best.pt")
    with pytest.raises(ValueError, match="is the checkpoint this diffusion model was trained with"):
        sample_run(moved / "ldm", tmp_path / "d", num=1, steps=2, autoencoder_run=other)


def test_writer_pages_the_contact_sheet_and_lists_only_finished_volumes(tmp_path, monkeypatch):
    import imageio.v3 as iio

    from medldm.inference import sample_writer as export

    monkeypatch.setattr(export, "SHEET_PAGE", 2)
    reference = {"affine": np.diag([2.0, 2.0, 2.0, 1.0]).tolist(), "shape": [8, 10, 12], "image": None}
    writer = export.SampleWriter(tmp_path, reference, {"conditions": {"age": 70.0}})
    rng = np.random.default_rng(0)
    for seed in (5, 6, 7):
        writer.write(rng.random((8, 10, 12)), seed)
        rows = (tmp_path / "samples.csv").read_text(encoding="utf-8").splitlines()
        assert len(rows) == 1 + seed - 4  # the manifest grows with each finished volume
    writer.close()
    first, second = iio.imread(tmp_path / "contact_sheet.png"), iio.imread(tmp_path / "contact_sheet_2.png")
    assert first.shape[0] == second.shape[0] and first.shape[1] > second.shape[1]  # two tiles, then one
    with pytest.raises(ValueError, match="differs from the reference"):
        writer.write(np.zeros((8, 10, 11)), 9)
