"""Self-Organizing Maps for direction extraction: MiniSom, and k maps of one grid and schedule
trained side by side (bit-identical to k MiniSom runs, one numpy call per step instead of k).

The lockstep trainer reuses a reference MiniSom's neuron grid (``_xx``, ``_yy``, ``_neigx``,
``_neigy``: MiniSom keeps them private; the tests compare the lockstep weights with MiniSom's own
training on every neighbourhood and topology, so a MiniSom release that changes them fails there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from minisom import MiniSom
from tqdm.auto import tqdm

from abliterate.config import ExtractionConfig


def som_seed(cfg: ExtractionConfig) -> int:
    """The SOM's seed; ``extraction.seed: null`` must have been resolved to the trial's seed
    (``pipeline.effective_extraction``): MiniSom would otherwise draw an unseeded, unrepeatable
    initialisation."""
    if cfg.seed is None:
        raise ValueError(
            "extraction.seed is null: resolve it to the trial's seed first "
            "(abliterate.pipeline.effective_extraction)"
        )
    return int(cfg.seed)


def train_som(data: np.ndarray, cfg: ExtractionConfig) -> MiniSom:
    """MiniSom with the config's grid and schedule, seeded, initialised from the samples."""
    som = MiniSom(
        cfg.som_rows,
        cfg.som_cols,
        data.shape[1],
        sigma=cfg.sigma,
        learning_rate=cfg.learning_rate,
        neighborhood_function=cfg.neighborhood,
        topology=cfg.topology,
        random_seed=som_seed(cfg),
    )
    som.random_weights_init(data)
    som.train_random(data, cfg.iterations)
    return som


def train_soms_lockstep(datasets: Sequence[np.ndarray], cfg: ExtractionConfig) -> list[np.ndarray]:
    """The final weights of ``train_som(data, cfg)`` for every dataset, trained side by side.

    Bit-identical to training one MiniSom per dataset (tests compare them): each map takes its
    initial weights and its sample order from its own ``RandomState(cfg.seed)`` with MiniSom's
    calls, and every step applies MiniSom's update (winner by Euclidean distance, neighbourhood
    g = h(winner, sigma_t) * eta_t, w <- w + g (x - w)) to all maps at once. A per-category
    extraction is k independent maps of the same grid and schedule; stepping them together costs
    one numpy call per operation per step instead of k, which is most of MiniSom's run time.

    Returns:
        One (som_rows, som_cols, d_model) float64 array per dataset.
    """
    rows, cols = cfg.som_rows, cfg.som_cols
    count, d_model, steps = len(datasets), datasets[0].shape[1], cfg.iterations
    reference = MiniSom(
        rows,
        cols,
        d_model,
        sigma=cfg.sigma,
        learning_rate=cfg.learning_rate,
        neighborhood_function=cfg.neighborhood,
        topology=cfg.topology,
        random_seed=som_seed(cfg),
    )  # validates the options (and warns) exactly as train_som does; its grid is reused below
    weights = np.empty((count, rows, cols, d_model))  # (maps, rows, cols, d_model)
    samples = np.empty((count, steps), dtype=np.int64)  # the sample each map learns at each step
    padded = np.zeros((count, max(len(data) for data in datasets), d_model))
    for index, data in enumerate(datasets):
        generator = np.random.RandomState(som_seed(cfg))
        generator.rand(rows, cols, d_model)  # MiniSom draws random initial weights first
        for flat in range(rows * cols):  # random_weights_init: one sample per neuron, C order
            weights[index].reshape(-1, d_model)[flat] = data[generator.randint(len(data))]
        order = np.arange(steps) % len(data)
        generator.shuffle(order)  # train_random's sample order
        samples[index] = order
        padded[index, : len(data)] = data
    xx_t, yy_t = reference._xx.T, reference._yy.T  # (rows, cols) neuron coordinates
    neigx, neigy = reference._neigx, reference._neigy
    maps = np.arange(count)
    for t in tqdm(range(steps), desc=f"SOM x{count}", leave=False, mininterval=0.5):
        x = padded[maps, samples[:, t]]  # (maps, d_model)
        difference = np.subtract(x[:, None, None, :], weights)  # (maps, rows, cols, d_model)
        distances = np.linalg.norm(difference, axis=-1).reshape(count, -1)  # (maps, neurons)
        win_row, win_col = np.unravel_index(distances.argmin(axis=1), (rows, cols))
        # MiniSom's asymptotic decay of both the learning rate and sigma
        eta = cfg.learning_rate / (1 + t / (steps / 2))
        sigma = cfg.sigma / (1 + t / (steps / 2))
        g = neighbourhood(cfg.neighborhood, xx_t, yy_t, neigx, neigy, win_row, win_col, sigma)
        # MiniSom: w += einsum('ij, ijk->ijk', g, x - w), the same products written in place
        weights += np.multiply(difference, (g * eta)[..., None], out=difference)
    return list(weights)


def neighbourhood(
    name: str,
    xx_t: np.ndarray,
    yy_t: np.ndarray,
    neigx: np.ndarray,
    neigy: np.ndarray,
    win_row: np.ndarray,
    win_col: np.ndarray,
    sigma: float,
) -> np.ndarray:
    """MiniSom's neighbourhood functions for several winners at once: (maps, rows, cols)."""
    if name in ("gaussian", "mexican_hat"):
        # (maps, cols, rows) like MiniSom's meshgrid arrays, transposed at the end as it does
        dx = xx_t.T[None] - xx_t[win_row, win_col][:, None, None]
        dy = yy_t.T[None] - yy_t[win_row, win_col][:, None, None]
        d = 2 * sigma * sigma
        if name == "gaussian":
            g = np.exp(-np.power(dx, 2) / d) * np.exp(-np.power(dy, 2) / d)
        else:
            p = np.power(dx, 2) + np.power(dy, 2)
            g = np.exp(-p / d) * (1 - 2 / d * p)
        return g.transpose(0, 2, 1)
    if name == "bubble":
        ax = np.logical_and(
            neigx[None] > (win_row - sigma)[:, None], neigx[None] < (win_row + sigma)[:, None]
        )
        ay = np.logical_and(
            neigy[None] > (win_col - sigma)[:, None], neigy[None] < (win_col + sigma)[:, None]
        )
        return (ax[:, :, None] * ay[:, None, :]) * 1.0
    if name == "triangle":
        tx = (-np.abs(win_row[:, None] - neigx[None])) + sigma
        ty = (-np.abs(win_col[:, None] - neigy[None])) + sigma
        tx[tx < 0] = 0.0
        ty[ty < 0] = 0.0
        return tx[:, :, None] * ty[:, None, :]
    raise ValueError(f"extraction.neighborhood={name!r} is not a MiniSom neighbourhood")


def assign_winners(weights: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best-matching neuron (flat row-major index; ties -> lowest) and its distance per sample."""
    distances = np.linalg.norm(data[:, None, :] - weights[None, :, :], axis=-1)  # (n, neurons)
    winners = distances.argmin(axis=1)  # (n,)
    return winners, distances[np.arange(len(data)), winners]
