"""Ahead-of-time compilation of a Triton kernel for a GPU target, on any machine (no GPU needed).

Triton's ``ASTSource`` changed between releases: up to 3.2 it takes the constexpr values as
``constants`` beside a signature of the other arguments; from 3.3 on the signature lists every
argument (``"constexpr"`` for the compile-time ones) and the values come as ``constexprs``. The
form is read from ``ASTSource``'s own parameters, so one call serves every supported Triton.

Example:
    >>> from triton.backends.compiler import GPUTarget
    >>> compiled = compile_kernel(my_kernel, {"x_ptr": "*fp32", "n": "i32"}, {"BLOCK": 128},
    ...                           GPUTarget("cuda", 90, 32), num_warps=4)    # doctest: +SKIP
    >>> len(compiled.asm["cubin"]) > 0                                        # doctest: +SKIP
    True
"""
from __future__ import annotations

import inspect

import triton

__all__ = ["ast_source", "compile_kernel"]


def ast_source(fn, signature: dict, constexprs: dict):
    """``triton.compiler.ASTSource`` of ``fn`` with run-time argument types ``signature``
    (name -> Triton type string, e.g. ``"*fp32"``, ``"i32"``) and compile-time values ``constexprs``."""
    from triton.compiler import ASTSource
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        full = dict(signature, **{name: "constexpr" for name in constexprs})
        return ASTSource(fn=fn, signature=full, constexprs=dict(constexprs))
    return ASTSource(fn=fn, signature=dict(signature), constants=dict(constexprs))


def compile_kernel(fn, signature: dict, constexprs: dict, target, **options):
    """``triton.compile`` of :func:`ast_source` for ``target`` (a ``GPUTarget``) with ``options``."""
    return triton.compile(ast_source(fn, signature, constexprs), target=target, options=options)
