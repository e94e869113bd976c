"""The shape the code keeps (docs/DESIGN.md, "Shape of the code"): no function of the four files
over 80 lines or with more than 7 arguments, and no S3 request outside ``Records`` (and the
``MultipartUpload`` it hands out)."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = ("common_s3.py", "master_mapper.py", "python_zipper.py", "python_unzipper.py", "migrate.py")
S3_OWNERS = {"Records", "MultipartUpload"}


def tree(name: str) -> ast.Module:
    with open(os.path.join(ROOT, name), encoding="utf-8") as fh:
        return ast.parse(fh.read(), name)


def functions(module: ast.Module):
    for node in ast.walk(module):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def arguments(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    return names + (["*" + a.vararg.arg] if a.vararg else []) + (["**" + a.kwarg.arg] if a.kwarg else [])


@pytest.mark.parametrize("name", FILES)
def test_functions_are_short_and_narrow(name):
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in functions(tree(name)) if f.end_lineno - f.lineno >= 80]
    wide = [(f.name, len(arguments(f))) for f in functions(tree(name)) if len(arguments(f)) > 7]
    assert long == [], f"functions over 80 lines in {name}"
    assert wide == [], f"functions with more than 7 arguments in {name}"


def s3_calls_outside_records(module: ast.Module) -> list[str]:
    """``<anything>.s3.<method>`` reached from outside the classes that own the client."""
    found = []

    def visit(node: ast.AST, owner: str | None) -> None:
        if isinstance(node, ast.ClassDef):
            owner = node.name
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "s3" and owner not in S3_OWNERS):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        for child in ast.iter_child_nodes(node):
            visit(child, owner)
    visit(module, None)
    return found


@pytest.mark.parametrize("name", FILES)
def test_no_s3_request_outside_records(name):
    assert s3_calls_outside_records(tree(name)) == []


def test_the_s3_check_finds_a_call_outside_records():
    module = ast.parse("class Claims:\n    def f(self):\n        return self.records.s3.get_object(Key='k')\n")
    assert s3_calls_outside_records(module) == ["line 3: self.records.s3.get_object"]
