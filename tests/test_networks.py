"""anofpdm_monai.networks: the UNet and its three class embeddings, the scheduler, label drops, precision and device
choices, loading a model folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from anofpdm_monai import networks
from anofpdm_monai.config import DiffusionConfig, ModelConfig, NetworkConfig, PreprocessConfig
from anofpdm_monai.io import InputError, InputWarning
from anofpdm_monai.networks import HEALTHY, NULL, UNHEALTHY, NoisePredictor, build_network, drop_labels

MICRO = NetworkConfig(preset="test-micro", image_size=16, in_channels=2, channels=(8, 8), attention_levels=(False, True),
                      num_res_blocks=1, num_head_channels=8, norm_num_groups=8)  # fmt: skip


def micro_network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    network = build_network(MICRO)
    with torch.no_grad():  # MONAI zero-initialises the last conv of each block and of the output: make every path count
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return network.eval()


def test_network_shape_and_one_embedding_per_class():
    assert sorted((HEALTHY, UNHEALTHY, NULL)) == [0, 1, 2] == list(range(networks.NUM_CLASS_EMBEDS))
    network = micro_network()
    assert network.class_embedding.num_embeddings == 3
    x = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(1)).expand(3, -1, -1, -1)
    eps = NoisePredictor(network)(x, torch.full((3,), 10), torch.tensor([HEALTHY, UNHEALTHY, NULL]))
    assert eps.shape == (3, 2, 16, 16) and eps.dtype == torch.float32 and torch.isfinite(eps).all()
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not torch.allclose(eps[a], eps[b]), f"classes {a} and {b} give the same noise: the label is ignored"
    with pytest.raises(IndexError):
        network(x[:1], timesteps=torch.tensor([10]), class_labels=torch.tensor([networks.NUM_CLASS_EMBEDS]))


def test_scheduler_follows_the_config():
    scheduler = networks.build_scheduler(DiffusionConfig(num_train_timesteps=50, beta_start=1e-3, beta_end=0.05))
    assert len(scheduler.betas) == 50
    assert scheduler.betas[0].item() == pytest.approx(1e-3) and scheduler.betas[-1].item() == pytest.approx(0.05)
    assert (scheduler.alphas_cumprod.diff() < 0).all()


def test_drop_labels_rate_and_reproducibility():
    labels = torch.tensor([HEALTHY, UNHEALTHY]).repeat(10_000)
    dropped = drop_labels(labels, 0.3, torch.Generator().manual_seed(0))
    is_null = dropped == NULL
    assert abs(is_null.float().mean().item() - 0.3) < 0.015
    assert abs(is_null[labels == UNHEALTHY].float().mean().item() - 0.3) < 0.02, "drops do not depend on the class"
    assert torch.equal(dropped[~is_null], labels[~is_null]), "kept labels are unchanged"
    assert torch.equal(dropped, drop_labels(labels, 0.3, torch.Generator().manual_seed(0)))
    assert not torch.equal(dropped, drop_labels(labels, 0.3, torch.Generator().manual_seed(1)))
    assert torch.equal(drop_labels(labels, 0.0), labels) and (drop_labels(labels, 1.0) == NULL).all()
    with pytest.raises(ValueError, match="p_uncond=1.5"):
        drop_labels(labels, 1.5)


@pytest.mark.parametrize("native", [True, False])
def test_use_bf16_choices(monkeypatch, native):
    monkeypatch.setattr(networks, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert networks.use_bf16("bf16", cpu) and not networks.use_bf16("fp32", cpu)
    assert networks.use_bf16("auto", cpu) is native
    with pytest.raises(InputError) as err:
        networks.use_bf16("fp16", cpu)
    assert str(err.value) == "precision='fp16': choose one of auto, fp32, bf16" and err.value.arguments == ("precision",)


def test_resolve_device(monkeypatch):
    assert networks.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert networks.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(InputError, match="^device='cuda': no CUDA GPU is available") as err:
        networks.resolve_device("cuda")
    assert err.value.arguments == ("device",)
    with pytest.raises(InputError, match="^device='tpu': choose"):
        networks.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert networks.resolve_device("auto") == torch.device("cuda") == networks.resolve_device("cuda")
    assert networks.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InputError, match="^device='cuda:2': 2 CUDA GPU"):
        networks.resolve_device("cuda:2")


def save_folder(folder, network: torch.nn.Module, config: ModelConfig):
    folder.mkdir()
    config.save(folder / "config.json")
    torch.save(network.state_dict(), folder / "model.pt")
    return folder


def test_load_model_folder_round_trip_and_refusals(tmp_path):
    config = ModelConfig(network=MICRO, preprocess=PreprocessConfig(image_size=16, channel_names=("t1", "t2"), map_channels=("t2",)))
    network = micro_network(seed=3)
    good = save_folder(tmp_path / "good", network, config)
    loaded, loaded_config = networks.load_model_folder(good)
    assert loaded_config == config and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in network.state_dict().items())

    for missing in ("config.json", "model.pt"):
        folder = tmp_path / f"no_{missing}"
        shutil.copytree(good, folder)
        (folder / missing).unlink()
        with pytest.raises(FileNotFoundError):
            networks.load_model_folder(folder)

    other = ModelConfig(network=NetworkConfig(**{**MICRO.__dict__, "in_channels": 3}),
                        preprocess=PreprocessConfig(image_size=16, channel_names=("a", "b", "c"), map_channels=("a",)))  # fmt: skip
    wrong = save_folder(tmp_path / "wrong", micro_network(), other)
    with pytest.raises(InputError, match=r"weights do not fit config.json \(preset 'test-micro', 3 channels.*takes 2 channels"):
        networks.load_model_folder(wrong)

    pickled = save_folder(tmp_path / "pickled", network, config)
    torch.save(network, pickled / "model.pt")  # the whole module: unpickling it would run code
    with pytest.raises(InputError, match="refused to load"):
        networks.load_model_folder(pickled)

    registered = save_folder(tmp_path / "registered", network, config)
    text = (registered / "config.json").read_text().replace('"register_to": null', f'"register_to": "{tmp_path / "gone.nii.gz"}"')
    (registered / "config.json").write_text(text)
    with pytest.raises(InputError, match=r"config.json: preprocess.register_to = .*file not found"):
        networks.load_model_folder(registered)


def test_load_weights_refuses_what_is_not_a_state_dict(tmp_path):
    network = build_network(MICRO)
    for state in ([torch.zeros(1)], {"conv_in.conv.weight": "text"}):
        with pytest.raises(InputError, match="not a plain state dict of tensors"):
            networks.load_weights(network, state, tmp_path / "model.pt", MICRO)


# ---------------------------------------------------------------- layout and measured precision


def test_fp32_channels_last_gives_the_same_masks_as_the_default_layout(brats_store, monkeypatch):
    """Where the precision does not change, the layout changes maps only within float rounding and masks not at all
    (the bundled model, calibrated settings, on the lesion slices of a phantom store)."""
    from anofpdm_monai.data import PreprocessedStore
    from anofpdm_monai.inferers import VolumeInferer

    # keep every component: the masks are then the thresholded maps themselves, the decision most sensitive to a map's last bits
    monkeypatch.setattr("anofpdm_monai.segmentation.min_component_area", lambda image_size: 0)
    store = PreprocessedStore(brats_store)
    rows = store.rows(None)
    images = store.load_slices(rows.sort_values("lesion_pixels").tail(4))[0]
    inferer = VolumeInferer("bundled", device="cpu", precision="fp32").slice_inferer
    inferer.setup = "unhealthy"
    assert inferer.predict_eps.execution == "fp32/contiguous"
    default = inferer(images, "BraTS2021_00000")["aggregated"]
    inferer.predict_eps = NoisePredictor(inferer.predict_eps.network, channels_last=True)
    assert inferer.predict_eps.network.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc = inferer(images, "BraTS2021_00000")["aggregated"]
    masks = default.masks
    assert 0 < masks.sum() < masks.numel(), "an empty or full mask would prove nothing"
    torch.testing.assert_close(nhwc.maps, default.maps, rtol=1e-4, atol=1e-6)
    assert torch.equal(nhwc.masks, masks)


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Timing on (ANOFPDM_MEASURE unset), the cache in a fresh folder, bf16 advertised by the CPU."""
    monkeypatch.delenv(networks.MEASURE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(networks, "native_bf16", lambda device: True)
    return tmp_path / "anofpdm" / "execution.json"


def refuse_timing(*args, **kwargs):
    raise AssertionError("the network was timed although the cache holds the answer")


def test_auto_times_each_candidate_once_then_reads_the_cache(measuring, monkeypatch):
    cpu, shape = torch.device("cpu"), (4, 2, 16, 16)
    network = micro_network()
    choice = networks.fastest_execution(network, cpu, "auto", shape)  # really timed, on the micro network
    assert choice in networks.candidate_executions("auto", cpu) and len(networks.candidate_executions("auto", cpu)) == 4
    entry = next(iter(json.loads(measuring.read_text())["entries"].values()))
    assert (entry["precision"], entry["layout"]) == choice and len(entry["seconds"]) == 4 and entry["input_shape"] == list(shape)
    monkeypatch.setattr(networks, "time_executions", refuse_timing)
    assert networks.fastest_execution(micro_network(seed=1), cpu, "auto", shape) == choice, "another seed: the same architecture"
    # the fastest measured is chosen; a fixed precision still chooses its layout, and is cached under its own key
    fake = {("fp32", "contiguous"): 3.0, ("fp32", "channels_last"): 2.0, ("bf16", "contiguous"): 1.0, ("bf16", "channels_last"): 4.0}
    monkeypatch.setattr(networks, "time_executions", lambda net, candidates, *a, **k: {c: fake[c] for c in candidates})
    assert networks.fastest_execution(network, cpu, "auto", (8, 2, 16, 16)) == ("bf16", "contiguous")
    assert networks.fastest_execution(network, cpu, "fp32", (8, 2, 16, 16)) == ("fp32", "channels_last")
    assert len(json.loads(measuring.read_text())["entries"]) == 3


def test_no_timing_when_switched_off(measuring, monkeypatch):
    monkeypatch.setenv(networks.MEASURE_ENV, "0")
    monkeypatch.setattr(networks, "time_executions", refuse_timing)
    cpu = torch.device("cpu")
    assert networks.fastest_execution(micro_network(), cpu, "auto", (4, 2, 16, 16)) == ("bf16", "contiguous")
    assert networks.fastest_execution(micro_network(), cpu, "fp32", (4, 2, 16, 16)) == ("fp32", "contiguous")
    assert not measuring.exists()


@pytest.mark.parametrize("text", ["{not json", '["a list"]', '{"format": 99, "entries": {}}', "ENTRY", "x" * (2 << 20)])
def test_a_bad_cache_is_ignored_with_one_warning_and_rewritten(measuring, monkeypatch, text):
    cpu, shape, network = torch.device("cpu"), (4, 2, 16, 16), micro_network()
    candidates = networks.candidate_executions("auto", cpu)
    if text == "ENTRY":  # a well-formed file whose entry for this network names a layout that does not exist
        key = networks.execution_key(network, shape, cpu, candidates)
        text = json.dumps({"format": 1, "entries": {key: {"precision": "fp32", "layout": "diagonal"}}})
    measuring.parent.mkdir(parents=True)
    measuring.write_text(text)
    monkeypatch.setattr(networks, "time_executions", lambda net, candidates, *a, **k: dict.fromkeys(candidates, 1.0))
    with pytest.warns(InputWarning, match=f"{measuring}: ignored") as record:
        assert networks.fastest_execution(network, cpu, "auto", shape) == candidates[0]
    assert len(record) == 1
    data = json.loads(measuring.read_text())
    assert data["format"] == 1 and len(data["entries"]) == 1
