"""A result names the code that made it: the commit of the checkout, '+dirty' when its tracked files changed
or the package has files git does not know."""

import subprocess

import hssl_cli
from hssl_cli.sweep.provenance import source_commit


def _git(root, *args):
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_commit_and_dirty_mark_of_the_checkout_holding_the_package(tmp_path, monkeypatch):
    package = tmp_path / "hssl_cli"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (tmp_path / "README.md").write_text("x\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(hssl_cli, "__file__", str(package / "__init__.py"))
    commit = _git(tmp_path, "rev-parse", "HEAD")
    assert source_commit() == commit
    (tmp_path / "notes.txt").write_text("untracked outside the package: not code that runs\n")
    assert source_commit() == commit
    (package / "new_module.py").write_text("")
    assert source_commit() == f"{commit}+dirty"
    (package / "new_module.py").unlink()
    (tmp_path / "README.md").write_text("changed\n")
    assert source_commit() == f"{commit}+dirty"
