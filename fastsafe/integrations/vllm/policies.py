"""Server-wide safety policies of the vLLM adapter: the TOML file named by ``FASTSAFE_VLLM_POLICIES``.

The file holds one ``[policy.NAME]`` table per policy::

    [policy.default]                 # applies to every request that names no policy
    store = "risk.db"                # a RiskEntityStore (followed live: hot swap)
    phrases = ["make a bomb", "nerve agent"]
    regexes = ['\\bkill\\s+(him|her)\\b']
    tsdi = "bias.safetensors"        # a TSDI bias table; its row of each response position is subtracted
    tsdi_scale = 1.0
    top_k = 10                       # candidates the text-level check looks at
    allow_opt_out = false            # may a request send policy = "none"?

    [policy.strict]
    phrases = ["..."]

Relative paths are relative to the file's folder. Every key is optional; unknown keys, wrong
types and missing files are errors that name the file, the policy and the key. Parsing is plain
Python (``tomllib``, no torch), so the frontend process can validate requests against the same
file; the automata are built once, in the worker (:mod:`.built`).

Example:
    >>> policies = load_policies("policies.toml")          # doctest: +SKIP
    >>> policies["default"].phrases
    ('make a bomb', 'nerve agent')
"""
from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass


def _toml():
    """The TOML reader: ``tomllib`` (Python >= 3.11), else ``tomli`` (Python 3.10), else a clear error."""
    try:
        import tomllib
        return tomllib
    except ImportError:
        pass
    try:
        import tomli
        return tomli
    except ImportError:
        raise ImportError(f"fastsafe.integrations.vllm: reading the policies file ({ENV_VAR}) needs tomllib "
                          f"(Python >= 3.11) or, on Python 3.10, the tomli package: pip install tomli") from None

__all__ = ["Policy", "PolicyError", "load_policies", "policies_from_env", "ENV_VAR", "DEFAULT_POLICY", "OPT_OUT",
           "POLICY_KEYS"]

#: The environment variable naming the policies file.
ENV_VAR = "FASTSAFE_VLLM_POLICIES"
#: The policy every request that names none gets.
DEFAULT_POLICY = "default"
#: The policy name a request sends to opt out (where the default policy allows it).
OPT_OUT = "none"
#: The keys a ``[policy.NAME]`` table may hold.
POLICY_KEYS = ("store", "phrases", "regexes", "tsdi", "tsdi_scale", "top_k", "allow_opt_out")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class PolicyError(ValueError):
    """A policies file that cannot be used (the message names the file, the policy and the key)."""


@dataclass(frozen=True)
class Policy:
    """One server-wide policy (plain settings; :func:`fastsafe.integrations.vllm.built.build_policy`
    turns it into device tables).

    Attributes:
        name: the ``NAME`` of ``[policy.NAME]``.
        store: absolute path of a :class:`fastsafe.RiskEntityStore` file, or ``None``.
        phrases: phrases (strings) and token-id lists, as ``SafetyConfig.banned_phrases``.
        regexes: regular expressions (text level, host path).
        tsdi: absolute path of a TSDI bias file, or ``None``.
        tsdi_scale: multiplier of the bias (a request may override it).
        top_k: candidates of each row the text-level check looks at.
        allow_opt_out: a request may send ``policy = "none"`` (meaningful on ``default``).
    """

    name: str
    store: str | None = None
    phrases: tuple = ()
    regexes: tuple = ()
    tsdi: str | None = None
    tsdi_scale: float = 1.0
    top_k: int = 10
    allow_opt_out: bool = False

    @property
    def has_filter(self) -> bool:
        """True when the policy can ban a token (phrases, regexes or a store)."""
        return bool(self.phrases or self.regexes or self.store)

    @property
    def is_empty(self) -> bool:
        """True when the policy changes nothing (no filter, no TSDI)."""
        return not self.has_filter and self.tsdi is None


def _fail(path, policy, key, message) -> PolicyError:
    where = f"{path}: [policy.{policy}]" if policy is not None else f"{path}"
    return PolicyError(f"{where}{' ' + key if key else ''}: {message}")


def _path(path, base, name, key, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, name, key, f"expected a file path (string), got {value!r}")
    full = value if os.path.isabs(value) else os.path.join(base, value)
    full = os.path.realpath(os.path.expanduser(full))
    if not os.path.isfile(full):
        raise _fail(path, name, key, f"file not found: {full}")
    return full


def _phrases(path, name, value) -> tuple:
    if not isinstance(value, list):
        raise _fail(path, name, "phrases", f"expected a list of strings and/or token-id lists, got {value!r}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item.strip():
                raise _fail(path, name, f"phrases[{i}]", f"expected a non-empty phrase, got {item!r}")
            out.append(item)
        elif (isinstance(item, list) and item and all(type(t) is int for t in item)):
            if any(t < 0 for t in item):
                raise _fail(path, name, f"phrases[{i}]", f"expected non-negative token ids, got {item}")
            out.append(tuple(item))
        else:
            raise _fail(path, name, f"phrases[{i}]", f"expected a string or a non-empty list of token ids, "
                                                     f"got {item!r}")
    return tuple(out)


def _regexes(path, name, value) -> tuple:
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise _fail(path, name, "regexes", f"expected a list of strings, got {value!r}")
    for i, r in enumerate(value):
        try:
            re.compile(r)
        except re.error as exc:
            raise _fail(path, name, f"regexes[{i}]", f"not a valid regular expression {r!r}: {exc}") from None
    return tuple(value)


def _policy(path, base, name, table) -> Policy:
    if not isinstance(name, str) or not _NAME.match(name) or name == OPT_OUT:
        raise _fail(path, None, None, f"policy name {name!r}: expected 1-64 characters of letters, digits, "
                                      f"'_', '.', '-' (and not {OPT_OUT!r}, which means opting out)")
    if not isinstance(table, dict):
        raise _fail(path, name, None, f"expected a table, got {table!r}")
    unknown = sorted(set(table) - set(POLICY_KEYS))
    if unknown:
        raise _fail(path, name, unknown[0], f"unknown key (expected one of {', '.join(POLICY_KEYS)})")
    kw: dict = {"name": name}
    if "store" in table:
        kw["store"] = _path(path, base, name, "store", table["store"])
    if "tsdi" in table:
        kw["tsdi"] = _path(path, base, name, "tsdi", table["tsdi"])
    if "phrases" in table:
        kw["phrases"] = _phrases(path, name, table["phrases"])
    if "regexes" in table:
        kw["regexes"] = _regexes(path, name, table["regexes"])
    if "tsdi_scale" in table:
        v = table["tsdi_scale"]
        if type(v) not in (int, float) or not math.isfinite(v):
            raise _fail(path, name, "tsdi_scale", f"expected a finite number, got {v!r}")
        if "tsdi" not in table:
            raise _fail(path, name, "tsdi_scale", "set without tsdi (there is no bias table to scale)")
        kw["tsdi_scale"] = float(v)
    if "top_k" in table:
        v = table["top_k"]
        if type(v) is not int or not 1 <= v <= 1024:
            raise _fail(path, name, "top_k", f"expected an int in [1, 1024], got {v!r}")
        kw["top_k"] = v
    if "allow_opt_out" in table:
        v = table["allow_opt_out"]
        if type(v) is not bool:
            raise _fail(path, name, "allow_opt_out", f"expected true or false, got {v!r}")
        kw["allow_opt_out"] = v
    return Policy(**kw)


def load_policies(path) -> dict[str, Policy]:
    """Parse and check a policies file.

    Args:
        path: the TOML file (see the module docstring).

    Returns:
        ``{name: Policy}`` in file order.

    Raises:
        PolicyError: unreadable file, TOML syntax, a top-level key other than ``policy``, a bad
            policy name, an unknown key, a value of the wrong type, a missing store / bias file,
            an invalid regex. The message names the file, the policy and the key.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.toml"
        >>> _ = f.write_text('[policy.default]\\nphrases = ["make a bomb"]\\ntop_k = 5\\n')
        >>> load_policies(f)["default"].top_k
        5
    """
    path = os.fspath(path)
    tomllib = _toml()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise _fail(path, None, None, f"cannot read the policies file ({ENV_VAR}): {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise _fail(path, None, None, f"not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"policy"})
    if extra:
        raise _fail(path, None, None, f"unknown top-level key {extra[0]!r} (expected only [policy.NAME] tables)")
    tables = data.get("policy", {})
    if not isinstance(tables, dict):
        raise _fail(path, None, None, f"'policy' must be a table of [policy.NAME] tables, got {tables!r}")
    base = os.path.dirname(os.path.realpath(path))
    return {name: _policy(path, base, name, table) for name, table in tables.items()}


_lock = threading.Lock()
_memo: dict = {}


def policies_from_env(environ=None) -> dict[str, Policy] | None:
    """The policies of the file ``FASTSAFE_VLLM_POLICIES`` names, or ``None`` when it is unset.

    Parsed once per file content (path, size, modification time), so the frontend's per-request
    validation does not re-read it.
    """
    environ = os.environ if environ is None else environ
    path = environ.get(ENV_VAR, "").strip()
    if not path:
        return None
    try:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    except OSError as exc:
        raise _fail(path, None, None, f"cannot read the policies file ({ENV_VAR}): {exc}") from None
    with _lock:
        hit = _memo.get(key)
    if hit is None:
        hit = load_policies(path)
        with _lock:
            _memo.clear()
            _memo[key] = hit
    return hit
