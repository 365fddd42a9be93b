"""lib.provenance: the git state of a checkout (in throw-away repositories) and the environment record."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

import pytest
import torch

from lib.provenance import environment, git_state


def _git(root, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args], cwd=root,
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """``tmp_path/repo``, with git unable to see any repository above ``tmp_path`` and no ``LLA_GIT_SHA``."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.delenv("LLA_GIT_SHA", raising=False)
    root = tmp_path / "repo"
    root.mkdir()
    return root


@pytest.fixture
def repo(isolated):
    """A repository with one commit of ``a.txt`` and ``_freeze/kept.txt``."""
    _git(isolated, "init", "-q")
    (isolated / "a.txt").write_text("one\n")
    (isolated / "_freeze").mkdir()
    (isolated / "_freeze" / "kept.txt").write_text("frozen\n")
    _git(isolated, "add", "a.txt", "_freeze/kept.txt")
    _git(isolated, "commit", "-q", "-m", "first")
    return isolated


def test_git_state_clean_then_dirty(repo):
    sha = _git(repo, "rev-parse", "HEAD")
    assert len(sha) == 40 and git_state(repo) == {"git_sha": sha, "git_dirty": False}
    (repo / "a.txt").write_text("two\n")  # a modified tracked file
    assert git_state(repo) == {"git_sha": sha, "git_dirty": True}
    _git(repo, "checkout", "-q", "--", "a.txt")
    (repo / "new.txt").write_text("untracked\n")  # an untracked file counts too
    assert git_state(repo)["git_dirty"] is True


def test_git_state_ignores_freeze(repo):
    """A run rewrites _freeze/ itself: changed or new files there leave the checkout clean."""
    (repo / "_freeze" / "kept.txt").write_text("rewritten\n")
    (repo / "_freeze" / "new.csv").write_text("a\n1\n")
    assert git_state(repo)["git_dirty"] is False


def test_git_state_sha_follows_new_commits(repo):
    first = git_state(repo)["git_sha"]
    (repo / "a.txt").write_text("two\n")
    _git(repo, "commit", "-q", "-am", "second")
    second = git_state(repo)
    assert second == {"git_sha": _git(repo, "rev-parse", "HEAD"), "git_dirty": False} and second["git_sha"] != first


def test_git_state_without_git_uses_the_environment(isolated, monkeypatch):
    """A copy of the working tree without .git: the commit comes from LLA_GIT_SHA, dirtiness unknown;
    without the variable nothing is known."""
    (isolated / "a.txt").write_text("one\n")
    assert git_state(isolated) == {"git_sha": None, "git_dirty": None}
    monkeypatch.setenv("LLA_GIT_SHA", "0123456789abcdef0123456789abcdef01234567")
    assert git_state(isolated) == {"git_sha": "0123456789abcdef0123456789abcdef01234567", "git_dirty": None}


def test_git_state_prefers_the_repository_over_the_environment(repo, monkeypatch):
    monkeypatch.setenv("LLA_GIT_SHA", "f" * 40)
    assert git_state(repo) == {"git_sha": _git(repo, "rev-parse", "HEAD"), "git_dirty": False}


@pytest.fixture
def nested(isolated):
    """``repo/project``: a copy of a project tree (no ``.git`` of its own) inside a repository with
    one commit, as when the working tree is unpacked in some other checkout."""
    _git(isolated, "init", "-q")
    (isolated / "outer.txt").write_text("outer\n")
    _git(isolated, "add", "outer.txt")
    _git(isolated, "commit", "-q", "-m", "outer")
    project = isolated / "project"
    (project / "lib").mkdir(parents=True)
    (project / "lib" / "__init__.py").write_text("")
    (project / "_quarto.yml").write_text("project: {}\n")
    return project


def test_git_state_ignores_an_enclosing_repository(nested, monkeypatch):
    """git would report the outer repository's commit, dirty because the copy is untracked there:
    neither describes the project, so nothing is recorded, or the commit given in LLA_GIT_SHA."""
    outer = _git(nested.parent, "rev-parse", "HEAD")
    assert _git(nested, "rev-parse", "HEAD") == outer  # what git alone would record
    assert git_state(nested) == {"git_sha": None, "git_dirty": None}
    assert environment(nested)["git_sha"] is None
    monkeypatch.setenv("LLA_GIT_SHA", "0123456789abcdef0123456789abcdef01234567")
    assert git_state(nested) == {"git_sha": "0123456789abcdef0123456789abcdef01234567", "git_dirty": None}


def test_git_state_of_a_repository_nested_in_another(nested, monkeypatch):
    """The project with its own repository inside another one: its own commit and state."""
    monkeypatch.setenv("LLA_GIT_SHA", "f" * 40)
    _git(nested, "init", "-q")
    _git(nested, "add", ".")
    _git(nested, "commit", "-q", "-m", "project")
    assert git_state(nested) == {"git_sha": _git(nested, "rev-parse", "HEAD"), "git_dirty": False}
    assert git_state(nested)["git_sha"] != _git(nested.parent, "rev-parse", "HEAD")


def test_git_state_through_a_symlinked_root(repo, tmp_path):
    """A root reached through a symlink is still the repository's top level (paths are resolved)."""
    link = tmp_path / "link"
    link.symlink_to(repo, target_is_directory=True)
    assert git_state(link) == {"git_sha": _git(repo, "rev-parse", "HEAD"), "git_dirty": False}


def test_environment_records_git_device_and_versions(repo):
    env = environment(repo)
    assert set(env) == {"git_sha", "git_dirty", "device", "versions"}
    assert (env["git_sha"], env["git_dirty"]) == (_git(repo, "rev-parse", "HEAD"), False)
    expected_device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    assert env["device"] == expected_device
    assert set(env["versions"]) == {"python", "torch", "timm", "peft", "laplace-torch", "torch_build"}
    # the installed distribution's version, and the build with its local tag (e.g. "+cu130")
    assert env["versions"]["torch"] == metadata.version("torch") == torch.__version__.split("+")[0]
    assert env["versions"]["torch_build"] == torch.__version__
    assert env["versions"]["python"] == platform.python_version()
