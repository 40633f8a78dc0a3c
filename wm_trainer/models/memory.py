"""M: the MDN-RNN (LSTM over [z_t, a_t] -> mixture over z_{t+1}, plus an optional done head).

M trains on windows of encoded episodes (:mod:`wm_trainer.data.latents`) from the state the previous window
ended in (:mod:`wm_trainer.training.mdnrnn_updater`). M's input action is the action the env executes
(``games.spec.executed_action``). Losses: the MDN negative log-likelihood (sum of log densities over z dims,
logsumexp over mixtures) averaged over valid steps AND divided by z_dim -- the per-dimension
scale the paper's lr 1e-3 and clip 1.0 were tuned for -- plus, with ``done_head``, a
sigmoid cross-entropy whose positives are weighted by ``done_weight``. With ``joint=True`` the mixture is one
K-component mixture over the whole z (``mdnrnn.mixture: joint``) instead of one per dimension (the paper's).
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L

from ..base.storage import load_weights
from ..ops import joint_mdn_nll_packed, lstm_layer
from ..ops.links import State
from .mdn import MDNHead, mdn_nll_packed


def weighted_sigmoid_bce(logit, target, weight_pos: float, mask):
    """Masked mean of -[w * y * log s(x) + (1 - y) * log(1 - s(x))]."""
    y = target.astype(logit.dtype)
    per = weight_pos * y * F.softplus(-logit) + (1.0 - y) * F.softplus(logit)
    m = mask.astype(logit.dtype)
    return F.sum(per * m) / max(float(m.sum()), 1.0)


class MDNRNN(chainer.Chain):
    """LSTM over [z_t, a_t] predicting a K-mixture over each dim of z_{t+1} (and, optionally, done)."""

    def __init__(self, z_dim: int, action_dim: int, hidden: int = 256, mixtures: int = 5,
                 done_head: bool = False, done_weight: float = 10.0, joint: bool = False):
        super().__init__()
        self.z_dim, self.action_dim, self.hidden = z_dim, action_dim, hidden
        self.mixtures, self.done_weight, self.joint = mixtures, done_weight, joint
        self.has_done = done_head
        with self.init_scope():
            self.rnn = lstm_layer(z_dim + action_dim, hidden)
            self.mdn = MDNHead(hidden, z_dim, mixtures)
            if done_head:
                self.done = L.Linear(hidden, 1)

    def initial_state(self, batch: int) -> State:
        """Zero LSTM state for ``batch`` agents."""
        return self.rnn.initial_state(batch)

    def step(self, z, a, state: State | None) -> tuple[chainer.Variable, State]:
        """One batched step: z (B, z_dim), a (B, A) -> (h (B, hidden), new state)."""
        return self.rnn.step(F.concat((z, a), axis=1), state)

    def predict(self, h) -> tuple:
        """Mixture (logits, mu, log_std), each (B, z_dim, K), and done logits (B,) or None."""
        logits, mu, log_std = self.mdn(h)
        done = F.reshape(self.done(h), (-1,)) if self.has_done else None
        return logits, mu, log_std, done

    def loss(self, z_in, a, z_next, nll_mask, done, done_mask, reset=None, h0=None, c0=None) -> chainer.Variable:
        """Masked per-dimension MDN NLL + weighted done BCE over (B, T) windows; reports loss/nll/done.

        The LSTM starts from (h0, c0) (each (B, hidden); zero when not given); ``reset`` is the iterator's
        episode-start flags, which the updater has already applied to (h0, c0).
        """
        return self.loss_and_state(z_in, a, z_next, nll_mask, done, done_mask, h0, c0)[0]

    def loss_and_state(self, z_in, a, z_next, nll_mask, done, done_mask, h0=None, c0=None) -> tuple:
        """(loss, (h, c) after the window's last step): :meth:`loss`, and the state a next window goes on from."""
        b, t, _ = z_in.shape
        state = None if h0 is None else (h0, c0)
        hs, final = self.rnn.forward_seq(F.concat((z_in, a), axis=2), state)
        hs = F.reshape(hs, (b * t, self.hidden))
        nll_fn = joint_mdn_nll_packed if self.joint else mdn_nll_packed
        per_row = nll_fn(self.mdn.packed(hs), z_next.reshape(b * t, self.z_dim), self.mixtures, reduce="no")
        mask = nll_mask.reshape(-1).astype(per_row.dtype)
        nll = F.sum(per_row * mask) / (max(float(mask.sum()), 1.0) * self.z_dim)
        loss = nll
        report = {"nll": nll}
        if self.has_done:
            done_loss = weighted_sigmoid_bce(F.reshape(self.done(hs), (-1,)), done.reshape(-1),
                                             self.done_weight, done_mask.reshape(-1))
            loss = loss + done_loss
            report["done"] = done_loss
        report["loss"] = loss
        chainer.reporter.report(report, self)
        return loss, final

    forward = loss


def build_mdnrnn(cfg, action_dim: int) -> MDNRNN:
    """M sized from the config (vae.z_dim, mdnrnn.hidden/mixtures/done_head/done_weight/mixture)."""
    m = cfg.mdnrnn
    return MDNRNN(cfg.vae.z_dim, action_dim, m.hidden, m.mixtures, m.done_head, m.done_weight,
                  joint=m.mixture == "joint")


def load_mdnrnn(path, cfg, action_dim: int) -> MDNRNN:
    """M with weights from ``path`` (RunPaths.mdnrnn_model); UserError if missing or mismatched."""
    return load_weights(path, build_mdnrnn(cfg, action_dim),
                        missing="M's weights are missing; run `wm-trainer train-mdnrnn` first",
                        mismatch="cannot load M's weights with this config (vae.z_dim, mdnrnn.hidden, "
                                 "mdnrnn.mixtures, mdnrnn.done_head)")
