"""The registry of methods: every system ``segment`` and ``evaluate`` run is one entry, found by name.

A method entry carries everything the library needs to run it, and only the modules of
:data:`METHOD_MODULES` define methods, decisions and calibration sections (a section also migrates its
own data from older ``calibration.json`` versions: :attr:`CalibrationSection.migrate`). Other modules
name registered methods only as defaults: :data:`anofpdm_monai.model.PREFERRED_METHODS` and
``InferenceSettings.method`` (what ``segment`` runs when none is named), ``pipelines/demo.py``'s
``DEMO_METHODS``, and the ``"aggregated"`` variant :class:`anofpdm_monai.inferers.ForwardProcessInferer`
produces when none is given. One section option lives in the generic code: the volume family's false-positive
rate (:data:`DEFAULT_FP_RATE`, :attr:`SectionContext.fp_rate`, ``CalibrationSettings.fp_rate``, ``calibrate
--fp-rate``). There are three kinds (docs/architecture.md, "How to add a method"):

* :class:`AnoFPDMMethod`: a decision variant on the shared forward process of its encoding
  (``anofpdm-ddim``, ``anofpdm-ddim-last``, ``anofpdm-ddim-volume``, ...). Its :class:`Decision`
  (registered with :func:`register_decision`) maps a volume's forward-process result, the volume's
  inputs and the decision's own :class:`CalibrationSection` to masks and a map. A section is a typed
  dataclass stored under its name in ``calibration.json`` and made by its calibration hook
  (image-level labels only).
* :class:`ReconstructionMethod`: a baseline that maps slices to anomaly maps (ddib; the
  reconstruction baselines of the comparison) and is tuned with pixel labels: a grid over its
  hyperparameters plus the map threshold, chosen on validation slices separately for the mixed and
  the unhealthy setup (:mod:`anofpdm_monai.tuning`). It names the :class:`Component` s it needs
  (extra networks in ``MODEL/baselines/NAME/``), loaded only when the method runs.
* :class:`ThresholdMethod`: the oracle intensity threshold of the map channels (tuned on the
  evaluated slices themselves: an upper bound).

A method with ``uses_pixel_labels`` is marked with a dagger in the summary, which says why from
its ``footnote``. The built-in methods are registered by the modules in :data:`METHOD_MODULES`,
imported the first time the registry is read; a new system is one module that calls
:func:`register` (and :func:`register_decision` for a new AnoFPDM variant), added to that list.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anofpdm_monai.forward_process import ENCODINGS
from anofpdm_monai.io import InputError

KINDS = ("anofpdm", "reconstruction", "threshold")
SETUPS = ("mixed", "unhealthy")
DEFAULT_FP_RATE = 0.1
"""False-positive components per 100 ml of healthy brain the volume family's minimum lesion size allows on the
healthy validation slices (about one per adult brain of 1,000 to 1,400 ml); ``anofpdm calibrate --fp-rate``."""
COMPONENTS_FOLDER = "baselines"  # MODEL/baselines/NAME/: the components of a model folder (anofpdm_monai.components)
# Modules whose import registers methods, decisions and calibration sections (in this order).
METHOD_MODULES = ("anofpdm_monai.segmentation", "anofpdm_monai.volume_mode", "anofpdm_monai.baselines", "anofpdm_monai.comparison")


# ---------------------------------------------------------------------------------------------
# AnoFPDM decisions and their calibration sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationSection:
    """A decision family's part of ``calibration.json``, stored under ``name`` beside the paper's fields.

    Attributes:
        name: the key in ``calibration.json`` (e.g. ``"volume"``).
        type: the typed dataclass; ``type.from_dict(dict)`` reads it (a ``TypeError``/``ValueError``
            for a bad field) and ``obj.to_dict()`` writes it.
        calibrate: ``(SectionContext) -> section``: makes it on validation data with image-level
            labels only (``anofpdm calibrate`` runs it after the paper's calibration); None when it
            cannot be calibrated by the library.
        missing: what to do when a calibration lacks the section, one line (a command to run).
        describe: ``(section) -> str``, one line on what was calibrated, for the log (None: the name only).
        migrate: ``(stored object, file's schema_version) -> object``: the section's object of an older
            ``calibration.json`` as the current one (:func:`anofpdm_monai.calibration.migrate` calls it for
            every registered section the file holds); None when the section's format never changed.
    """

    name: str
    type: type
    calibrate: Callable[[SectionContext], Any] | None = None
    missing: str = "recalibrate the model (anofpdm calibrate)"
    describe: Callable[[Any], str] | None = None
    migrate: Callable[[dict[str, Any], int], dict[str, Any]] | None = None


@dataclass
class SectionContext:
    """What a section's calibration hook gets.

    Attributes:
        forward: ``(slices (B, C, S, S), case id, slice indices) -> ForwardProcessResult`` (G = 1) at the
            encoding's calibrated N, k and w (:meth:`anofpdm_monai.inferers.ForwardProcessInferer.forward_process`).
        store: the preprocessed store (:class:`anofpdm_monai.data.PreprocessedStore`) with a ``val`` split;
            a hook reads its image-level labels only.
        cases: how many whole validation patients the hook may run.
        seed: seed of the hook's choice of patients.
        calibration: the encoding's paper calibration (:class:`anofpdm_monai.calibration.Calibration`).
        fp_rate: false-positive components per 100 ml of healthy brain a section's minimum lesion size may
            leave on the healthy validation slices (the volume family's size rule; ``anofpdm calibrate --fp-rate``).
    """

    forward: Callable[..., Any]
    store: Any
    cases: int
    seed: int
    calibration: Any
    fp_rate: float = DEFAULT_FP_RATE


@dataclass(frozen=True)
class Decision:
    """A decision variant of the forward process.

    Attributes:
        name: the variant's name (``"aggregated"``, ``"last"``, ``"volume"``).
        decide: ``(result, volume, calibration, section, setup) -> SegmentationResult``: ``result`` is the
            forward process of ALL of one volume's slices (G = 1, on the network's device), ``volume`` its
            :class:`~anofpdm_monai.segmentation.VolumeInputs` (None unless ``needs_volume``), ``calibration``
            the encoding's :class:`~anofpdm_monai.calibration.Calibration`, ``section`` the typed
            calibration section (None when ``section`` is None), ``setup`` ``"mixed"`` or ``"unhealthy"``.
        section: the :class:`CalibrationSection` the decision reads, or None (the paper's fields only).
        needs_volume: whether ``decide`` needs the volume's brain pixels, slice indices and voxel size.
        input_mask: ``(slices, geometry, section, setup) -> (X, Y, Z) uint8``: the mask on the input grid from
            the decision's :class:`~anofpdm_monai.segmentation.SegmentationResult` and the case's
            :class:`~anofpdm_monai.transforms.CaseGeometry`; None brings the slice masks back
            (:func:`~anofpdm_monai.transforms.slices_to_volume`). The volume family decides there instead.
    """

    name: str
    decide: Callable[..., Any]
    section: CalibrationSection | None = None
    needs_volume: bool = False
    input_mask: Callable[..., Any] | None = None


DECISIONS: dict[str, Decision] = {}
SECTIONS: dict[str, CalibrationSection] = {}


def register_decision(decision: Decision) -> Decision:
    """Add a decision variant (and its calibration section, once) to the registry."""
    if decision.name in DECISIONS:
        raise ValueError(f"decision {decision.name!r} is registered already")
    if decision.section is not None:
        known = SECTIONS.get(decision.section.name)
        if known is not None and known is not decision.section:
            raise ValueError(f"calibration section {decision.section.name!r} is registered already by another family")
        SECTIONS[decision.section.name] = decision.section
    DECISIONS[decision.name] = decision
    return decision


def get_decision(name: str) -> Decision:
    """The registered decision variant ``name``; a ValueError listing the known ones otherwise."""
    _load_builtin()
    if name not in DECISIONS:
        raise ValueError(f"unknown decision variant {name!r}; choose from {list(DECISIONS)}")
    return DECISIONS[name]


def calibration_sections() -> dict[str, CalibrationSection]:
    """Every registered calibration section, by its key in ``calibration.json``."""
    _load_builtin()
    return dict(SECTIONS)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodEntry:
    """What every method has.

    Attributes:
        name: the name on the command line (``--method``, ``--methods``).
        description: one line for the docs and ``--help``.
        uses_pixel_labels: something of the method is tuned on pixel labels (not label-free).
        footnote: for such a method, what was tuned on them (the summary's dagger note).
    """

    name: str
    description: str
    uses_pixel_labels: bool = False
    footnote: str = ""
    kind = ""

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/,= "):
            raise ValueError(f"method name {self.name!r} must be non-empty without '/', ',', '=' or spaces")
        if self.uses_pixel_labels and not self.footnote:
            raise ValueError(f"method {self.name!r}: say in its footnote what is tuned on pixel labels")


@dataclass(frozen=True)
class AnoFPDMMethod(MethodEntry):
    """A decision variant on the forward process of one encoding.

    Attributes:
        encoding: ``"ddim"`` or ``"ddpm"`` (the calibration it reads: ``calibration.json``, ``calibration_ddpm.json``).
        variant: the name of its registered :class:`Decision`.
    """

    encoding: str = "ddim"
    variant: str = "aggregated"
    kind = "anofpdm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoding not in ENCODINGS:
            raise ValueError(f"method {self.name!r}: encoding {self.encoding!r} must be one of {ENCODINGS}")

    @property
    def decision(self) -> Decision:
        return get_decision(self.variant)


@dataclass(frozen=True)
class Component:
    """A network (or any object) a method needs besides the main model, kept in ``MODEL/baselines/NAME/``.

    Attributes:
        name: the folder name under ``MODEL/baselines/``.
        load: ``(model, device) -> object``, called once per run when a method needs it; ``model`` is the loaded
            main :class:`~anofpdm_monai.model.AnoFPDMModel` (its ``folder`` and ``config``), e.g.
            ``lambda model, device: load_component(model.folder, NAME, model.config, device)``.
        command: the command that makes it, named when its folder is missing: a string, or
            ``(model folder) -> str`` (e.g. ``lambda folder: training_command(folder, NAME)``).
    """

    name: str
    load: Callable[[Any, Any], Any]
    command: str | Callable[[Path], str]

    def make_command(self, model_folder: str | Path) -> str:
        return self.command(Path(model_folder)) if callable(self.command) else self.command


@dataclass
class MapsResult:
    """What a reconstruction method's ``maps`` returns for a batch.

    Attributes:
        maps: (B, S, S) anomaly maps, larger = more anomalous, any device, float.
        network_calls: batched network calls spent per slice.
    """

    maps: Any
    network_calls: int


@dataclass
class MethodContext:
    """What a reconstruction method's hooks get.

    Attributes:
        model: the loaded :class:`~anofpdm_monai.model.AnoFPDMModel` (network, schedule, calibrations).
        settings: the run's :class:`~anofpdm_monai.model.InferenceSettings` (precision, batch size, stride).
        components: the method's :class:`Component` s by name, loaded.
    """

    model: Any
    settings: Any
    components: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self):
        return self.model.device

    def noise_predictor(self):
        """The main model's ``eps(x_t, t, labels)`` at the run's precision."""
        return self.model.noise_predictor(self.settings.precision)

    def calibration(self, encoding: str = "ddim"):
        """The main model's calibration of ``encoding`` (its w*, stride, map channels)."""
        return self.model.calibration(encoding)

    @property
    def stride(self) -> int:
        """The run's stride k, else the DDIM calibration's."""
        return self.settings.stride or self.calibration("ddim").stride


@dataclass(frozen=True)
class ReconstructionMethod(MethodEntry):
    """A baseline with per-slice anomaly maps, binarised by a threshold tuned on validation pixel labels.

    Attributes:
        maps: ``(context, x0 (B, C, S, S) in [-1, 1] on the device, seeds (B,) ints, params) -> MapsResult``;
            ``seeds`` are the slices' own seeds (:func:`~anofpdm_monai.inferers.slice_seeds`): a stochastic
            method draws slice b's noise from ``torch.Generator(device).manual_seed(seeds[b])``, so its maps do
            not depend on the batch; ``params`` holds one value per hyperparameter of ``grid``. Called outside
            ``torch.no_grad()``: a method that needs gradients (classifier guidance) takes them, the others
            decorate it with ``@torch.no_grad()``.
        grid: ``(context) -> {hyperparameter: [candidate values]}``, the default tuning grid (a run may replace
            any hyperparameter's candidates: ``evaluate --tune NAME.PARAM=v1,v2``); every combination is run
            on the validation slices and, with the best map threshold each, the best one per setup is kept.
        components: the :class:`Component` s it needs; a missing one skips the method with one line.
    """

    maps: Callable[..., MapsResult] | None = None
    grid: Callable[[MethodContext], dict[str, list]] = lambda context: {}
    components: tuple[Component, ...] = ()
    uses_pixel_labels: bool = True
    kind = "reconstruction"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.maps is None:
            raise ValueError(f"method {self.name!r}: a reconstruction method needs its maps function")
        if not self.uses_pixel_labels:
            raise ValueError(f"method {self.name!r}: its threshold is tuned on pixel labels; keep uses_pixel_labels")

    def load_components(self, model: Any, device: Any) -> dict[str, Any]:
        """Each component of the loaded main ``model`` (``MODEL/baselines/NAME/``), by name.

        Raises:
            ComponentMissing: a component's folder is missing (the message names the command that makes it).
        """
        loaded = {}
        for component in self.components:
            folder = Path(model.folder) / COMPONENTS_FOLDER / component.name
            if not folder.is_dir():
                raise ComponentMissing(f"{self.name} skipped: {folder} is missing; make it with: {component.make_command(model.folder)}")
            loaded[component.name] = component.load(model, device)
        return loaded

    def tuning_grid(self, context: MethodContext, overrides: Mapping[str, Sequence] | None = None) -> dict[str, list]:
        """The grid to tune: the default one with the hyperparameters in ``overrides`` replaced.

        Raises:
            InputError: ``overrides`` names a hyperparameter the method does not have.
        """
        grid = {k: list(v) for k, v in self.grid(context).items()}
        unknown = sorted(set(overrides or {}) - set(grid))
        if unknown:
            raise InputError(f"tune: {self.name} has no hyperparameter {unknown}; it has {sorted(grid)}", arguments="tune")
        grid.update({k: list(v) for k, v in (overrides or {}).items()})
        empty = [k for k, v in grid.items() if not v]
        if empty:
            raise InputError(f"tune: {self.name}.{empty[0]} has no candidate value", arguments="tune")
        return grid


class ComponentMissing(InputError):
    """A method's component is not in the model folder (the method is skipped)."""


def grid_points(grid: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    """Every combination of a grid, in order (the last hyperparameter varies fastest)."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


@dataclass(frozen=True)
class ThresholdMethod(MethodEntry):
    """The oracle intensity threshold of the map channels' mean (computed when the tables are merged)."""

    uses_pixel_labels: bool = True
    kind = "threshold"


REGISTRY: dict[str, MethodEntry] = {}


def register(method: MethodEntry) -> MethodEntry:
    """Add ``method`` to the registry (a name is registered once)."""
    if not isinstance(method, (AnoFPDMMethod, ReconstructionMethod, ThresholdMethod)):
        raise ValueError(f"method {getattr(method, 'name', method)!r}: register an AnoFPDMMethod, ReconstructionMethod or ThresholdMethod")
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered already")
    REGISTRY[method.name] = method
    return method


_loaded = False


def _load_builtin() -> None:
    """Import the modules of :data:`METHOD_MODULES` once (they register the built-in methods)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in METHOD_MODULES:
            importlib.import_module(module)


def all_methods() -> dict[str, MethodEntry]:
    """Every registered method by name: the AnoFPDM ones, then the reconstruction baselines, then the oracle
    threshold, each kind in registration order (the order of the summary's rows)."""
    _load_builtin()
    return {m.name: m for kind in KINDS for m in REGISTRY.values() if m.kind == kind}


def get_method(name: str) -> MethodEntry:
    """The registered method ``name``; an InputError listing the known names otherwise."""
    methods = all_methods()
    if name not in methods:
        raise InputError(f"method={name!r} is unknown; choose from {list(methods)}", arguments="method")
    return methods[name]


def anofpdm_methods() -> dict[str, AnoFPDMMethod]:
    """The AnoFPDM methods by name, in registration order."""
    return {n: m for n, m in all_methods().items() if isinstance(m, AnoFPDMMethod)}
