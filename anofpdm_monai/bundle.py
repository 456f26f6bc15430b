"""A trained model as a MONAI bundle (``python -m monai.bundle run`` segments a folder of NIfTI cases).

:func:`export_bundle` writes::

    BUNDLE/configs/metadata.json    MONAI bundle metadata: versions, inputs (channels, orientation,
                                    intensity), outputs, training data, licence
    BUNDLE/configs/inference.json   builds the network (monai DiffusionModelUNet, its arguments named),
                                    the preprocessing and diffusion settings, the model, the inference
                                    settings and the AnoFPDM inferer with ``_target_``; its ``run``
                                    segments ``dataset_dir`` into ``output_dir``
    BUNDLE/models/                  the model folder: model.pt (EMA weights), config.json,
                                    calibration*.json (so ``anofpdm segment -m BUNDLE/models`` works too)
    BUNDLE/docs/README.md, docs/license.txt

The run step calls :func:`anofpdm_monai.api.segment`, the code path of ``anofpdm segment``, so the
bundle writes the same ``CASE.nii.gz`` masks and ``CASE_anomaly.nii.gz`` maps.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anofpdm_monai import __version__
from anofpdm_monai.bundled import BUNDLED_MODELS, resolve_model_dir
from anofpdm_monai.config import TRAINING_SETTINGS_FILE, ModelConfig
from anofpdm_monai.forward_process import ENCODINGS
from anofpdm_monai.io import InputError, atomic_write_json, atomic_write_text
from anofpdm_monai.model import AnoFPDMModel, InferenceSettings, available_methods, calibration_path, default_method
from anofpdm_monai.networks import load_model_folder, network_arguments

BUNDLE_VERSION = "0.1.0"
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
LICENSE = "Apache-2.0"
# files of a model folder the bundle carries under models/ (calibration*.json are added when present)
MODEL_FILES = ("config.json", "model.pt")
OPTIONAL_MODEL_FILES = (TRAINING_SETTINGS_FILE,)
PHANTOM_DATA = (
    "a synthetic phantom cohort written by `anofpdm phantom` from the MNI152 template shipped with nilearn "
    "(tumours, MS-like lesions and faint infiltrative regions drawn into healthy anatomy); no real patient data "
    "(docs/bundled_model.md of anofpdm_monai gives the commands and seeds)"
)
UNKNOWN_DATA = "not recorded in the model folder; state it with `anofpdm export-bundle --data-source TEXT`"
DEFAULT_DATASET_DIR = "/workspace/data"


def bundle_model(model_dir: str | Path, network: torch.nn.Module, config: ModelConfig, device: str | torch.device = "auto") -> AnoFPDMModel:
    """The model of a bundle: ``network`` and ``config`` as ``inference.json`` builds them, with the
    weights (``model.pt``) and calibrations of ``model_dir`` (the bundle's ``models/``).

    Args:
        model_dir: a model folder (``model.pt``, ``config.json``, ``calibration*.json``).
        network: a ``DiffusionModelUNet`` built from the arguments ``inference.json`` names.
        config: the model config ``inference.json`` builds (network, diffusion, preprocessing sections).
        device: ``auto``, ``cpu``, ``cuda`` or a torch device.

    Raises:
        InputError: the weights do not fit ``network`` (its arguments were edited), or a file is not valid.
    """
    return AnoFPDMModel.from_folder(model_dir, device, network=network, config=config)


def calibration_files(folder: Path) -> list[Path]:
    """The calibration files of a model folder (``calibration.json``, ``calibration_ddpm.json``)."""
    return [p for p in (calibration_path(folder, e) for e in ENCODINGS) if p.is_file()]


def export_bundle(model: str | Path, output: str | Path, *, data_source: str | None = None, version: str = BUNDLE_VERSION) -> Path:
    """Write the MONAI bundle of a model folder (or a bundled model's name) to ``output``.

    The bundle is written into a temporary folder beside ``output`` and renamed onto it once
    complete, so an interrupted export leaves nothing behind.

    Args:
        model: a trained, calibrated model folder, or ``"bundled"`` / ``"bundled-atlas"``.
        output: the bundle folder to create; it must not exist or be empty.
        data_source: what the model was trained on, for ``metadata.json`` (default: the phantom cohort
            for the bundled models, else "not recorded").
        version: the bundle's version.

    Returns:
        ``output``.

    Raises:
        InputError: the model folder is missing, incomplete or not loadable, or ``output`` holds files.
    """
    folder = resolve_model_dir(model)
    output = Path(output)
    check_model_folder(folder)
    check_output(output)
    _, config = load_model_folder(folder, "cpu")  # the weights must load before anything is written
    if config.preprocess.register_to is not None:
        raise InputError(
            f"{folder / 'config.json'}: the model registers inputs to a template ({config.preprocess.register_to}); "
            "bundles of models that register their inputs are not supported yet; export one preprocessed without registration"
        )
    if data_source is None:
        data_source = PHANTOM_DATA if str(model) in BUNDLED_MODELS else UNKNOWN_DATA
    try:
        parent = output.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=parent))
    except OSError as err:
        raise InputError(f"{output}: cannot create the bundle folder ({err.strerror or err}); give a writable output", arguments="output") from err
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle gets the usual permissions
        write_bundle(tmp, folder, config, data_source, version)
        os.replace(tmp, output)  # onto a missing or empty folder
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{output}: cannot write the bundle ({err.strerror or err}); give a writable output with free space", arguments="output") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def check_model_folder(folder: Path) -> None:
    """A model folder to export holds config.json, model.pt and at least one calibration."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not found; give a trained, calibrated folder (anofpdm train, anofpdm calibrate) or 'bundled' as model", arguments="model")
    for name in MODEL_FILES:
        if not (folder / name).is_file():
            raise InputError(f"{folder / name}: missing; a model folder holds config.json and model.pt (anofpdm train writes them)")
    if not calibration_files(folder):
        raise InputError(f"{folder / 'calibration.json'}: missing; calibrate the model first (anofpdm calibrate -m {folder} -d PREP)")


def check_output(output: Path) -> None:
    """``output`` must not exist, or be an empty folder."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"{output}: exists and is not an empty folder; give a new bundle folder as output, or empty it", arguments="output")


def write_bundle(root: Path, folder: Path, config: ModelConfig, data_source: str, version: str) -> None:
    """Write every file of the bundle under ``root`` (the model folder's files are copied byte for byte)."""
    models = root / "models"
    models.mkdir(parents=True)
    carried = [folder / n for n in MODEL_FILES + OPTIONAL_MODEL_FILES if (folder / n).is_file()] + calibration_files(folder)
    for path in carried:
        shutil.copyfile(path, models / path.name)
    methods = available_methods(folder, kinds=("anofpdm",))
    atomic_write_json(root / "configs" / "inference.json", inference_config(config, default_method(folder)))
    atomic_write_json(root / "configs" / "metadata.json", bundle_metadata(config, data_source, version, methods))
    atomic_write_text(root / "docs" / "README.md", bundle_readme(config, data_source, methods))
    atomic_write_text(root / "docs" / "license.txt", f"{LICENSE}: https://www.apache.org/licenses/LICENSE-2.0\n")


def inference_config(config: ModelConfig, method: str) -> dict[str, Any]:
    """The ``configs/inference.json`` of a model: every component built by ``_target_`` from named arguments.

    ``method`` is its default (the one ``anofpdm segment`` runs on the model folder, :func:`~anofpdm_monai.model.default_method`).

    Overridable on the command line (``--id value``): ``dataset_dir``, ``output_dir``, ``device``, and
    the inference settings ``method``, ``steps``, ``stride``, ``batch_size``, ``seed``, ``precision``,
    ``keep_3d_components``, ``save_anomaly``, ``progress``.
    """
    defaults = InferenceSettings()
    network = config.network
    return {
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "dataset_dir": DEFAULT_DATASET_DIR,
        "output_dir": "$@bundle_root + '/eval'",
        "device": "auto",
        "method": method,
        "steps": defaults.steps,
        "stride": defaults.stride,
        "batch_size": defaults.batch_size,
        "seed": defaults.seed,
        "precision": defaults.precision,
        "keep_3d_components": defaults.keep_3d_components,
        "save_anomaly": "masked",
        "progress": True,
        "network_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", **network_arguments(network)},
        "network_config": {
            "_target_": "anofpdm_monai.config.NetworkConfig",
            "preset": network.preset,
            "image_size": network.image_size,
            **{name: f"@network_def::{name}" for name in
               ("in_channels", "channels", "attention_levels", "num_res_blocks", "num_head_channels", "norm_num_groups")},
        },  # fmt: skip
        "diffusion": {"_target_": "anofpdm_monai.config.DiffusionConfig", **dataclasses.asdict(config.diffusion)},
        "preprocessing": {"_target_": "anofpdm_monai.config.PreprocessConfig", **dataclasses.asdict(config.preprocess)},
        "model_config": {
            "_target_": "anofpdm_monai.config.ModelConfig",
            "network": "@network_config",
            "diffusion": "@diffusion",
            "preprocess": "@preprocessing",
        },
        "model": {
            "_target_": "anofpdm_monai.bundle.bundle_model",
            "model_dir": "@model_dir",
            "network": "@network_def",
            "config": "@model_config",
            "device": "@device",
        },
        "settings": {
            "_target_": "anofpdm_monai.model.InferenceSettings",
            **{name: f"@{name}" for name in ("method", "steps", "stride", "batch_size", "seed", "precision", "keep_3d_components")},
        },
        "inferer": {"_target_": "anofpdm_monai.inferers.VolumeInferer", "model": "@model", "settings": "@settings"},
        "run": [
            {
                "_target_": "anofpdm_monai.api.segment",
                "inputs": ["@dataset_dir"],
                "model": "$@inferer.model",
                "settings": "$@inferer.settings",
                "output_dir": "@output_dir",
                "save_anomaly": "@save_anomaly",
                "progress": "@progress",
            }
        ],
    }


def bundle_metadata(config: ModelConfig, data_source: str, version: str, methods: list[str]) -> dict[str, Any]:
    """``configs/metadata.json`` after the MONAI bundle specification (mandatory keys, tensor format specifiers).

    The network's input is the stack of a volume's axial slices after the model's preprocessing;
    the bundle's outputs are the mask and the anomaly map on the input's own grid.
    """
    import monai
    import nibabel
    import scipy
    import SimpleITK

    prep = config.preprocess
    channels = {str(i): name for i, name in enumerate(prep.channel_names)}
    crop = (
        f"the axial planes cropped to the brain's bounding box plus {prep.crop_margin_mm:g} mm and padded to a square in mm, "
        if prep.crop_foreground
        else ""
    )
    brain = {
        "nonzero": "the brain is the non-zero voxels (skull-stripped input)",
        "template": "the brain is the MNI152 brain mask fitted by affine registration (whole-head input), the image zero outside it",
        "files": "the brain is the case's own mask file, the image zero outside it",
    }[prep.brain_mask]
    intensity = (
        f"{brain}; per volume and channel divided by the {prep.percentile:g}th percentile of the brain voxels; "
        f"{crop}axial slices with at least {prep.min_brain_fraction:.0%} brain pixels resized to "
        f"{prep.image_size} x {prep.image_size}, then per slice and channel min-max scaled to [-1, 1]"
    )
    size = [prep.image_size, prep.image_size]
    return {
        "schema": META_SCHEMA,
        "version": version,
        "changelog": {version: f"exported by anofpdm_monai {__version__} (anofpdm export-bundle)"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {
            "anofpdm_monai": __version__,
            "nibabel": nibabel.__version__,
            "SimpleITK": SimpleITK.Version_VersionString(),
            "scipy": scipy.__version__,
        },
        "optional_packages_version": {},
        "name": "AnoFPDM brain MRI anomaly segmentation",
        "task": "Brain-MRI lesion segmentation without pixel labels (AnoFPDM, forward process of a guided diffusion model)",
        "description": (
            "A classifier-free-guided 2-D diffusion UNet trained on axial slices with image-level labels only "
            "(healthy / unhealthy). Inference compares the healthy-guided and unguided forward processes of each "
            "slice (Che et al., WACV 2025 workshops) and writes a lesion mask and an anomaly map per case on the "
            "input's own grid. Methods this bundle's calibrations support: " + ", ".join(methods) + "."
        ),
        "authors": "anofpdm_monai contributors (the AnoFPDM method: Che et al.)",
        "copyright": "Copyright (c) anofpdm_monai contributors",
        "license": LICENSE,
        "data_source": data_source,
        "data_type": "nibabel",
        "intended_use": "Research only; not for clinical or diagnostic use.",
        "references": [
            "Che, Y., et al. Anomaly Detection with Forward Process of Diffusion Models for Brain MRI. WACV 2025 workshops."
        ],
        "methods": methods,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": len(prep.channel_names),
                    "spatial_shape": size,
                    "dtype": "float32",
                    "value_range": [-1, 1],
                    "is_patch_data": False,
                    "channel_def": channels,
                    "orientation": "RAS",
                    "intensity": intensity,
                    "source": "one NIfTI volume per channel, all on one grid; reoriented to RAS before slicing",
                }
            },
            "outputs": {
                "mask": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 1,
                    "spatial_shape": ["*", "*", "*"],
                    "dtype": "uint8",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "lesion (1) or not (0), on the input's grid and affine: CASE.nii.gz"},
                },
                "anomaly_map": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": 1,
                    "spatial_shape": ["*", "*", "*"],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {
                        "0": "anomaly map over the map channels (" + ", ".join(prep.map_channels) + "), on the input's grid: "
                        "CASE_anomaly.nii.gz"
                    },
                },
            },
        },
    }


def bundle_readme(config: ModelConfig, data_source: str, methods: list[str]) -> str:
    """``docs/README.md``: what the bundle is, how to run it, what it was trained on."""
    prep = config.preprocess
    net = config.network
    return f"""# AnoFPDM brain MRI anomaly segmentation (MONAI bundle)

Lesion masks without pixel labels: a classifier-free-guided 2-D diffusion UNet (MONAI
`DiffusionModelUNet`, preset `{net.preset}`, widths {list(net.channels)}, {prep.image_size} x {prep.image_size}
slices) and the AnoFPDM forward-process decisions (Che et al., WACV 2025 workshops), exported by
`anofpdm export-bundle` (anofpdm_monai {__version__}).

Research only; not for clinical or diagnostic use.

## Inputs and outputs

* In: a folder of cases, each with one NIfTI volume per channel ({", ".join(prep.channel_names)}, in
  this order; BraTS, ATLAS, nnU-Net `CASE_XXXX.nii.gz` or manifest layouts, as `anofpdm segment -i`).
* Out, per case, in `output_dir`: `CASE.nii.gz` (uint8 mask) and `CASE_anomaly.nii.gz` (float32 map),
  on the input's own grid and affine.

## Run

Needs `anofpdm_monai` installed (the config builds its classes):

```bash
python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\
    --dataset_dir CASES --output_dir OUT
```

Settings override from the command line: `--method` (one of {", ".join(methods)}), `--steps`,
`--stride`, `--batch_size`, `--seed`, `--precision`, `--keep_3d_components`, `--device`,
`--save_anomaly`, `--progress`. `models/` is also a model folder: `anofpdm segment -m BUNDLE/models -i CASES -o OUT`
writes the same files.

## Security: the configs are code

`configs/inference.json` is a program, not data: MONAI's config parser imports every `_target_` it names
and evaluates every string that starts with `$` as Python (MONAI's design, as its own bundles' READMEs
say). Run a bundle only from a source you trust, and read `configs/*.json` of one you received before
you run it. `anofpdm segment -m BUNDLE/models` runs no code from the configs: it reads `models/config.json`
as checked settings and `models/model.pt` with `torch.load(weights_only=True)`.

## Training data

{data_source}.

## Licence

{LICENSE} (docs/license.txt).
"""
