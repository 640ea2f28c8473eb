"""QuMoS error hierarchy.

    QumosError
    ├── DesignError          an invalid model or fragment description (names the field)
    ├── ArtifactError        a corrupted, mismatched or missing artifact
    ├── DatasetError         unknown dataset/task, or data files missing
    └── AttackError          an attack that cannot run (e.g. not a provider directory)

Services map these to JSON error responses; the CLI prints them without a traceback.
"""

from __future__ import annotations


class QumosError(Exception):
    """Base class of every error QuMoS raises on purpose."""


class DesignError(QumosError, ValueError):
    """An invalid design: the message names the field and what is allowed."""


class ArtifactError(QumosError):
    """An artifact that cannot be loaded: the message says which file and why."""


class DatasetError(QumosError):
    """An unknown dataset or task, or data files that are missing."""


class AttackError(QumosError):
    """An attack that cannot run as asked."""
