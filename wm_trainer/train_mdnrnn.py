"""``wm-trainer train-mdnrnn``: M on the encoded episodes with the truncated-BPTT updater.

The whole latents set is held in memory with mu/logvar as float16 (see ``latents.LatentSet``).
Adam(mdnrnn.lr) with the toolkit's global-norm GradientClipping(mdnrnn.grad_clip); snapshots
every ``mdnrnn.snapshot_every`` iterations and at the end, resumed automatically; final
weights to ``<run>/mdnrnn.npz`` atomically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from chainer import training

import extensions as ext

from . import ops
from .base.errors import UserError
from .base.storage import RunPaths
from .data.latents import LatentSet, SequenceIterator, sequence_converter
from .games.spec import executed_action
from .models.memory import build_mdnrnn
from .training import distributed
from .training.mdnrnn_updater import MDNRNNUpdater
from .training.trainer import add_common_extensions, resolve_device, save_weights


def train_mdnrnn(cfg) -> Path:
    """Train M (resuming if snapshots exist) and write its weights to RunPaths.mdnrnn_model."""
    paths = RunPaths(cfg.run_dir)
    world = distributed.world(cfg.experiment.device)  # mpiexec -n N: N processes share each batch
    batch = world.share(cfg.mdnrnn.batch_size, "mdnrnn.batch_size")
    data = LatentSet.from_folder(paths.latents, shard=(world.rank, world.size))
    if data.z_dim != cfg.vae.z_dim:
        raise UserError(f"{paths.latents}: latents have z_dim {data.z_dim} but vae.z_dim is {cfg.vae.z_dim}; "
                        "re-run `wm-trainer encode` with this config")
    data.actions = executed_action(cfg.env.id, data.actions)  # what the game executed: what the dream feeds M
    ext.set_float64(cfg.debug.float64)
    np.random.seed(cfg.experiment.seed)  # initial weights; a resumed run loads its snapshot instead
    device = resolve_device(world.device(cfg.experiment.device))
    model = build_mdnrnn(cfg, data.action_dim)
    model.to_device(device)
    m = cfg.mdnrnn
    it = SequenceIterator(data, batch, m.seq_len, seed=world.seed(cfg.experiment.seed))
    optimizer = ops.make_adam(alpha=m.lr)
    optimizer.setup(model)
    if m.grad_clip > 0:  # on the averaged gradient under ChainerMN: the wrapped optimizer's hooks run after it
        optimizer.add_hook(ext.GradientClipping(m.grad_clip))
    optimizer = world.optimizer(optimizer)
    updater = MDNRNNUpdater(it, optimizer, device=device, debug=cfg.debug, converter=sequence_converter)
    trainer = training.Trainer(updater, (m.iterations, "iteration"), out=str(paths.mdnrnn_dir))
    ext.install(trainer, cfg.debug)
    add_common_extensions(trainer, total=m.iterations, snapshot_every=m.snapshot_every, desc="train-mdnrnn",
                          world=world)
    trainer.run(show_loop_exception_msg=False)
    return save_weights(paths.mdnrnn_model, model) if world.writes else paths.mdnrnn_model


def main(cfg, args) -> int:
    """CLI entry: train M and say where the weights went."""
    out = train_mdnrnn(cfg)
    if distributed.current().writes:
        print(f"M weights -> {out}")
    return 0
