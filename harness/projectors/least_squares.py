"""Least-squares projectors from accumulated second moments: mat (no intercept) and affine (with one).

One pass over the fit positions accumulates, in float64, the Gram matrix of the stacked states
[h_0 | h_1 | ... | h_L] and their sums. Every ordered pair (l, l') then comes from the normal equations
without revisiting the data: mat solves G_ll M = G_ll', affine solves the same on centred moments.
When the stacked Gram would not fit in memory, only the blocks that the lens metrics need (every
layer to the last) are accumulated.
"""

from __future__ import annotations

import os
import warnings

import torch

from .base import Projector

PAIR_MODES = ("all", "last")
BUFFER_BYTES = 384 << 20


def stacked_gram_bytes(num_states: int, d: int) -> int:
    return (num_states * d) ** 2 * 8


def available_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def choose_pair_mode(requested: str, num_states: int, d: int) -> str:
    """``all`` unless the stacked Gram (plus the product that updates it) would take over 40% of free memory."""
    if requested not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {PAIR_MODES}, got {requested!r}")
    if requested == "all" and 2 * stacked_gram_bytes(num_states, d) > 0.4 * available_memory_bytes():
        warnings.warn(
            f"the stacked Gram matrix of {num_states} x {d} features needs {stacked_gram_bytes(num_states, d) / 2**30:.1f} GiB; "
            "fitting only the pairs to the last layer",
            RuntimeWarning,
            stacklevel=2,
        )
        return "last"
    return requested


class GramAccumulator:
    """Second moments of hidden states h_0..h_L over fit positions, in float64."""

    def __init__(self, num_states: int, d: int, pairs: str = "all", buffer_rows: int | None = None):
        self.num_states, self.d, self.pairs = num_states, d, pairs
        self.n = 0
        # Rows are buffered so that the large Gram is updated by a few big products, not many thin ones.
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        # as many rows as fit in BUFFER_BYTES of float64 (bigger products run faster), within [256, 4096]
        self.buffer_rows = buffer_rows or max(256, min(4096, BUFFER_BYTES // (num_states * d * 8)))
        self.sums = torch.zeros(num_states, d, dtype=torch.float64)
        if pairs == "all":
            self.gram = torch.zeros(num_states * d, num_states * d, dtype=torch.float64)
        else:
            # diagonal blocks G_ll for every state and cross blocks G_lL to the last one
            self.diag = torch.zeros(num_states, d, d, dtype=torch.float64)
            self.cross = torch.zeros(num_states - 1, d, d, dtype=torch.float64)

    def update(self, states: torch.Tensor) -> None:
        """Add positions: ``states`` is (num_states, P, d)."""
        if states.shape[0] != self.num_states or states.shape[2] != self.d:
            raise ValueError(f"expected states of shape ({self.num_states}, P, {self.d}), got {tuple(states.shape)}")
        self._buffer.append(states.detach().to("cpu", torch.float64))
        self._buffered += states.shape[1]
        if self._buffered >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        x = torch.cat(self._buffer, dim=1)
        self._buffer, self._buffered = [], 0
        self.n += x.shape[1]
        self.sums += x.sum(1)
        if self.pairs == "all":
            # only the blocks on and above the diagonal (the Gram is symmetric): half the products
            d = self.d
            z = x.permute(1, 0, 2).reshape(x.shape[1], -1)
            for l in range(self.num_states):
                self.gram[l * d:(l + 1) * d, l * d:].addmm_(z[:, l * d:(l + 1) * d].T, z[:, l * d:])
        else:
            self.diag += torch.einsum("lpd,lpe->lde", x, x)
            self.cross += torch.einsum("lpd,pe->lde", x[:-1], x[-1])

    def block(self, l: int, m: int) -> torch.Tensor:
        """Sum over positions of h_l h_m^T."""
        self.flush()
        if self.pairs == "all":
            d = self.d
            if l > m:  # stored above the diagonal only
                return self.gram[m * d:(m + 1) * d, l * d:(l + 1) * d].T
            return self.gram[l * d:(l + 1) * d, m * d:(m + 1) * d]
        if l == m:
            return self.diag[l]
        if m == self.num_states - 1:
            return self.cross[l]
        raise KeyError(f"pair ({l}, {m}) was not accumulated (pairs='last')")

    def pairs_to_fit(self) -> list[tuple[int, int]]:
        last = self.num_states - 1
        if self.pairs == "all":
            return [(l, m) for l in range(self.num_states) for m in range(l + 1, self.num_states)]
        return [(l, last) for l in range(last)]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a data-parallel reduction sums: every accumulated tensor and the count."""
        self.flush()
        out = {"n": torch.tensor([float(self.n)], dtype=torch.float64), "sums": self.sums}
        if self.pairs == "all":
            out["gram"] = self.gram
        else:
            out["diag"], out["cross"] = self.diag, self.cross
        return out

    def add(self, other: "GramAccumulator") -> "GramAccumulator":
        """The statistics of both accumulators' positions together (a new accumulator)."""
        out = GramAccumulator(self.num_states, self.d, self.pairs, self.buffer_rows)
        mine, theirs, target = self.state_tensors(), other.state_tensors(), out.state_tensors()
        for key, value in target.items():
            value.copy_(mine[key] + theirs[key])
        out.n = self.n + other.n
        return out

    def reduce(self, sum_) -> None:
        """Combine the statistics of several processes: ``sum_`` all-reduces a list of tensors in place."""
        state = self.state_tensors()
        sum_(list(state.values()))
        self.n = int(state["n"].item())


class FitError(ValueError):
    """The least-squares statistics or solution are unusable (non-finite); the message says which."""


def _solve_spd(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve gram @ X = rhs, with Jacobi scaling so that a few huge coordinates do not ruin the conditioning."""
    if not (torch.isfinite(gram).all() and torch.isfinite(rhs).all()):
        # LAPACK would stop on an internal assertion, or return garbage
        raise FitError("the accumulated second moments hold inf/NaN: some fit positions had non-finite hidden states "
                       f"({int((~torch.isfinite(gram)).sum())} non-finite Gram entries)")
    scale = gram.diagonal().clamp_min(1e-300).sqrt()
    g = gram / scale[:, None] / scale[None, :]
    r = rhs / scale[:, None]
    try:
        x = torch.linalg.solve(g, r)
        if not torch.isfinite(x).all():
            raise RuntimeError("non-finite solution")
    except RuntimeError:
        # Singular (fewer positions than dimensions, or collinear features): minimum-norm least squares.
        x = torch.linalg.lstsq(g, r, driver="gelsd").solution
    x = x / scale[:, None]
    if not torch.isfinite(x).all():
        raise FitError(f"the least-squares solution holds {int((~torch.isfinite(x)).sum())} non-finite value(s) "
                       f"although its statistics are finite (largest Gram diagonal {float(gram.diagonal().max()):.3g}): "
                       "the hidden states are too large to solve for in float64")
    return x


def _sources(acc: GramAccumulator) -> dict[int, list[int]]:
    by_source: dict[int, list[int]] = {}
    for l, m in acc.pairs_to_fit():
        by_source.setdefault(l, []).append(m)
    return by_source


def normal_equations(acc: GramAccumulator, l: int, targets: list[int], intercept: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, R) of the least-squares problem from h_l to the stacked targets; centred when fitting an intercept."""
    mean = acc.sums / acc.n
    g = acc.block(l, l)
    rhs = torch.cat([acc.block(l, m) for m in targets], dim=1)
    if intercept:
        g = g - acc.n * torch.outer(mean[l], mean[l])
        rhs = rhs - acc.n * torch.outer(mean[l], torch.cat([mean[m] for m in targets]))
    return g, rhs


def ridge_penalty(g: torch.Tensor, ridge: float) -> torch.Tensor:
    """``ridge`` relative to the mean diagonal of G, so that one value means the same at every layer and scale."""
    return g + ridge * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)


def fit_least_squares(acc: GramAccumulator, intercept: bool,
                      ridge: float | dict[int, float] = 0.0) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]]:
    """Solutions M (d, d) and b (d) with v = h_l @ M + b for every accumulated pair, in float64.

    ``ridge`` (one value, or one per source layer) adds ridge * mean(diag G) * I to the Gram matrix G."""
    acc.flush()
    if acc.n == 0:
        raise ValueError("no fit positions were accumulated")
    out = {}
    mean = acc.sums / acc.n
    for l, targets in _sources(acc).items():
        g, rhs = normal_equations(acc, l, targets, intercept)
        lam = ridge.get(l, 0.0) if isinstance(ridge, dict) else ridge
        if lam > 0:
            g = ridge_penalty(g, lam)
        try:
            sol = _solve_spd(g, rhs)
        except FitError as exc:
            raise FitError(f"{'affine' if intercept else 'mat'} from layer {l}: {exc}") from None
        for k, m in enumerate(targets):
            M = sol[:, k * acc.d:(k + 1) * acc.d]
            b = mean[m] - mean[l] @ M if intercept else None
            out[(l, m)] = (M, b)
    return out


class LeastSquaresProjector(Projector):
    """v = h_l @ M[l, l'] (+ b[l, l']); ``name`` is 'mat' without intercept, 'affine' with one."""

    def __init__(self, name: str, solutions: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]]):
        self.name = name
        self.solutions = solutions
        self._stacked: dict = {}

    def pairs(self) -> list[tuple[int, int]]:
        return sorted(self.solutions)

    def _stack(self, sources: tuple[int, ...], target: int, device, dtype):
        key = (sources, target, device, dtype)
        if key not in self._stacked:
            try:
                Ms = torch.stack([self.solutions[(l, target)][0] for l in sources]).to(device, dtype)
            except KeyError as exc:
                raise KeyError(f"{self.name}: no fitted map for pair {exc.args[0]}") from None
            bs = None
            if self.solutions[(sources[0], target)][1] is not None:
                bs = torch.stack([self.solutions[(l, target)][1] for l in sources]).to(device, dtype)[:, None, :]
            self._stacked[key] = (Ms, bs)
        return self._stacked[key]

    def project(self, states: torch.Tensor, sources: list[int], target: int) -> torch.Tensor:
        Ms, bs = self._stack(tuple(sources), target, states.device, states.dtype)
        out = torch.bmm(states[list(sources)], Ms)  # all source layers in one batched product
        return out + bs if bs is not None else out

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for (l, m), (M, b) in self.solutions.items():
            out[f"M.{l}.{m}"] = M.to(torch.float32).contiguous()
            if b is not None:
                out[f"b.{l}.{m}"] = b.to(torch.float32).contiguous()
        return out

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor]) -> "LeastSquaresProjector":
        solutions = {}
        for key, M in tensors.items():
            kind, l, m = key.split(".")
            if kind == "M":
                solutions[(int(l), int(m))] = (M, tensors.get(f"b.{l}.{m}"))
        if not solutions:
            raise ValueError(f"{name}: no matrices in the stored tensors")
        return cls(name, solutions)


RIDGE_GRID = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def held_out_error(held: GramAccumulator, l: int, targets: list[int], M: torch.Tensor, b: torch.Tensor | None) -> float:
    """Sum over the held-out positions of ||h_l M + b - y||^2 (y the stacked targets), from their moments only."""
    held.flush()
    n = held.n
    gxx = held.block(l, l)
    gxy = torch.cat([held.block(l, m) for m in targets], dim=1)
    yy = sum(held.block(m, m).diagonal().sum() for m in targets)
    sse = yy - 2 * (M * gxy).sum() + (M * (gxx @ M)).sum()
    if b is not None:
        sx = held.sums[l]
        sy = torch.cat([held.sums[m] for m in targets])
        sse = sse + 2 * (b * (sx @ M)).sum() - 2 * (b * sy).sum() + n * (b * b).sum()
    return float(sse)


def choose_ridge(train: GramAccumulator, held: GramAccumulator, intercept: bool,
                 grid: tuple[float, ...] = RIDGE_GRID) -> tuple[dict[int, float], dict[int, list[float]]]:
    """Per source layer, the ridge of ``grid`` with the least held-out squared error of a fit on ``train``;
    and every candidate's held-out error relative to the unpenalised one's (for the record)."""
    train.flush()
    held.flush()
    if train.n == 0 or held.n == 0:
        raise ValueError("ridge=auto needs fit positions both to fit and to hold out")
    chosen, errors = {}, {}
    mean = train.sums / train.n
    for l, targets in _sources(train).items():
        g, rhs = normal_equations(train, l, targets, intercept)
        errs = []
        for lam in grid:
            M = _solve_spd(ridge_penalty(g, lam) if lam > 0 else g, rhs)
            b = (torch.cat([mean[m] for m in targets]) - mean[l] @ M) if intercept else None
            errs.append(held_out_error(held, l, targets, M, b))
        best = min(range(len(grid)), key=lambda k: errs[k])
        chosen[l] = grid[best]
        errors[l] = [e / errs[0] if errs[0] > 0 else float("nan") for e in errs]
    return chosen, errors
