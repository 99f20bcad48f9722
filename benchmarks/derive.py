"""Derive and verify the built-in library and the examples, cold, and compare with dense SymPy differentiation.

    python benchmarks/derive.py [--json benchmarks/results/derive.json]

mcalc's times are measured in a fresh process (imports included); the dense
baseline differentiates the same forward functions entrywise with SymPy's
own ``Matrix.jacobian`` / ``hessian`` at small fixed sizes, which is what a
user without matrix calculus would do.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)

COLD = r"""
import time, json, sys
t0 = time.perf_counter()
import mcalc as mc
from mcalc.layers import LIBRARY
from mcalc.user_modules import load_modules
from mcalc.numeric.verify import verify_module
t_import = time.perf_counter() - t0
modules = list(LIBRARY) + load_modules(sys.argv[1])
rows, derivations = [], {}
t0 = time.perf_counter()
for m in modules:
    s = time.perf_counter(); d = mc.derive(m); d.rules(); derivations[m.name] = d
    rows.append({"module": m.name, "derive_s": time.perf_counter() - s})
t_derive = time.perf_counter() - t0
t0 = time.perf_counter()
for row, m in zip(rows, modules):
    s = time.perf_counter(); checks = verify_module(m, derivation=derivations[m.name])
    row["verify_s"] = time.perf_counter() - s; row["checks"] = len(checks); row["ok"] = all(c.ok for c in checks)
t_verify = time.perf_counter() - t0
print(json.dumps({"import_s": t_import, "derive_s": t_derive, "verify_s": t_verify, "modules": rows}))
"""


def dense_sympy_baseline(sizes: dict[str, int]) -> dict[str, float]:
    """Time SymPy's entrywise Jacobian + per-output Hessians of the same modules at fixed sizes."""
    import sympy as sp

    from mcalc.calculus.explicit import Expander
    from mcalc.layers import LIBRARY
    from mcalc.user_modules import load_modules

    out = {}
    for m in list(LIBRARY) + load_modules(ROOT / "examples" / "custom_layers.py"):
        names = {str(d) for s in m.symbols for e in s.shape for d in e.free_symbols}
        expand = Expander({n: sizes.get(n, 3) for n in names})
        start = time.perf_counter()
        z = list(expand(m.output))
        for v in m.variables:
            entries = list(expand(v))
            jac = sp.Matrix(z).jacobian(entries)
            jac.applyfunc(sp.simplify)
            for zk in z:
                sp.hessian(zk, entries).applyfunc(sp.simplify)
        out[m.name] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--skip-dense", action="store_true", help="skip the (slow) dense SymPy baseline")
    args = parser.parse_args()
    result = subprocess.run([sys.executable, "-c", COLD, str(ROOT / "examples" / "custom_layers.py")],
                            capture_output=True, text=True, check=True)
    cold = json.loads(result.stdout)
    print(f"cold import {cold['import_s']:.2f} s, derive all {cold['derive_s']:.2f} s, "
          f"verify all {cold['verify_s']:.2f} s")
    print(f"{'module':<14} {'derive ms':>10} {'verify ms':>10} {'checks':>7}  dense SymPy ms")
    dense = {} if args.skip_dense else dense_sympy_baseline({"n": 3, "m": 3, "r": 2})
    for row in cold["modules"]:
        d = dense.get(row["module"])
        ratio = f"{d * 1e3:10.0f}  ({d / row['derive_s']:.0f}× mcalc's derive)" if d else ""
        print(f"{row['module']:<14} {row['derive_s'] * 1e3:10.1f} {row['verify_s'] * 1e3:10.1f} "
              f"{row['checks']:>7}  {ratio}")
    if dense:
        total = sum(dense.values())
        print(f"dense SymPy total {total:.2f} s at n = m = 3 (mcalc's rules hold for every size)")
    if args.json:
        out = {"machine": describe(), "python": platform.python_version(),
               "cold": cold, "dense_sympy_s": dense}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
