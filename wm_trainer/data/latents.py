"""M's training data: every encoded episode in memory (:class:`LatentSet`) served as windows of consecutive steps.

Each lane of a batch reads whole episodes from their start in consecutive ``seq_len`` windows, so the LSTM
state a window starts from means what it means in the dream; z is drawn from (mu, logvar) each time a window
is served, as in the paper.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import chainer
import numpy as np

from ..base.errors import UserError
from . import episodes


def list_latents(folder) -> list[Path]:
    """Encoded episode files (``ep_NNNNNN.npz``) in ``folder``, in index order."""
    return episodes.list_episodes(folder)


def latent_lengths(folder) -> dict[int, int]:
    """Episode index -> steps of each readable encoded episode in ``folder`` (corrupt ones skipped, as in training)."""
    files = list_latents(folder)
    return {episodes.episode_index(path): len(ep["dones"])
            for path, ep in episodes.iter_valid_episodes(files, keys=("dones",))}


class LatentSet:
    """Every encoded episode concatenated in memory: mu/logvar as float16 (half the RAM), actions, dones.

    float16 keeps the paper-scale worst case (10k episodes x 2100 steps x z 64 x 2) near 5 GB;
    its ~1e-3 relative precision is far below the sampling noise exp(logvar / 2).
    """

    def __init__(self, episodes: Sequence[dict]):
        if not episodes:
            raise ValueError("no episodes")
        self.lengths = np.array([len(e["mu"]) for e in episodes], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.mu = np.concatenate([e["mu"] for e in episodes]).astype(np.float16)
        self.logvar = np.concatenate([e["logvar"] for e in episodes]).astype(np.float16)
        self.actions = np.concatenate([np.asarray(e["actions"], np.float32).reshape(len(e["mu"]), -1)
                                       for e in episodes])
        self.dones = np.concatenate([np.asarray(e["dones"], bool) for e in episodes])
        self.z_dim = self.mu.shape[1]
        self.action_dim = self.actions.shape[1]

    @classmethod
    def from_folder(cls, folder, shard: tuple[int, int] = (0, 1)) -> LatentSet:
        """Load every encoded episode in ``folder`` (process r of n: episodes r, r + n, ...); corrupt files are
        skipped with a warning naming them."""
        folder = Path(folder)
        files = list_latents(folder)
        if not files:
            raise UserError(f"{folder}: no encoded episodes; run `wm-trainer encode` first")
        if shard[1] > 1:
            files = files[shard[0]::shard[1]]
            if not files:
                raise UserError(f"{folder}: {len(list_latents(folder))} encoded episodes, none for process "
                                f"{shard[0]} of {shard[1]}; use fewer processes")
        eps = [ep for _, ep in episodes.iter_valid_episodes(files, keys=("mu", "logvar", "actions", "dones"))
               if len(ep["mu"])]
        if not eps:
            raise UserError(f"{folder}: no readable encoded episodes; re-run `wm-trainer encode`")
        return cls(eps)

    def __len__(self) -> int:
        return len(self.lengths)


class SequenceIterator(chainer.dataset.Iterator):
    """Endless batches of consecutive ``seq_len`` windows: each of ``batch_size`` lanes reads whole episodes.

    Lane b reads its k-th episode (drawn from (seed, b, k)) from step 0 to its end in consecutive windows,
    then starts another. The batch's ``reset`` (B,) flags the lanes whose window starts an episode; the
    updater starts those from a zero LSTM state and the others from the state the lane's previous window
    ended in (stateful truncated BPTT), so M's state means at every step what it means in the dream, which
    starts each rollout at step 0 from a zero state and runs on. Every step of an episode, its done step
    included, is served once per pass over it. Steps past an episode's end are padding, masked out.
    z ~ N(mu, exp(logvar)) is drawn afresh for every window, as in the paper. The lanes are state:
    ``serialize`` keeps them, so a resumed run serves exactly the batches it would have.
    Yields dicts: z_in, a (B, T, .), z_next (B, T, z), nll_mask, done, done_mask (B, T), reset (B,).
    """

    def __init__(self, data: LatentSet, batch_size: int, seq_len: int, seed: int = 0):
        self.data, self.batch_size, self.seq_len, self.seed = data, batch_size, seq_len, seed
        self.iteration = 0
        self.lane_episode = np.full(batch_size, -1, np.int64)
        self.lane_offset = np.zeros(batch_size, np.int64)
        self.lane_count = np.zeros(batch_size, np.int64)

    def _start_episodes(self) -> np.ndarray:
        """Give a new episode to every lane that has finished its own; returns those lanes' flags."""
        ep, off = self.lane_episode, self.lane_offset
        reset = (ep < 0) | (off >= self.data.lengths[np.maximum(ep, 0)])
        for b in np.flatnonzero(reset):
            ep[b] = np.random.default_rng([self.seed, int(b), int(self.lane_count[b])]).integers(len(self.data))
            self.lane_count[b] += 1
            off[b] = 0
        return reset

    def window(self, episode: np.ndarray, start: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Windows of ``seq_len`` steps from step ``start[b]`` of ``episode[b]``, z drawn with ``rng``."""
        d, t = self.data, self.seq_len
        length = d.lengths[episode]
        offs = start[:, None] + np.arange(t + 1)[None, :]
        valid = offs < length[:, None]
        idx = d.starts[episode][:, None] + np.minimum(offs, length[:, None] - 1)
        mu = d.mu[idx].astype(np.float32)
        std = np.exp(0.5 * d.logvar[idx].astype(np.float32))
        z = mu + std * rng.standard_normal(mu.shape, dtype=np.float32)
        z *= valid[:, :, None]
        v_in = valid[:, :t]
        return {
            "z_in": z[:, :t],
            "a": d.actions[idx[:, :t]] * v_in[:, :, None],
            "z_next": np.ascontiguousarray(z[:, 1:]),
            "nll_mask": valid[:, 1:],
            "done": d.dones[idx[:, :t]] & v_in,
            "done_mask": v_in,
        }

    def __next__(self) -> dict[str, np.ndarray]:
        reset = self._start_episodes()
        out = self.window(self.lane_episode, self.lane_offset, np.random.default_rng([self.seed, 1, self.iteration]))
        out["reset"] = reset
        self.lane_offset += self.seq_len
        self.iteration += 1
        return out

    @property
    def epoch_detail(self) -> float:
        """Steps served / steps in the data."""
        return self.iteration * self.batch_size * self.seq_len / max(int(self.data.lengths.sum()), 1)

    @property
    def epoch(self) -> int:
        return int(self.epoch_detail)

    @property
    def is_new_epoch(self) -> bool:
        if not self.iteration:
            return False
        per = self.batch_size * self.seq_len / max(int(self.data.lengths.sum()), 1)
        return int((self.iteration - 1) * per) != self.epoch

    def serialize(self, serializer) -> None:
        """The batch counter and each lane's episode, position and episode count."""
        self.iteration = int(serializer("iteration", self.iteration))
        try:
            for name in ("lane_episode", "lane_offset", "lane_count"):
                setattr(self, name, np.asarray(serializer(name, getattr(self, name)), np.int64))
        except KeyError:  # a snapshot without lanes: every lane starts a new episode
            pass


def sequence_converter(batch: dict, device=None) -> dict:
    """Send a window batch to ``device``, floats in chainer's current dtype (float64 mode included)."""
    dtype = chainer.get_dtype()
    out = {}
    for k, v in batch.items():
        if v.dtype.kind == "f":
            v = v.astype(dtype, copy=False)
        out[k] = chainer.dataset.to_device(device, v)
    return out
