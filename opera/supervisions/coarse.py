"""The coarse class space ``coarse``: the hierarchy carried one level further (§3.2).

OPERA orders supervisions by strength, weakest at the base: instance (``self``) < class (``full``),
Y^full = h(Y^self). A coarser label set (superclasses) groups the classes, so it is a weaker-still
form of *class* supervision that must agree with every fine class it contains; the paper's
argument for placing stronger supervision higher (Eq. 8, "a hierarchy of representations")
extends to instance < fine class < coarse class, each space a mapping of the one below:

    Y^coarse = h'(Y^full),    J^coarse = weight * sum_views CE(h'(Y^full_i), c)

with c the image's label in the data's ``coarse`` label set (``-1``: none; the mean is over the
labelled samples of the global batch, as for ``full``). h' is the same MLP as ``full``'s class
head. Without ``full`` below, ``coarse`` is placed by the arrangement as ``full`` would be.

Label sets: digits groups its digits by glyph shape (``opera.data.datasets.DIGITS_COARSE``);
any other data needs a ``coarse`` label set, else building the hierarchy says so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from opera.fields import option
from opera.supervisions.base import SPACES
from opera.supervisions.class_space import ClassOptions, ClassSpace


@dataclass
class CoarseOptions(ClassOptions):
    """``full``'s options, supervised by the ``coarse`` label set."""

    labels: str = option("coarse", help="the data's label set this space is supervised with")


@SPACES.register("coarse")
class CoarseClassSpace(ClassSpace):
    """A class space on the coarse label set, stacked on the fine class space."""

    name = "coarse"
    level = 3
    Options = CoarseOptions
