"""The git repository the comparison tools read runs from: checked before DVC or git is
asked, so that a folder without git, a repository without commits or a misspelt revision is
one line saying what to do (DVC would raise a clone error and leave a temporary clone)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=False, timeout=60
    )


def require_revisions(repo: Path, revs: list[str], tool: str) -> None:
    """Raise unless `repo` is a git repository with commits in which every rev resolves.

    Raises:
        ValueError: naming the folder or revision and what to do.
    """
    where = Path(repo).resolve()
    if _git(repo, "rev-parse", "--git-dir").returncode != 0:
        raise ValueError(
            f"{where}: not a git repository; `medpipe {tool}` reads runs recorded in git "
            "(git init && dvc init, commit the project, then dvc repro or dvc exp run)"
        )
    if _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}").returncode != 0:
        raise ValueError(
            f"{where}: the git repository has no commits yet; `medpipe {tool}` reads runs "
            "recorded in git (git add -A && git commit -m 'baseline', then dvc repro or "
            "dvc exp run)"
        )
    for rev in revs:
        if _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").returncode != 0:
            raise ValueError(
                f"{rev!r}: no such git revision in {where} (a branch, tag or commit, e.g. "
                "main, HEAD~1; `git branch -a` lists branches)"
            )
