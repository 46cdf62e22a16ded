"""Writing a conversion's output so that no failure, and no unlucky choice of paths, destroys
data: the output is built in a fresh directory beside its destination and swapped in only when
complete, and the only paths ever deleted are the ones created here (by `tempfile.mkdtemp`, so
their names cannot be those of anything that was already there, such as `OUT.tmp` or
`OUT.old` holding the very checkpoint being converted)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def overlap(a: Path, b: Path) -> bool:
    """Whether one of two resolved paths is, or is inside, the other."""
    return a == b or a in b.parents or b in a.parents


def staging_dir(target: Path) -> Path:
    """A new, empty directory beside `target`, unique to this call, to build its replacement
    in. Hidden (`.NAME.tmp-XXXX`) so that a crash leaves nothing that looks like output."""
    path = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    # mkdtemp makes it private (0700); the output should get what a plain mkdir would give
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    return path


def replace_dir(staged: Path, target: Path) -> None:
    """Move the complete `staged` directory to `target`. An existing `target` is first renamed
    into a fresh directory beside it and deleted only once `staged` is in place: at every
    moment either the old or the new output is whole at `target` or beside it."""
    if not target.exists():
        staged.rename(target)
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    target.rename(aside / target.name)
    try:
        staged.rename(target)
    except BaseException:
        (aside / target.name).rename(target)
        aside.rmdir()
        raise
    shutil.rmtree(aside)
