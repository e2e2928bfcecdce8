"""The featcache under test is this checkout's: a second clone's setup must never re-point it."""

from pathlib import Path

import pytest

import featcache.cache
import featcache.pipeline


def test_featcache_resolves_inside_this_checkout():
    root = Path(__file__).resolve().parents[1]
    for package in (featcache.pipeline, featcache.cache):
        assert all(Path(p).resolve().is_relative_to(root) for p in package.__path__), package.__path__


def _shared_venv() -> Path | None:
    """The shared third-party venv this clone's venv sees (its .pth file names its site-packages)."""
    import sysconfig

    pth = Path(sysconfig.get_paths()["purelib"]) / "_featcache_shared.pth"
    return Path(pth.read_text().strip()).parents[2] if pth.exists() else None


def test_a_second_clone_never_re_points_the_first(tmp_path):
    """Two fresh clones each run setup's per-clone step (.ci/clone-venv.sh, as .ci/setup.sh does)
    over the shared venv; afterwards each clone's .venv imports featcache from its own tree.

    The shared venv and the system steps of setup.sh are what make it slow and are left out: the
    per-clone step is the part that decides which code a clone's ``featcache`` runs.
    """
    import os
    import subprocess

    base = _shared_venv()
    if base is None:
        if os.environ.get("CI"):
            raise AssertionError("CI installs with .ci/setup.sh, which writes _featcache_shared.pth")
        pytest.skip("this venv was not made by .ci/setup.sh")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FEATCACHE_HOME": str(tmp_path / "home"), "FEATCACHE_BASE_VENV": str(base),
           "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache/featcache/pip"))}
    env.pop("FEATCACHE_VENV", None)
    clones = [tmp_path / "first", tmp_path / "second"]
    probe = "import featcache.pipeline, featcache.cli; print(featcache.pipeline.__path__[0]); print(featcache.cli.__path__[0])"

    def imports_from(clone: Path) -> list[Path]:
        out = subprocess.run([str(clone / ".venv/bin/python"), "-c", probe], cwd=tmp_path, env=env,
                             capture_output=True, text=True, check=True)
        return [Path(line).resolve() for line in out.stdout.split()]

    for clone in clones:
        subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
        # The working tree's setup script, so the test checks the script under test even before a commit.
        (clone / ".ci/clone-venv.sh").write_bytes((root / ".ci/clone-venv.sh").read_bytes())
        subprocess.run(["bash", str(clone / ".ci/clone-venv.sh")], env=env, check=True, timeout=600)
        if clone == clones[0]:
            assert all(p.is_relative_to(clone) for p in imports_from(clone))
    first, second = imports_from(clones[0]), imports_from(clones[1])
    assert all(p.is_relative_to(clones[0]) for p in first), first  # still the first clone's code
    assert all(p.is_relative_to(clones[1]) for p in second), second
    assert (clones[0] / ".venv").resolve() != (clones[1] / ".venv").resolve()
    assert (tmp_path / "home").resolve() in (clones[0] / ".venv").resolve().parents
