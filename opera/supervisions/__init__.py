"""Task spaces, one module each: ``mask`` (Eq. 35-36), ``self`` (Eq. 34), ``full`` (Eq. 8-9).

Importing this package registers every built-in space in ``SPACES``.
"""

from opera.supervisions import class_space, instance, masked  # noqa: F401  (registration)
from opera.supervisions.base import SPACES, BuildContext, SpaceOutput, Stage, TaskSpace
from opera.supervisions.class_space import ARRANGEMENT_SOURCE, ClassOptions, ClassSpace
from opera.supervisions.instance import InstanceOptions, InstanceSpace
from opera.supervisions.masked import MaskedImageSpace, MaskOptions

__all__ = [
    "ARRANGEMENT_SOURCE",
    "SPACES",
    "BuildContext",
    "ClassOptions",
    "ClassSpace",
    "InstanceOptions",
    "InstanceSpace",
    "MaskOptions",
    "MaskedImageSpace",
    "SpaceOutput",
    "Stage",
    "TaskSpace",
]
