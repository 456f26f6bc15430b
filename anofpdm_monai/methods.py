"""The registry of methods ``segment`` and ``evaluate`` know, found by name.

A method is one :class:`Method` entry: its name, how it runs (``kind``: an AnoFPDM decision
variant on the shared forward process of its encoding, or a baseline), whether anything of it is
tuned with pixel labels (then the summary marks it with a dagger and says why, from
``footnote``). Adding an AnoFPDM variant is one decision function plus one :func:`register` call;
the volume family was added that way (``anofpdm_monai.volume_mode``).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("anofpdm", "ddib", "threshold")


@dataclass(frozen=True)
class Method:
    """One method.

    Attributes:
        name: the name on the command line (``--method``, ``--methods``).
        kind: ``"anofpdm"`` (a decision variant of the forward process), ``"ddib"`` or ``"threshold"``.
        description: one line for the docs and ``--help``.
        encoding: AnoFPDM only: ``"ddim"`` or ``"ddpm"``.
        variant: AnoFPDM only: the decision variant (``"aggregated"``, ``"last"``, ``"volume"``).
        uses_pixel_labels: something of the method is tuned on pixel labels (not label-free).
        footnote: for such a method, what was tuned on them.
    """

    name: str
    kind: str
    description: str
    encoding: str | None = None
    variant: str | None = None
    uses_pixel_labels: bool = False
    footnote: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} must be one of {KINDS}")
        if (self.kind == "anofpdm") != (self.encoding is not None and self.variant is not None):
            raise ValueError(f"method {self.name!r}: an anofpdm method names its encoding and variant, others none")
        if self.uses_pixel_labels and not self.footnote:
            raise ValueError(f"method {self.name!r}: say in its footnote what is tuned on pixel labels")


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name is registered once)."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered already")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; a ValueError listing the known names otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {list(REGISTRY)}")
    return REGISTRY[name]


def anofpdm_methods() -> dict[str, tuple[str, str]]:
    """``{name: (encoding, variant)}`` of the AnoFPDM methods, in registration order."""
    return {m.name: (m.encoding, m.variant) for m in REGISTRY.values() if m.kind == "anofpdm"}


for _encoding in ("ddim", "ddpm"):
    register(Method(f"anofpdm-{_encoding}", "anofpdm", f"the paper's AnoFPDM, {_encoding.upper()} encoding, per-slice decisions on the aggregated map", _encoding, "aggregated"))
    register(Method(f"anofpdm-{_encoding}-last", "anofpdm", f"as anofpdm-{_encoding} on the sub-anomaly map at t_e only", _encoding, "last"))
    register(Method(f"anofpdm-{_encoding}-volume", "anofpdm", f"the volume family on the {_encoding.upper()} forward process: brain-pixel threshold, 3-D components in mm^3, calibrated health statistic", _encoding, "volume"))
register(Method("ddib", "ddib", "DDIB-style classifier-free reconstruction on the same model", uses_pixel_labels=True,
                footnote="ddib's threshold is tuned on validation masks"))  # fmt: skip
register(Method("threshold", "threshold", "the oracle intensity threshold of the map channels' mean", uses_pixel_labels=True,
                footnote="threshold is the oracle intensity cut, tuned on the evaluated slices themselves (an upper bound)"))  # fmt: skip
