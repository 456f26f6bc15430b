"""Synthetic brain-MRI cohorts with ground truth, built from the MNI152 template nilearn ships.

Every case is a fresh anatomy: the MNI152 grey-matter, white-matter and CSF maps are pushed
through a random affine transform, a smooth elastic displacement and the mass effect of any
lesion, then turned into MR contrasts from a per-case-jittered table of tissue intensities
(shared/PHANTOM.md), blurred at tissue borders, multiplied by a smooth bias field and given
Rician noise. Lesions are drawn in the case's own space:

* ``brats``: tumours with a necrotic core (label 1), an irregular enhancing rim (4) and
  oedema (2) that spreads along white matter, on FLAIR, T1, T1ce and T2, 240 x 240 x 155 at 1 mm,
  stored the way BraTS21 ships them (LPS voxel order, int16).
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


class PhantomCase:
    """Build one synthetic case on an output grid.

    Args:
        layout: ``brats`` or ``atlas``.
        n_lesions: number of lesions (0 for a healthy case).
        seed: per-case seed; the same seed gives the same case.
    """

    def __init__(self, layout: str, n_lesions: int, seed: int) -> None:
        if layout not in ("brats", "atlas"):
            raise ValueError(f"layout={layout!r}; choose 'brats' or 'atlas'")
        self.layout = layout
        self.n_lesions = n_lesions
        self.rng = np.random.default_rng(seed)
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
            if self.layout != "brats":
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
        memberships: dict[int, torch.Tensor] = {}
        for lesion in lesions:
            level = self._lesion_level(world, lesion)
            for label, member in self._lesion_parts(level, lesion, tissue).items():
                memberships[label] = memberships.get(label, torch.zeros(self.shape, dtype=torch.bool)) | (member & brain)
        labels = torch.zeros(self.shape, dtype=torch.uint8)
        for label in (2, 1, 4):  # BraTS priority: enhancing over necrosis over oedema (ATLAS has label 1 only)
            if label in memberships:
                labels[memberships[label]] = label
        images = self._contrast(tissue, labels, brain)
        return {name: self._paste(img.numpy()) for name, img in images.items()}, self._paste(labels.numpy())

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

    def _contrast(self, tissue: torch.Tensor, labels: torch.Tensor, brain: torch.Tensor) -> dict[str, torch.Tensor]:
        """MR channels from tissue maps and labels, with partial volume, texture, bias field, noise."""
        wm, gm, csf, _ = tissue
        total = (wm + gm + csf).clamp_min(1e-3)
        fractions = {"wm": wm / total, "gm": gm / total, "csf": csf / total}
        label_values = [1, 2, 4] if self.layout == "brats" else [1]
        soft = _gaussian_blur(torch.stack([(labels == v).float() for v in label_values]), 0.8)
        # Oedema infiltrates: how much of a voxel's signal it replaces varies in space.
        infiltration = (0.9 + 0.15 * _smooth_noise(self.shape, 12, self.rng)).clamp(0.5, 1.0)
        atlas_cavity = self.rng.uniform(0.25, 0.40)
        atlas_rim = self.rng.uniform(0.55, 0.70)
        images = {}
        for name in self.channels:
            jitter = {k: v * self.rng.uniform(0.9, 1.1) for k, v in TISSUE_CONTRAST[name].items()}
            image = sum(fractions[k] * jitter[k] for k in TISSUES)
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
            images[name] = torch.where(brain, image, torch.zeros(())) * (1000.0 * self.rng.uniform(0.8, 1.2))
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


def write_case(layout: str, root: Path, index: int, n_lesions: int, seed: int) -> str:
    """Generate case ``index`` of a cohort and write it in the real dataset's layout; return its id."""
    from anofpdm_monai.io import _atomic_write

    paths = brats_case_paths if layout == "brats" else atlas_case_paths
    case_id, channel_paths, label_path = paths(root, index)
    phantom = PhantomCase(layout, n_lesions, seed)
    images, labels = phantom.generate()

    def save(array: np.ndarray, path: Path, dtype: type) -> None:
        image = nib.Nifti1Image(array.astype(dtype), phantom.affine)
        image.header.set_xyzt_units("mm", "sec")
        image.set_qform(phantom.affine, code=1)
        image.set_sform(phantom.affine, code=1)
        _atomic_write(path, lambda tmp: nib.save(image, str(tmp)))

    for name, path in channel_paths.items():
        save(np.round(images[name]), path, np.int16)
    save(labels, label_path, np.uint8)
    return case_id


def generate_cohort(
    out_dir: str | Path,
    layout: str,
    cases: int,
    healthy_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> list[str]:
    """Write a phantom cohort of ``cases`` patients; a fraction ``healthy_fraction`` carries no lesion.

    Case ``i`` of a cohort with seed ``s`` is seeded by ``(s, i)``, so cohorts with different seeds
    never share an anatomy and rerunning a cohort reproduces it file for file.
    """
    from tqdm import tqdm

    if cases < 1:
        raise ValueError(f"cases={cases} must be at least 1")
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ValueError(f"healthy_fraction={healthy_fraction} must lie in [0, 1]")
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    healthy = set(rng.choice(cases, size=int(round(healthy_fraction * cases)), replace=False).tolist())
    max_lesions = 3 if layout == "brats" else 4
    jobs = []
    for i in range(cases):
        n_lesions = 0 if i in healthy else int(rng.integers(1, max_lesions + 1))
        case_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        jobs.append((layout, root, i, n_lesions, case_seed))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(write_case, *job) for job in jobs]
            return [f.result() for f in tqdm(futures, desc="phantom", disable=not progress)]
    return [write_case(*job) for job in tqdm(jobs, desc="phantom", disable=not progress)]
