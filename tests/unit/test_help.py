"""The table VARIABLES in common_s3: every variable Config.from_env reads has a row, each script's
--help lists exactly its rows, and KNOWN_VARIABLES (the near-miss warnings) and the required
variables come from the same table."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

import common_s3
import master_mapper
import python_unzipper
import python_zipper
from common_s3 import KNOWN_VARIABLES, VARIABLES, Config, ConfigError

SCRIPTS = {"mapper": master_mapper, "zipper": python_zipper, "unzipper": python_unzipper}
READERS = ("env_str", "env_bool", "env_number")


def from_env_sources() -> list[str]:
    """The source of Config.from_env and of the ``_env_*`` helpers it calls."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(Config.from_env)))
    helpers = sorted({n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)
                      and isinstance(n.func, ast.Name) and n.func.id.startswith("_env_")})
    return [inspect.getsource(Config.from_env)] + [inspect.getsource(getattr(common_s3, h)) for h in helpers]


def variables_read_everywhere() -> set[str]:
    return set().union(*(variables_read(src) for src in from_env_sources()))


def variables_read(source: str) -> set[str]:
    """The variable names a from_env reads: the name argument of env_str/env_bool/env_number, and
    environ.get(...) / environ[...]. A name held in a local (WORKER_INDEX's stand-ins) counts as
    every string the local is bound from; anything else fails, so no read goes unchecked."""
    func = ast.parse(textwrap.dedent(source)).body[0]
    bindings: dict[str, list[ast.AST]] = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    bindings.setdefault(target.id, []).append(node.value)
        elif isinstance(node, ast.comprehension) and isinstance(node.target, ast.Name):
            bindings.setdefault(node.target.id, []).append(node.iter)

    def names(arg: ast.AST) -> set[str]:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return {arg.value}
        if isinstance(arg, ast.Name) and arg.id in bindings:
            return {n.value for value in bindings[arg.id] for n in ast.walk(value)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        raise AssertionError(f"from_env reads a variable this test cannot name: {ast.unparse(arg)}")

    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == "environ"

    found: set[str] = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in READERS:
            name_arg = node.args[1] if len(node.args) > 1 else next(k.value for k in node.keywords
                                                                      if k.arg == "name")
            found |= names(name_arg)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and is_environ(node.func.value)):
            found |= names(node.args[0])
        elif isinstance(node, ast.Subscript) and is_environ(node.value):
            found |= names(node.slice)
    return found


def help_names(script: str, capsys) -> list[str]:
    """The names in the name column of the script's --help variable list, in order."""
    assert SCRIPTS[script].main(argv=["--help"], environ={}) == 0
    out = capsys.readouterr().out
    section = out.split("Environment variables (default in brackets):\n", 1)[1].split("\n\n", 1)[0]
    listed = []
    for line in section.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            listed += line[2:].split("  ", 1)[0].split(", ")
    return listed


def shown(script: str) -> list[str]:
    return [name for var in VARIABLES if script in var.scripts for name in var.names]


def test_every_variable_from_env_reads_has_a_row():
    read = variables_read_everywhere()
    assert {"S3_BUCKET", "MAX_DELETE", "S3_PREFIX", "LOG_FORMAT", "JOB_COMPLETION_INDEX"} <= read
    assert read - set(KNOWN_VARIABLES) == set()


def test_a_variable_without_a_row_is_caught():
    source = inspect.getsource(Config.from_env).replace(
        'env_bool(environ, "SKIP_UPLOAD")', 'env_bool(environ, "SKIP_UPLOAD") or env_bool(environ, "NEW_ONE")')
    assert "NEW_ONE" in source
    assert variables_read(source) - set(KNOWN_VARIABLES) == {"NEW_ONE"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_lists_exactly_the_scripts_rows(capsys, script):
    listed = help_names(script, capsys)
    assert listed == shown(script)
    assert len(listed) == len(set(listed)), "a variable is listed twice"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_puts_the_variables_between_usage_and_example(capsys, script):
    SCRIPTS[script].main(argv=["--help"], environ={})
    out = capsys.readouterr().out
    assert out.index("Usage:") < out.index("Environment variables") < out.index("Example:") < out.index("Exit codes:")
    assert "Environment variables" not in SCRIPTS[script].__doc__, "a hand-written list is back in the docstring"
    assert max(len(line) for line in out.splitlines()) <= 103


def test_known_variables_are_the_tables_names():
    names = {name for var in VARIABLES for name in var.names}
    assert set(KNOWN_VARIABLES) == names
    assert len(KNOWN_VARIABLES) == len(names)
    assert {"JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX", "AWS_DEFAULT_REGION"} <= names


def test_rows_are_consistent():
    defaults: dict[str, str] = {}
    for var in VARIABLES:
        assert set(var.scripts) <= {"mapper", "zipper", "unzipper", "migrate"}
        assert set(var.required) <= set(var.scripts), f"{var.name} is required where --help does not show it"
        for script in var.scripts:
            assert var.meaning_for(script)
        if var.default is not None and len(var.names) > 1:
            values = var.default.split(", ")
            assert len(values) == len(var.names), f"{var.name}: one default per name"
            for name, value in zip(var.names, values):
                assert defaults.setdefault(name, value) == value, f"{name} has two defaults"
        elif var.default is not None:
            assert defaults.setdefault(var.name, var.default) == var.default, f"{var.name} has two defaults"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_required_in_help_is_required_by_from_env(tmp_path, script):
    required = [name for var in VARIABLES if script in var.required for name in var.names]
    assert required == list(common_s3._REQUIRED[script])
    env = {"WORK_DIR": str(tmp_path), "DESTINATION": "dst:", **{name: "value" for name in required}}
    env["S3_BUCKET"] = "unit-bucket"
    Config.from_env(env, script)
    for name in required:
        with pytest.raises(ConfigError, match=f"{name} is required"):
            Config.from_env({k: v for k, v in env.items() if k != name}, script)


def test_variables_help_layout():
    lines = common_s3.variables_help("zipper").splitlines()
    assert lines[0] == "Environment variables (default in brackets):"
    assert "  S3_BUCKET                hub bucket [required]" in lines
    aws = lines.index("  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION")
    assert lines[aws + 1] == " " * 27 + "credentials and region, through boto3's normal chain"
    count = next(i for i, line in enumerate(lines) if line.startswith("  WORKER_COUNT "))
    assert lines[count][27:].startswith("workers of this stage at once")
    assert lines[count + 1] == " " * 27 + "ignores conditional writes (else claims need no count) [1]"
    assert "  DESTINATION              rclone remote:path or local path to migrate to [required unless SKIP_UPLOAD]" \
        in common_s3.variables_help("unzipper").splitlines()
