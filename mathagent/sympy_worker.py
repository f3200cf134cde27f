r"""The sympy worker: the child process that decides the comparisons the strings cannot (step 4 of
`grading.py`).

It reads one JSON request per line on stdin ({"gold", "pred", "rel_tol", "abs_tol"}: two normalized
single-value answers) and writes one answer per line on stdout ({"equal": bool}, with "error": "unparsed",
"oversize" or an exception's name when it could not decide). `sympy_pool.py` starts it, gives each request a
deadline and kills it past that deadline, which is why this runs in a process of its own: a runaway sympy
call can be stopped from any thread (math-verify's signal.alarm timeouts work only in the main thread).

How it compares, with latex2sympy2_extended as the parser:
- exact numbers (radicals, pi, factorials) exactly when small and to 60 significant digits otherwise, never
  with an absolute tolerance (1/2004! != 1/2006!, e^-100 != e^-101, which math-verify `chop`s to zero);
- a decimal against an irrational within |a - b| <= abs_tol + rel_tol * |b| (b the reference);
- expressions in variables by evaluation at fixed points (an identity test), equations up to a constant
  factor; '^' is always a power, never XOR; "i" is the imaginary unit where the answer is complex;
- size guards before any evaluation (towers of powers, huge factorials and binomials: "oversize") and a 3 GiB
  address-space limit, so a runaway exact integer raises MemoryError instead of taking the machine's memory.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import OrderedDict
from typing import Any

# Points at which two expressions in free symbols are compared (an identity test: two different
# expressions agree at all of them only by accident). Irregular values avoid the special points of trig and
# rational functions; one is negative so that |x| and x differ.
_SAMPLE_POINTS = ("0.7316512", "1.4187653", "2.2360131", "-1.1237359", "0.3819662")


def _sympy_equal(gold: str, pred: str, rel_tol: float, abs_tol: float) -> bool:
    """The worker's comparison of two normalized single-value answers (raises _Unparsed)."""
    import sympy
    from sympy import Float, MatrixBase
    from sympy.core.relational import Relational

    g, p = _parse_latex(gold), _parse_latex(pred)
    if isinstance(g, Relational) and isinstance(p, Relational):
        return _relations_equal(g, p, rel_tol, abs_tol)
    if isinstance(g, Relational) or isinstance(p, Relational):
        # An equation against a value: "x = 3" against "3" was settled on the strings; "2x = 3" against "3"
        # is a different answer (math-verify compares the right-hand sides and says equal).
        return False
    if isinstance(g, MatrixBase) or isinstance(p, MatrixBase) or not isinstance(g, sympy.Expr) or not isinstance(p, sympy.Expr):
        from math_verify import verify

        return verify(g, p, float_rounding=9, numeric_precision=40, timeout_seconds=None)
    if g == p:
        return True
    exact = not (g.has(Float) or p.has(Float))
    free = sorted(g.free_symbols | p.free_symbols, key=str)
    if not free:
        return _numbers_equal(g, p, exact, rel_tol, abs_tol)
    return _functions_equal(g, p, free, exact, rel_tol, abs_tol)


class _Unparsed(Exception):
    pass


class _Oversize(Exception):
    """Too big to evaluate (a tower of powers): equal only if written identically."""


_PARSE_CACHE: OrderedDict[str, Any] = OrderedDict()


def _parse_latex(s: str):
    if s in _PARSE_CACHE:
        return _PARSE_CACHE[s]
    from latex2sympy2_extended import NormalizationConfig, latex2sympy
    from math_verify.grader import should_treat_as_complex

    try:
        expr = latex2sympy(
            s,
            is_real=not should_treat_as_complex(s),
            convert_degrees=False,
            normalization_config=NormalizationConfig(
                basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all", equations=False
            ),
        )
    except Exception as e:  # noqa: BLE001 - any parser failure means "not an expression"
        raise _Unparsed(str(e)) from e
    if should_treat_as_complex(s):
        # latex2sympy2 reads i as a plain symbol; in an answer it is the imaginary unit.
        import sympy

        expr = expr.subs({symbol: sympy.I for symbol in getattr(expr, "free_symbols", ()) if symbol.name == "i"})
    _PARSE_CACHE[s] = expr
    if len(_PARSE_CACHE) > 4096:
        _PARSE_CACHE.popitem(last=False)
    return expr


_EXACT_BITS = 2e5  # exact integers up to ~60,000 digits are cheap; beyond, compare to 60 significant digits
_EVALF_BITS = 1e15  # beyond this even the exponent of a float is unmanageable: compare the trees only


def _size_class(expr) -> int:
    """0: evaluate exactly; 1: too big to build exactly, evaluate to 60 digits; 2: too big to evaluate.

    The size of b^e is about e * log2|b| bits, of n! about n * log2(n) bits and of C(n, k) at most n bits,
    estimated with 15-digit floats (which mpmath keeps finite far beyond the machine's range). Long sums and
    products are left to the deadline."""
    import sympy

    size = 0
    for node in sympy.preorder_traversal(expr):
        bits = 0.0
        try:
            if isinstance(node, sympy.Pow) and node.base.is_number and node.exp.is_number:
                base = abs(sympy.N(node.base, 15))
                if base not in (0, 1):
                    bits = float(abs(sympy.N(node.exp, 15)) * abs(sympy.log(base, 2)).evalf(15))
            elif isinstance(node, (sympy.factorial, sympy.gamma)) and node.args[0].is_number:
                n = float(abs(sympy.N(node.args[0], 15)))
                bits = n * math.log2(max(n, 2.0))
            elif isinstance(node, sympy.binomial) and node.args[0].is_number:
                bits = float(abs(sympy.N(node.args[0], 15)))  # C(n, k) < 2^n
        except (TypeError, ValueError, OverflowError):
            return 2
        if not math.isfinite(bits) or bits > _EVALF_BITS:
            return 2
        if bits > _EXACT_BITS:
            size = 1
    return size


def _numbers_equal(g, p, exact: bool, rel_tol: float, abs_tol: float) -> bool:
    import sympy

    size = max(_size_class(g), _size_class(p))
    if size == 2:
        if g == p:
            return True
        raise _Oversize()
    if exact and size == 0:
        g_val, p_val = g.doit(), p.doit()
        if g_val.is_Rational and p_val.is_Rational:
            return g_val == p_val  # exact: 1/2004! != 1/2006!
    a, b = sympy.N(p, 60), sympy.N(g, 60)
    if not (a.is_number and b.is_number) or a.has(sympy.nan, sympy.zoo):
        return False
    if a.is_infinite or b.is_infinite:
        return a == b
    diff = sympy.Abs(a - b).evalf(60)
    scale = sympy.Abs(b).evalf(60)
    if exact:
        # Both sides are exact: only evaluation noise at 60 digits may separate them.
        return bool(diff <= sympy.Float("1e-45", 60) * max(scale, sympy.Abs(a).evalf(60)) or diff == 0)
    return bool(diff <= abs_tol + rel_tol * scale)


def _functions_equal(g, p, free, exact: bool, rel_tol: float, abs_tol: float) -> bool:
    import sympy

    agreed = 0
    for k in range(len(_SAMPLE_POINTS)):
        subs = {s: sympy.Float(_SAMPLE_POINTS[(i + k) % len(_SAMPLE_POINTS)], 30) for i, s in enumerate(free)}
        try:
            a, b = sympy.N(p.subs(subs), 30), sympy.N(g.subs(subs), 30)
        except Exception:  # noqa: BLE001 - undefined at this point: try the next one
            continue
        if not (a.is_number and b.is_number) or a.has(sympy.nan, sympy.zoo) or b.has(sympy.nan, sympy.zoo):
            continue
        diff = sympy.Abs(a - b).evalf(30)
        tol = (1e-20 if exact else rel_tol) * max(sympy.Abs(b).evalf(30), 1) + (0 if exact else abs_tol)
        if diff > tol:
            return False
        agreed += 1
    if agreed >= 3:
        return True
    return sympy.simplify(g - p) == 0


def _relations_equal(g, p, rel_tol: float, abs_tol: float) -> bool:
    """Two equations are equal when lhs - rhs of one is a nonzero constant multiple of the other's."""
    import sympy

    if type(g) is not type(p) or not isinstance(g, sympy.Eq):
        from math_verify import verify

        return verify(g, p, float_rounding=9, numeric_precision=40, timeout_seconds=None)
    d_g, d_p = g.lhs - g.rhs, p.lhs - p.rhs
    free = sorted(d_g.free_symbols | d_p.free_symbols, key=str)
    if not free:
        return False
    subs = {s: sympy.Float(_SAMPLE_POINTS[i % len(_SAMPLE_POINTS)], 30) for i, s in enumerate(free)}
    base = sympy.N(d_g.subs(subs), 30)
    if base == 0:
        return False
    ratio = sympy.nsimplify(sympy.N(d_p.subs(subs), 30) / base, rational=True, tolerance=1e-12)
    if ratio == 0:
        return False
    exact = not (g.has(sympy.Float) or p.has(sympy.Float))
    return _functions_equal(d_g * ratio, d_p, free, exact, rel_tol, abs_tol)


def worker_main() -> None:
    """The loop of a sympy worker process: one JSON request per line on stdin, one answer on stdout."""
    import logging
    import resource

    logging.disable(logging.CRITICAL)
    try:
        # A runaway exact integer raises MemoryError instead of taking the machine's memory.
        limit = 3 * 1024**3
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass
    import latex2sympy2_extended  # noqa: F401 - import before "ready" so startup is not billed to a request
    import sympy  # noqa: F401

    # The protocol owns the real stdout; anything a library prints goes to stderr (discarded by the parent).
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            equal = _sympy_equal(request["gold"], request["pred"], request["rel_tol"], request["abs_tol"])
            answer = {"equal": bool(equal)}
        except _Unparsed:
            answer = {"equal": False, "error": "unparsed"}
        except _Oversize:
            answer = {"equal": False, "error": "oversize"}
        except BaseException as e:  # noqa: BLE001 - MemoryError, RecursionError, sympy bugs: report, keep serving
            answer = {"equal": False, "error": f"{type(e).__name__}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
