"""The noise predictor: MONAI's DiffusionModelUNet with three class embeddings.

The class convention lives here and only here: every caller asks for
``HEALTHY``, ``UNHEALTHY`` or ``NULL`` (the unconditional embedding of
classifier-free guidance).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder
from monai.networks.schedulers import DDPMScheduler

from anofpdm_monai.config import DiffusionConfig, ModelConfig, NetworkConfig, check_register_to
from anofpdm_monai.distributed import rank_device
from anofpdm_monai.io import InputError, safe_torch_load

HEALTHY = 0
UNHEALTHY = 1
NULL = 2
NUM_CLASS_EMBEDS = 3
PRECISIONS = ("auto", "fp32", "bf16")


def network_arguments(cfg: NetworkConfig) -> dict:
    """The arguments of MONAI's ``DiffusionModelUNet`` for ``cfg``: a 2-D epsilon-predicting UNet with
    embeddings {healthy, unhealthy, null}. A MONAI bundle's ``inference.json`` writes these out."""
    return dict(
        spatial_dims=2,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        channels=list(cfg.channels),
        attention_levels=list(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks,
        num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=NUM_CLASS_EMBEDS,
    )


def build_network(cfg: NetworkConfig) -> DiffusionModelUNet:
    """Build the 2-D epsilon-predicting UNet of ``cfg`` (:func:`network_arguments`)."""
    return DiffusionModelUNet(**network_arguments(cfg))


def classifier_arguments(cfg: NetworkConfig) -> dict:
    """The arguments of MONAI's ``DiffusionModelEncoder`` for the noise-conditional healthy/unhealthy
    classifier of classifier guidance (Wolleb et al. 2022): the UNet's encoder widths of ``cfg`` plus one
    more level at the last width, so the flattened features before the classifier head stay small
    ((S / 2^levels)^2 x width: 4 x 4 x 64 for the tiny preset), and two outputs (logits of HEALTHY, UNHEALTHY)."""
    return dict(
        spatial_dims=2,
        in_channels=cfg.in_channels,
        out_channels=2,
        input_shape=(cfg.image_size, cfg.image_size),
        channels=[*cfg.channels, cfg.channels[-1]],
        attention_levels=[*cfg.attention_levels, cfg.attention_levels[-1]],
        num_res_blocks=cfg.num_res_blocks,
        num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups,
    )


def build_classifier(cfg: NetworkConfig) -> DiffusionModelEncoder:
    """Build the noise-conditional classifier of ``cfg`` (:func:`classifier_arguments`): ``(x_t (N, C, S, S),
    timesteps (N,)) -> (N, 2)`` logits, index ``HEALTHY`` and ``UNHEALTHY``."""
    return DiffusionModelEncoder(**classifier_arguments(cfg))


def build_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """MONAI's DDPM scheduler for ``cfg`` (linear betas 1e-4 to 0.02 over 1000 steps by default)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
    )


def drop_labels(labels: torch.Tensor, p_uncond: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by ``NULL`` with probability ``p_uncond`` (classifier-free training).

    Args:
        labels: (B,) long, values in {HEALTHY, UNHEALTHY}.
        p_uncond: probability of dropping a label, in [0, 1].
        generator: random source for reproducible drops (on the labels' device).
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond={p_uncond} must lie in [0, 1]")
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, NULL), labels)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 support, or a CPU whose oneDNN
    build supports bf16 (AVX512-BF16 / AMX; asked through ``torch.ops.mkldnn._is_mkldnn_bf16_supported``)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the query: stay in fp32
        return False


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` or ``cuda:N`` must name an available GPU.

    Under ``torchrun``, ``auto`` and ``cuda`` give each rank its own GPU, ``cuda:LOCAL_RANK``
    (:func:`anofpdm_monai.distributed.rank_device`).
    """
    if name == "auto":
        return rank_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name != "cpu" and match is None:
        raise InputError(f"device={name!r}: choose 'auto', 'cpu', 'cuda' or 'cuda:N'", arguments="device")
    if match is not None:
        index, count = int(match.group(1) or 0), torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device={name!r}: no CUDA GPU is available; use 'cpu' or 'auto'", arguments="device")
        if index >= count:
            raise InputError(f"device={name!r}: {count} CUDA GPU(s) available here; use 'cpu', 'auto' or a GPU below {count}",
                             arguments="device")  # fmt: skip
    return rank_device(torch.device(name))


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve ``precision``: ``bf16`` always autocasts, ``fp32`` never, ``auto`` where :func:`native_bf16`."""
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}", arguments="precision")
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


class NoisePredictor:
    """Callable ``eps(x_t, t, labels)`` over a UNet: the interface the forward process uses.

    Args:
        network: a network built by :func:`build_network`, in eval mode.
        autocast: run the network under bf16 autocast (on CPU or CUDA); its output is cast back to float32.
    """

    def __init__(self, network: torch.nn.Module, autocast: bool = False) -> None:
        self.network = network
        self.autocast = autocast

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict the noise.

        Args:
            x_t: (N, C, S, S) noised slices.
            t: (N,) long timesteps in [0, T).
            labels: (N,) long class indices (HEALTHY, UNHEALTHY or NULL).

        Returns:
            (N, C, S, S) float32 predicted noise.
        """
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            eps = self.network(x_t, timesteps=t, class_labels=labels)
        return eps.float()


def load_model_folder(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    *,
    network: torch.nn.Module | None = None,
    config: ModelConfig | None = None,
) -> tuple[torch.nn.Module, ModelConfig]:
    """Load a trained model folder (``config.json`` + ``model.pt``, EMA weights) for inference.

    Args:
        network, config: built elsewhere (a MONAI bundle's ``inference.json`` builds both from the
            arguments it names) instead of from the folder's ``config.json``; the folder's
            ``model.pt`` is loaded into ``network`` all the same.

    Raises:
        FileNotFoundError: ``config.json`` or ``model.pt`` is missing.
        InputError: the weights are not a plain state dict, or do not fit the config
            (another preset or channel count).
    """
    model_dir = Path(model_dir)
    config = ModelConfig.load(model_dir / "config.json") if config is None else config
    try:
        check_register_to(config.preprocess.register_to, "preprocess.register_to")
    except ValueError as err:
        raise InputError(f"{model_dir / 'config.json'}: {err}; fix that field, or use the config.json saved with these weights") from err
    state = safe_torch_load(model_dir / "model.pt")
    if network is None:  # the config is checked against the weights before it costs any memory
        check_weights_fit(state, model_dir / "model.pt", config.network)
        network = build_network(config.network)
    load_weights(network, state, model_dir / "model.pt", config.network)
    return network.to(device).eval(), config


def check_weights_fit(state: object, path: Path, cfg: NetworkConfig) -> None:
    """Refuse ``config.json`` network settings that do not fit the weights file, before the network is built.

    The widths, channel count and blocks per level are read off the file's tensor names and shapes first; then
    the network is built on PyTorch's ``meta`` device (no memory) and every tensor's shape is compared, so an
    absurd config (widths 8192, 16 blocks: hundreds of GiB of parameters) is refused without allocating it.

    Raises:
        InputError: one line naming the first setting or tensor that differs.
    """
    _check_plain(state, path)
    first = state.get("conv_in.conv.weight")
    if first is not None and first.ndim == 4:
        found = {"in_channels": int(first.shape[1]), "channels[0]": int(first.shape[0])}
        levels = sorted({int(m[1]) for k in state if (m := re.match(r"down_blocks\.(\d+)\.", k))})
        blocks = {int(m[1]) for k in state if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
        found["levels"] = len(levels)
        found["num_res_blocks"] = len(blocks)
        for i in levels:
            width = state.get(f"down_blocks.{i}.resnets.0.conv2.conv.weight")
            if width is not None:
                found[f"channels[{i}]"] = int(width.shape[0])
        wanted = {"in_channels": cfg.in_channels, "levels": len(cfg.channels), "num_res_blocks": cfg.num_res_blocks,
                  **{f"channels[{i}]": int(c) for i, c in enumerate(cfg.channels)}}  # fmt: skip
        for key, value in wanted.items():
            if key in found and found[key] != value:
                detail = (f"the file's first layer takes {found[key]} channels" if key == "in_channels"
                          else f"{key} is {found[key]} in the weights, {value} in config.json")  # fmt: skip
                raise _misfit(path, cfg, detail)
    with torch.device("meta"):
        skeleton = build_network(cfg)
    _check_shapes(skeleton, state, path, cfg)


def _check_plain(state: object, path: Path) -> None:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a plain state dict of tensors; save weights with torch.save(model.state_dict())")


def _check_shapes(network: torch.nn.Module, state: dict, path: Path, cfg: NetworkConfig) -> None:
    """Every tensor of ``network`` (real or on the meta device) has its counterpart of the same shape in ``state``."""
    expected = network.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shape = next((k for k in expected if k in state and tuple(expected[k].shape) != tuple(state[k].shape)), None)
    if not (missing or unexpected or shape):
        return
    if shape == "conv_in.conv.weight" and state[shape].ndim == 4 and state[shape].shape[1] != expected[shape].shape[1]:
        detail = f"the file's first layer takes {state[shape].shape[1]} channels"
    elif shape is not None:
        detail = f"{shape} is {tuple(state[shape].shape)} in the weights, {tuple(expected[shape].shape)} for config.json"
    else:
        detail = f"tensor {(missing or unexpected)[0]} is {'missing from' if missing else 'not expected in'} the weights"
    raise _misfit(path, cfg, detail)


def _misfit(path: Path, cfg: NetworkConfig, detail: str) -> InputError:
    return InputError(
        f"{path}: weights do not fit config.json (preset {cfg.preset!r}, {cfg.in_channels} channels, widths "
        f"{list(cfg.channels)}, {cfg.num_res_blocks} res block(s)): {detail}; use the config.json saved with these weights"
    )


def load_weights(network: torch.nn.Module, state: object, path: Path, cfg: NetworkConfig) -> None:
    """``load_state_dict`` after checking that the weights fit ``network`` and are finite (one-line InputErrors)."""
    _check_plain(state, path)
    _check_shapes(network, state, path, cfg)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(
            f"{path}: {len(bad)} of {len(state)} weight tensors hold NaN or infinite values (first: {bad[0]}), so every "
            "output would be meaningless; the training that saved them diverged: retrain with a lower learning rate, or use "
            "weights saved before it diverged"
        )
    network.load_state_dict(state)