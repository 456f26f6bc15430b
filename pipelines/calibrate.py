"""``anofpdm calibrate``: choose w*, thr_01, D (and N if several are given) on validation slices (image-level labels only)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from anofpdm_monai.calibration import Calibration, calibrate, plot_calibration, predictor_precision
from anofpdm_monai.data import PreprocessedStore
from anofpdm_monai.inferers import SliceInferer
from anofpdm_monai.io import InputError
from anofpdm_monai.logs import get_logger, log_to_file
from anofpdm_monai.provenance import write_run_record
from anofpdm_monai.model import DEFAULT_BATCH_SIZE, AnoFPDMModel, calibration_path
from anofpdm_monai.volume_mode import calibrate_volume_mode, validation_volumes
from pipelines.options import add_device_arguments, record_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="trained model folder")
    parser.add_argument("-d", "--data", required=True, help="preprocessed store with a val split")
    parser.add_argument("--w-grid", default="0.5,1,1.5,2,3,5", help="candidate guidance strengths")
    parser.add_argument("--n-val", type=int, default=1000, help="validation slices (seeded sample)")
    parser.add_argument(
        "--steps", default="600",
        help="forward-step budget N (paper: 600), or several, e.g. 100,200,300,400,600, to select N too (one run)",
    )  # fmt: skip
    parser.add_argument("--stride", type=int, default=1, help="visit every k-th step (fast mode: k > 1)")
    parser.add_argument("--encoding", choices=["ddim", "ddpm"], default="ddim", help="forward-process encoding to calibrate (ddpm: calibration_ddpm.json)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="slices per forward process (2 x this per network call); bounds memory")
    parser.add_argument(
        "--volume-cases", type=int, default=4,
        help="whole validation patients that calibrate the volume family (anofpdm-*-volume) at the selected N, k, w; 0: none",
    )  # fmt: skip
    parser.add_argument(
        "--volume-only", action="store_true",
        help="keep the existing calibration of --encoding and (re)calibrate only its volume family",
    )  # fmt: skip
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation sample and the forward process")


def validation_sample(store: PreprocessedStore, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded sample of at most ``n_val`` validation slices and their image-level labels (no masks used)."""
    rows = store.sample_rows("val", n_val, seed, "for calibration")
    images, _, labels = store.load_slices(rows)
    return images, labels


def run(args: argparse.Namespace) -> int:
    model = AnoFPDMModel.from_folder(args.model, args.device)
    device, config = model.device, model.config
    store = PreprocessedStore(args.data)
    if store.config.channel_names != config.preprocess.channel_names or store.config.image_size != config.network.image_size:
        raise InputError(
            f"{args.data}: store has channels {store.config.channel_names} at {store.config.image_size}px, the model "
            f"takes {config.preprocess.channel_names} at {config.network.image_size}px; use the store the model was trained on"
        )
    try:
        w_grid = [float(w) for w in args.w_grid.split(",") if w.strip()]
    except ValueError as err:
        raise ValueError(f"--w-grid {args.w_grid!r}: give comma-separated numbers, e.g. 0.5,1,2") from err
    try:
        steps = [int(n) for n in args.steps.split(",") if n.strip()]
    except ValueError as err:
        raise ValueError(f"--steps {args.steps!r}: give one or more comma-separated integers, e.g. 600 or 200,400,600") from err
    predict_eps = model.noise_predictor(args.precision)
    alphas_cumprod = model.alphas_cumprod.to(device)
    out = calibration_path(model.folder, args.encoding)
    log_to_file(Path(out).parent, "calibrate")
    log = get_logger()
    if args.volume_only:
        if args.volume_cases < 1:
            raise ValueError(f"--volume-only needs --volume-cases >= 1, got {args.volume_cases}")
        calibration = Calibration.load(out)
    else:
        images, labels = validation_sample(store, args.n_val, args.seed)
        calibration, curves = calibrate(
            predict_eps,
            alphas_cumprod,
            images,
            labels,
            w_grid=w_grid,
            steps=steps,
            stride=args.stride,
            encoding=args.encoding,
            map_channels=config.preprocess.map_channel_indices,
            map_channel_names=config.preprocess.map_channels,
            batch_size=args.batch_size,
            generator=torch.Generator(device=device).manual_seed(args.seed),
            device=device,
        )
        log.info(
            f"{out}: N*={calibration.steps}, w*={calibration.w:g}, thr_01={calibration.thr_01:.4f}, "
            f"D={[round(d, 5) for d in calibration.D]}"
        )
        log.info(f"validation accuracy ({calibration.n_val} slices):")
        for budget, row in zip(calibration.steps_grid, calibration.accuracy_by_steps):
            log.info(f"  N={budget}: " + ", ".join(f"w={w:g}: {a:.3f}" for w, a in zip(calibration.w_grid, row)))
    if args.volume_cases > 0:
        inferer = SliceInferer(predict_eps, alphas_cumprod, calibration, batch_size=args.batch_size, seed=args.seed, device=device)
        volumes = validation_volumes(store, inferer.forward_process, args.volume_cases, args.seed)
        volume = calibrate_volume_mode(volumes)
        calibration.volume = volume.to_dict()
        log.info(
            f"volume family ({volume.n_val_volumes} patients, {volume.n_val_slices} slices): pixel level q={volume.pixel_quantile} "
            f"(map >= {volume.pixel_threshold:.4g}), components >= {volume.min_lesion_mm3:g} mm^3, health by "
            f"{volume.health}{' (with neighbours)' if volume.smooth_slices else ''}: accuracy {volume.accuracy:.3f}"
        )
    calibration.save(out)
    resolved = {"data": Path(args.data).resolve(), "device": str(device), "precision": predictor_precision(predict_eps),
                "w_grid": w_grid, "steps": steps, "output": Path(out).resolve()}  # fmt: skip
    write_run_record(Path(out).parent, record_of("calibrate", args, resolved, Path(out).parent), calibration_record_name(out))
    if not args.volume_only:
        plot_calibration(calibration, curves, Path(out).with_suffix(".png"))
    return 0


def calibration_record_name(calibration_file: str | Path) -> str:
    """The run record beside a calibration: ``run_calibrate.json`` (DDIM), ``run_calibrate_ddpm.json`` (DDPM)."""
    return Path(calibration_file).name.replace("calibration", "run_calibrate", 1)
