"""Imports every service's models so ``Base.metadata`` describes the whole schema."""

from simral.archive import models as archive_models
from simral.audit import models as audit_models
from simral.compression import models as compression_models
from simral.db.base import Base
from simral.dmp import models as dmp_models
from simral.identity import models as identity_models
from simral.jobs import models as jobs_models
from simral.lifecycle import models as lifecycle_models
from simral.nodes import models as nodes_models
from simral.patients import models as patients_models
from simral.preservation import models as preservation_models
from simral.reading import models as reading_models
from simral.sharing import models as sharing_models

__all__ = [
    "Base",
    "archive_models",
    "audit_models",
    "compression_models",
    "dmp_models",
    "identity_models",
    "jobs_models",
    "lifecycle_models",
    "nodes_models",
    "patients_models",
    "preservation_models",
    "reading_models",
    "sharing_models",
]
