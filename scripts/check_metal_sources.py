"""Checks that shaders/*.metal keep to what Apple's Metal compiler accepts and the Linux shim lets pass.

Rules: every pointer or reference parameter carries an address space (device, constant, threadgroup,
thread); no recursion; no exceptions, dynamic allocation, virtual functions, RTTI, double (type or
unsuffixed literal), static locals or goto; no library outside metal_stdlib (no std::, one
`#include <metal_stdlib>`); threadgroup arrays only through QA_TG_ARRAY (so the harness can poison them
and check the 32 KiB limit); every kernel binds its buffers as [[buffer(0)]], [[buffer(1)]], ... in
argument order (torch.mps.compile_shader binds tensors by position) and ends with the thread ids of
QA_THREAD_IDS (the harness's calling order).

Usage: python scripts/check_metal_sources.py [shader dir]  (exit status 1 and one line per violation)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ADDRESS_SPACES = ("device", "constant", "threadgroup", "thread")
FORBIDDEN = {
    r"\bstd::": "C++ standard library (only metal_stdlib exists on Metal)",
    r"\bthrow\b|\btry\b|\bcatch\b": "exceptions",
    r"\bnew\b|\bdelete\b|\bmalloc\b|\bcalloc\b|\brealloc\b|\bfree\s*\(": "dynamic allocation",
    r"\bvirtual\b|\bdynamic_cast\b|\btypeid\b": "virtual functions / RTTI",
    r"\bdouble\b": "double (Metal has no 64-bit float)",
    r"(?<![\w.])\d+\.\d*(?:[eE][-+]?\d+)?(?![\w.])": "floating literal without an f/h suffix (a double in C++)",
    r"\bgoto\b": "goto",
    r"\bstatic\b(?!_assert|_cast)": "static storage (use constant or QA_TG_ARRAY)",
    r"\bprintf\b": "printf",
}
THREAD_IDS = (
    "threadgroup_position_in_grid",
    "thread_position_in_threadgroup",
    "simdgroup_index_in_threadgroup",
    "thread_index_in_simdgroup",
)
KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "catch"}


def strip_comments(text: str) -> str:
    """The text without // and /* */ comments (string literals in shaders hold no comment markers)."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def expand_macros(text: str) -> str:
    """Join continued lines and substitute object-like #defines (the argument-list macros), repeatedly."""
    text = text.replace("\\\n", " ")
    macros = dict(re.findall(r"^\s*#define\s+(\w+)[ \t]+([^\n]*)$", text, flags=re.M))
    body = re.sub(r"^\s*#[^\n]*$", "", text, flags=re.M)
    for _ in range(4):
        for name, value in macros.items():
            body = re.sub(r"\b" + name + r"\b(?!\s*\()", lambda _m, v=value: v, body)
    return body


def _matching(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_ch}{close_ch}")


def _split_params(params: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in params:
        depth += ch in "([<"
        depth -= ch in ")]>"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def functions(body: str) -> list[tuple[str, str, str, bool]]:
    """(name, parameter text, body text, is_kernel) of every function definition."""
    found = []
    for m in re.finditer(r"\b(\w+)\s*(?:<[^<>;{}()]*>)?\s*\(", body):
        name = m.group(1)
        if name in KEYWORDS:
            continue
        close = _matching(body, m.end() - 1, "(", ")")
        after = body[close:].lstrip()
        prefix = body[max(0, m.start() - 200) : m.start()]
        if not after.startswith("{") or not re.search(r"[\w>&*]\s*$", prefix):
            continue
        line_start = prefix.rfind(";") + 1
        head = prefix[line_start:]
        if re.search(r"[=({]\s*$", head):
            continue
        brace = body.index("{", close)
        end = _matching(body, brace, "{", "}")
        is_kernel = re.search(r"\bkernel\b[^;{}]*$", prefix) is not None
        found.append((name, body[m.end() : close - 1], body[brace:end], is_kernel))
    return found


def check_text(text: str, label: str = "shaders") -> list[str]:
    """Every violation of the rules in one shader source (the concatenation of the files)."""
    problems = []
    clean = strip_comments(text)
    for lineno, line in enumerate(clean.splitlines(), 1):
        inc = re.match(r"\s*#\s*include\s*(\S+)", line)
        if inc and inc.group(1) != "<metal_stdlib>":
            problems.append(f"{label}:{lineno}: #include {inc.group(1)}: only <metal_stdlib> exists on Metal")
        if line.lstrip().startswith("#"):
            continue
        for pattern, what in FORBIDDEN.items():
            if re.search(pattern, line):
                problems.append(f"{label}:{lineno}: {what}: {line.strip()}")
        if re.search(r"\bthreadgroup\s+[\w:]+(?:<[^>]*>)?\s+\w+\s*\[", line):
            problems.append(f"{label}:{lineno}: threadgroup array declared without QA_TG_ARRAY: {line.strip()}")
    body = expand_macros(clean)
    defs = functions(body)
    names = {name for name, *_ in defs}
    calls: dict[str, set[str]] = {}
    for name, params, fbody, is_kernel in defs:
        plist = _split_params(params)
        for param in plist:
            if ("*" in param or "&" in param) and not any(re.search(rf"\b{a}\b", param) for a in ADDRESS_SPACES):
                problems.append(f"{label}: {name}: pointer/reference parameter without an address space: {param}")
        if is_kernel:
            problems += _check_kernel(label, name, plist)
        calls.setdefault(name, set()).update(
            c for c in re.findall(r"\b(\w+)\s*(?:<[^<>;{}()]*>)?\s*\(", fbody) if c in names
        )
    problems += [f"{label}: recursion: {' -> '.join(cycle)}" for cycle in _cycles(calls)]
    return problems


def _check_kernel(label: str, name: str, params: list[str]) -> list[str]:
    flat = [p.replace(" ", "") for p in params]
    ids = [t for p in flat for t in THREAD_IDS if f"[[{t}]]" in p]
    problems = []
    if ids != list(THREAD_IDS) or not all(any(f"[[{t}]]" in p for t in THREAD_IDS) for p in flat[-4:]):
        problems.append(f"{label}: kernel {name}: must end with QA_THREAD_IDS (tg, tid, sg, lane) after its buffers")
    buffers = [p for p in flat if not any(f"[[{t}]]" in p for t in THREAD_IDS)]
    for i, p in enumerate(buffers):
        if f"[[buffer({i})]]" not in p:
            problems.append(f"{label}: kernel {name}: parameter {i} must be bound as [[buffer({i})]]: {p}")
    return problems


def _cycles(calls: dict[str, set[str]]) -> list[list[str]]:
    """Call cycles (recursion), each as the chain of names that closes it."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(calls.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(calls):
        if node not in state:
            visit(node, [node])
    return cycles


def check_dir(directory: Path) -> list[str]:
    """Violations in the shader folder, checked on the concatenation the backends compile."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quantattn_hf.backends.metal.sources import library_source

    return check_text(library_source(directory), label=str(directory))


def main(argv: list[str]) -> int:
    directory = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "shaders"
    problems = check_dir(directory)
    for p in problems:
        print(p)
    print(f"check_metal_sources: {len(problems)} problem(s) in {directory}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
