"""Tests of training (ALGORITHM.md section 2): configs, networks, label drops, the loop, resume,
weights-only loading, DDP (two gloo processes) and the ``anofpdm train`` error paths.

Most tests train a test-only preset ``micro`` (16 px, widths (8, 16), 2 channels) on a hand-made
store so that a step takes milliseconds; the real presets are checked for shape separately.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from anofpdm_monai import training
from anofpdm_monai.config import PRESETS, DiffusionConfig, ModelConfig, PreprocessConfig, network_preset
from anofpdm_monai.data import write_settings
from anofpdm_monai.io import InputError, safe_torch_load
from anofpdm_monai.networks import (
    HEALTHY,
    NULL,
    NUM_CLASS_EMBEDS,
    UNHEALTHY,
    NoisePredictor,
    build_network,
    drop_labels,
    load_model_folder,
    native_bf16,
    use_bf16,
)
from anofpdm_monai.training import TrainSettings, train
from pipelines.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_worker import state_hash  # noqa: E402  (one hash for this file and the DDP worker)

TESTS = Path(__file__).resolve().parent
MICRO = dict(
    image_size=16, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
    norm_num_groups=8,
)  # fmt: skip
OTHER = dict(MICRO, channels=(16, 16))  # same size, other widths: a checkpoint of one does not fit the other


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_micro_presets():
    """One thread (two threads on a busy two-core machine are many times slower) and the test presets."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "micro", MICRO)
        mp.setitem(PRESETS, "other", OTHER)
        yield
    torch.set_num_threads(threads)


def make_store(
    root: Path, size: int = 16, channels: tuple[str, ...] = ("flair", "t2"), patients: int = 3, slices: int = 6,
    split: str = "train", seed: int = 0,
) -> Path:  # fmt: skip
    """A hand-made preprocessed store: bright disks on a dark background, every other slice with a 'lesion'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    rows = []
    for p in range(patients):
        patient = f"P{p}"
        images = np.full((slices, len(channels), size, size), -1.0, dtype=np.float32)
        masks = np.zeros((slices, size, size), dtype=np.uint8)
        for s in range(slices):
            radius = rng.uniform(0.5, 0.8)
            brain = xx**2 + yy**2 < radius**2
            for c in range(len(channels)):
                images[s, c][brain] = rng.uniform(-0.2, 0.4) + 0.2 * xx[brain]
            if s % 2:
                cy, cx = rng.uniform(-0.3, 0.3, size=2)
                lesion = (xx - cx) ** 2 + (yy - cy) ** 2 < 0.2**2
                images[s, 0][lesion] = 0.9
                masks[s][lesion] = 1
            rows.append((patient, s, split, int(masks[s].any()), int(masks[s].sum())))
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        (root / "cases").mkdir(exist_ok=True)
        np.save(root / "images" / f"{patient}.npy", images.astype(np.float16))
        np.save(root / "masks" / f"{patient}.npy", masks)
        meta = {"slices": list(range(slices)), "has_label": True, "sources": {}}
        (root / "cases" / f"{patient}.json").write_text(json.dumps(meta))
    pd.DataFrame(rows, columns=["patient", "slice", "split", "label", "lesion_pixels"]).to_csv(
        root / "manifest.csv", index=False
    )
    config = PreprocessConfig(image_size=size, channel_names=channels, map_channels=channels[:1], dataset="synthetic")
    write_settings(root, config, (1.0, 0.0, 0.0), 0)
    return root


@pytest.fixture(scope="module")
def micro_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("micro_store"))


@pytest.fixture(scope="module")
def store64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px, four-channel hand-made store: fits the tiny preset (for the CLI, which knows only tiny/paper)."""
    return make_store(tmp_path_factory.mktemp("store64"), size=64, channels=("flair", "t1", "t1ce", "t2"), slices=2)


def settings(store: Path, model_dir: Path, **overrides) -> TrainSettings:
    base = dict(store=store, model_dir=model_dir, preset="micro", steps=3, batch_size=4, lr=1e-3, ema=0.9,
                checkpoint_every=3, device="cpu", seed=0, progress=False)  # fmt: skip
    base.update(overrides)
    return TrainSettings(**base)


@pytest.fixture(scope="module")
def micro_model(micro_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(settings(micro_store, tmp_path_factory.mktemp("micro_model") / "model", steps=2, checkpoint_every=2))




class Payload:
    """A non-tensor object: pickling it into a checkpoint must make the checkpoint unloadable."""

    def __init__(self) -> None:
        self.note = "not a tensor"


# ---------------------------------------------------------------- config


def test_model_config_json_round_trip(tmp_path):
    config = ModelConfig(
        network=network_preset("paper", 1),
        diffusion=DiffusionConfig(num_train_timesteps=500, beta_end=0.03),
        preprocess=PreprocessConfig(image_size=128, channel_names=("t1w",), map_channels=("t1w",), dataset="atlas",
                                    register_to="/templates/mni.nii.gz"),
    )  # fmt: skip
    config.save(tmp_path / "config.json")
    loaded = ModelConfig.load(tmp_path / "config.json")
    assert loaded == config
    assert isinstance(loaded.network.channels, tuple) and isinstance(loaded.preprocess.channel_names, tuple)
    assert loaded.network.preset == "paper" and loaded.network.in_channels == 1
    assert json.loads((tmp_path / "config.json").read_text())["diffusion"]["num_train_timesteps"] == 500
    assert ModelConfig.load(tmp_path / "config.json") != ModelConfig()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.pop("network"), "not a valid anofpdm model config"),
        (lambda d: d["network"].update(width=3), "not a valid anofpdm model config"),
        (lambda d: d["network"].update(norm_num_groups=5), "norm_num_groups=5 must divide"),
        (lambda d: d["network"].update(attention_levels=[True]), "must have the same length"),
        (lambda d: d["network"].update(image_size=66), "image_size=66 must be divisible"),
        (lambda d: d["preprocess"].update(map_channels=["dwi"]), "not among channel_names"),
    ],
)
def test_invalid_model_config_is_refused(tmp_path, edit, match):
    data = ModelConfig().to_dict()
    edit(data)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        ModelConfig.load(tmp_path / "config.json")


def test_unreadable_or_missing_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid anofpdm model config"):
        ModelConfig.load(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json beside model.pt"):
        ModelConfig.load(tmp_path / "missing" / "config.json")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        network_preset("huge", 4)


# ---------------------------------------------------------------- networks


def test_tiny_preset_output_shape():
    cfg = network_preset("tiny", 4)
    net = build_network(cfg).eval()
    x = torch.randn(2, 4, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        out = net(x, timesteps=torch.tensor([0, 999]), class_labels=torch.tensor([HEALTHY, NULL]))
    assert cfg.image_size == 64
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert net.class_embedding.num_embeddings == NUM_CLASS_EMBEDS
    assert 0.5e6 < sum(p.numel() for p in net.parameters()) < 2e6


def test_paper_preset_output_shape():
    # A real forward pass (about 1.5 s per call on one busy CPU thread), at two timesteps.
    cfg = network_preset("paper", 4)
    net = build_network(cfg).eval()
    assert cfg.image_size == 128
    assert net.conv_in.conv.weight.shape == (128, 4, 3, 3)
    assert net.class_embedding.num_embeddings == NUM_CLASS_EMBEDS
    assert 80e6 < sum(p.numel() for p in net.parameters()) < 110e6  # about the reference's size
    x = torch.randn(1, 4, 128, 128)
    with torch.no_grad():
        for t, label in ((0, UNHEALTHY), (999, NULL)):
            out = net(x, timesteps=torch.tensor([t]), class_labels=torch.tensor([label]))
            assert out.shape == (1, 4, 128, 128) and torch.isfinite(out).all()


def test_precision_choice():
    cpu = torch.device("cpu")
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)
    assert use_bf16("auto", cpu) == native_bf16(cpu)
    with pytest.raises(ValueError, match="^precision='half': choose one of"):
        use_bf16("half", cpu)


def test_bf16_predictor_returns_float32_close_to_fp32():
    from anofpdm_monai.bundled import bundled_model_dir

    net, _ = load_model_folder(bundled_model_dir())  # trained weights (a fresh UNet's output layer is all zeros)
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([10, 500]), torch.tensor([HEALTHY, NULL])
    full, half = NoisePredictor(net)(x, t, labels), NoisePredictor(net, autocast=True)(x, t, labels)
    assert half.dtype == torch.float32 and not torch.equal(full, half)  # autocast really ran in bf16
    assert (half - full).abs().max() < 0.1 * full.abs().max()


# ---------------------------------------------------------------- class convention


def test_class_convention():
    assert (HEALTHY, UNHEALTHY, NULL, NUM_CLASS_EMBEDS) == (0, 1, 2, 3)


def test_drop_labels_is_bernoulli_p_uncond():
    n, p = 40_000, 0.1
    labels = torch.randint(0, 2, (n,))
    dropped = drop_labels(labels, p, torch.Generator().manual_seed(7))
    is_null = dropped == NULL
    # 5 standard deviations of a Binomial(n, p) fraction
    assert abs(is_null.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the others keep their label
    # drops do not depend on the label
    assert abs(is_null[labels == 0].float().mean() - is_null[labels == 1].float().mean()) < 0.02
    again = drop_labels(labels, p, torch.Generator().manual_seed(7))
    assert torch.equal(dropped, again)
    assert not torch.equal(dropped, drop_labels(labels, p, torch.Generator().manual_seed(8)))
    assert torch.equal(drop_labels(labels, 0.0), labels)
    assert (drop_labels(labels, 1.0) == NULL).all()
    with pytest.raises(ValueError, match="p_uncond"):
        drop_labels(labels, 1.5)


def test_training_loop_uses_p_uncond_and_max_train_timestep(micro_store, tmp_path, monkeypatch):
    drops, timesteps = [], []

    def spy_drop(labels, p_uncond, generator=None):
        out = drop_labels(labels, p_uncond, generator)
        drops.append((p_uncond, out))
        return out

    build_scheduler = training.build_scheduler
    monkeypatch.setattr(training, "drop_labels", spy_drop)
    monkeypatch.setattr(training, "build_scheduler", lambda cfg: _wrap_scheduler(build_scheduler(cfg), timesteps))
    train(settings(micro_store, tmp_path / "m", steps=4, p_uncond=1.0, max_train_timestep=5))
    assert len(drops) == 4 and all(p == 1.0 and (out == NULL).all() for p, out in drops)
    seen = torch.cat(timesteps)
    assert len(timesteps) == 4 and seen.max() < 5 and seen.min() >= 0


def _wrap_scheduler(scheduler, record: list):
    add_noise = scheduler.add_noise

    def recording_add_noise(original_samples, noise, timesteps):
        record.append(timesteps.clone())
        return add_noise(original_samples=original_samples, noise=noise, timesteps=timesteps)

    scheduler.add_noise = recording_add_noise
    return scheduler


# ---------------------------------------------------------------- the loop


def test_loss_falls(micro_store, tmp_path):
    model_dir = train(settings(micro_store, tmp_path / "m", steps=30, checkpoint_every=30))
    log = pd.read_csv(model_dir / "log.csv")
    assert list(log.columns) == training.LOG_COLUMNS
    assert log["step"].tolist() == list(range(1, 31))
    assert (log["lr"] == 1e-3).all() and np.isfinite(log["loss"]).all()
    assert log["wall_s"].is_monotonic_increasing
    first, last = log["loss"].iloc[:5].mean(), log["loss"].iloc[-5:].mean()
    assert last < first, (first, last)


def test_resume_continues_exactly(micro_store, tmp_path):
    straight = train(settings(micro_store, tmp_path / "straight", steps=6, checkpoint_every=3))
    interrupted = train(settings(micro_store, tmp_path / "resumed", steps=3, checkpoint_every=3))
    assert torch.load(interrupted / "train_state.pt", weights_only=True)["step"] == 3
    train(settings(micro_store, interrupted, steps=6, checkpoint_every=3, resume=True))

    # Bit-identical: same process, same thread count, same seeded draws.
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (straight, interrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(d / "train_state.pt", weights_only=True) for d in (straight, interrupted))
    assert sa["step"] == sb["step"] == 6
    for part in ("model", "ema"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part])
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for key in oa["state"]:
        for name, value in oa["state"][key].items():
            assert torch.equal(value, ob["state"][key][name]), (key, name)
    la, lb = (pd.read_csv(d / "log.csv") for d in (straight, interrupted))
    assert la["step"].tolist() == lb["step"].tolist() == list(range(1, 7))
    assert la["loss"].tolist() == lb["loss"].tolist() and la["lr"].tolist() == lb["lr"].tolist()
    assert (lb["wall_s"].diff().dropna() >= 0).all()  # the clock continues across the resume
    # a different run (other seed) does differ: the comparison above can fail
    other = torch.load(train(settings(micro_store, tmp_path / "other", steps=6, seed=1)) / "model.pt", weights_only=True)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_resume_refuses_another_preset(micro_model, micro_store, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(micro_model, model_dir)
    with pytest.raises(InputError, match=r"preset 'micro' with 2 channels.*preset 'other' with 2 channels"):
        train(settings(micro_store, model_dir, preset="other", steps=4, resume=True))
    assert torch.load(model_dir / "train_state.pt", weights_only=True)["step"] == 2  # untouched


def test_resume_keeps_the_checkpoints_learning_rate(micro_model, micro_store, tmp_path):
    # The optimizer state (its lr included) comes from the checkpoint; the log says which lr was used.
    model_dir = tmp_path / "m"
    shutil.copytree(micro_model, model_dir)
    train(settings(micro_store, model_dir, steps=3, lr=5e-4, resume=True))
    log = pd.read_csv(model_dir / "log.csv")
    assert log["step"].tolist() == [1, 2, 3] and (log["lr"] == 1e-3).all()


def test_ema_warm_up():
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    training.update_ema(ema, model, decay=0.9999, step=0)  # effective decay 1/10
    assert ema.weight.item() == pytest.approx(0.9)
    training.update_ema(ema, model, decay=0.5, step=1000)  # the cap applies once the warm-up passed it
    assert ema.weight.item() == pytest.approx(0.95)


# ---------------------------------------------------------------- weights-only loading


def test_model_pt_is_weights_only(micro_model):
    state = torch.load(micro_model / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    network, config = load_model_folder(micro_model)
    assert config.network.preset == "micro" and not network.training
    assert all(torch.equal(network.state_dict()[k], state[k]) for k in state)
    assert set(os.listdir(micro_model)) == {"config.json", "model.pt", "train_state.pt", "log.csv", "training.json"}


def test_pickled_objects_are_refused(tmp_path, micro_model):
    path = tmp_path / "evil.pt"
    torch.save({"conv_in.conv.weight": torch.zeros(1), "extra": Payload()}, path)
    with pytest.raises(InputError, match="refused to load: it is not a weights-only checkpoint"):
        safe_torch_load(path)
    model_dir = tmp_path / "m"
    shutil.copytree(micro_model, model_dir)
    shutil.copy(path, model_dir / "model.pt")
    with pytest.raises(InputError, match="refused to load"):
        load_model_folder(model_dir)
    torch.save({"conv_in.conv.weight": 3}, model_dir / "model.pt")  # loadable, but not a state dict of tensors
    with pytest.raises(InputError, match="not a plain state dict of tensors"):
        load_model_folder(model_dir)


@pytest.mark.parametrize("network", ["channels", "preset"])
def test_model_folder_with_another_config_is_refused(tmp_path, micro_model, network):
    model_dir = tmp_path / "m"
    shutil.copytree(micro_model, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if network == "channels":
        config["network"]["in_channels"] = 3
        match = r"preset 'micro', 3 channels.*first layer takes 2 channels"
    else:
        config["network"] = dataclasses.asdict(network_preset("paper", 2))
        match = r"preset 'paper', 2 channels, widths \[128, 128, 256, 384, 512\]"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=match):
        load_model_folder(model_dir)


# ---------------------------------------------------------------- DDP


def test_two_process_gloo_run(micro_store, tmp_path):
    model_dir, reports = tmp_path / "ddp_model", tmp_path / "reports"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        str(TESTS / "ddp_worker.py"), str(micro_store), str(model_dir), str(reports),
        "--preset-json", json.dumps(MICRO), "--steps", "4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["model"] == r1["model"] and r0["ema"] == r1["ema"]  # DDP kept the replicas identical
    assert r0["model"] != r0["ema"]
    assert r0["saves"] == [2, 4] and r1["saves"] == []  # only rank 0 writes
    assert sorted(os.listdir(model_dir)) == ["config.json", "log.csv", "model.pt", "train_state.pt", "training.json"]
    assert state_hash(torch.load(model_dir / "model.pt", weights_only=True)) == r0["ema"]
    assert pd.read_csv(model_dir / "log.csv")["step"].tolist() == [1, 2, 3, 4]
    # the second call (existing model, no --resume) failed on both ranks instead of hanging rank 1
    assert "already holds a model" in r0["second_run"] and r1["second_run"] == r0["second_run"]
    assert r0["second_run_arguments"] == r1["second_run_arguments"] == ["resume"]


# ---------------------------------------------------------------- anofpdm train: bad inputs


def run_cli(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(["train", *args, "--batch-size", "4", "--steps", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anofpdm train: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_missing_or_empty_store(capsys, tmp_path):
    out = tmp_path / "model"
    code, err = run_cli(capsys, "-d", str(tmp_path / "nowhere"), "-o", str(out))
    assert_one_line_error(code, err, "not a preprocessed store", "anofpdm preprocess")
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, "-d", str(tmp_path / "empty"), "-o", str(out))
    assert_one_line_error(code, err, "not a preprocessed store")
    header_only = make_store(tmp_path / "header_only", size=64)
    pd.DataFrame(columns=["patient", "slice", "split", "label", "lesion_pixels"]).to_csv(
        header_only / "manifest.csv", index=False
    )
    code, err = run_cli(capsys, "-d", str(header_only), "-o", str(out))
    assert_one_line_error(code, err, "holds no slices")
    no_train = make_store(tmp_path / "no_train", size=64, split="val")
    code, err = run_cli(capsys, "-d", str(no_train), "-o", str(out))
    assert_one_line_error(code, err, "'train' split holds no slices")
    assert not out.exists()  # nothing was written


def test_cli_store_size_does_not_fit_preset(capsys, tmp_path, store64, micro_store):
    code, err = run_cli(capsys, "-d", str(store64), "-o", str(tmp_path / "m"), "--preset", "paper")
    assert_one_line_error(code, err, "slices are 64px but preset 'paper' takes 128px", "--size 128")
    code, err = run_cli(capsys, "-d", str(micro_store), "-o", str(tmp_path / "m"), "--preset", "tiny")
    assert_one_line_error(code, err, "slices are 16px but preset 'tiny' takes 64px")
    assert not (tmp_path / "m").exists()


def test_cli_unwritable_output(capsys, tmp_path, store64):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "model"):  # a file, and a folder below a file: unwritable even for root
        code, err = run_cli(capsys, "-d", str(store64), "-o", str(out))
        assert_one_line_error(code, err, "output folder is not writable", "choose another output folder")
    assert a_file.read_text() == "x"
    if os.geteuid() == 0:
        return  # root writes into a 0o500 folder anyway; the file cases above cover root
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        code, err = run_cli(capsys, "-d", str(store64), "-o", str(locked / "model"))
        assert_one_line_error(code, err, "output folder is not writable")
    finally:
        locked.chmod(0o700)


def test_cli_resume_without_checkpoint(capsys, tmp_path, store64):
    code, err = run_cli(capsys, "-d", str(store64), "-o", str(tmp_path / "m"), "--resume")
    assert_one_line_error(code, err, "--resume needs a checkpoint", "drop --resume")
    assert not (tmp_path / "m" / "model.pt").exists()


def test_cli_existing_model_without_resume(capsys, tmp_path, store64):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.pt").write_bytes(b"precious weights")
    os.utime(model_dir / "model.pt", ns=(1_000_000_000, 1_000_000_000))
    code, err = run_cli(capsys, "-d", str(store64), "-o", str(model_dir))
    assert_one_line_error(code, err, "already holds a model", "--resume")
    assert (model_dir / "model.pt").stat().st_mtime_ns == 1_000_000_000
    assert (model_dir / "model.pt").read_bytes() == b"precious weights"
    assert os.listdir(model_dir) == ["model.pt"]


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--steps", "0"], "--steps=0 must be at least 1"),
        (["--checkpoint-every", "0"], "--checkpoint-every=0 must be at least 1"),
        (["--max-train-timestep", "0"], "--max-train-timestep=0 must lie in [1, 1000]"),
        (["--max-train-timestep", "1001"], "--max-train-timestep=1001 must lie in [1, 1000]"),
        (["--p-uncond", "1.5"], "--p-uncond=1.5 must lie in [0, 1]"),
        (["--lr", "0"], "--lr=0.0 must be positive"),
        (["--ema", "2"], "--ema=2.0 must lie in [0, 1]"),
        (["--batch-size", "0"], "--batch-size=0 must be at least 1"),
    ],
)
def test_cli_bad_numbers(capsys, tmp_path, store64, flags, needle):
    capsys.readouterr()
    args = ["train", "-d", str(store64), "-o", str(tmp_path / "m"), "--batch-size", "4", "--device", "cpu"]
    if "--steps" not in flags:
        args += ["--steps", "2"]
    code = cli_main(args + flags)
    assert_one_line_error(code, capsys.readouterr().err.strip(), needle)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "field, value, needle",
    [("steps", 0, "steps=0 must be at least 1"), ("epochs", 0.0, "epochs=0.0 must be positive"),
     ("batch_size", 0, "batch_size=0 must be at least 1"), ("checkpoint_every", 0, "checkpoint_every=0 must be at least 1"),
     ("lr", -1.0, "lr=-1.0 must be positive"), ("ema", 1.5, "ema=1.5 must lie in [0, 1]"),
     ("p_uncond", -0.1, "p_uncond=-0.1 must lie in [0, 1]")],
)  # fmt: skip
def test_library_errors_name_the_setting_not_the_flag(tmp_path, field, value, needle):
    with pytest.raises(InputError) as err:
        training.check_settings(settings(tmp_path / "store", tmp_path / "m", **{field: value}))
    assert str(err.value) == needle and err.value.arguments == (field,)
    resume = settings(tmp_path / "store", tmp_path / "m", resume=True)
    with pytest.raises(InputError, match="resume needs a checkpoint, none found; drop resume ") as err:
        training.prepare_model_dir(resume, ModelConfig())
    assert "--" not in str(err.value) and err.value.arguments == ("resume",)


def test_warm_start_copies_the_weights_of_a_model_with_the_same_network(tmp_path):
    from test_segment import make_model

    from anofpdm_monai.config import ModelConfig
    from anofpdm_monai.networks import build_network
    from anofpdm_monai.training import warm_start

    source = make_model(tmp_path / "source")
    cfg = ModelConfig.load(source / "config.json").network
    model, ema = build_network(cfg), build_network(cfg)
    warm_start(source, cfg, (model, ema))
    saved = torch.load(source / "model.pt")
    for net in (model, ema):
        assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    other = dataclasses.replace(cfg, in_channels=1)
    with pytest.raises(InputError, match="same network"):
        warm_start(source, other, (build_network(other),))
