"""Synthetic brain-MRI cohorts with ground truth, built from the MNI152 template nilearn ships.

Every case is a fresh anatomy: the MNI152 grey-matter, white-matter and CSF maps are pushed
through a random affine transform, a smooth elastic displacement and the mass effect of any
lesion, then turned into MR contrasts from a per-case-jittered table of tissue intensities
(shared/PHANTOM.md), blurred at tissue borders, multiplied by a smooth bias field and given
Rician noise. Lesions are drawn in the case's own space:

* ``brats``: tumours with a necrotic core (label 1), an irregular enhancing rim (4) and
  oedema (2) that spreads along white matter, on FLAIR, T1, T1ce and T2, 240 x 240 x 155 at 1 mm,
  stored the way BraTS21 ships them (LPS voxel order, int16).
  Besides tumours (``tumour``), a ``brats`` lesion case can carry MS-like plaques (``ms``: 3 to 15
  small ovoid T2/FLAIR-hyperintense lesions of 30 to 1,500 mm^3, periventricular, juxtacortical or
  in deep white matter, some enhancing) or low-contrast infiltrative regions (``infiltrative``: 1 or 2 diffuse
  5 to 40 ml regions with soft borders, ground truth where the lesion weight reaches 0.5), both
  label 2. ``generate_cohort(lesions=...)`` picks the mix (default: all three, one kind per case).
* ``atlas``: chronic stroke lesions (T1-hypointense cavity with a gliotic rim, cortical and
  subcortical, 0.5 to 150 ml) on T1w only, 197 x 233 x 189 at 1 mm in MNI space (label 1).

Lesion intensities overlap the normal tissue range of every channel: oedema is as bright as
grey matter on FLAIR, a necrotic core as dark as white matter is bright, a stroke cavity as
dark as CSF. ``benchmarks/phantom_oracle.py`` measures how far plain thresholding gets.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

# Relative intensities, brightest tissue of each sequence = 1.0 (shared/PHANTOM.md).
TISSUES = ("wm", "gm", "csf")
BRATS_CHANNELS = ("flair", "t1", "t1ce", "t2")
TISSUE_CONTRAST = {
    "flair": {"wm": 0.60, "gm": 0.75, "csf": 0.15},
    "t1": {"wm": 1.00, "gm": 0.70, "csf": 0.25},
    "t1ce": {"wm": 1.00, "gm": 0.72, "csf": 0.25},
    "t2": {"wm": 0.45, "gm": 0.60, "csf": 1.00},
}
# BraTS labels: 1 necrotic core, 2 oedema, 4 enhancing rim.
TUMOUR_CONTRAST = {
    1: {"flair": 0.55, "t1": 0.35, "t1ce": 0.35, "t2": 0.90},
    2: {"flair": 0.90, "t1": 0.65, "t1ce": 0.65, "t2": 0.85},
    4: {"flair": 0.80, "t1": 0.70, "t1ce": 1.10, "t2": 0.70},
}

# Lesion kinds each layout can draw, and the default mix (shared/PHANTOM.md, issue 12).
LESION_KINDS = {"brats": ("tumour", "ms", "infiltrative"), "atlas": ("stroke", "ms", "infiltrative")}
DEFAULT_LESIONS = {"brats": ("tumour", "ms", "infiltrative"), "atlas": ("stroke",)}
LESION_METADATA = "phantom_lesions.json"
# MS-like plaques: (low, high) per channel, drawn per lesion; T1ce = T1 unless the plaque enhances.
MS_CONTRAST = {"flair": (0.70, 0.90), "t2": (0.75, 0.90), "t1": (0.60, 0.95)}
MS_ENHANCING = (1.00, 1.12)  # T1ce of an enhancing plaque (whole or rim)
MS_ENHANCING_FRACTION = 0.3
MS_VOLUME_MM3 = (30.0, 1500.0)
"""Range of an MS-like plaque's ground-truth volume (mm^3, 1 mm voxels), drawn log-uniform per plaque (issue 27)."""
# Infiltrative regions: relative signal change over the underlying tissue, (low, high) per channel.
INFILTRATIVE_CHANGE = {"flair": (0.15, 0.25), "t2": (0.10, 0.20), "t1": (-0.10, -0.05), "t1ce": (-0.10, -0.05)}

# Around the brain of a whole-head phantom (PhantomCase(whole_head=True)): layer thickness in mm
# (mean, smooth spread) from the brain outwards, and intensity per sequence (brightest tissue = 1.0):
# CSF as in the brain, cortical bone dark on every sequence, fatty marrow and scalp bright on T1.
HEAD_LAYERS_MM = {"csf": (2.0, 0.8), "skull": (6.0, 1.5), "scalp": (5.0, 1.5)}
HEAD_CONTRAST = {
    "t1": {"csf": 0.25, "bone": 0.06, "marrow": 0.6, "scalp": 0.85},
    "t1ce": {"csf": 0.25, "bone": 0.06, "marrow": 0.6, "scalp": 0.85},
    "t2": {"csf": 1.00, "bone": 0.05, "marrow": 0.5, "scalp": 0.55},
    "flair": {"csf": 0.15, "bone": 0.05, "marrow": 0.45, "scalp": 0.65},
}
# Phantoms are drawn as the real datasets ship: BraTS skull-stripped, ATLAS v2.0 as whole heads.
WHOLE_HEAD_DEFAULT = {"brats": False, "atlas": True}

BRATS_SHAPE = (240, 240, 155)
# LPS voxel order like the BraTS21 files; the brain sits in the middle of the grid.
BRATS_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 119.5], [0.0, -1.0, 0.0, 101.5], [0.0, 0.0, 1.0, -67.0], [0.0, 0.0, 0.0, 1.0]]
)


@dataclass
class TemplateMaps:
    """MNI152 tissue probabilities on the template grid (X, Y, Z) and the grid's affine."""

    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    affine: np.ndarray


@functools.lru_cache(maxsize=1)
def load_template() -> TemplateMaps:
    """Load the 1 mm MNI152 template maps shipped with nilearn (no download)."""
    from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    gm_data = gm.get_fdata(dtype=np.float32)
    csf = np.clip(brain - gm_data - wm, 0.0, 1.0)
    return TemplateMaps(wm=wm, gm=gm_data, csf=csf, brain=brain, affine=gm.affine.astype(np.float64))


def _smooth_noise(shape: tuple[int, ...], coarse: int, rng: np.random.Generator) -> torch.Tensor:
    """Smooth random field of ``shape`` (unit-ish std), from Gaussian noise on a coarse grid."""
    small = torch.from_numpy(rng.standard_normal([coarse] * len(shape)).astype(np.float32))[None, None]
    return F.interpolate(small, size=shape, mode="trilinear", align_corners=True)[0, 0]


def _gaussian_blur(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (standard deviation ``sigma`` voxels) of each channel of a (C, X, Y, Z) tensor."""
    from scipy.ndimage import gaussian_filter

    blurred = [gaussian_filter(channel.numpy(), sigma, truncate=2.5) for channel in volume]
    return torch.from_numpy(np.stack(blurred))


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Lesion:
    """One lesion in the case's world coordinates (mm): centre, radius, kind-specific extras."""

    centre: np.ndarray
    radius: float
    axes: np.ndarray  # (3, 3) random ellipsoid stretch
    extent: float = 1.0  # oedema reach relative to the tumour radius (brats)
    kind: str = "tumour"
    volume_mm3: float = 0.0  # target ground-truth volume (ms: the plaque is grown to it)


def parse_lesions(layout: str, lesions: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Validated tuple of lesion kinds for ``layout`` (``None`` or empty: the layout's default mix)."""
    if layout not in LESION_KINDS:
        raise ValueError(f"layout={layout!r}; choose 'brats' or 'atlas'")
    if lesions is None:
        return DEFAULT_LESIONS[layout]
    names = lesions.split(",") if isinstance(lesions, str) else list(lesions)
    names = [n.strip().lower() for n in names if n.strip()]
    if not names:
        return DEFAULT_LESIONS[layout]
    allowed = LESION_KINDS[layout]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(
            f"unknown lesion kind(s) {', '.join(map(repr, unknown))} for layout {layout!r}; "
            f"allowed: {', '.join(allowed)}"
        )
    return tuple(dict.fromkeys(names))


@functools.lru_cache(maxsize=1)
def _ms_candidates() -> dict[str, np.ndarray]:
    """Template voxels (i, j, k) where MS plaques sit: periventricular, juxtacortical, deep white matter."""
    from scipy.ndimage import binary_dilation, binary_erosion

    t = load_template()
    brain = t.brain > 0.5
    deep = binary_erosion(brain, iterations=15)  # far from the cortical surface
    ventricles = (t.csf > 0.6) & deep
    cerebrum = np.zeros_like(brain)
    cerebrum[:, :, int(t.brain.shape[2] * 0.35) :] = True
    periventricular = (t.wm > 0.5) & binary_dilation(ventricles, iterations=5) & ~ventricles & cerebrum
    juxtacortical = (t.wm > 0.45) & (t.wm < 0.8) & binary_dilation(t.gm > 0.5, iterations=2) & brain & cerebrum
    deep_wm = (t.wm > 0.85) & brain & cerebrum
    return {name: np.argwhere(mask) for name, mask in
            (("periventricular", periventricular), ("juxtacortical", juxtacortical), ("deep", deep_wm))}  # fmt: skip


class PhantomCase:
    """Build one synthetic case on an output grid.

    Args:
        layout: ``brats`` or ``atlas``.
        n_lesions: number of lesions (0 for a healthy case).
        seed: per-case seed; the same seed gives the same case.
        kind: lesion kind (``tumour``, ``stroke``, ``ms``, ``infiltrative``); ``None`` is the
            layout's classic kind (tumours for ``brats``, strokes for ``atlas``).
        whole_head: also draw what lies around the brain (a CSF rim, the skull, the scalp) and
            Rician noise in the air, as ATLAS v2.0 and clinical exports ship; the brain itself is
            the skull-stripped case voxel for voxel (the head comes from a random stream of its own).

    After :meth:`generate`, ``lesion_info`` lists each lesion's kind, centre voxel on the output
    grid and ground-truth volume (ml).
    """

    def __init__(self, layout: str, n_lesions: int, seed: int, kind: str | None = None, whole_head: bool = False) -> None:
        if layout not in ("brats", "atlas"):
            raise ValueError(f"layout={layout!r}; choose 'brats' or 'atlas'")
        kind = ("tumour" if layout == "brats" else "stroke") if kind is None else kind
        if kind not in LESION_KINDS[layout]:
            raise ValueError(f"lesion kind {kind!r} for layout {layout!r}; allowed: {', '.join(LESION_KINDS[layout])}")
        self.kind = kind
        self.lesion_info: list[dict] = []
        self.layout = layout
        self.n_lesions = n_lesions
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.whole_head = bool(whole_head)
        self.channel_noise: dict[str, tuple[float, float]] = {}
        self.template = load_template()
        if layout == "brats":
            self.full_shape, self.affine, self.channels = BRATS_SHAPE, BRATS_AFFINE, BRATS_CHANNELS
        else:
            self.full_shape, self.affine, self.channels = self.template.brain.shape, self.template.affine, ("t1",)

    # --- geometry -------------------------------------------------------------------------------
    def _brain_box(self, m: np.ndarray, b: np.ndarray, margin: int = 14) -> tuple[slice, ...]:
        """Output-grid slices that hold the deformed brain (work is done inside them only)."""
        t = self.template
        nonzero = np.argwhere(t.brain > 0)
        lo, hi = nonzero.min(0), nonzero.max(0)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        world_mni = corners @ t.affine[:3, :3].T + t.affine[:3, 3]
        world_case = (world_mni - b) @ np.linalg.inv(m).T
        out_inv = np.linalg.inv(self.affine)
        ijk = world_case @ out_inv[:3, :3].T + out_inv[:3, 3]
        start = np.maximum(np.floor(ijk.min(0)) - margin, 0).astype(int)
        stop = np.minimum(np.ceil(ijk.max(0)) + margin + 1, self.full_shape).astype(int)
        return tuple(slice(int(a), int(z)) for a, z in zip(start, stop))

    def _world_grid(self) -> torch.Tensor:
        """(X, Y, Z, 3) world coordinates (mm) of the voxels inside the working box."""
        axes = [torch.arange(s.start, s.stop, dtype=torch.float32) for s in self.box]
        ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        a = torch.from_numpy(self.affine.astype(np.float32))
        return ijk @ a[:3, :3].T + a[:3, 3]

    def _random_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Matrix M and shift b mapping case world -> template world: p_mni = M p + b."""
        rot = _rotation(self.rng.uniform(-7, 7, size=3))
        scale = np.diag(self.rng.uniform(0.9, 1.1, size=3))
        return rot @ scale, self.rng.uniform(-4, 4, size=3)

    def _pick_lesions(self, m: np.ndarray, b: np.ndarray) -> list[Lesion]:
        """Draw lesion centres on template tissue and map them into the case's world."""
        if self.kind == "ms":
            return self._pick_ms(m, b)
        if self.kind == "infiltrative":
            return self._pick_infiltrative(m, b)
        t = self.template
        if self.layout == "brats":
            candidates = np.argwhere((t.wm > 0.7) & (t.brain > 0.5))
            volumes_ml = np.exp(self.rng.uniform(math.log(2.0), math.log(60.0), size=self.n_lesions))
        else:
            territory = (t.gm > 0.45) if self.rng.random() < 0.7 else ((t.gm > 0.3) & (t.wm > 0.3))
            candidates = np.argwhere(territory & (t.brain > 0.5))
            volumes_ml = np.exp(self.rng.uniform(math.log(0.5), math.log(150.0), size=self.n_lesions))
        # Stay in the cerebrum: the lowest third of the template (cerebellum, brainstem) is avoided.
        candidates = candidates[candidates[:, 2] > t.brain.shape[2] * 0.35]
        lesions = []
        minv = np.linalg.inv(m)
        for volume in volumes_ml:
            ijk = candidates[self.rng.integers(len(candidates))]
            p_mni = t.affine[:3, :3] @ ijk + t.affine[:3, 3]
            centre = minv @ (p_mni - b)
            radius = (3.0 * volume * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
            axes = np.diag(self.rng.uniform(0.75, 1.3, size=3)) @ _rotation(self.rng.uniform(-90, 90, size=3))
            extent = self.rng.uniform(1.4, 2.0) if self.layout == "brats" else 1.0
            lesions.append(Lesion(centre=centre, radius=radius / extent, axes=axes, extent=extent))
        return lesions

    def _pick_ms(self, m: np.ndarray, b: np.ndarray) -> list[Lesion]:
        """3 to 15 small ovoid plaques (:data:`MS_VOLUME_MM3`, log-uniform) in periventricular, juxtacortical or deep WM.

        Each :class:`Lesion` carries its target ``volume_mm3``; :meth:`_ms_plaques` grows the plaque to
        that many voxels (fewer where CSF, grey matter or a neighbour leaves too little room).
        """
        t = self.template
        pools = _ms_candidates()
        minv = np.linalg.inv(m)
        lesions: list[Lesion] = []
        low, high = MS_VOLUME_MM3
        for _ in range(self.n_lesions):
            # Mostly small plaques: volumes log-uniform in [30, 1500] mm^3 (3.9 to 14.2 mm across as spheres).
            volume = math.exp(self.rng.uniform(math.log(low), math.log(high)))
            radius = (3.0 * volume / (4.0 * math.pi)) ** (1.0 / 3.0)
            site = self.rng.choice(["periventricular", "juxtacortical", "deep"], p=[0.45, 0.35, 0.2])
            for _attempt in range(20):  # keep plaques apart, so each stays its own component
                ijk = pools[site][self.rng.integers(len(pools[site]))]
                centre = minv @ (t.affine[:3, :3] @ ijk + t.affine[:3, 3] - b)
                if all(np.linalg.norm(centre - o.centre) > 1.6 * (radius + o.radius) + 3.0 for o in lesions):
                    break
            else:
                continue
            # Ovoid: one axis up to 1.8x longer than the others (Dawson's fingers, roughly).
            stretch = np.array([self.rng.uniform(0.55, 0.9), self.rng.uniform(0.9, 1.1), self.rng.uniform(0.9, 1.1)])
            axes = np.diag(stretch / np.cbrt(np.prod(stretch))) @ _rotation(self.rng.uniform(-90, 90, size=3))
            lesions.append(Lesion(centre=centre, radius=radius, axes=axes, kind="ms", volume_mm3=volume))
        return lesions

    def _pick_infiltrative(self, m: np.ndarray, b: np.ndarray) -> list[Lesion]:
        """1 or 2 large diffuse regions (5 to 40 ml) centred in deep white matter."""
        t = self.template
        candidates = np.argwhere((t.wm > 0.8) & (t.brain > 0.5))
        candidates = candidates[candidates[:, 2] > t.brain.shape[2] * 0.35]
        minv = np.linalg.inv(m)
        lesions = []
        for _ in range(self.n_lesions):
            volume = math.exp(self.rng.uniform(math.log(5.0), math.log(40.0)))
            ijk = candidates[self.rng.integers(len(candidates))]
            centre = minv @ (t.affine[:3, :3] @ ijk + t.affine[:3, 3] - b)
            radius = (3.0 * volume * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
            axes = np.diag(self.rng.uniform(0.8, 1.25, size=3)) @ _rotation(self.rng.uniform(-90, 90, size=3))
            lesions.append(Lesion(centre=centre, radius=radius, axes=axes, kind="infiltrative"))
        return lesions

    def _window(self, centre: np.ndarray, half_mm: float) -> tuple[slice, ...]:
        """Box-relative slices of a cube of half-width ``half_mm`` around world point ``centre``."""
        inv = np.linalg.inv(self.affine)
        ijk = inv[:3, :3] @ centre + inv[:3, 3] - np.array([s.start for s in self.box])
        half = int(math.ceil(half_mm))  # 1 mm voxels in both layouts
        return tuple(
            slice(int(min(max(round(c) - half, 0), n)), int(min(max(round(c) + half + 1, 0), n)))
            for c, n in zip(ijk, self.shape)
        )

    def _output_voxel(self, centre: np.ndarray) -> list[int]:
        inv = np.linalg.inv(self.affine)
        return [int(round(v)) for v in inv[:3, :3] @ centre + inv[:3, 3]]

    def _local_level(self, world: torch.Tensor, lesion: Lesion, noise: float, feature_mm: float) -> torch.Tensor:
        """Irregular normalised distance inside a window (``world`` is the window's grid)."""
        offset = (world - torch.from_numpy(lesion.centre.astype(np.float32))) @ torch.from_numpy(
            lesion.axes.astype(np.float32)
        ).T
        shape = tuple(world.shape[:3])
        coarse = max(3, int(math.ceil(max(shape) / feature_mm)))
        return offset.norm(dim=-1) / lesion.radius + noise * _smooth_noise(shape, coarse, self.rng)

    def _ms_plaques(self, world: torch.Tensor, lesions: list[Lesion], tissue: torch.Tensor, brain: torch.Tensor):
        """Plaque masks (box), and per-channel soft weight / value sums for the contrast step."""
        from scipy.ndimage import gaussian_filter, label

        mask = torch.zeros(self.shape, dtype=torch.bool)
        weight = torch.zeros(self.shape)
        values = {name: torch.zeros(self.shape) for name in self.channels}
        case_gain = self.rng.uniform(0.9, 1.1)
        for lesion in lesions:
            win = self._window(lesion.centre, 1.6 * lesion.radius / 0.75 + 4)
            level = self._local_level(world[win], lesion, 0.15, 4.0)
            level = level - 0.35 * (tissue[0][win] - 0.5)  # plaques keep to white matter
            allowed = brain[win] & (tissue[2][win] < 0.5) & ~mask[win]
            # Grow the plaque to its drawn volume: the lowest-level allowed voxels, as many as the
            # target (1 mm voxels), but never past 1.5 x its nominal border.
            levels = level[allowed]
            if levels.numel() == 0:
                continue
            target = max(1, int(round(lesion.volume_mm3)))
            cut = min(float(torch.kthvalue(levels, min(target, levels.numel())).values), 1.5)
            member = (level <= cut) & allowed
            components, n = label(member.numpy())
            if n > 1:  # one plaque, one component
                sizes = np.bincount(components.ravel())[1:]
                member = torch.from_numpy(components == 1 + int(np.argmax(sizes)))
            if int(member.sum()) < 5:  # squeezed out by CSF or grey matter: under ~2 mm across, dropped
                continue
            mask[win] |= member
            soft = torch.from_numpy(gaussian_filter(member.float().numpy(), 0.8, truncate=2.5))
            weight[win] += soft
            t1 = self.rng.uniform(*MS_CONTRAST["t1"]) * case_gain
            draw = {n: self.rng.uniform(*MS_CONTRAST[n]) * case_gain for n in ("flair", "t2")}
            enhancing = self.rng.random() < MS_ENHANCING_FRACTION
            rim = self.rng.random() < 0.5
            t1ce = self.rng.uniform(*MS_ENHANCING) * case_gain
            for name in self.channels:
                if name in draw:
                    value = member.float() * draw[name]
                elif name == "t1ce" and enhancing:
                    ring = (level > 0.6) if rim else torch.ones_like(member)
                    value = member.float() * torch.where(ring, torch.tensor(t1ce), torch.tensor(t1))
                else:
                    value = member.float() * t1
                values[name][win] += torch.from_numpy(gaussian_filter(value.numpy(), 0.8, truncate=2.5))
            centre = self._output_voxel(lesion.centre)
            info = {"kind": "ms", "centre_voxel": centre, "volume_ml": int(member.sum()) / 1000.0}
            if enhancing:
                info["enhancing"] = "rim" if rim else "whole"
            self.lesion_info.append(info)
        return mask, weight, values

    def _infiltrative_regions(
        self, world: torch.Tensor, lesions: list[Lesion], tissue: torch.Tensor, brain: torch.Tensor
    ) -> torch.Tensor:
        """Continuous lesion weight (box) with soft borders; ground truth is weight >= 0.5."""
        wm, csf = tissue[0], tissue[2]
        weight = torch.zeros(self.shape)
        for lesion in lesions:
            softness = self.rng.uniform(2.0, 3.5)  # mm; 10 % to 90 % over about 4.4 x softness
            win = self._window(lesion.centre, 1.9 * lesion.radius / 0.8 + 5 * softness)
            level = self._local_level(world[win], lesion, 0.25, 12.0)
            level = level - 0.3 * (wm[win] - 0.6)  # spreads along white matter
            local = torch.sigmoid((1.0 - level) * lesion.radius / softness) * (1.0 - csf[win]).clamp(0, 1)
            local = torch.where(brain[win], local, torch.zeros(()))
            before = weight[win] >= 0.5
            weight[win] = torch.maximum(weight[win], local)
            volume = int(((local >= 0.5) & ~before).sum())
            self.lesion_info.append({"kind": "infiltrative", "centre_voxel": self._output_voxel(lesion.centre),
                                     "volume_ml": volume / 1000.0})  # fmt: skip
        return weight

    def _lesion_level(self, world: torch.Tensor, lesion: Lesion) -> torch.Tensor:
        """Irregular normalised distance (X, Y, Z): 1.0 on the lesion's nominal border."""
        offset = (world - torch.from_numpy(lesion.centre.astype(np.float32))) @ torch.from_numpy(
            lesion.axes.astype(np.float32)
        ).T
        distance = offset.norm(dim=-1) / lesion.radius
        return distance + 0.3 * _smooth_noise(self.shape, 9, self.rng)

    # --- synthesis ------------------------------------------------------------------------------
    def generate(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Return ({channel: (X, Y, Z) float32 image}, (X, Y, Z) uint8 label map)."""
        m, b = self._random_affine()
        lesions = self._pick_lesions(m, b)
        self.box = self._brain_box(m, b)
        self.shape = tuple(s.stop - s.start for s in self.box)
        world = self._world_grid()
        # Elastic deformation (~3 mm) and mass effect push the anatomy away from tumour centres.
        displacement = torch.stack([_smooth_noise(self.shape, 6, self.rng) for _ in range(3)], dim=-1) * 2.5
        for lesion in lesions:
            if self.layout != "brats" or lesion.kind == "ms":  # MS plaques push nothing aside
                continue
            offset = world - torch.from_numpy(lesion.centre.astype(np.float32))
            dist = offset.norm(dim=-1, keepdim=True).clamp_min(1e-3)
            reach = lesion.radius * lesion.extent
            strength = self.rng.uniform(0.2, 0.45) * reach
            displacement -= offset / dist * strength * torch.exp(-((dist / (1.5 * reach)) ** 2))
        source = (world + displacement) @ torch.from_numpy(m.astype(np.float32)).T + torch.from_numpy(
            b.astype(np.float32)
        )
        tissue = self._sample_template(source)  # (4, X, Y, Z): wm, gm, csf, brain
        brain = tissue[3] > 0.5
        self.tissue = tissue  # kept for inspection (tests): the case's tissue maps inside self.box
        self.lesion_info = []
        labels = torch.zeros(self.shape, dtype=torch.uint8)
        lesion_label = 2 if self.layout == "brats" else 1
        if self.kind == "ms":
            mask, weight, values = self._ms_plaques(world, lesions, tissue, brain)
            labels[mask] = lesion_label
            images = self._contrast(tissue, labels, brain, ms=(weight, values))
        elif self.kind == "infiltrative":
            weight = self._infiltrative_regions(world, lesions, tissue, brain)
            labels[weight >= 0.5] = lesion_label
            images = self._contrast(tissue, labels, brain, infiltrative=weight)
        else:
            memberships: dict[int, torch.Tensor] = {}
            for lesion in lesions:
                level = self._lesion_level(world, lesion)
                own = torch.zeros(self.shape, dtype=torch.bool)
                for label, member in self._lesion_parts(level, lesion, tissue).items():
                    member = member & brain
                    own |= member
                    memberships[label] = memberships.get(label, torch.zeros(self.shape, dtype=torch.bool)) | member
                self.lesion_info.append({"kind": self.kind, "centre_voxel": self._output_voxel(lesion.centre),
                                         "volume_ml": int(own.sum()) / 1000.0})  # fmt: skip
            for label in (2, 1, 4):  # BraTS priority: enhancing over necrosis over oedema (ATLAS has label 1 only)
                if label in memberships:
                    labels[memberships[label]] = label
            images = self._contrast(tissue, labels, brain)
        full = {name: self._paste(img.numpy()) for name, img in images.items()}
        self.brain = self._paste(brain.numpy())  # (X, Y, Z) bool on the output grid
        if self.whole_head:
            full = self._add_head(full, self.brain)
        return full, self._paste(labels.numpy())

    def _add_head(self, images: dict[str, np.ndarray], brain: np.ndarray) -> dict[str, np.ndarray]:
        """Surround the brain with a CSF rim, the skull (dark tables, brighter marrow) and the scalp, and
        fill the air with Rician noise of the case's own level; voxels of ``brain`` keep their values.

        Layer thicknesses (mm) vary smoothly around the head: CSF rim ~2, skull ~6 (marrow in its middle
        third), scalp ~5 (:data:`HEAD_LAYERS_MM`); intensities relative to each sequence's brightest
        tissue are in :data:`HEAD_CONTRAST`.
        """
        from scipy.ndimage import distance_transform_edt

        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 24]))
        spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        depth = torch.from_numpy(distance_transform_edt(~brain, sampling=spacing).astype(np.float32))
        bounds, edge = [], torch.zeros(self.full_shape)
        for (mean, spread), coarse in zip(HEAD_LAYERS_MM.values(), (5, 4, 6)):
            edge = edge + (mean + spread * _smooth_noise(self.full_shape, coarse, rng)).clamp_min(0.5 * mean)
            bounds.append(edge)
        rim, skull, scalp = bounds
        layer = {
            "csf": (depth > 0) & (depth <= rim),
            "bone": (depth > rim) & (depth <= skull),
            "scalp": (depth > skull) & (depth <= scalp),
        }
        marrow = layer["bone"] & ((depth - rim - (skull - rim) / 3.0).abs() <= (skull - rim) / 6.0)
        out = {}
        for name, image in images.items():
            contrast = HEAD_CONTRAST[name]
            head = torch.zeros(self.full_shape)
            for part, member in layer.items():
                head[member] = contrast[part] * rng.uniform(0.9, 1.1)
            head[marrow] = contrast["marrow"] * rng.uniform(0.9, 1.1)
            head = head * (1.0 + 0.1 * _smooth_noise(self.full_shape, 20, rng))
            head = _gaussian_blur(head[None], 0.8)[0]
            sigma, scale = self.channel_noise[name]
            n1 = torch.from_numpy(rng.standard_normal(self.full_shape, dtype=np.float32))
            n2 = torch.from_numpy(rng.standard_normal(self.full_shape, dtype=np.float32))
            head = torch.sqrt((head + sigma * n1) ** 2 + (sigma * n2) ** 2) * scale
            out[name] = np.where(brain, image, head.numpy()).astype(image.dtype)
        return out

    def _paste(self, box_array: np.ndarray) -> np.ndarray:
        """Place an array computed inside the working box onto the full, otherwise zero, grid."""
        full = np.zeros(self.full_shape, dtype=box_array.dtype)
        full[self.box] = box_array
        return full

    def _sample_template(self, source: torch.Tensor) -> torch.Tensor:
        """Resample the template maps at template-world points ``source`` (X, Y, Z, 3)."""
        t = self.template
        inv = torch.from_numpy(np.linalg.inv(t.affine).astype(np.float32))
        ijk = source @ inv[:3, :3].T + inv[:3, 3]
        size = torch.tensor(t.brain.shape, dtype=torch.float32)
        grid = (2.0 * ijk / (size - 1) - 1.0).flip(-1)  # grid_sample wants (z, y, x) -> (W, H, D) order
        maps = torch.from_numpy(np.stack([t.wm, t.gm, t.csf, t.brain]).astype(np.float32))
        return F.grid_sample(maps[None], grid[None], mode="bilinear", align_corners=True)[0]

    def _lesion_parts(self, level: torch.Tensor, lesion: Lesion, tissue: torch.Tensor) -> dict[int, torch.Tensor]:
        """Boolean masks per label for one lesion from its irregular level set."""
        wm, csf = tissue[0], tissue[2]
        if self.layout == "atlas":
            return {1: (level < 1.0) & (csf < 0.6)}
        rim_noise = _smooth_noise(self.shape, 14, self.rng)
        core = level < self.rng.uniform(0.35, 0.55)
        rim = (level < 0.75) & ~core & (rim_noise > -0.4)
        core = core | ((level < 0.75) & ~rim)
        spread = level / lesion.extent - 0.25 * wm + 0.2 * _smooth_noise(self.shape, 11, self.rng)
        oedema = (spread < 0.85) & (csf < 0.5) & ~core & ~rim
        return {1: core, 4: rim, 2: oedema}

    def _contrast(
        self,
        tissue: torch.Tensor,
        labels: torch.Tensor,
        brain: torch.Tensor,
        ms: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
        infiltrative: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """MR channels from tissue maps and labels, with partial volume, texture, bias field, noise.

        Tumours and strokes are painted from ``labels``; MS plaques from ``ms`` (summed soft weight,
        summed soft weight x plaque value per channel); infiltrative regions scale the underlying
        tissue by the continuous weight ``infiltrative``.
        """
        wm, gm, csf, _ = tissue
        total = (wm + gm + csf).clamp_min(1e-3)
        fractions = {"wm": wm / total, "gm": gm / total, "csf": csf / total}
        classic = ms is None and infiltrative is None
        label_values = ([1, 2, 4] if self.layout == "brats" else [1]) if classic else []
        if classic:
            soft = _gaussian_blur(torch.stack([(labels == v).float() for v in label_values]), 0.8)
            # Oedema infiltrates: how much of a voxel's signal it replaces varies in space.
            infiltration = (0.9 + 0.15 * _smooth_noise(self.shape, 12, self.rng)).clamp(0.5, 1.0)
            atlas_cavity = self.rng.uniform(0.25, 0.40)
            atlas_rim = self.rng.uniform(0.55, 0.70)
        images = {}
        for name in self.channels:
            jitter = {k: v * self.rng.uniform(0.9, 1.1) for k, v in TISSUE_CONTRAST[name].items()}
            image = sum(fractions[k] * jitter[k] for k in TISSUES)
            if ms is not None:
                weight_sum, value_sums = ms
                weight = weight_sum.clamp(0.0, 1.0)
                # Plaque values follow the case's own jittered tissue scale (GM on FLAIR/T2, WM on T1).
                ref = "gm" if name in ("flair", "t2") else "wm"
                value = value_sums[name] / weight_sum.clamp_min(1e-6) * (jitter[ref] / TISSUE_CONTRAST[name][ref])
                texture = 1.0 + 0.08 * _smooth_noise(self.shape, 24, self.rng)
                image = image * (1 - weight) + weight * value * texture
            if infiltrative is not None:
                change = self.rng.uniform(*INFILTRATIVE_CHANGE[name]) * self.rng.uniform(0.9, 1.1)
                texture = 0.05 * _smooth_noise(self.shape, 24, self.rng)
                image = image * (1.0 + infiltrative * (change + texture * abs(change) / 0.2))
            for i, value in enumerate(label_values):
                weight = soft[i]
                if self.layout == "brats":
                    target = TUMOUR_CONTRAST[value][name] * self.rng.uniform(0.9, 1.1)
                    if value == 2:
                        weight = weight * infiltration
                else:
                    core = _gaussian_blur((soft[i] > 0.75).float()[None], 1.0)[0]
                    target = atlas_rim + (atlas_cavity - atlas_rim) * core
                texture = 1.0 + 0.08 * _smooth_noise(self.shape, 24, self.rng)
                image = image * (1 - weight) + weight * target * texture
            image = _gaussian_blur(image[None], 0.6)[0]
            image = image * torch.exp(0.12 * _smooth_noise(self.shape, 4, self.rng))
            sigma = self.rng.uniform(0.02, 0.04)
            n1 = torch.from_numpy(self.rng.standard_normal(self.shape, dtype=np.float32))
            n2 = torch.from_numpy(self.rng.standard_normal(self.shape, dtype=np.float32))
            image = torch.sqrt((image + sigma * n1) ** 2 + (sigma * n2) ** 2)
            scale = 1000.0 * self.rng.uniform(0.8, 1.2)
            self.channel_noise[name] = (sigma, scale)  # the whole head is drawn in the same units
            images[name] = torch.where(brain, image, torch.zeros(())) * scale
        return images


def brats_case_paths(root: Path, index: int) -> tuple[str, dict[str, Path], Path]:
    """(case id, {channel: path}, seg path) of BraTS21 case ``index`` under ``root``."""
    case = f"BraTS2021_{index:05d}"
    folder = root / case
    return case, {c: folder / f"{case}_{c}.nii.gz" for c in BRATS_CHANNELS}, folder / f"{case}_seg.nii.gz"


def atlas_case_paths(root: Path, index: int) -> tuple[str, dict[str, Path], Path]:
    """(case id, {"t1": path}, mask path) of ATLAS v2.0 case ``index`` under ``root`` (BIDS-like tree)."""
    site = f"R{index // 100 + 1:03d}"
    subject = f"sub-r{index // 100 + 1:03d}s{index % 100 + 1:03d}"
    folder = root / "ATLAS_2" / "Training" / site / subject / "ses-1" / "anat"
    stem = f"{subject}_ses-1_space-MNI152NLin2009aSym"
    return subject, {"t1": folder / f"{stem}_T1w.nii.gz"}, folder / f"{stem}_label-L_desc-T1lesion_mask.nii.gz"


def write_case(
    layout: str, root: Path, index: int, n_lesions: int, seed: int, kind: str | None = None, whole_head: bool = False
) -> tuple[str, dict]:
    """Generate case ``index`` of a cohort and write it in the real dataset's layout.

    Returns the case id and its lesion metadata ``{"kind": ..., "lesions": [...]}`` (kind
    ``healthy`` when the case has no lesion).
    """
    from anofpdm_monai.io import atomic_write

    paths = brats_case_paths if layout == "brats" else atlas_case_paths
    case_id, channel_paths, label_path = paths(root, index)
    phantom = PhantomCase(layout, n_lesions, seed, kind, whole_head=whole_head)
    images, labels = phantom.generate()
    if layout == "atlas":
        labels = (labels > 0).astype(np.uint8)  # ATLAS masks are binary whatever the kind

    def save(array: np.ndarray, path: Path, dtype: type) -> None:
        image = nib.Nifti1Image(array.astype(dtype), phantom.affine)
        image.header.set_xyzt_units("mm", "sec")
        image.set_qform(phantom.affine, code=1)
        image.set_sform(phantom.affine, code=1)
        atomic_write(path, lambda tmp: nib.save(image, str(tmp)))

    for name, path in channel_paths.items():
        save(np.round(images[name]), path, np.int16)
    save(labels, label_path, np.uint8)
    return case_id, {"kind": phantom.kind if n_lesions > 0 else "healthy", "lesions": phantom.lesion_info}


def load_lesion_metadata(root: str | Path) -> dict:
    """Per-case lesion metadata of a phantom cohort (``ROOT/phantom_lesions.json``); ``{}`` if absent.

    Maps each case id to ``{"kind": "healthy" | kind, "lesions": [{"kind", "centre_voxel",
    "volume_ml"}, ...]}``; centre voxels index the written grid, volumes count ground-truth voxels.
    """
    import json

    path = Path(root) / LESION_METADATA
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def generate_cohort(
    out_dir: str | Path,
    layout: str,
    cases: int,
    healthy_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    lesions: str | list[str] | tuple[str, ...] | None = None,
    whole_head: bool | None = None,
) -> list[str]:
    """Write a phantom cohort of ``cases`` patients; a fraction ``healthy_fraction`` carries no lesion.

    Each lesion case draws one kind uniformly from ``lesions`` (comma list or sequence; ``None``:
    ``tumour,ms,infiltrative`` for ``brats``, ``stroke`` for ``atlas``). Which kind lies where is
    written to ``ROOT/phantom_lesions.json`` (see :func:`load_lesion_metadata`).

    Case ``i`` of a cohort with seed ``s`` is seeded by ``(s, i)``, so cohorts with different seeds
    never share an anatomy and rerunning a cohort reproduces it file for file.

    ``whole_head``: draw the head around the brain (:class:`PhantomCase`); ``None`` is the layout's
    way of shipping (:data:`WHOLE_HEAD_DEFAULT`: ``atlas`` whole heads, ``brats`` skull-stripped). The
    brains of a cohort do not depend on it: the same seed gives the same brains either way.
    """
    import json

    from tqdm import tqdm

    from anofpdm_monai.io import InputError, atomic_write_text

    kinds = parse_lesions(layout, lesions)
    whole_head = WHOLE_HEAD_DEFAULT[layout] if whole_head is None else bool(whole_head)
    if cases < 1:
        raise ValueError(f"cases={cases} must be at least 1")
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ValueError(f"healthy_fraction={healthy_fraction} must lie in [0, 1]")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():  # refused before any case is made (it failed after all of them)
        raise InputError(f"{root}: exists and is not a folder; give the output (-o) a new or existing folder")
    rng = np.random.default_rng(seed)
    healthy = set(rng.choice(cases, size=int(round(healthy_fraction * cases)), replace=False).tolist())
    max_lesions = 3 if layout == "brats" else 4
    # Kinds and their lesion counts come from a stream of their own, so the classic draws
    # (healthy cases, tumour/stroke counts, case seeds) are what they were before kinds existed.
    kind_rng = np.random.default_rng(np.random.SeedSequence([seed, 12]))
    jobs = []
    for i in range(cases):
        n_lesions = 0 if i in healthy else int(rng.integers(1, max_lesions + 1))
        kind = str(kinds[int(kind_rng.integers(len(kinds)))])
        if n_lesions and kind == "ms":
            n_lesions = int(kind_rng.integers(3, 16))
        elif n_lesions and kind == "infiltrative":
            n_lesions = int(kind_rng.integers(1, 3))
        case_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        # Healthy cases take the classic path whatever kind was drawn, so they are what they were.
        jobs.append((layout, root, i, n_lesions, case_seed, kind if n_lesions else None, whole_head))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(write_case, *job) for job in jobs]
            results = [f.result() for f in tqdm(futures, desc="phantom", disable=not progress)]
    else:
        results = [write_case(*job) for job in tqdm(jobs, desc="phantom", disable=not progress)]
    metadata = dict(results)
    atomic_write_text(root / LESION_METADATA, json.dumps(metadata, indent=1, allow_nan=False) + "\n")
    return [case_id for case_id, _ in results]
