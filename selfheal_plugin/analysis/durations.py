"""The one duration model of a tool's calls: a log-normal fitted with right-censoring.

The timeout strategy (what limit to propose) and the simulation (how many timed-out calls
a new limit would have let finish) both ask this module, so a proposal and its test use
the same fitted parameters and name the same model:
``durations ~ censored log-normal (n=…, censored=…)``.

Data (:func:`load_tool_calls`, then :func:`sample_from_calls`): a tool's finished calls
(``tool_complete`` events) whose timestamp is in the window, exactly the calls
:meth:`HistoryWindow.tool_calls <selfheal_plugin.plugins.strategy.HistoryWindow.tool_calls>`
gives, but read for one tool from the error index's ``selfheal_calls``. A successful call
with a duration is *observed*; a call that failed with error type ``timeout`` is *right-
censored* at the duration it was cut off at (it would have taken at least that long), or
at the configured limit when it has no duration. Other failures say nothing about how long
the tool takes and are left out. ``n`` is observed + censored.

Family: one, the log-normal. ``ln T`` is normal with (mu, sigma). One family keeps both
outputs naming the same model, and a tail chosen by whichever family wins an AIC contest
would move the proposed p99 by a whole family's tail at the switch point.

Fit: maximum likelihood of the normal on the log durations, censored ones by their log
survival (the log-normal likelihood up to the Jacobian ``Σ ln x``, which does not depend on
the parameters), by ``scipy.optimize.minimize`` with the analytic gradient and Hessian: the
same MLE as ``scipy.stats.lognorm.fit`` on ``CensoredData`` (tests/test_durations.py), in a
few milliseconds instead of a generic simplex search, and without importing scipy.stats
(~1 s) in the commands that fit.
Fewer than :data:`MIN_OBSERVED` observed durations, or observed durations that do not
vary, is **no model**: :func:`fit_durations` returns the reason instead of numbers.

Uncertainty: the covariance of (mu, ln sigma) is the inverse of the observed information
(the analytic second derivatives of the censored normal log-likelihood at the MLE).
Intervals are by the delta method: for a quantile on ``ln q``, for a probability on
``logit p`` (so they stay inside (0, 1)). The simulation draws (mu, ln sigma) from the same
normal approximation (:meth:`DurationModel.draws`) for its run-level bootstrap.

scipy is imported inside the functions that need it: it costs ~1–2 s at start-up and most
commands never fit a duration.
"""
from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, ClassVar

from selfheal_plugin.lazy import lazy_module
from selfheal_plugin.plugins.strategy import ToolCall, read_tool_calls

np = lazy_module("numpy")  # imported on first use: start-up does not pay for it

MODEL_NAME = "censored log-normal"
MIN_OBSERVED = 8  # observed (uncensored) durations needed to fit
TIMEOUT = "timeout"
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class DurationSample:
    """Durations in ms: ``observed`` (successful calls) and ``censored`` (timed out at)."""

    observed: tuple[float, ...]
    censored: tuple[float, ...]


def load_tool_calls(conn: sqlite3.Connection, tool: str, since: datetime,
                    until: datetime | None = None) -> list[ToolCall]:
    """Every finished call of ``tool`` with its event timestamp in [since, until), oldest
    first: what ``HistoryWindow(conn, since, until).tool_calls(tool)`` returns, read for one
    tool (:func:`~selfheal_plugin.plugins.strategy.read_tool_calls`)."""
    return read_tool_calls(conn, since, until, tool).get(tool, [])


def sample_from_calls(calls: Iterable[Any], limit_ms: float | None = None) -> DurationSample:
    """The sample of a tool's ``calls`` (objects with ``ok``, ``duration_ms`` and
    ``error_type``): successful calls observed, ``timeout`` failures censored at their
    duration (at ``limit_ms`` when they have none; left out when neither is known)."""
    observed, censored = [], []
    for c in calls:
        d = c.duration_ms if isinstance(c.duration_ms, (int, float)) and c.duration_ms > 0 else None
        if c.ok:
            if d is not None:
                observed.append(float(d))
        elif c.error_type == TIMEOUT:
            at = d if d is not None else limit_ms
            if isinstance(at, (int, float)) and at > 0:
                censored.append(float(at))
    return DurationSample(tuple(observed), tuple(censored))


def _log_sf(z: Any) -> Any:
    from scipy.special import log_ndtr

    return log_ndtr(-np.asarray(z, dtype=float))


def _hazard(z: Any) -> Any:
    """phi(z) / S(z) of the standard normal, stable far in the tail."""
    z = np.asarray(z, dtype=float)
    return np.exp(-0.5 * z * z - _LOG_SQRT_2PI - _log_sf(z))


@dataclass(frozen=True)
class DurationModel:
    """``ln T ~ Normal(mu, sigma)`` fitted with right-censoring (see the module docstring)."""

    mu: float
    sigma: float
    cov: tuple[tuple[float, float], tuple[float, float]]  # of (mu, ln sigma)
    observed: int
    censored: int
    max_observed_ms: float

    name: ClassVar[str] = MODEL_NAME

    @property
    def n(self) -> int:
        return self.observed + self.censored

    def describe(self) -> str:
        """``censored log-normal (n=…, censored=…)``: the model's name in every output."""
        return f"{MODEL_NAME} (n={self.n}, censored={self.censored})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cov"] = [list(r) for r in self.cov]
        return {"model": MODEL_NAME, "description": self.describe(), **d}

    # -------------------------------------------------------------- quantiles

    def quantile_ms(self, q: float) -> float:
        """The duration that a share ``q`` of calls finishes within."""
        from scipy.special import ndtri

        return float(math.exp(self.mu + self.sigma * float(ndtri(q))))

    def quantile_interval_ms(self, q: float, level: float = 0.95) -> tuple[float, float]:
        """Delta-method interval of the ``q`` quantile, on ``ln q``."""
        from scipy.special import ndtri

        zq = float(ndtri(q))
        grad = np.array([1.0, self.sigma * zq])
        se = math.sqrt(max(float(grad @ np.array(self.cov) @ grad), 0.0))
        k = float(ndtri(0.5 + level / 2)) * se
        centre = self.mu + self.sigma * zq
        return math.exp(centre - k), math.exp(centre + k)

    # -------------------------------------------------------------- finishing under a limit

    def p_finish(self, limit_ms: float, after_ms: Any = None, mu: Any = None, sigma: Any = None) -> np.ndarray:
        """P(T <= limit) or, per value c of ``after_ms``, P(T <= limit | T > c) (0 where
        limit <= c). With arrays ``mu``/``sigma`` of K parameter draws: a (K, n) matrix."""
        m = np.asarray(self.mu if mu is None else mu, dtype=float)
        s = np.asarray(self.sigma if sigma is None else sigma, dtype=float)
        if m.ndim:
            m, s = m[:, None], s[:, None]
        a = (math.log(limit_ms) - m) / s
        if after_ms is None:
            return 1.0 - np.exp(_log_sf(a))
        c = np.asarray(after_ms, dtype=float)
        b = (np.log(c) - m) / s
        p = 1.0 - np.exp(np.minimum(_log_sf(a) - _log_sf(b), 0.0))
        return np.where(limit_ms > c, p, 0.0)

    def _p_finish_grad(self, limit_ms: float, after_ms: Any) -> tuple[np.ndarray, np.ndarray]:
        """p and d p / d(mu, ln sigma), per point (shape (n,), (n, 2))."""
        s = self.sigma
        a = (math.log(limit_ms) - self.mu) / s
        ha = float(_hazard(a))
        if after_ms is None:
            c = np.array([0.0])
            lsf_b, hb, b = np.zeros(1), np.zeros(1), np.zeros(1)
        else:
            c = np.atleast_1d(np.asarray(after_ms, dtype=float))
            b = (np.log(c) - self.mu) / s
            lsf_b, hb = _log_sf(b), _hazard(b)
        r = np.exp(np.minimum(float(_log_sf(a)) - lsf_b, 0.0))  # S(L) / S(c)
        # d ln S(x)/d mu = h(x)/s, d ln S(x)/d ln s = h(x) x;  p = 1 - r
        grad = -r[:, None] * np.stack([(ha - hb) / s, ha * a - hb * b], axis=1)
        p = 1.0 - r
        inside = limit_ms > c
        return np.where(inside, p, 0.0), np.where(inside[:, None], grad, 0.0)

    def finish_estimate(self, limit_ms: float, after_ms: Any = None,
                        level: float = 0.95) -> tuple[float, float, float]:
        """``(p, lo, hi)``: the probability that a call finishes under ``limit_ms`` —
        averaged over the censoring points ``after_ms`` when given (the share of those
        timed-out calls the limit would have let finish) — with a delta-method interval
        on ``logit p``."""
        from scipy.special import ndtri

        p_i, g_i = self._p_finish_grad(limit_ms, after_ms)
        p = float(np.mean(p_i))
        grad = g_i.mean(axis=0)
        if not 0.0 < p < 1.0:
            return p, p, p
        var = max(float(grad @ np.array(self.cov) @ grad), 0.0) / (p * (1 - p)) ** 2
        k = float(ndtri(0.5 + level / 2)) * math.sqrt(var)
        logit = math.log(p / (1 - p))
        return p, 1 / (1 + math.exp(-(logit - k))), 1 / (1 + math.exp(-(logit + k)))

    def draws(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``k`` draws of (mu, sigma) from the MLE's normal approximation on (mu, ln sigma);
        the first one is the MLE itself."""
        theta = rng.multivariate_normal([self.mu, math.log(self.sigma)], np.array(self.cov), size=k)
        theta[0] = [self.mu, math.log(self.sigma)]
        return theta[:, 0], np.exp(theta[:, 1])


def information(mu: float, sigma: float, log_observed: np.ndarray, log_censored: np.ndarray) -> np.ndarray:
    """Observed information (minus the Hessian of the log-likelihood) in (mu, sigma) of a
    normal sample right-censored at ``log_censored``."""
    s2 = sigma * sigma
    z = (log_observed - mu) / sigma
    w = (log_censored - mu) / sigma
    h = _hazard(w)
    dh = h * (h - w)  # h'(w)
    l_mm = -len(z) / s2 - np.sum(dh) / s2
    l_ms = -2 * np.sum(z) / s2 - np.sum(dh * w + h) / s2
    l_ss = np.sum(1 - 3 * z * z) / s2 - np.sum(dh * w * w + 2 * h * w) / s2
    return -np.array([[l_mm, l_ms], [l_ms, l_ss]])


def _mle(x: np.ndarray, c: np.ndarray) -> tuple[float, float]:
    """(mu, sigma) maximising the censored normal log-likelihood of log durations ``x``
    (observed) and ``c`` (right-censored): ``scipy.optimize.minimize`` (trust-exact) on
    (mu, ln sigma) with the analytic gradient and Hessian (:func:`information`), from the
    observed sample's mean and spread; NaNs when it does not converge."""
    from scipy.optimize import minimize

    n = len(x)

    def nll(theta: np.ndarray) -> float:
        mu, sigma = theta[0], math.exp(theta[1])
        z = (x - mu) / sigma
        return n * theta[1] + 0.5 * float(z @ z) - float(_log_sf((c - mu) / sigma).sum())

    def jac(theta: np.ndarray) -> np.ndarray:
        mu, sigma = theta[0], math.exp(theta[1])
        z, w = (x - mu) / sigma, (c - mu) / sigma
        h = _hazard(w)
        return np.array([-(z.sum() + h.sum()) / sigma, n - float(z @ z) - float(h @ w)])

    def hess(theta: np.ndarray) -> np.ndarray:
        mu, sigma = theta[0], math.exp(theta[1])
        i = information(mu, sigma, x, c)  # -(Hessian of the log-likelihood) in (mu, sigma)
        return np.array([[i[0, 0], sigma * i[0, 1]], [sigma * i[0, 1], sigma * sigma * i[1, 1] + jac(theta)[1]]])

    start = np.array([float(x.mean()), math.log(float(x.std()))])
    res = minimize(nll, start, jac=jac, hess=hess, method="trust-exact", options={"gtol": 1e-8})
    if not res.success and np.abs(res.jac).max() > 1e-5 * max(1, n + len(c)):
        return math.nan, math.nan
    return float(res.x[0]), math.exp(float(res.x[1]))


def fit_durations(observed_ms: Iterable[float], censored_ms: Iterable[float] = ()) -> DurationModel | str:
    """Fit the censored log-normal to durations in ms; the reason (a str) when the data
    cannot support a model (too few observed durations, no spread, no convergence)."""
    obs = np.array([d for d in observed_ms if d and d > 0], dtype=float)
    cens = np.array([c for c in censored_ms if c and c > 0], dtype=float)
    if len(obs) < MIN_OBSERVED:
        return (f"only {len(obs)} successful calls with a duration (need {MIN_OBSERVED}) to fit the "
                f"{MODEL_NAME} model ({len(cens)} timed out)")
    x, c = np.log(obs), np.log(cens)
    if np.ptp(x) == 0:
        return f"all {len(obs)} successful calls took {obs[0]:.0f} ms: no spread to fit a duration model to"
    mu, sigma = _mle(x, c)
    if not (math.isfinite(mu) and math.isfinite(sigma) and sigma > 0):
        return f"the {MODEL_NAME} fit did not converge"
    try:
        cov_s = np.linalg.inv(information(mu, sigma, x, c))
    except np.linalg.LinAlgError:
        return f"the {MODEL_NAME} fit is degenerate (singular information matrix)"
    jac = np.diag([1.0, 1.0 / sigma])  # (mu, sigma) → (mu, ln sigma)
    cov = jac @ cov_s @ jac
    if not (np.all(np.isfinite(cov)) and np.all(np.linalg.eigvalsh(cov) > 0)):
        return f"the {MODEL_NAME} fit is degenerate (the likelihood is not curved at its maximum)"
    return DurationModel(mu, sigma, ((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
                         len(obs), len(cens), float(obs.max()))


def fit_sample(sample: DurationSample) -> DurationModel | str:
    return fit_durations(sample.observed, sample.censored)
