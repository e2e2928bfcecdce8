"""The training loop of one run: losses of a batch, validation, early stopping on the best
validation epoch, the λ ramp, clipping, and what each epoch records."""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from featcache.pipeline.common.losses import (
    clip_loss,
    compile_wanted,
    core_compiled,
    lambda_at,
    maybe_compile,
    structure_regularizer,
)
from featcache.pipeline.train.config import AlignConfig
from featcache.pipeline.train.heads import FixedModel
from featcache.pipeline.train.plan import CachedData, RunSetup, build_run, load_cached
from featcache.pipeline.train.progress import LOSS_NAMES, RunProgress
from featcache.pipeline.train.runs import RunWriter
from featcache.pipeline.train.training_free import fit as fit_free


def structure_term(model, cfg: AlignConfig, xi, xt, zi=None, zt=None) -> torch.Tensor:
    """(R_S(img) + R_S(txt)) / 2 on inputs ``xi, xt`` (head outputs computed when not given)."""
    if zi is None:
        zi, zt = model(xi, xt)
    options = structure_options(cfg) | {"compiled": core_compiled(cfg.compile, len(zi))}
    tau = model.temperature.detach()  # the contrastive loss's tau, learnable or not (method.md); no host read
    rs = structure_function(compile_wanted(cfg.compile))
    return (rs(xi, zi, tau, **options) + rs(xt, zt, tau, **options)) / 2


_STRUCTURE: dict[bool, object] = {}


def structure_function(compiled: bool):
    """structure_regularizer, compiled (once per process) or eager."""
    if compiled not in _STRUCTURE:
        _STRUCTURE[compiled] = maybe_compile(structure_regularizer, compiled)
    return _STRUCTURE[compiled]


def structure_options(cfg: AlignConfig) -> dict:
    """The R_S switches of a config, as structure_regularizer takes them."""
    return dict(levels=cfg.levels, weighting=cfg.weighting, divergence=cfg.divergence, centering=cfg.centering,
                center_first=cfg.center_first, similarity=cfg.similarity, gamma=cfg.gamma, margin=cfg.margin)


def batch_losses(model, cfg: AlignConfig, xi, xt, lam: float, fixed: tuple | None = None):
    """Total, contrastive and regularizer loss of a batch; ``fixed``: the batch R_S is taken on
    instead (the fixed-structure ablation)."""
    zi, zt = model(xi, xt)
    clip = clip_loss(zi, zt, model.temperature)
    if cfg.loss == "clip":
        return clip, clip, torch.zeros(())
    reg = structure_term(model, cfg, *fixed) if fixed is not None else structure_term(model, cfg, xi, xt, zi, zt)
    return clip + lam * reg, clip, reg


@torch.no_grad()
def validation_losses(model, cfg, xi, xt) -> dict:
    """Validation losses over batches of the training batch size, weighted by batch length."""
    totals = torch.zeros(3, dtype=torch.float64, device=xi.device)  # summed on the device, read once
    scored = 0
    for s in range(0, len(xi), cfg.batch_size):
        bi, bt = xi[s:s + cfg.batch_size], xt[s:s + cfg.batch_size]
        if len(bi) < 2:  # a last batch of one row has no contrastive loss
            continue
        total, clip, reg = batch_losses(model, cfg, bi, bt, cfg.lam)
        totals += torch.stack([total, clip, reg.to(total.device)]).double() * len(bi)
        scored += len(bi)
    return dict(zip(LOSS_NAMES, (totals / max(scored, 1)).tolist()))


def fit(run: RunSetup, writer: RunWriter, progress=None) -> dict:
    """The training loop with early stopping; leaves the best epoch's weights in ``run.model``."""
    cfg, model, opt, sched = run.cfg, run.model, run.opt, run.sched
    xi, xt, vi, vt = run.tensors
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(cfg.seed)
    fixed = None
    if cfg.fixed_structure:  # drawn once per run, from its own generator so batch order is unchanged
        pick = torch.randperm(run.rows, generator=torch.Generator().manual_seed(cfg.seed + 1))[:run.batch]
        fixed = (xi[pick.to(xi.device)], xt[pick.to(xt.device)])
    progress_of_run = RunProgress(cfg, writer, run.config, copy.deepcopy(model.state_dict()))
    step = 0
    layers = f"{run.config['image_layer']}/{run.config['text_layer']}"
    task = progress.add_task(f"align {layers} seed {cfg.seed}", total=cfg.epochs) if progress else None
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(run.rows, generator=gen).to(xi.device)
        sums_t = torch.zeros(3, device=xi.device)  # running sums stay on the device: no sync per step
        for b in range(run.steps_per_epoch):  # the tail that does not fill a batch is dropped this epoch
            idx = order[b * run.batch:(b + 1) * run.batch]
            lam = lambda_at(step, cfg.lam, cfg.lam_warmup_steps)
            total, clip, reg = batch_losses(model, cfg, xi[idx], xt[idx], lam, fixed)
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            sums_t += torch.stack([total.detach(), clip.detach(), reg.detach().to(total.device)])
        sums = dict(zip(LOSS_NAMES, (sums_t / run.steps_per_epoch).tolist()))  # one read
        model.eval()
        val = validation_losses(model, cfg, vi, vt)
        stop = progress_of_run.end_epoch(epoch, step, sched.get_last_lr()[0], sums, val,
                                         lambda: copy.deepcopy(model.state_dict()))
        if task is not None:
            progress.update(task, advance=1)
        if stop:
            break
    model.load_state_dict(progress_of_run.best_weights)
    return progress_of_run.summary(step, run.rows)


def fit_training_free(run: RunSetup, writer: RunWriter) -> dict:
    """A training-free method: fit its maps on the run's training pairs, score them once on val."""
    cfg, start = run.cfg, time.perf_counter()
    xi, xt, vi, vt = run.tensors
    image, text, facts = fit_free(cfg.method, xi.float().cpu().numpy(), xt.float().cpu().numpy(), cfg.free, cfg.seed)
    run.model = FixedModel(image, text, cfg.temperature).to(xi.device)
    val = validation_losses(run.model, replace(cfg, loss="clip"), vi, vt)
    writer.log({"epoch": 0, "step": 0, **{f"val_{k}": v for k, v in val.items()}})
    return {
        "run_id": writer.run_id, "image_layer": run.config["image_layer"], "text_layer": run.config["text_layer"],
        "method": cfg.method, "fit": facts, "best_epoch": 0, "best_val": val["clip"], "checkpoint_on": "val_clip",
        "epochs_run": 0, "steps": 0, "seconds": time.perf_counter() - start,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_pairs": run.rows,
    }


def train(cfg: AlignConfig, data: CachedData | None = None, progress=None) -> Path:
    """Train (or, for a training-free method, fit) one run and write its record; returns the run
    directory (none is left on failure)."""
    cfg.validate()
    run = build_run(cfg, data or load_cached(cfg))
    writer = RunWriter(cfg.runs_dir, run.config, cfg.log)
    try:
        summary = fit(run, writer, progress) if cfg.method == "heads" else fit_training_free(run, writer)
    except BaseException:
        writer.abort()
        raise
    extra = {"layer_scores.json": run.table.to_dict()} if run.table is not None else None
    return writer.finish(summary, run.model.state_dict(), extra)
