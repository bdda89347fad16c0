"""Print one of the README's two opening commands (``main`` or ``test``), exactly as written.

They are the first two ```bash blocks under "## Two commands on a fresh machine"; ``.ci/run``
executes what this prints, so CI runs the README's lines themselves and the two cannot drift.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SECTION = "## Two commands on a fresh machine"


def commands(readme: str) -> dict[str, str]:
    if SECTION not in readme:
        raise SystemExit(f"README.md has no section {SECTION!r}")
    body = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    if len(blocks) < 2:
        raise SystemExit(f"README.md's {SECTION!r} holds {len(blocks)} bash blocks; it needs two (main job, tests)")
    return {"main": blocks[0].strip(), "test": blocks[1].strip()}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: readme_commands.py README.md main|test")
    cmds = commands(Path(sys.argv[1]).read_text())
    if sys.argv[2] not in cmds:
        raise SystemExit(f"usage: readme_commands.py README.md {'|'.join(cmds)}")
    print(cmds[sys.argv[2]])
