"""The README's Python example runs as written and does what it says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_example_trains_a_step(capsys):
    blocks = python_blocks()
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out, hierarchy = namespace["out"], namespace["hierarchy"]
    assert set(out.losses) == {"self", "full"}
    assert out.loss.ndim == 0 and out.loss.item() > 0
    assert hierarchy.spaces["full"].class_head[-1].out_features == 10
    assert "'self'" in capsys.readouterr().out


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    commands = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:2]
    assert "opera run pretrain --hierarchy self,full" in commands[0]
    assert "pytest" in commands[1]
    assert "install_slurm.sh" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "readme_commands.py" in ci  # CI runs these very lines (tests/fidelity/test_commands_as_typed.py)
