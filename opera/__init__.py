"""opera: omni-supervised representation learning with hierarchical supervisions (OPERA).

The package mirrors the paper: ``opera.supervisions`` holds one module per task space
(``mask``, ``self``, ``full``), ``opera.hierarchy`` stacks them over a backbone
(Eq. 8-9, Eq. 35-36), ``opera.backbones`` builds the backbones by name.
"""

__version__ = "0.1.0"

from opera.errors import OperaError  # noqa: E402,F401
