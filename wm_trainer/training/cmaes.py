"""CMA-ES through pycma, with its whole state saved as data (npz + JSON, no pickle) after each generation.

pycma draws its samples from the ``randn`` option; we give it a generator of our own whose
state is saved with the rest, so a run killed after generation g and resumed asks exactly
the candidates the uninterrupted run would have asked at g + 1.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cma
import numpy as np

from extensions.serializers import NpzLoadError, SafeNpz

from ..base.errors import UserError
from ..base.storage import atomic_savez

# pycma objects whose data attributes make up the optimiser's state (the rest is rebuilt
# from the options): attribute path on the strategy -> attribute names never to copy.
_STATE_OBJECTS: dict[str, frozenset[str]] = {
    "": frozenset({"B", "C", "D"}),  # aliases of sm's, re-linked after a restore
    "sm": frozenset(),
    "adapt_sigma": frozenset(),
    "best": frozenset(),
    "fit": frozenset(),
    "sigma_vec": frozenset({"dim"}),
    "_stoptolxstagnation": frozenset(),
    "sent_solutions": frozenset(),
    "archive": frozenset(),
}
FORMAT = "wm-trainer-cmaes-1"


class Randn:
    """The normal sampler pycma calls as ``randn(*shape)``, backed by a RandomState we can save."""

    def __init__(self, seed: int):
        self.rs = np.random.RandomState(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rs.standard_normal(shape)

    def get_state(self) -> tuple[dict, np.ndarray]:
        """(JSON-able fields, the MT19937 key array)."""
        st = self.rs.get_state(legacy=False)
        meta = {"pos": int(st["state"]["pos"]), "has_gauss": int(st["has_gauss"]), "gauss": float(st["gauss"])}
        return meta, np.asarray(st["state"]["key"], np.uint32)

    def set_state(self, meta: dict, key: np.ndarray) -> None:
        """Restore what :meth:`get_state` returned."""
        self.rs.set_state({"bit_generator": "MT19937", "state": {"key": key, "pos": meta["pos"]},
                           "has_gauss": meta["has_gauss"], "gauss": meta["gauss"]})


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, np.bool_, np.integer, np.floating))


def _plain(v: Any) -> Any:
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _capture(es: cma.CMAEvolutionStrategy) -> tuple[dict, dict[str, np.ndarray]]:
    """Every data attribute of the state objects: scalars and lists to JSON, arrays to npz."""
    scalars: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for obj_path, skip in _STATE_OBJECTS.items():
        obj = es if not obj_path else getattr(es, obj_path, None)
        if obj is None:
            continue
        for name, v in vars(obj).items():
            if name in skip:
                continue
            key = f"{obj_path}.{name}" if obj_path else name
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
                arrays[key] = v
            elif _is_scalar(v):
                scalars[key] = _plain(v)
            elif type(v) is list and all(_is_scalar(x) for x in v):
                scalars[key] = [_plain(x) for x in v]
            elif type(v) is list and v and all(isinstance(x, np.ndarray) for x in v):
                arrays[key] = np.stack(v)
                scalars[key + "#list"] = True
    return scalars, arrays


def _restore(es: cma.CMAEvolutionStrategy, scalars: dict, arrays: dict[str, np.ndarray]) -> None:
    def target(key: str) -> tuple[Any, str]:
        obj_path, _, name = key.rpartition(".")
        return (getattr(es, obj_path) if obj_path else es), name

    for key, v in scalars.items():
        if key.endswith("#list"):
            continue
        obj, name = target(key)
        setattr(obj, name, v)
    for key, v in arrays.items():
        obj, name = target(key)
        setattr(obj, name, list(v) if scalars.get(key + "#list") else np.array(v))
    es._updateBDfromSM()
    if es.countiter > 0 and not hasattr(es, "timer"):  # pycma creates its wall-clock timer on the first ask
        es.timer = cma.utilities.utils.ElapsedWCTime()


class CMAES:
    """pycma's CMA-ES that MAXIMISES fitness, with ask/tell and data-only save/load of its full state."""

    def __init__(self, n_params: int, population: int, sigma0: float, seed: int = 0,
                 x0: np.ndarray | None = None):
        self.n_params, self.population, self.sigma0, self.seed = int(n_params), int(population), float(sigma0), seed
        self.randn = Randn(seed)
        x0 = np.zeros(self.n_params) if x0 is None else np.asarray(x0, np.float64)
        opts = {"popsize": self.population, "randn": self.randn, "seed": seed + 1, "verbose": -9,
                "verb_disp": 0, "verb_log": 0, "verb_filenameprefix": os.devnull, "tolx": 0, "tolfun": 0,
                "tolstagnation": int(1e9), "tolflatfitness": int(1e9)}
        self.es = cma.CMAEvolutionStrategy(x0, self.sigma0, opts)
        self._asked: np.ndarray | None = None

    @property
    def generation(self) -> int:
        """Generations told so far."""
        return int(self.es.countiter)

    @property
    def mean(self) -> np.ndarray:
        """The distribution mean (the recommended solution)."""
        return np.asarray(self.es.mean, np.float64)

    @property
    def sigma(self) -> float:
        """Current overall step size."""
        return float(self.es.sigma)

    @property
    def best(self) -> tuple[np.ndarray | None, float]:
        """Best candidate told so far and its fitness (higher is better)."""
        x, f = self.es.best.x, self.es.best.f
        if x is None:
            return None, -np.inf
        return np.asarray(x, np.float64), -float(f)

    def ask(self) -> np.ndarray:
        """This generation's candidates, shape (population, n_params); asking twice returns the same set."""
        if self._asked is None:
            self._asked = np.asarray(self.es.ask(), np.float64)
        return self._asked.copy()

    def tell(self, candidates: np.ndarray, fitness: np.ndarray) -> None:
        """Report fitness (higher is better) for the candidates returned by :meth:`ask`."""
        fitness = np.asarray(fitness, np.float64)
        if fitness.shape != (len(candidates),) or not np.all(np.isfinite(fitness)):
            raise ValueError(f"need one finite fitness per candidate, got {fitness!r}")
        self.es.tell(list(np.asarray(candidates, np.float64)), list(-fitness))
        self._asked = None

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able metadata, arrays) describing the optimiser completely."""
        scalars, arrays = _capture(self.es)
        rng_meta, rng_key = self.randn.get_state()
        meta = {"format": FORMAT, "n_params": self.n_params, "population": self.population,
                "sigma0": self.sigma0, "seed": self.seed, "rng": rng_meta, "es": scalars}
        arrays = {f"es/{k}": v for k, v in arrays.items()}
        arrays["x0"] = np.asarray(self.es.x0, np.float64)
        arrays["rng_key"] = rng_key
        return meta, arrays

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the state (plus ``extra`` JSON-able data of the caller) to one npz, atomically."""
        meta, arrays = self.state()
        meta["extra"] = extra or {}
        return atomic_savez(path, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[CMAES, dict]:
        """Rebuild an optimiser saved by :meth:`save` (read with pickling off); returns it and the ``extra`` data."""
        path = Path(path)
        meta, arrays = read_state(path)
        hint = "; delete it to start over"
        for key in ("x0", "rng_key"):
            if key not in arrays:
                raise UserError(f"{path}: key {key!r}: missing from the file{hint}")
        try:
            n_params = int(meta["n_params"])
            x0 = arrays["x0"]
            if x0.shape != (n_params,):
                raise UserError(f"{path}: key 'x0': shape {x0.shape}, expected ({n_params},){hint}")
            opt = cls(n_params, meta["population"], meta["sigma0"], meta["seed"], x0=x0)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: key 'meta': no valid n_params, population, sigma0, seed ({e}){hint}") from None
        _, fresh = opt.state()
        for key, value in arrays.items():
            ref = fresh.get(key)
            if value.dtype.kind not in "biuf" or (ref is not None and value.shape != ref.shape):
                want = f"{ref.dtype} {ref.shape}" if ref is not None else "numbers"
                raise UserError(f"{path}: key {key!r}: {value.dtype} {value.shape}, expected {want}{hint}")
        try:
            es_arrays = {k[3:]: v for k, v in arrays.items() if k.startswith("es/")}
            _restore(opt.es, meta["es"], es_arrays)
            opt.randn.set_state(meta["rng"], arrays["rng_key"])
            return opt, meta["extra"]
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise UserError(f"{path}: key 'meta': inconsistent CMA-ES state ({type(e).__name__}: {e}){hint}") from None


def read_state(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, arrays) of a saved CMA-ES state, read with pickling off; a bad file is a UserError."""
    hint = "; delete it to start over"
    try:
        with SafeNpz(path) as f:
            arrays = {k: f[k] for k in f.files}
    except NpzLoadError as e:
        raise UserError(f"{e}{hint}") from None
    if "meta" not in arrays:
        raise UserError(f"{path}: key 'meta': missing from the file{hint}")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: key 'meta': not JSON ({e}){hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{path}: key 'meta': not a CMA-ES state of this version (format {fmt!r})")
    return meta, arrays
