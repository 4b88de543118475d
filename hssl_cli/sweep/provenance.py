"""Which code made a result: the hssl version and the git commit of the source tree it was imported from
(with `+dirty` when tracked files differ from that commit). A table in docs/ names the commits of its cells,
so "tables come from today's code" can be checked rather than asserted."""

from __future__ import annotations

import subprocess
from pathlib import Path

import hssl_cli


def source_commit() -> str | None:
    """`<40-hex commit>` or `<commit>+dirty` (tracked files changed, or files under hssl_cli/ git does not know)
    of the checkout holding this hssl_cli; None outside git."""
    root = Path(hssl_cli.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        # a module not yet added to git runs too: new files of the package make the tree dirty as well
        changed += subprocess.run(["git", "-C", str(root), "ls-files", "--others", "--exclude-standard", "hssl_cli"],
                                  capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if changed else commit


def provenance() -> dict[str, str | None]:
    return {"hssl_version": hssl_cli.__version__, "commit": source_commit()}


def describe_commits(results: list[dict]) -> str:
    """'hssl 0.1.0 at commit 1a2b3c4 (12 cells)' for the cells of a report, each distinct commit named."""
    counts: dict[str, int] = {}
    for result in results:
        made = result.get("provenance") or {}
        commit = made.get("commit")
        name = f"hssl {made.get('hssl_version', '?')} at " + (
            f"commit {commit[:10]}{'+dirty' if commit.endswith('+dirty') else ''}" if commit
            else "an unknown commit")
        counts[name] = counts.get(name, 0) + 1
    return "; ".join(f"{name} ({count} cell{'s' if count > 1 else ''})" for name, count in counts.items())
