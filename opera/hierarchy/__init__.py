"""The supervision hierarchy: task spaces stacked over a backbone (Eq. 8-9, Eq. 35-36)."""

from opera.hierarchy.hierarchy import ARRANGEMENTS, HierarchyOutput, SupervisionHierarchy, parse_spec

__all__ = ["ARRANGEMENTS", "HierarchyOutput", "SupervisionHierarchy", "parse_spec"]
