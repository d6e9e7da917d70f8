"""README.md says what the tool does: the two set-up commands, the commands, the family table."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from fusemoe_ckpt.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _families_table_module():
    spec = importlib.util.spec_from_file_location("families_table", ROOT / "scripts" / "families_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_starts_with_the_two_setup_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert README.index("```bash") < README.index("\n## ")
    for command in commands:
        assert (ROOT / command.split()[1]).is_file()


def test_ci_runs_the_readme_test_command():
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_command_is_documented():
    for name in cli.commands:
        assert f"`fusemoe-ckpt {name}" in README, name


def test_family_table_matches_the_family_rules():
    module = _families_table_module()
    expected = module.render(module.tested_model_types())
    start, end = README.index(module.START), README.index(module.END) + len(module.END)
    assert README[start:end] == expected, "run: python scripts/families_table.py --write"


def test_every_convert_option_is_in_the_options_table():
    table = README[README.index("`convert` options:") :]
    table = table[: table.index("\n\n", table.index("| option |"))]
    for param in cli.commands["convert"].params:
        if param.param_type_name == "option" and param.name != "help":
            flag = max(param.opts, key=len)
            assert f"| `{flag}" in table, flag
