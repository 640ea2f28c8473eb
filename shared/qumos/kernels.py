"""The C kernels of the simulator's batch part (`kernels.c`): compiled at first use with
`$CC` (default `cc`), called through ctypes.

`get()` returns a `Kernels` object, or None when the pure-torch path is to be used:
`QUMOS_SIM_KERNEL=torch`, or (the default, `auto`) when compiling or loading failed — then
one warning is logged and torch is used. With `QUMOS_SIM_KERNEL=c` a failure raises.

It is compiled for this CPU (`-march=native`) when the compiler takes it, else portably;
`QUMOS_KERNEL_NATIVE=0` asks for the portable build only. The shared library is cached in
`$QUMOS_CACHE_DIR` (default `~/.cache/qumos`) under a name keyed by a hash of the source,
the compiler command and flags, the compiler's version and the machine (for the native
build also the CPU's model and feature flags), so a changed source, compiler or CPU
recompiles. It is written to a temporary name
and renamed into place, so processes compiling at the same time do not see partial files.

The C source is plain C99 (no Python or torch headers); see it for the maths and layout.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["Kernels", "UnitaryProgram", "get", "set_mode"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
COMPILER = shlex.split(os.environ.get("CC", "cc"))
# -fopenmp-simd: honour kernels.c's "omp simd" loops (no OpenMP runtime).
FLAGS = ["-O3", "-fopenmp-simd", "-fPIC", "-shared", "-std=c99"]
# Tried first: the CPU's own vector width (16 lanes of a block in one AVX-512 register
# instead of four SSE ones; a 4-qubit training step 1.2-2.1x faster with the unitary
# kernel, bench/bench_kernels_native.py). The library is then tied to this CPU, so the
# cache key includes the CPU's identity (`_cpu_id`); QUMOS_KERNEL_NATIVE=0 leaves it out.
NATIVE = ["-march=native"]
LIBS = ["-lm"]
MODES = ("auto", "c", "torch")

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}
_REAL = {c: r for r, c in _COMPLEX.items()}

_lock = threading.Lock()
_mode: str | None = None  # the mode in force; None: read QUMOS_SIM_KERNEL at the next get()
_lib: Kernels | Exception | None = None  # the loaded kernels, or why loading failed


def set_mode(mode: str | None) -> None:
    """Override QUMOS_SIM_KERNEL: "auto", "c" or "torch" (None: read the variable again).
    Cheap, for tests and benchmarks: the library is compiled and loaded once per process."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}; allowed: {MODES}")
    _mode = mode


def get() -> Kernels | None:
    """The C kernels, or None for the torch path."""
    global _mode
    mode = _mode
    if mode is None:
        mode = os.environ.get("QUMOS_SIM_KERNEL", "auto").strip().lower() or "auto"
        if mode not in MODES:
            raise ValueError(f"QUMOS_SIM_KERNEL={mode!r}; allowed: {MODES}")
        if mode == "torch":
            log.debug("QUMOS_SIM_KERNEL=torch: the simulator's batch part runs in torch")
        _mode = mode
    if mode == "torch":
        return None
    lib = _load()
    if isinstance(lib, Kernels):
        return lib
    if mode == "c":
        raise RuntimeError(f"QUMOS_SIM_KERNEL=c but the C kernels are unavailable: {lib}") from lib
    return None


def _load() -> Kernels | Exception:
    """Compile (if not cached) and load the library, once per process; a failure is
    logged once and kept."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                try:
                    _lib = Kernels(ctypes.CDLL(str(_compile())))
                except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
                    # no compiler, a compile error, an unloadable library or missing symbol
                    log.warning("C simulator kernels unavailable, using torch: %s", e)
                    _lib = e
    return _lib


def _cache_dir() -> Path:
    env = os.environ.get("QUMOS_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "qumos"


def _cpu_id() -> bytes:
    """What a -march=native library depends on: the CPU's model and feature flags (Linux's
    /proc/cpuinfo), else the platform's processor string."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        info = []
    keep = [line for line in info if line.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(dict.fromkeys(keep)).encode() or platform.processor().encode()


def _variants() -> list[list[str]]:
    """Flag sets to try in order: native first unless QUMOS_KERNEL_NATIVE=0."""
    native = os.environ.get("QUMOS_KERNEL_NATIVE", "1").strip() != "0"
    return [FLAGS + NATIVE, FLAGS] if native else [FLAGS]


def _compile() -> Path:
    """Path of the shared library, compiled if it is not in the cache yet: with NATIVE
    (keyed by this CPU) if the compiler takes it, else with the portable FLAGS."""
    source = SOURCE.read_bytes()
    version = subprocess.run(
        [*COMPILER, "--version"], capture_output=True, check=True, timeout=60
    ).stdout
    error: Exception | None = None
    for flags in _variants():
        command = " ".join([*COMPILER, *flags, *LIBS]).encode()
        parts = [source, command, version, platform.machine().encode()]
        if NATIVE[0] in flags:
            parts.append(_cpu_id())
        key = hashlib.sha256(b"\0".join(parts))
        lib = _cache_dir() / f"qumos_kernels_{key.hexdigest()[:16]}.so"
        if lib.exists():
            return lib
        try:
            _build(flags, lib)
            return lib
        except RuntimeError as e:  # e.g. a compiler without -march=native: the next set
            error = e
    assert error is not None
    raise error


def _build(flags: list[str], lib: Path) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=lib.parent, prefix=lib.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        res = subprocess.run(
            [*COMPILER, *flags, "-o", tmp, str(SOURCE), *LIBS],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(COMPILER)} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.debug("compiled %s with %s", lib, " ".join(flags))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _arg(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """t as the C code reads it: checked (a wrong pointer would corrupt memory, not raise),
    contiguous, and with torch's lazy conjugate / negative views applied (data_ptr() would
    otherwise show the un-conjugated numbers); no-ops when it already is."""
    if t.dtype != dtype or not t.is_cpu or t.shape != shape:
        raise ValueError(
            f"kernel argument {tuple(t.shape)} {t.dtype} on {t.device}; "
            f"expected {shape} {dtype} on the CPU"
        )
    return t.resolve_conj().resolve_neg().contiguous()


class Kernels:
    """Typed wrappers around the library's functions (see kernels.c). They take CPU tensors
    of one real dtype, float32 or float64 (states complex64 / complex128), of any layout,
    and return new contiguous tensors."""

    def __init__(self, lib: ctypes.CDLL):
        p, i, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        self._fn = {}
        for dtype, sfx in _SUFFIX.items():
            for name, args in (
                ("qk_encode_fwd", [long, long, i, i, i, p, p, p]),
                ("qk_encode_bwd", [long, long, i, i, i, p, p, p, i, i, p, p]),
                ("qk_readout_fwd", [long, i, p, p]),
                ("qk_readout_bwd", [long, i, p, p, p]),
                ("qk_unitary_fwd", [long, i, i, p, long, p, p, p, p, p]),
                ("qk_eur_fwd", [long, long, i, i, i, p, p, long, p, long, p]),
                ("qk_eur_bwd", [long, long, i, i, i, p, p, long, p, long, p, i, i, i, p, p, p]),
                ("qk_unitary_bwd", [long, i, i, p, long, p, p, p, p, p, p]),
            ):
                fn = getattr(lib, f"{name}_{sfx}")
                fn.argtypes, fn.restype = args, None
                self._fn[name, dtype] = fn

    @staticmethod
    def supports(t: torch.Tensor) -> bool:
        """Whether the kernels handle tensors like t (float32/64 or complex64/128, on the CPU)."""
        return t.is_cpu and (t.dtype in _SUFFIX or t.dtype in _REAL)

    @staticmethod
    def _segments(x: torch.Tensor, t_ri: torch.Tensor) -> tuple[int, int, int, int, int]:
        """(B, n_inputs, M, n, 2**L) of x (B, n_inputs) and t_ri (n, 2**L, 4) or per model
        (M, n, 2**L, 4): then the B rows are M equal segments, model-major."""
        if t_ri.dim() not in (3, 4) or t_ri.shape[-1] != 4 or x.dim() != 2:
            raise ValueError(
                f"kernel arguments x {tuple(x.shape)}, t_ri {tuple(t_ri.shape)}; "
                "expected (B, n_inputs) and ([M,] n, 2**L, 4)"
            )
        (b, n_in), m = x.shape, (t_ri.shape[0] if t_ri.dim() == 4 else 1)
        n, k = t_ri.shape[-3], t_ri.shape[-2]
        if m < 1 or b % m:
            raise ValueError(f"kernel argument: {b} rows are not {m} equal per-model segments")
        return b, n_in, m, n, k

    def encode_fwd(self, x: torch.Tensor, t_ri: torch.Tensor) -> torch.Tensor:
        """x (B, n_inputs), t_ri (n, 2**L, 4) -> psi (B, 2**n) complex. Per model: t_ri
        (M, n, 2**L, 4), rows b * M // B of x use t_ri[m] (M equal segments)."""
        b, n_in, m, n, k = self._segments(x, t_ri)
        x, t_ri = _arg(x, x.dtype, (b, n_in)), _arg(t_ri, x.dtype, tuple(t_ri.shape))
        psi = torch.empty(b, 2**n, dtype=_COMPLEX[x.dtype])
        self._fn["qk_encode_fwd", x.dtype](
            b, m, n, n_in, k.bit_length() - 1, x.data_ptr(), t_ri.data_ptr(), psi.data_ptr()
        )
        return psi

    def encode_bwd(
        self, x: torch.Tensor, t_ri: torch.Tensor, g_psi: torch.Tensor, need_x: bool, need_t: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """grad x (B, n_inputs) and grad t_ri (n, 2**L, 4), summed over the batch (per
        model: (M, n, 2**L, 4), each summed over its segment), from grad psi (B, 2**n);
        None where not needed."""
        if not (need_x or need_t):
            return None, None
        b, n_in, m, n, k = self._segments(x, t_ri)
        x, t_ri = _arg(x, x.dtype, (b, n_in)), _arg(t_ri, x.dtype, tuple(t_ri.shape))
        g_psi = _arg(g_psi, _COMPLEX[x.dtype], (b, 2**n))
        g_x = torch.empty_like(x) if need_x else None
        g_t = torch.empty_like(t_ri) if need_t else None
        self._fn["qk_encode_bwd", x.dtype](
            b,
            m,
            n,
            n_in,
            k.bit_length() - 1,
            x.data_ptr(),
            t_ri.data_ptr(),
            g_psi.data_ptr(),
            int(need_x),
            int(need_t),
            _ptr(g_x),
            _ptr(g_t),
        )
        return g_x, g_t

    def readout_fwd(self, phi: torch.Tensor, n: int) -> torch.Tensor:
        """phi (B, 2**n) complex -> (B, n) <Z_q>."""
        phi = _arg(phi, phi.dtype, (phi.shape[0], 2**n))
        out = torch.empty(phi.shape[0], n, dtype=_REAL[phi.dtype])
        self._fn["qk_readout_fwd", out.dtype](phi.shape[0], n, phi.data_ptr(), out.data_ptr())
        return out

    def readout_bwd(self, phi: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
        """grad phi (B, 2**n) complex from grad out (B, n)."""
        (b, n) = g_out.shape
        phi = _arg(phi, phi.dtype, (b, 2**n))
        g_out = _arg(g_out, _REAL[phi.dtype], (b, n))
        g_phi = torch.empty_like(phi)
        self._fn["qk_readout_bwd", g_out.dtype](
            b, n, phi.data_ptr(), g_out.data_ptr(), g_phi.data_ptr()
        )
        return g_phi

    def _eur_args(self, x: torch.Tensor, t_ri: torch.Tensor, r: torch.Tensor | None, s: int):
        """Checked, contiguous (x, t_ri, r, t_step, r_step, L) for S = s segments of x's rows
        (B, n_inputs); t_ri (n, 2**L, 4) or per segment (S, n, 2**L, 4), r None, (d, d) or
        (S, d, d)."""
        if x.dim() != 2 or s < 1 or x.shape[0] % s or t_ri.dim() not in (3, 4):
            raise ValueError(
                f"kernel arguments x {tuple(x.shape)}, t_ri {tuple(t_ri.shape)}, S {s}"
            )
        n, k = t_ri.shape[-3], t_ri.shape[-2]
        if t_ri.shape[-1] != 4 or (t_ri.dim() == 4 and t_ri.shape[0] != s):
            raise ValueError(
                f"kernel argument t_ri {tuple(t_ri.shape)}; expected ([{s},] n, 2**L, 4)"
            )
        t_step = n * k * 4 if t_ri.dim() == 4 else 0
        x = _arg(x, x.dtype, tuple(x.shape))
        t_ri = _arg(t_ri, x.dtype, tuple(t_ri.shape))
        r_step = 0
        if r is not None:
            d = 2**n
            per = r.dim() == 3
            r = _arg(r, _COMPLEX[x.dtype], (s, d, d) if per else (d, d))
            r_step = d * d if per else 0
        return x, t_ri, r, t_step, r_step, n, k.bit_length() - 1

    def eur_fwd(self, x: torch.Tensor, t_ri: torch.Tensor, r: torch.Tensor | None, s: int):
        """readout(encode(x, t_ri) @ r): x (B, n_inputs) in s model-major segments, t_ri
        and r shared or one per segment (`_eur_args`) -> (B, n) real."""
        x, t_ri, r, t_step, r_step, n, layers = self._eur_args(x, t_ri, r, s)
        out = torch.empty(x.shape[0], n, dtype=x.dtype)
        self._fn["qk_eur_fwd", x.dtype](
            x.shape[0], s, n, x.shape[1], layers, x.data_ptr(), t_ri.data_ptr(), t_step,
            _ptr(r), r_step, out.data_ptr(),
        )  # fmt: skip
        return out

    def eur_bwd(
        self, x: torch.Tensor, t_ri: torch.Tensor, r: torch.Tensor | None, s: int,
        g_out: torch.Tensor, need_x: bool, need_t: bool, need_r: bool,
    ):  # fmt: skip
        """(grad x, grad t_ri, grad r) of eur_fwd from grad out (B, n); None where not
        needed (grad r also None without r)."""
        x, t_ri, r, t_step, r_step, n, layers = self._eur_args(x, t_ri, r, s)
        g_out = _arg(g_out, x.dtype, (x.shape[0], n))
        need_r = need_r and r is not None
        g_x = torch.empty_like(x) if need_x else None
        g_t = torch.zeros_like(t_ri) if need_t else None
        g_r = torch.zeros_like(r) if need_r else None
        self._fn["qk_eur_bwd", x.dtype](
            x.shape[0], s, n, x.shape[1], layers, x.data_ptr(), t_ri.data_ptr(), t_step,
            _ptr(r), r_step, g_out.data_ptr(), int(need_x), int(need_t), int(need_r),
            _ptr(g_x), _ptr(g_t), _ptr(g_r),
        )  # fmt: skip
        return g_x, g_t, g_r

    # Lanes per block of kernels.c (W): the tape of unitary_fwd holds W rows per block.
    LANES = 16

    def unitary_fwd(self, n: int, program: UnitaryProgram, g: torch.Tensor, tape: bool = True):
        """R = U^T (M, d, d) complex of `program` with gate entries g (M, G) complex (one
        model per row), and the tape unitary_bwd needs (None if not `tape`)."""
        m, size = self._program_args(n, program, g)
        real = _REAL[g.dtype]
        g = _arg(g, g.dtype, (m, size))
        d, blocks = 2**n, -(-(2**n) // self.LANES)
        rows = m * blocks * len(program.ops) * 2 * d * self.LANES
        tape_t = torch.empty(rows, dtype=real) if tape else None
        r = torch.empty(m, d, d, dtype=g.dtype)
        sign = program.sign_as(real)
        self._fn["qk_unitary_fwd", real](
            m, n, len(program.ops), program.ops.data_ptr(), size, g.data_ptr(),
            program.perm.data_ptr(), sign.data_ptr(), _ptr(tape_t), r.data_ptr(),
        )  # fmt: skip
        return r, tape_t

    def unitary_bwd(
        self, n: int, program: UnitaryProgram, g: torch.Tensor, tape: torch.Tensor,
        g_r: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """grad g (M, G) complex from grad R (M, d, d), with unitary_fwd's tape."""
        m, size = self._program_args(n, program, g)
        real = _REAL[g.dtype]
        g = _arg(g, g.dtype, (m, size))
        g_r = _arg(g_r, g.dtype, (m, 2**n, 2**n))
        g_g = torch.empty(m, size, dtype=g.dtype)
        sign = program.sign_as(real)
        self._fn["qk_unitary_bwd", real](
            m, n, len(program.ops), program.ops.data_ptr(), size, g.data_ptr(),
            program.perm.data_ptr(), sign.data_ptr(), tape.data_ptr(), g_r.data_ptr(),
            g_g.data_ptr(),
        )  # fmt: skip
        return g_g

    @staticmethod
    def _program_args(n: int, program: UnitaryProgram, g: torch.Tensor) -> tuple[int, int]:
        if g.dim() != 2 or g.dtype not in _REAL or g.shape[1] != program.size:
            raise ValueError(
                f"kernel argument g {tuple(g.shape)} {g.dtype}; expected (M, {program.size}) "
                "complex64 or complex128"
            )
        return g.shape[0], program.size


class UnitaryProgram:
    """The ops of `qk_unitary_fwd` (kernels.c) for n qubits: `ops` (n_ops, 4) int32 rows
    (kind, a, b, off): kind 0 a one-qubit gate on wire a (entries off .. off + 3), 1 a
    two-qubit gate on wires a, b (off .. off + 15), 2 diagonal phases (off .. off + d - 1),
    3 the signed permutation b of `perms` [(perm (d,), sign (d,) real)], 4 a controlled
    gate (control a, target b; its 4x4 at off .. off + 15, only the |1><1| block read,
    the rest taken as the identity); `size` gate
    entries per model. Checked here: the C code trusts it (a bad index would corrupt
    memory, not raise)."""

    def __init__(self, n: int, ops: list[tuple[int, int, int, int]], perms: list, size: int):
        d = 2**n
        span = {0: 4, 1: 16, 2: d, 3: 0, 4: 16}
        for kind, a, b, off in ops:
            ok = kind in span and 0 <= off and off + span[kind] <= size
            if kind in (0, 1):
                ok = ok and 0 <= a < n
            if kind in (1, 4):
                ok = ok and 0 <= b < n and a != b
            if kind == 3:
                ok = ok and 0 <= b < len(perms)
            if not ok:
                raise ValueError(
                    f"unitary program op {(kind, a, b, off)} invalid for {n} qubits, {size} entries"
                )
        for perm, sign in perms:
            if sorted(perm.tolist()) != list(range(d)) or sign.shape != (d,) or sign.is_complex():
                raise ValueError(
                    "unitary program: each permutation needs perm (d,) and a real sign (d,)"
                )
        if not ops:
            raise ValueError("a unitary program needs at least one op")
        self.n, self.size = n, size
        self.ops = torch.tensor(ops, dtype=torch.int32).reshape(-1, 4)
        self.perm = (
            torch.stack([p for p, _ in perms]).to(torch.int32) if perms
            else torch.zeros(1, d, dtype=torch.int32)
        )  # fmt: skip
        self.sign = torch.stack([s for _, s in perms]).double() if perms else torch.ones(1, d)
        self._signs: dict = {}

    def sign_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The permutations' signs as dtype, converted once."""
        if dtype not in self._signs:
            self._signs[dtype] = self.sign.to(dtype).contiguous()
        return self._signs[dtype]
