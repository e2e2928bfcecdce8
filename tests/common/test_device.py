"""The memory a process may still take: what check_fits (heads, layer tables) compares against."""

import subprocess
import sys

from featcache.pipeline.common.device import cgroup_headroom


def test_a_cgroup_limit_bounds_the_memory_available(tmp_path):
    proc = tmp_path / "cgroup"
    (tmp_path / "job").mkdir()
    proc.write_text("0::/job\n")
    (tmp_path / "job" / "memory.max").write_text("1073741824\n")
    (tmp_path / "job" / "memory.current").write_text("268435456\n")
    assert cgroup_headroom(str(proc), str(tmp_path)) == 768 * 2**20  # v2: max - current
    (tmp_path / "job" / "memory.max").write_text("max\n")
    assert cgroup_headroom(str(proc), str(tmp_path)) is None  # no limit
    proc.write_text("4:memory:/elsewhere\n")  # v1, the group not mounted: the namespace root
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("2147483648\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("1073741824\n")
    assert cgroup_headroom(str(proc), str(tmp_path)) == 2**30
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "none"
    assert cgroup_headroom(str(proc), str(tmp_path)) is None


def test_an_address_space_ulimit_bounds_the_memory_available():
    code = ("import resource, torch\n"
            "from featcache.pipeline.common.device import available_bytes\n"
            "resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, resource.RLIM_INFINITY))\n"
            "print(available_bytes(torch.device('cpu')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 0 <= int(out.stdout) < 12 * 2**30
