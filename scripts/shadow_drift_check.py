"""Resampling check of the shadow monitor's drift test and of drift tightening (docs/monitoring.md).

    flock /tmp/boostserve-heavy.lock .venv/bin/python scripts/shadow_drift_check.py
    # writes docs/benchmarks/shadow_drift.json, .md and .png (~1-2 min on 2 cores)

Why a resampling check: the test's level rests on a normal approximation and on a calibration
split that also chose the thresholds (the same images pick the point and estimate its
expectation), so its false-alarm rate is measured, not assumed. The population is the Fashion-MNIST
test split (10,000 images) run through the serving engine of the shipped model: every exit's
label, confidence and correctness is known, so the exact disagreement of any threshold vector on
any image is known too. Each of R draws takes 5,000 images i.i.d. (with replacement) from it as a
calibration split, resolves `max_accuracy_drop=d` on it exactly as the server does
(`service.core.policies`), computes the expectation (`service.core.shadow.expected_disagreement`:
the upper count the server uses, and the exact count an artifact storing the exits' labels would
allow), and tests windows of `DRIFT_WINDOW` shadow samples drawn i.i.d. from a scenario:

* clean: the same population (no drift): every alarm is a false alarm;
* hard third: the third of the population the shipped calibration finds hardest (latest exit under
  the served thresholds, then lowest first-exit confidence): a shift of the exit mix;
* noise s: every image with Gaussian pixel noise of s * 255 added (a covariate shift the model
  never saw), run through the engine again.

The live exit mix of a window is the scenario population's own (the server counts every exit, a
hundred times more images than samples at the default 1 %). Tightening is simulated with the
server's own `DriftTightener` and ladder (`drift_budget`): per draw, windows from the scenario at
the point in force, the level moved by each window's z; reported are the final level, MACs and the
real accuracy drop on the scenario (labels known here, never to the server). The exit-mix alert's
distance (total variation between a 2,000-image live mix and the draw's calibrated fractions) is
measured on the same draws.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import DEFAULT_DATA_DIR, load_test_set, preprocess
from service.core import policies
from service.core.artifact import CalibrationData, load_manifest
from service.core.engine import Engine
from service.core.exit_rule import confidence, exit_indices, softmax
from service.core.knobs import Budget
from service.core.shadow import (
    DRIFT_WINDOW,
    DRIFT_Z,
    DriftTightener,
    drift_budget,
    drift_statistic,
    expected_disagreement,
)

REPO = Path(__file__).resolve().parents[1]
ARTIFACT = REPO / "service" / "embedded_model"
OUT = REPO / "docs" / "benchmarks"
CAL_SIZE = 5000
MIX_IMAGES = 2000  # the exit-mix alert's volume guard (15 min)


@dataclass(frozen=True)
class Population:
    """Engine outputs on a set of images: confidence (E, n), labels (E, n), correct (E, n)."""

    name: str
    conf: np.ndarray
    pred: np.ndarray
    correct: np.ndarray

    def take(self, idx: np.ndarray) -> Population:
        return Population(self.name, self.conf[:, idx], self.pred[:, idx], self.correct[:, idx])


def run_engine(engine: Engine, x: np.ndarray, labels: np.ndarray, name: str) -> Population:
    parts = [engine.run_all_stages(x[i : i + 512]) for i in range(0, len(x), 512)]  # batches of 512
    logits = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]  # E x (n, classes)
    conf = np.stack([confidence(softmax(np.asarray(f, dtype=np.float32))) for f in logits])  # (E, n)
    pred = np.stack([np.asarray(f).argmax(axis=-1) for f in logits])  # (E, n)
    return Population(name, conf, pred, pred == labels[None, :])


def window_counts(
    pop: Population, thresholds: tuple[float, ...], rng: np.random.Generator, windows: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`windows` windows of DRIFT_WINDOW shadow samples from `pop` at `thresholds`: (live exits, samples,
    disagreements) per early exit, the live mix being the population's own."""
    exits = exit_indices(pop.conf, thresholds)  # (n,)
    early_exits = pop.conf.shape[0] - 1
    early = np.flatnonzero(exits < early_exits)
    if early.size == 0:
        return []
    mix = np.bincount(exits[early], minlength=early_exits)[:early_exits] * 100  # live counts, x100 the samples
    differ = pop.pred[exits[early], early] != pop.pred[-1, early]  # (early,)
    out = []
    for _ in range(windows):
        pick = rng.integers(0, early.size, DRIFT_WINDOW)  # i.i.d. shadow samples among early exits
        k = exits[early[pick]]
        m = np.bincount(k, minlength=early_exits)[:early_exits]
        x = np.bincount(k[differ[pick]], minlength=early_exits)[:early_exits]
        out.append((mix, m, x))
    return out


def real_drop(pop: Population, thresholds: tuple[float, ...]) -> float:
    exits = exit_indices(pop.conf, thresholds)
    n = pop.conf.shape[1]
    return float(pop.correct[-1].mean() - pop.correct[exits, np.arange(n)].mean())


def clopper_pearson_upper(k: int, n: int, alpha: float = 0.05) -> float:
    from service.core.policies.risk import binom_upper

    return float(binom_upper(k, n, alpha))


def tvd(
    pop: Population, thresholds: tuple[float, ...], fractions: tuple[float, ...], rng: np.random.Generator
) -> float:
    pick = rng.integers(0, pop.conf.shape[1], MIX_IMAGES)
    exits = exit_indices(pop.conf[:, pick], thresholds)
    live = np.bincount(exits, minlength=len(fractions)) / MIX_IMAGES
    return float(0.5 * np.abs(live - np.asarray(fractions)).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--windows", type=int, default=10, help="drift windows per draw and scenario")
    parser.add_argument("--tighten-windows", type=int, default=24)
    parser.add_argument("--drops", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--populations-cache", type=Path, default=None, help="npz of the engine outputs (written if missing)"
    )
    args = parser.parse_args()
    started = time.time()

    manifest = load_manifest(ARTIFACT, verify=True)
    engine = Engine(manifest, ARTIFACT)
    test = load_test_set(args.data)
    spec = manifest.preprocessing

    def tensor(raw: np.ndarray) -> np.ndarray:
        return preprocess(raw, height=spec.height, width=spec.width, channels=spec.channels, mean=list(spec.mean),
                          std=list(spec.std), input_scale=spec.input_scale, resize=spec.resize)  # fmt: skip

    rng = np.random.default_rng(args.seed)
    cache = args.populations_cache
    if cache is not None and cache.is_file():
        with np.load(cache) as data:
            names = [str(v) for v in data["names"]]
            loaded = {
                n: Population(n, data[f"{i}_conf"], data[f"{i}_pred"], data[f"{i}_correct"])
                for i, n in enumerate(names)
            }
        clean = loaded.pop("clean")
        scenarios = loaded
        rng.normal(0.0, 1.0, (len(scenarios), *test.images.shape))  # the same stream as without the cache
    else:
        clean = run_engine(engine, tensor(test.images), test.labels, "clean")
        scenarios = {}
        for s in args.noise:
            noisy = np.clip(test.images.astype(np.float64) + rng.normal(0.0, s * 255.0, test.images.shape), 0, 255)
            name = f"noise {s:g}"
            scenarios[name] = run_engine(engine, tensor(noisy.astype(np.uint8)), test.labels, name)
        if cache is not None:
            pops = [clean, *scenarios.values()]
            arrays: dict[str, np.ndarray] = {"names": np.asarray([p.name for p in pops])}
            for i, p in enumerate(pops):
                arrays.update({f"{i}_conf": p.conf, f"{i}_pred": p.pred, f"{i}_correct": p.correct})
            np.savez(cache, **arrays)
    cum_macs = np.asarray(manifest.cumulative_macs, dtype=np.float64)
    n = clean.conf.shape[1]

    results: dict[str, Any] = {"drops": {}}
    for d in args.drops:
        # The hard third, by the shipped calibration's own exits at this drop.
        from service.core.artifact import load_calibration

        shipped = load_calibration(ARTIFACT, manifest)
        served = policies.max_accuracy_drop(shipped, d).thresholds
        order = np.lexsort((clean.conf[0], -exit_indices(clean.conf, served)))  # hardest first
        pops = {"clean": clean, "hard third": clean.take(order[: n // 3]), **scenarios}
        alarms = {name: {"upper": 0, "exact": 0} for name in pops}
        tested = {name: 0 for name in pops}
        live_rates: dict[str, list[float]] = {name: [] for name in pops}
        expected_upper: list[float] = []
        expected_exact: list[float] = []
        tvds: dict[str, list[float]] = {name: [] for name in pops}
        tighten: dict[str, list[dict[str, float]]] = {name: [] for name in pops}
        tighten_exact: dict[str, list[dict[str, float]]] = {name: [] for name in pops}
        for _ in range(args.resamples):
            idx = rng.integers(0, n, CAL_SIZE)
            draw = clean.take(idx)
            cal = CalibrationData(draw.conf, draw.correct, cum_macs)
            point = policies.max_accuracy_drop(cal, d)
            thresholds = point.thresholds
            upper = expected_disagreement(cal, thresholds)
            exact = expected_disagreement(cal, thresholds, draw.pred == draw.pred[-1][None, :])
            if upper.early == 0:
                continue
            expected_upper.append(upper.early_rate() or 0.0)
            expected_exact.append(exact.early_rate() or 0.0)
            assert point.exit_fractions is not None
            for name, pop in pops.items():
                tvds[name].append(tvd(pop, thresholds, point.exit_fractions, rng))
                for counts in window_counts(pop, thresholds, rng, args.windows):
                    tested[name] += 1
                    z_upper, live = drift_statistic(upper, *counts)
                    z_exact, _ = drift_statistic(exact, *counts)
                    alarms[name]["upper"] += int(z_upper > DRIFT_Z)
                    alarms[name]["exact"] += int(z_exact > DRIFT_Z)
                    live_rates[name].append(live)
                # Tightening as the server does it (upper null), and with the exact null for comparison.
                for rows, exact_null in ((tighten, False), (tighten_exact, True)):
                    rows[name].append(
                        simulate_tightening(cal, d, point, pop, draw, exact_null, args.tighten_windows, rng)
                    )
        per: dict[str, Any] = {}
        for name in pops:
            t = tested[name]
            rows = tighten[name]
            per[name] = {
                "windows": t,
                "alarm_rate_upper": alarms[name]["upper"] / t if t else None,
                "alarm_rate_upper_cp95": clopper_pearson_upper(alarms[name]["upper"], t) if t else None,
                "alarm_rate_exact": alarms[name]["exact"] / t if t else None,
                "alarm_rate_exact_cp95": clopper_pearson_upper(alarms[name]["exact"], t) if t else None,
                "live_disagreement_mean": float(np.mean(live_rates[name])) if live_rates[name] else None,
                "tvd_p50": float(np.percentile(tvds[name], 50)),
                "tvd_p99": float(np.percentile(tvds[name], 99)),
                "tvd_max": float(np.max(tvds[name])),
                "tightened_share": float(np.mean([r["level"] > 0 for r in rows])),
                "level_mean": float(np.mean([r["level"] for r in rows])),
                "macs_fraction_base": float(np.mean([r["base_macs_fraction"] for r in rows])),
                "macs_fraction_after": float(np.mean([r["macs_fraction"] for r in rows])),
                "real_drop_base": float(np.mean([r["base_real_drop"] for r in rows])),
                "real_drop_after": float(np.mean([r["real_drop"] for r in rows])),
                "violations_base": float(np.mean([r["base_real_drop"] > d for r in rows])),
                "violations_after": float(np.mean([r["real_drop"] > d for r in rows])),
                "exact_null": {
                    "tightened_share": float(np.mean([r["level"] > 0 for r in tighten_exact[name]])),
                    "macs_fraction_after": float(np.mean([r["macs_fraction"] for r in tighten_exact[name]])),
                    "real_drop_after": float(np.mean([r["real_drop"] for r in tighten_exact[name]])),
                    "violations_after": float(np.mean([r["real_drop"] > d for r in tighten_exact[name]])),
                },
            }
        results["drops"][f"{d:g}"] = {
            "expected_upper_mean": float(np.mean(expected_upper)),
            "expected_exact_mean": float(np.mean(expected_exact)),
            "scenarios": per,
        }
    results["config"] = {
        "resamples": args.resamples,
        "windows_per_draw": args.windows,
        "tighten_windows": args.tighten_windows,
        "drift_window": DRIFT_WINDOW,
        "drift_z": DRIFT_Z,
        "calibration_size": CAL_SIZE,
        "population": f"Fashion-MNIST test split ({n} images) through the serving engine of {manifest.name} "
        f"{manifest.version}",
        "mix_images": MIX_IMAGES,
        "seed": args.seed,
        "seconds": round(time.time() - started, 1),
        "command": "python scripts/shadow_drift_check.py",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow_drift.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "shadow_drift.md").write_text(markdown(results))
    plot(results, args.out / "shadow_drift.png")
    print(markdown(results))
    return 0


def simulate_tightening(
    cal: CalibrationData,
    d: float,
    point: Any,
    pop: Population,
    draw: Population,
    exact_null: bool,
    windows: int,
    rng: np.random.Generator,
) -> dict[str, float]:
    """The server's DriftTightener and ladder on one draw, windows from `pop` at the point in force."""
    agrees = draw.pred == draw.pred[-1][None, :] if exact_null else None
    full = float(cal.cumulative_macs[-1])
    tightener = DriftTightener()
    base = Budget.of(max_accuracy_drop=d)
    cache: dict[int, Any] = {0: (point, expected_disagreement(cal, point.thresholds, agrees))}
    for _ in range(windows):
        level_point, level_exp = cache[tightener.level]
        counts = window_counts(pop, level_point.thresholds, rng, 1)
        if not counts:
            break  # the full network: nothing exits early, nothing to watch
        level = tightener.decide(drift_statistic(level_exp, *counts[0])[0])
        if level not in cache:
            budget = drift_budget(base, level)
            assert budget is not None
            tight = policies.max_accuracy_drop(cal, float(budget.value))
            cache[level] = (tight, expected_disagreement(cal, tight.thresholds, agrees))
    current = cache[tightener.level][0]
    macs = np.asarray(cal.cumulative_macs, dtype=np.float64)
    return {
        "level": float(tightener.level),
        "macs_fraction": float(np.dot(_fractions(pop, current.thresholds), macs) / full),
        "real_drop": real_drop(pop, current.thresholds),
        "base_real_drop": real_drop(pop, point.thresholds),
        "base_macs_fraction": float(np.dot(_fractions(pop, point.thresholds), macs) / full),
    }


def _fractions(pop: Population, thresholds: tuple[float, ...]) -> np.ndarray:
    exits = exit_indices(pop.conf, thresholds)
    return np.bincount(exits, minlength=pop.conf.shape[0]) / pop.conf.shape[1]


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f} %"


def markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    lines = [
        "# Shadow monitor: resampling check of the drift test and of drift tightening",
        "",
        f"Generated by `{c['command']}` ({c['seconds']} s). Population: {c['population']}. "
        f"{c['resamples']} calibration draws of {c['calibration_size']} images (i.i.d., with replacement); "
        f"per draw and scenario {c['windows_per_draw']} windows of {c['drift_window']} shadow samples, "
        f"drift when z > {c['drift_z']}; tightening simulated over {c['tighten_windows']} windows per draw; "
        f"exit-mix distance on {c['mix_images']} live images. Rates carry their Clopper-Pearson 95 % upper "
        "limit. 'upper' = the null the server uses (calibration stores correctness only); 'exact' = the "
        "null an artifact storing the exits' labels would allow.",
        "",
    ]
    for d, block in results["drops"].items():
        lines += [
            f"## max_accuracy_drop = {float(d) * 100:g} %",
            "",
            f"Calibrated early-exit disagreement (mean over draws): upper {_pct(block['expected_upper_mean'], 2)}, "
            f"exact {_pct(block['expected_exact_mean'], 2)}.",
            "",
            "| scenario | live disagreement | alarms/window (upper) | 95 % limit | alarms/window (exact) | 95 % limit "
            "| exit-mix TVD p50 / p99 / max |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for name, s in block["scenarios"].items():
            lines.append(
                f"| {name} | {_pct(s['live_disagreement_mean'], 2)} | {_pct(s['alarm_rate_upper'], 2)} | "
                f"{_pct(s['alarm_rate_upper_cp95'], 2)} | {_pct(s['alarm_rate_exact'], 2)} | "
                f"{_pct(s['alarm_rate_exact_cp95'], 2)} | "
                f"{s['tvd_p50']:.3f} / {s['tvd_p99']:.3f} / {s['tvd_max']:.3f} |"
            )
        lines += [
            "",
            "Drift tightening (the server's rule, upper null), after the simulated windows:",
            "",
            "| scenario | draws tightened | mean level | MACs (of full) before -> after | real drop before -> after "
            "| P(real drop > d) before -> after | with the exact null: tightened, MACs, real drop, P(> d) |",
            "|---|---:|---:|---|---|---|---|",
        ]
        for name, s in block["scenarios"].items():
            lines.append(
                f"| {name} | {_pct(s['tightened_share'], 0)} | {s['level_mean']:.2f} | "
                f"{_pct(s['macs_fraction_base'])} -> {_pct(s['macs_fraction_after'])} | "
                f"{_pct(s['real_drop_base'], 2)} -> {_pct(s['real_drop_after'], 2)} | "
                f"{_pct(s['violations_base'], 0)} -> {_pct(s['violations_after'], 0)} | "
                f"{_pct(s['exact_null']['tightened_share'], 0)}, {_pct(s['exact_null']['macs_fraction_after'])}, "
                f"{_pct(s['exact_null']['real_drop_after'], 2)}, {_pct(s['exact_null']['violations_after'], 0)} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drops = list(results["drops"])
    names = list(results["drops"][drops[0]]["scenarios"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(drops))
    for i, d in enumerate(drops):
        s = results["drops"][d]["scenarios"]
        xs = np.arange(len(names)) + i * width
        axes[0].bar(xs, [s[n]["alarm_rate_upper"] for n in names], width, label=f"d={float(d) * 100:g} % upper")
        axes[0].scatter(xs, [s[n]["alarm_rate_exact"] for n in names], marker="x", color="k",
                        label="exact null" if i == 0 else None)  # fmt: skip
        axes[1].bar(xs, [s[n]["real_drop_after"] - s[n]["real_drop_base"] for n in names], width,
                    label=f"d={float(d) * 100:g} %")  # fmt: skip
    for ax in axes:
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("drift alarms per window")
    axes[0].set_ylim(0, 1)
    axes[1].set_ylabel("real drop after - before tightening")
    axes[0].set_title("drift test: alarm rate (clean = false alarms)")
    axes[1].set_title("tightening: change of the real accuracy drop")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
