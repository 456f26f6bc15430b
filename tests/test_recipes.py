"""Training recipes of the comparison systems' components (``anofpdm train --recipe``) and their noise.

Each recipe trains a few steps on the hand-made micro store of ``test_training``, resumes exactly,
and writes ``component.json``; the simplex noise of AnoDDPM is checked for its statistics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anofpdm_monai import training
from anofpdm_monai.config import PRESETS
from anofpdm_monai.io import InputError
from anofpdm_monai.networks import HEALTHY, NULL, UNHEALTHY
from anofpdm_monai.noise import draw_noise, simplex_noise
from anofpdm_monai.training import RECIPES, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import MICRO, make_store, settings  # noqa: E402  (the micro preset and store of the training tests)


@pytest.fixture(scope="module", autouse=True)
def _micro_preset():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "micro", MICRO)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("recipe_store"))


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


# ---------------------------------------------------------------------------
# Simplex noise
# ---------------------------------------------------------------------------


def test_simplex_noise_is_standardised_smooth_and_per_sample():
    noise = simplex_noise((6, 2, 64, 64), generators(range(6)))
    assert noise.shape == (6, 2, 64, 64) and noise.dtype == torch.float32 and torch.isfinite(noise).all()
    fields = noise.reshape(12, -1)
    assert torch.allclose(fields.mean(1), torch.zeros(12), atol=1e-5)
    assert torch.allclose(fields.std(1), torch.ones(12), atol=1e-4)
    # smooth: neighbouring pixels are strongly correlated (white Gaussian noise: about 0)
    lag1 = (noise[..., 1:] * noise[..., :-1]).mean() / noise.pow(2).mean()
    white = torch.randn(6, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    white_lag1 = (white[..., 1:] * white[..., :-1]).mean() / white.pow(2).mean()
    assert lag1 > 0.6 and abs(float(white_lag1)) < 0.05
    # most power at low frequencies: the published base frequency 2^-6 and persistence 0.8
    power = torch.fft.rfft2(noise).abs().pow(2).mean(dim=(0, 1))
    low = power[:8, :8].sum() + power[-7:, :8].sum()
    assert low / power.sum() > 0.5
    # channels and samples are independent fields
    assert abs(float(torch.corrcoef(fields[[0, 1]])[0, 1])) < 0.5
    assert not torch.equal(noise[0], noise[1])


def test_simplex_noise_depends_only_on_each_samples_generator():
    whole = simplex_noise((4, 1, 32, 32), generators([5, 6, 7, 8]))
    parts = torch.cat([simplex_noise((2, 1, 32, 32), generators([5, 6])), simplex_noise((2, 1, 32, 32), generators([7, 8]))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, simplex_noise((4, 1, 32, 32), generators([1, 2, 3, 4])))
    with pytest.raises(ValueError, match="one per sample"):
        simplex_noise((4, 1, 32, 32), generators([1, 2]))


def test_draw_noise_kinds():
    gaussian = draw_noise("gaussian", (3, 2, 16, 16), torch.Generator().manual_seed(0))
    assert torch.equal(gaussian, torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert draw_noise("simplex", (3, 2, 16, 16), torch.Generator().manual_seed(0)).shape == (3, 2, 16, 16)
    with pytest.raises(ValueError, match="choose one of"):
        draw_noise("pink", (1, 1, 8, 8))


# ---------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "anofpdm"])
def test_component_recipe_trains_resumes_exactly_and_records_itself(micro_store, tmp_path, recipe):
    straight = train(settings(micro_store, tmp_path / "straight", steps=4, checkpoint_every=2, recipe=recipe))
    resumed = train(settings(micro_store, tmp_path / "resumed", steps=2, checkpoint_every=2, recipe=recipe))
    train(settings(micro_store, resumed, steps=4, checkpoint_every=2, recipe=recipe, resume=True))
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((straight / "component.json").read_text())
    assert record["recipe"] == recipe and record["noise"] == RECIPES[recipe].noise
    assert json.loads((straight / "training.json").read_text())["recipe"] == recipe
    if recipe == "anoddpm-simplex":
        assert record["simplex"] == {"octaves": 6, "persistence": 0.8, "frequency": 2**-6}
    if recipe == "classifier":
        assert "conv_in.conv.weight" in a and any(k.startswith("out.") for k in a)  # MONAI's DiffusionModelEncoder
    # another recipe's run cannot resume this checkpoint
    other = "anofpdm" if recipe != "anofpdm" else "classifier"
    with pytest.raises(InputError, match=f"trained with recipe '{recipe}'"):
        train(settings(micro_store, resumed, steps=6, recipe=other, resume=True))


def test_anoddpm_recipes_see_healthy_slices_with_the_null_label_only(micro_store, monkeypatch):
    dataset = training.SliceDataset(training.PreprocessedStore(micro_store), "train")
    pool = training.recipe_slices(dataset, RECIPES["anoddpm-gaussian"], micro_store)
    assert pool.size > 0 and (dataset.labels[pool] == HEALTHY).all()
    assert training.recipe_slices(dataset, RECIPES["classifier"], micro_store).size == len(dataset)
    seen = {}

    def network(x, timesteps, class_labels):
        seen["labels"] = class_labels.clone()
        return torch.zeros_like(x)

    images = torch.zeros(4, 2, 16, 16)
    labels = torch.tensor([HEALTHY, UNHEALTHY, HEALTHY, UNHEALTHY])
    scheduler = training.build_scheduler(training.DiffusionConfig())
    training.recipe_loss(RECIPES["anoddpm-simplex"], network, scheduler, images, labels, torch.Generator().manual_seed(0),
                         max_t=10, p_uncond=0.0)  # fmt: skip
    assert (seen["labels"] == NULL).all()
    training.recipe_loss(RECIPES["anofpdm"], network, scheduler, images, labels, torch.Generator().manual_seed(0),
                         max_t=10, p_uncond=0.0)  # fmt: skip
    assert torch.equal(seen["labels"], labels)


def test_classifier_loss_balances_the_classes():
    weights = training.balanced_class_weights(np.array([0, 0, 0, 1]))
    assert torch.allclose(weights, torch.tensor([4 / 6, 4 / 2]))
    assert torch.allclose(weights * torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0]))  # equal total weight


def test_recipe_refusals(micro_store, tmp_path):
    healthy_free = make_store(tmp_path / "all_unhealthy", slices=2)
    manifest = healthy_free / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",0,0\n", ",1,5\n"))
    with pytest.raises(InputError, match="no healthy slice"):
        train(settings(healthy_free, tmp_path / "m", recipe="anoddpm-gaussian"))
    with pytest.raises(InputError, match="recipe='pink'"):
        train(settings(micro_store, tmp_path / "m2", recipe="pink"))
    with pytest.raises(InputError, match="classifier is not the diffusion UNet") as err:
        train(settings(micro_store, tmp_path / "m3", recipe="classifier", init_from=tmp_path))
    assert err.value.arguments == ("init_from",)


# ---------------------------------------------------------------------------
# Components in a model folder
# ---------------------------------------------------------------------------


def test_load_component_finds_checks_and_names_the_command(micro_store, tmp_path):
    from anofpdm_monai.components import component_dir, load_component
    from anofpdm_monai.config import ModelConfig

    main = train(settings(micro_store, tmp_path / "model"))
    config = ModelConfig.load(main / "config.json")
    with pytest.raises(InputError, match=r"no classifier component.*anofpdm train with recipe classifier, output .*baselines/classifier \(docs"):
        load_component(main, "classifier", config)
    train(settings(micro_store, component_dir(main, "classifier"), recipe="classifier"))
    train(settings(micro_store, component_dir(main, "anoddpm-gaussian"), recipe="anoddpm-gaussian", init_from=main))
    classifier = load_component(main, "classifier", config)
    logits = classifier.network(torch.zeros(3, 2, 16, 16), torch.tensor([0, 5, 9]))
    assert logits.shape == (3, 2) and len(classifier.sha256) == 64
    ddpm = load_component(main, "anoddpm-gaussian", config)
    eps = ddpm.noise_predictor("fp32")(torch.zeros(2, 2, 16, 16), torch.tensor([1, 2]), torch.full((2,), NULL))
    assert eps.shape == (2, 2, 16, 16)
    with pytest.raises(TypeError, match="not a noise predictor"):
        classifier.noise_predictor()
    # a folder holding another recipe's model, and a component trained on another chain, are refused
    import shutil

    shutil.copytree(component_dir(main, "classifier"), component_dir(main, "anoddpm-simplex"))
    with pytest.raises(InputError, match="trained with recipe 'classifier', not 'anoddpm-simplex'"):
        load_component(main, "anoddpm-simplex", config)
    other = dataclasses_replace_preprocess(config, percentile=98.0)
    with pytest.raises(InputError, match="another preprocessing chain"):
        load_component(main, "classifier", other)


def dataclasses_replace_preprocess(config, **changes):
    import dataclasses

    return dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, **changes))
