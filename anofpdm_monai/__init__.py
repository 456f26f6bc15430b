"""AnoFPDM brain-MRI anomaly segmentation on MONAI (see README.md and docs/)."""

__version__ = "0.1.0"  # the one place the version is written; setup.cfg reads it (version = attr: ...)

__all__ = ["AnoFPDMModel", "InferenceSettings", "VolumeInferer", "segment", "__version__"]


def __getattr__(name: str):
    """The API (``am.segment``, ``am.AnoFPDMModel``, ...) is imported on first use: ``import anofpdm_monai`` stays light."""
    if name == "segment":
        from anofpdm_monai.api import segment

        return segment
    if name in ("AnoFPDMModel", "InferenceSettings"):
        from anofpdm_monai import model

        return getattr(model, name)
    if name == "VolumeInferer":
        from anofpdm_monai.inferers import VolumeInferer

        return VolumeInferer
    raise AttributeError(f"module 'anofpdm_monai' has no attribute {name!r}")
