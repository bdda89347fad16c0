"""Task spaces, one module each: ``mask`` (Eq. 35-36), ``self`` (Eq. 34), ``full`` (Eq. 8-9), ...

Importing this package imports every module in it, which registers its spaces in ``SPACES``: a
new space is a new file here, with nothing to add elsewhere.
"""

import importlib
import pkgutil

from opera.supervisions.base import NO_LABEL, SPACES, BuildContext, Progress, SpaceOutput, Stage, TaskSpace
from opera.supervisions.class_space import ARRANGEMENT_ROLE, ClassOptions, ClassSpace
from opera.supervisions.instance import InstanceOptions, InstanceSpace
from opera.supervisions.masked import MaskedImageSpace, MaskOptions

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ARRANGEMENT_ROLE",
    "NO_LABEL",
    "SPACES",
    "BuildContext",
    "ClassOptions",
    "ClassSpace",
    "InstanceOptions",
    "InstanceSpace",
    "MaskOptions",
    "MaskedImageSpace",
    "Progress",
    "SpaceOutput",
    "Stage",
    "TaskSpace",
]
