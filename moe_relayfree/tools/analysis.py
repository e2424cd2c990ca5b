"""Static analysis of lowered / compiled programs: which full-size buffers a program makes.

Used by the benchmarks to count the ``~T*k*d`` intermediates between router and GEMM and
between GEMM and output, for the native (``cuda``-lowered StableHLO) and CPU (compiled HLO) paths.
"""

from __future__ import annotations

import dataclasses
import re

_DTYPE_BYTES = {
    "f64": 8, "f32": 4, "f16": 2, "bf16": 2, "s64": 8, "s32": 4, "s16": 2, "s8": 1,
    "u64": 8, "u32": 4, "u16": 2, "u8": 1, "pred": 1, "i64": 8, "i32": 4, "i16": 2, "i8": 1,
    "i1": 1, "ui32": 4, "ui8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
}


@dataclasses.dataclass(frozen=True)
class Buffer:
    op: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.elements * _DTYPE_BYTES.get(self.dtype, 4)


# StableHLO: `%3 = stablehlo.gather(...) ... -> tensor<8x16xf32>` or `: tensor<8x16xf32>`
_MLIR_LINE = re.compile(r"^\s*%[\w#:]+\s*=\s*\"?([\w.]+)")
_MLIR_TENSOR = re.compile(r"tensor<([0-9x]*)x?([a-z][a-z0-9]*)>")
# Non-materialising or metadata ops: never counted.
_MLIR_SKIP = {
    "stablehlo.constant", "stablehlo.reshape", "stablehlo.bitcast_convert",
    "stablehlo.get_tuple_element", "stablehlo.tuple", "sdy.sharding_constraint",
    "stablehlo.optimization_barrier", "func.call", "call",
}


def _result_text(lines: list[str], i: int) -> str:
    """The text holding op ``i``'s result type: its own line, or for an op with regions
    (scatter, sort, reduce, while, case) the line closing them at the same indentation."""
    line = lines[i]
    if not line.rstrip().endswith("{"):
        return line
    indent = len(line) - len(line.lstrip())
    for close in lines[i + 1 :]:
        if len(close) - len(close.lstrip()) == indent and close.lstrip().startswith("}"):
            return close
    return line


def stablehlo_buffers(text: str, min_elements: int) -> list[Buffer]:
    """Results of StableHLO ops with at least ``min_elements`` elements (reshapes excluded)."""
    out = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _MLIR_LINE.match(line)
        if not m or m.group(1) in _MLIR_SKIP:
            continue
        text_i = _result_text(lines, i)
        result = text_i.rsplit("->", 1)[-1] if "->" in text_i else text_i.rsplit(":", 1)[-1]
        for dims, dtype in _MLIR_TENSOR.findall(result)[-1:]:
            shape = tuple(int(d) for d in dims.split("x") if d)
            buf = Buffer(m.group(1), shape, dtype)
            if buf.elements >= min_elements:
                out.append(buf)
    return out


# Compiled HLO: `  %name = f32[8,16]{1,0} fusion(...), kind=kLoop, calls=...`
_HLO_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*([a-z0-9]+)\[([0-9,]*)\][^ ]*\s+([\w\-]+)")
_HLO_SKIP = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "copy-start",
             "copy-done", "after-all", "reshape"}


def compiled_hlo_buffers(text: str, min_elements: int) -> list[Buffer]:
    """Materialised buffers of compiled HLO: top-level instructions of non-fused computations
    with at least ``min_elements`` elements (fusion internals are never materialised)."""
    out, in_fused = [], False
    for line in text.splitlines():
        head = _HLO_COMP.match(line)
        if head and not line.startswith((" ", "\t")):  # computation headers are not indented
            name = head.group(1)
            in_fused = "fused" in name or name.startswith(("fusion", "wrapped_"))
            continue
        if in_fused:
            continue
        m = _HLO_INSTR.match(line)
        if not m or m.group(3) in _HLO_SKIP:
            continue
        shape = tuple(int(d) for d in m.group(2).split(",") if d)
        buf = Buffer(m.group(3), shape, m.group(1))
        if buf.elements >= min_elements:
            out.append(buf)
    return out


def summarize(buffers: list[Buffer]) -> dict:
    """``{"count", "bytes", "ops": {op: count}}`` of a buffer list."""
    ops: dict[str, int] = {}
    for b in buffers:
        ops[b.op] = ops.get(b.op, 0) + 1
    return {"count": len(buffers), "bytes": sum(b.nbytes for b in buffers), "ops": ops}


# Collective ops of the lowered program and the buffer each one moves per rank.
_MLIR_COLLECTIVES = {
    "stablehlo.all_gather": "all_gather", "stablehlo.all_to_all": "all_to_all",
    "stablehlo.reduce_scatter": "reduce_scatter", "stablehlo.all_reduce": "all_reduce",
    "stablehlo.collective_permute": "collective_permute",
}


@dataclasses.dataclass(frozen=True)
class Collective:
    """A collective of a StableHLO program: its operands' and result's buffers.

    ``moved`` is the buffer one rank puts through it: the gathered result of an all-gather,
    the operand of an all-to-all / reduce-scatter / all-reduce. A ragged all-to-all sends at
    most its operand and receives at most its output buffer; over all ranks the rows sent and
    received are equal, so the smaller of the two bounds a rank's traffic.
    """

    op: str
    operands: tuple[Buffer, ...]
    result: Buffer
    in_loop: bool = False  # inside a while loop (a schedule's rounds, once in the usual case)

    @property
    def moved(self) -> Buffer:
        if self.op == "ragged_all_to_all":
            return min(self.operands[:2], key=lambda b: b.elements)
        return self.result if self.op == "all_gather" else self.operands[0]


def _buffers(types: str, op: str) -> list[Buffer]:
    return [Buffer(op, tuple(int(d) for d in dims.split("x") if d), dtype)
            for dims, dtype in _MLIR_TENSOR.findall(types)]


_FUNC = re.compile(r"^\s*func\.func\s+\w+\s+@([\w.$-]+)")
_CALLEE = re.compile(r"(?:func\.)?call @([\w.$-]+)")


def _loop_lines(lines: list[str]) -> set[int]:
    """Indices of the lines that run inside a ``stablehlo.while`` loop: in a loop's regions,
    or in a function called from there (transitively)."""
    funcs: dict[str, list[int]] = {}
    current = None
    for i, line in enumerate(lines):
        m = _FUNC.match(line)
        if m:
            current = m.group(1)
            funcs[current] = []
        elif current is not None:
            funcs[current].append(i)
    looped, called_in_loop = set(), set()
    for body in funcs.values():
        depth_indent = None
        for i in body:
            line = lines[i]
            indent = len(line) - len(line.lstrip())
            closing = line.lstrip().startswith("}") and not line.lstrip().startswith("} do")
            if depth_indent is not None and indent <= depth_indent and closing:
                depth_indent = None
                continue
            if depth_indent is not None:
                looped.add(i)
            elif "stablehlo.while" in line:
                depth_indent = indent
    frontier = {c for i in looped for c in _CALLEE.findall(lines[i])}
    while frontier:
        name = frontier.pop()
        if name in called_in_loop or name not in funcs:
            continue
        called_in_loop.add(name)
        looped.update(funcs[name])
        frontier |= {c for i in funcs[name] for c in _CALLEE.findall(lines[i])}
    return looped


def collectives(text: str) -> list[Collective]:
    """Every collective op of a StableHLO module (``jit(...).lower(...).as_text()``), each
    marked ``in_loop`` when it runs inside a while loop."""
    out = []
    lines = text.splitlines()
    looped = _loop_lines(lines)
    for i, line in enumerate(lines):
        if "@ragged_all_to_all" in line:
            op = "ragged_all_to_all"
        else:
            m = _MLIR_LINE.match(line)
            op = _MLIR_COLLECTIVES.get(m.group(1)) if m else None
        if op is None:
            continue
        signature = _result_text(lines, i).rsplit(" : (", 1)[-1]
        operands, _, result = signature.partition("->")
        out.append(Collective(op, tuple(_buffers(operands, op)), _buffers(result, op)[-1],
                              in_loop=i in looped))
    return out


_FLOAT = {"f64", "f32", "f16", "bf16"}


def float_scatter_adds(text: str) -> list[Buffer]:
    """The scatters of a StableHLO module that add floating-point updates at indices not
    declared unique: XLA's GPU backend runs those as atomic adds, whose order, and so the
    result's last bits, changes from run to run. Returns their result buffers."""
    out = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _MLIR_LINE.match(line)
        if not m or m.group(1) != "stablehlo.scatter" or "unique_indices = true" in line:
            continue
        close = _result_text(lines, i)
        region = lines[i + 1 : lines.index(close, i + 1)] if close is not line else []
        result = _buffers(close.rsplit("->", 1)[-1], "stablehlo.scatter")
        if result and result[-1].dtype in _FLOAT and any("stablehlo.add" in r for r in region):
            out.append(result[-1])
    return out


# NaN bit patterns as StableHLO prints float constants (f64, f32, bf16, f16)
_NAN_CONSTANT = re.compile(
    r"^\s*(%[\w#]+)\s*=\s*stablehlo\.constant dense<0x(7FF8[0-9A-F]{12}|7FC0[0-9A-F]{4}|7FC0|7E00)>")
_OPERANDS = re.compile(r"%[\w#]+")


def nan_filled_selects(text: str) -> int:
    """Selects of a StableHLO module that fill with a NaN constant (directly or broadcast):
    the out-of-bounds mask ``jnp.take`` adds by default (``mode="fill"``), a compare and select
    over the whole gathered result that XLA:CPU does not fuse into the gather. Row gathers
    whose indices are in bounds by construction need none (``windows.take_rows``)."""
    nans = set()
    count = 0
    for line in text.splitlines():
        if line.lstrip().startswith("func.func"):
            nans = set()  # value names are scoped to their function
            continue
        m = _NAN_CONSTANT.match(line)
        if m:
            nans.add(m.group(1))
            continue
        m = _MLIR_LINE.match(line)
        if not m:
            continue
        name = line.split("=", 1)[0].strip()
        operands = _OPERANDS.findall(line.split("=", 1)[1])
        if m.group(1) == "stablehlo.broadcast_in_dim" and operands and operands[0] in nans:
            nans.add(name)
        elif m.group(1) == "stablehlo.select" and any(o in nans for o in operands):
            count += 1
    return count


# Compiled (optimised) HLO collectives, as XLA:TPU / XLA:GPU print them: operands by name only.
_HLO_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_HLO_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HLO_COLLECTIVE_OPS = {
    "all-gather": "all_gather", "all-gather-start": "all_gather",
    "all-reduce": "all_reduce", "all-reduce-start": "all_reduce",
    "all-to-all": "all_to_all", "ragged-all-to-all": "ragged_all_to_all",
    "reduce-scatter": "reduce_scatter", "collective-permute": "collective_permute",
    "collective-permute-start": "collective_permute",
}
_HLO_OP = re.compile(r"\s([a-z][a-z\-]*)\(")


@dataclasses.dataclass(frozen=True)
class CompiledCollective:
    """A collective of a compiled HLO module: its result and operand arrays (per device) and
    the computation it sits in (``ENTRY``, a loop body, a conditional branch...)."""

    op: str
    result: tuple[Buffer, ...]
    operands: tuple[Buffer, ...]
    computation: str

    @property
    def buffer(self) -> Buffer:
        """The data array it moves: the operand of an all-to-all / reduce / permute (the first,
        the data, for a ragged all-to-all), the result of an all-gather."""
        if self.op == "all_gather":
            return self.result[0]
        return self.operands[0]


def _arrays(text: str, op: str) -> tuple[Buffer, ...]:
    return tuple(Buffer(op, tuple(int(d) for d in dims.split(",") if d), dtype)
                 for dtype, dims in _HLO_ARRAY.findall(text) if dtype not in ("token",))


def compiled_collectives(text: str) -> list[CompiledCollective]:
    """Every collective of a compiled HLO module (``compiled.as_text()``), async ``-start``
    halves counted once, with operand shapes looked up by name."""
    shapes: dict[str, tuple[Buffer, ...]] = {}
    found = []
    computation = ""
    for line in text.splitlines():
        if line and not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            computation = line.split("(", 1)[0].replace("ENTRY", "").strip().lstrip("%")
            continue
        m = _HLO_DEF.match(line)
        if not m:
            continue
        name, rest = m.groups()
        op = _HLO_OP.search(rest)
        type_text = rest[: op.start()] if op else rest
        shapes[name] = _arrays(type_text, "value")
        if op and op.group(1) in _HLO_COLLECTIVE_OPS:
            args = rest[op.end():].split(")", 1)[0]
            found.append((_HLO_COLLECTIVE_OPS[op.group(1)], shapes[name],
                          re.findall(r"%([\w.\-]+)", args), computation))
    out = []
    for op, result, args, comp in found:
        operands = tuple(b for a in args for b in shapes.get(a, ())[:1])
        out.append(CompiledCollective(op, tuple(Buffer(op, b.shape, b.dtype) for b in result),
                                      tuple(Buffer(op, b.shape, b.dtype) for b in operands), comp))
    return out
