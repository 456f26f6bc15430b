"""The noise predictor: MONAI's DiffusionModelUNet with three class embeddings.

The class convention lives here and only here: every caller asks for
``HEALTHY``, ``UNHEALTHY`` or ``NULL`` (the unconditional embedding of
classifier-free guidance).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import statistics
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from anofpdm_monai.config import DiffusionConfig, ModelConfig, NetworkConfig, check_register_to
from anofpdm_monai.distributed import rank_device
from anofpdm_monai.io import InputError, InputWarning, atomic_write_json, safe_torch_load
from anofpdm_monai.logs import get_logger

if TYPE_CHECKING:  # MONAI's networks are imported where they are built: `anofpdm --help` and the light verbs skip them
    from monai.networks.nets import DiffusionModelUNet
    from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder
    from monai.networks.schedulers import DDPMScheduler

HEALTHY = 0
UNHEALTHY = 1
NULL = 2
NUM_CLASS_EMBEDS = 3
PRECISIONS = ("auto", "fp32", "bf16")
LAYOUTS = ("contiguous", "channels_last")  # memory formats of the network's activations and weights
MEASURE_ENV = "ANOFPDM_MEASURE"  # "0": no timing; auto = bf16 where the device advertises it, default layout
CACHE_FORMAT = 1
MAX_CACHE_BYTES = 1 << 20


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
    from monai.networks.nets import DiffusionModelUNet

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
    from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder

    return DiffusionModelEncoder(**classifier_arguments(cfg))


def build_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """MONAI's DDPM scheduler for ``cfg`` (linear betas 1e-4 to 0.02 over 1000 steps by default)."""
    from monai.networks.schedulers import DDPMScheduler

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
        network: a network built by :func:`build_network`, in eval mode. Its weights are put in the
            layout asked for (in place; the values do not change).
        autocast: run the network under bf16 autocast (on CPU or CUDA); its output is cast back to float32.
        channels_last: run weights and inputs in ``torch.channels_last`` memory format (NHWC). In fp32 the
            values are those of the default layout within float rounding (a test: the same masks).
        compile: run ``torch.compile(network)``; the first call compiles (tens of seconds on a CPU), so it
            pays over a cohort, not one case (docs/segment.md).
    """

    def __init__(self, network: torch.nn.Module, autocast: bool = False, channels_last: bool = False, compile: bool = False) -> None:
        self.network = network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.autocast = autocast
        self.channels_last = channels_last
        self.compiled = compile
        self._forward = torch.compile(network) if compile else network

    @property
    def execution(self) -> str:
        """``precision/layout`` as run, e.g. ``fp32/channels_last`` (``+compile`` when compiled)."""
        name = f"{'bf16' if self.autocast else 'fp32'}/{LAYOUTS[int(self.channels_last)]}"
        return name + ("+compile" if self.compiled else "")

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict the noise.

        Args:
            x_t: (N, C, S, S) noised slices.
            t: (N,) long timesteps in [0, T).
            labels: (N,) long class indices (HEALTHY, UNHEALTHY or NULL).

        Returns:
            (N, C, S, S) float32 predicted noise, contiguous.
        """
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            eps = self._forward(x_t, timesteps=t, class_labels=labels)
        return eps.float().contiguous()


def candidate_executions(precision: str, device: torch.device) -> list[tuple[str, str]]:
    """The (precision, layout) pairs :func:`fastest_execution` may choose from for ``precision`` on ``device``.

    ``auto`` weighs bf16 only where the device computes it natively (:func:`native_bf16`); channels_last is
    weighed on CPUs and CUDA GPUs."""
    use_bf16(precision, device)  # checks the name
    precisions = ["fp32", "bf16"] if precision == "auto" and native_bf16(device) else ["bf16" if precision == "bf16" else "fp32"]
    layouts = LAYOUTS if device.type in ("cpu", "cuda") else LAYOUTS[:1]
    return [(p, layout) for p in precisions for layout in layouts]


def time_executions(
    network: torch.nn.Module, candidates: list[tuple[str, str]], input_shape: tuple[int, ...], device: torch.device, repeats: int = 3
) -> dict[tuple[str, str], float]:
    """Median seconds of one network call per candidate on (B, C, S, S) random inputs.

    One warm-up round, then ``repeats`` rounds that visit every candidate in turn, so a load on the
    machine that comes and goes weighs on all of them alike."""
    seconds: dict[tuple[str, str], list[float]] = {c: [] for c in candidates}
    for round_ in range(repeats + 1):
        for precision, layout in candidates:
            predictor = NoisePredictor(network, autocast=precision == "bf16", channels_last=layout == "channels_last")
            if round_:
                seconds[(precision, layout)].append(time_call(predictor, input_shape, device))
            else:
                time_call(predictor, input_shape, device)
    return {c: statistics.median(v) for c, v in seconds.items()}


def time_call(predict_eps, input_shape: tuple[int, ...], device: torch.device) -> float:
    """Seconds of one call of a noise predictor ``(x, t, labels) -> eps`` on (B, C, S, S) random inputs on ``device``
    (queued GPU work waited for); the first call of a predictor includes its warm-up."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(input_shape, generator=generator).to(device)
    t = torch.full((input_shape[0],), 100, dtype=torch.long, device=device)
    labels = torch.full((input_shape[0],), NULL, dtype=torch.long, device=device)
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        predict_eps(x, t, labels)
        synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_dir() -> Path:
    """The user's cache folder for anofpdm: ``$XDG_CACHE_HOME/anofpdm``, else ``~/.cache/anofpdm``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "anofpdm"


def machine_description(device: torch.device) -> dict:
    """What the speed of a network call depends on besides the network: processor, threads, torch, device."""
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            processor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), processor)
    except OSError:
        pass
    return {
        "machine": platform.machine(), "processor": processor, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
    }  # fmt: skip


def execution_key(network: torch.nn.Module, input_shape: tuple[int, ...], device: torch.device, candidates: list) -> str:
    """Cache key: this machine, the network's architecture (class and parameter shapes; not the weights'
    values), the input shape and the candidates."""
    architecture = [type(network).__name__, *[(name, list(v.shape)) for name, v in network.state_dict().items()]]
    text = json.dumps([machine_description(device), architecture, list(input_shape), candidates], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_execution_cache(path: Path) -> dict:
    """The entries of the cache file, checked as untrusted input; a bad file is ignored with one warning."""
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > MAX_CACHE_BYTES:
            raise ValueError(f"larger than {MAX_CACHE_BYTES} bytes")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError(f"not an object with format {CACHE_FORMAT} and entries")
    except (OSError, ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        warnings.warn(f"{path}: ignored ({err}); the network will be timed again and the file rewritten (delete it to reset)",
                      InputWarning, stacklevel=2)  # fmt: skip
        return {}
    return data["entries"]


def cached_choice(entry: object, candidates: list[tuple[str, str]]) -> tuple[str, str] | None:
    """A cache entry's (precision, layout) when it is well formed and one of ``candidates``, else None."""
    if not isinstance(entry, dict):
        return None
    choice = (entry.get("precision"), entry.get("layout"))
    return choice if choice in candidates else None


def fastest_execution(
    network: torch.nn.Module, device: torch.device, precision: str = "auto", input_shape: tuple[int, ...] = (16, 1, 64, 64)
) -> tuple[str, str]:
    """``(precision, layout)`` for ``precision``: the fastest ``fp32``/``bf16`` and ``contiguous``/``channels_last``
    measured on this machine (arguments of :class:`NoisePredictor`: ``autocast``, ``channels_last``).

    The candidates (:func:`candidate_executions`) are timed once per machine and network architecture on
    (B, C, S, S) inputs (a few seconds) and the choice is cached in ``cache_dir()/execution.json``; later
    runs read it. With ``ANOFPDM_MEASURE=0`` nothing is timed: ``auto`` takes bf16 where the device
    advertises it natively (:func:`native_bf16`) and the default layout.

    Args:
        network: the UNet, in eval mode, on ``device``.
        precision: ``auto``, ``fp32`` or ``bf16`` (the two fixed ones still choose the layout).
        input_shape: (B, C, S, S) of one network call: 2 x the batch size of slices.
    """
    candidates = candidate_executions(precision, device)
    if os.environ.get(MEASURE_ENV, "1") == "0":
        choice = ("bf16" if use_bf16(precision, device) else "fp32", "contiguous")
    elif len(candidates) == 1:
        choice = candidates[0]
    else:
        path = cache_dir() / "execution.json"
        entries = read_execution_cache(path)
        key = execution_key(network, input_shape, device, candidates)
        choice = cached_choice(entries.get(key), candidates)
        if choice is None and key in entries:
            warnings.warn(f"{path}: ignored the entry for this machine and network (not a precision and layout of "
                          f"{candidates}); the network will be timed again", InputWarning, stacklevel=2)  # fmt: skip
        if choice is None:
            seconds = time_executions(network, candidates, tuple(input_shape), device)
            choice = min(seconds, key=seconds.get)
            entries[key] = {"precision": choice[0], "layout": choice[1], "input_shape": list(input_shape),
                            "seconds": {f"{p}/{layout}": s for (p, layout), s in seconds.items()},
                            "machine": machine_description(device), "date": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
            timings = ", ".join(f"{p}/{layout} {s * 1000:.0f} ms" for (p, layout), s in seconds.items())
            try:
                atomic_write_json(path, {"format": CACHE_FORMAT, "entries": entries})
                where = f"cached in {path}"
            except OSError as err:
                where = f"not cached ({path}: {err.strerror})"
            get_logger().info(f"network timed on this machine ({timings} per call of {input_shape[0]}): "
                              f"{choice[0]}/{choice[1]}, {where}")  # fmt: skip
    return choice


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