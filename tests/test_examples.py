"""The examples run: the custom layers verify, and the paper's CIFAR-10 experiment runs its table (smoke)."""
import subprocess
import sys

from conftest import ROOT


def test_cifar10_example_prints_the_papers_table():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "cifar10_hbp.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("SGD", "CG"))]
    assert len(rows) == 8
    assert rows[0].split()[1] == "0.406" and rows[2].split()[2] == "0.488"  # the authors' numbers beside ours
