"""Vectorised sweep cells: K compatible cells of a sweep trained as one batched model.

Why: the cells of a sweep on one layer pair differ only in numbers (seed, lambda, tau, pair
count), so their heads have the same shapes. Their parameters are stacked
(``torch.func.stack_module_state``) and one ``vmap`` of the forward pass and the losses
(``functional_call``) replaces K small passes, so a GPU launches each kernel once for K cells
and the host never waits inside the step loop.

Each cell stays its own run. It starts from the weights its sequential run would (seeded by its
seed alone), draws its own batch order from its own generator, ramps its own lambda, clips its
own gradient norm, stops early on its own validation score (a stopped cell leaves the stack with
its best weights) and writes its own record (config.json, heads.safetensors, metrics.jsonl,
summary.json). AdamW is elementwise, so one optimiser over stacked tensors is K optimisers;
gradient-norm clipping is not, so it is done per cell here. The result equals the sequential run
to float rounding (tests/train/test_train.py).

The epochs, early stopping, records and λ ramp are ``loop.fit``'s, the one loop a single run
also goes through; this module supplies only what a stack does differently, its step
(``Stack``).

Cells that cannot share a stack (another head, loss switch or epoch budget, a training-free
method, the fixed-structure ablation) are trained one by one, as without vectorisation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from featcache.pipeline.common.device import pick_device
from featcache.pipeline.common.losses import clip_loss, compile_wanted, lambda_at, maybe_compile, structure_regularizer
from featcache.pipeline.train.config import AlignConfig
from featcache.pipeline.train.heads import AlignmentModel
from featcache.pipeline.train.loop import Budget, fit, structure_options, train
from featcache.pipeline.train.plan import (
    MATRICES_PER_CELL,
    CachedData,
    RunPlan,
    checked_tensors,
    cosine_factor,
    new_model,
    plan_run,
)
from featcache.pipeline.train.progress import RunProgress
from featcache.pipeline.train.runs import RunWriter

# What cells of one stack may differ in; ``layers`` only as written (they share the resolved pair).
VARIES = ("seed", "lam", "temperature", "pairs", "layers")

CPU_BUDGET_BYTES = 4 << 30


def group_key(plan: RunPlan) -> tuple | None:
    """Cells with equal keys can be trained in one stack; None: this cell trains alone."""
    cfg = plan.cfg
    if cfg.method != "heads" or cfg.fixed_structure:
        return None
    fixed = {k: v for k, v in cfg.to_dict().items() if k not in VARIES}
    return json.dumps(fixed, sort_keys=True, default=str), plan.image_layer, plan.text_layer, plan.batch, \
        plan.steps_per_epoch


def max_cells(cfg: AlignConfig, batch: int, device: torch.device) -> int:
    """How many cells fit one stack: half the free GPU memory, or a fixed budget on a CPU."""
    per_cell = MATRICES_PER_CELL[cfg.loss] * cfg.levels * batch * batch * 4
    budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else CPU_BUDGET_BYTES
    return max(1, int(budget // per_cell))


def train_cells(configs: list[AlignConfig], data: CachedData, progress=None) -> list[Path]:
    """Train every config (one run each), stacking compatible ones; returns run dirs in config order."""
    out: list[Path | None] = [None] * len(configs)
    groups: dict[tuple, list[RunPlan]] = {}
    slots: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(configs):
        cfg.validate()
        plan = plan_run(cfg, data) if cfg.method == "heads" else None
        key = group_key(plan) if plan is not None else None
        if key is None:
            out[i] = train(cfg, data, progress)
            continue
        groups.setdefault(key, []).append(plan)
        slots.setdefault(key, []).append(i)
    for key, plans in groups.items():
        device = pick_device(plans[0].cfg.device)
        size = max_cells(plans[0].cfg, plans[0].batch, device)
        for s in range(0, len(plans), size):
            chunk, where = plans[s:s + size], slots[key][s:s + size]
            runs = [train(chunk[0].cfg, data, progress)] if len(chunk) == 1 else train_stack(chunk, data, progress)
            for i, run in zip(where, runs):
                out[i] = run
    return out


def _cell_losses(base: AlignmentModel, cfg: AlignConfig):
    """One cell's (total, contrastive, regularizer) loss, written for vmap over stacked cells;
    the same arithmetic as loop.batch_losses, with the cell's tau and lambda as tensors."""
    options = structure_options(cfg)

    def losses(params, buffers, xi, xt, lam):
        zi, zt = functional_call(base, (params, buffers), (xi, xt))
        tau = AlignmentModel.temperature_of(params["log_temperature"])
        clip = clip_loss(zi, zt, tau)
        if cfg.loss == "clip":
            return clip, clip, torch.zeros_like(clip)
        t = tau.detach()  # R_S takes tau as a constant, as loop.structure_term does
        reg = (structure_regularizer(xi, zi, t, stacked=True, **options)
               + structure_regularizer(xt, zt, t, stacked=True, **options)) / 2
        return clip + lam * reg, clip, reg

    return losses


def clip_grad_norm_per_cell_(grads: list[torch.Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ for each cell of stacked gradients (leading dim = cells)."""
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1) for g in grads], 1)
    coef = (max_norm / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))


class Stack:
    """K cells as ``loop.Cells``: their stacked parameters, one AdamW over them, and a step that
    is one vmapped forward and backward; cells leave by ``keep`` when they stop."""

    def __init__(self, plans: list[RunPlan], models: list[AlignmentModel], tensors: tuple, rows: torch.Tensor):
        self.cfg = plans[0].cfg
        self.xi, self.xt, self.vi, self.vt = tensors
        self.device = self.xi.device
        self.rows = rows  # (cells, n_max): each cell's training rows as positions in the tensors
        self.params, self.buffers = stack_module_state(models)
        self.trainable = [n for n, p in self.params.items() if p.requires_grad]
        self.opt = self._optimizer()
        self.lam = torch.tensor([p.cfg.lam for p in plans], dtype=torch.float32, device=self.device)
        self.total_steps = plans[0].steps_per_epoch * self.cfg.epochs
        compiled = compile_wanted(self.cfg.compile)  # the whole stacked loss, forward and backward
        losses = _cell_losses(copy.deepcopy(models[0]).to("meta"), self.cfg)
        self.losses = maybe_compile(vmap(losses), compiled)
        self.val_losses = maybe_compile(vmap(losses, in_dims=(0, 0, None, None, 0)), compiled)

    def _optimizer(self) -> torch.optim.AdamW:
        return torch.optim.AdamW([self.params[n] for n in self.trainable], lr=self.cfg.lr, betas=self.cfg.betas,
                                 weight_decay=self.cfg.weight_decay)

    def step(self, positions: torch.Tensor, step: int) -> torch.Tensor:
        cfg = self.cfg
        idx = torch.gather(self.rows, 1, positions)  # (cells, batch) rows of the feature tables
        lam = self.lam * lambda_at(step, 1.0, cfg.lam_warmup_steps)
        total, clip, reg = self.losses(self.params, self.buffers, self.xi[idx], self.xt[idx], lam)
        self.opt.zero_grad(set_to_none=True)
        total.sum().backward()  # cells are independent: each gets its own gradient
        grads = [self.params[n].grad for n in self.trainable if self.params[n].grad is not None]
        clip_grad_norm_per_cell_(grads, cfg.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * cosine_factor(step, self.total_steps)
        self.opt.step()
        return torch.stack([total, clip, reg], 1).detach()

    @torch.no_grad()
    def validate(self) -> torch.Tensor:
        """loop.validation_losses for every active cell at once."""
        sums = torch.zeros(len(self.lam), 3, dtype=torch.float64, device=self.device)
        scored = 0
        for s in range(0, len(self.vi), self.cfg.batch_size):
            bi, bt = self.vi[s:s + self.cfg.batch_size], self.vt[s:s + self.cfg.batch_size]
            if len(bi) < 2:  # a last batch of one row has no contrastive loss
                continue
            total, clip, reg = self.val_losses(self.params, self.buffers, bi, bt, self.lam)
            sums += torch.stack([total, clip, reg], 1).double() * len(bi)
            scored += len(bi)
        return sums / max(scored, 1)

    def weights(self, j: int) -> dict:
        return {n: t[j].detach().clone() for n, t in (*self.params.items(), *self.buffers.items())}

    def keep(self, sel: list[int]) -> None:
        """Keep only the cells at positions ``sel``, their optimiser state included."""
        sel = torch.tensor(sel, device=self.device)
        old = {n: self.params[n] for n in self.trainable}
        self.params = {n: p.detach()[sel].requires_grad_(p.requires_grad) for n, p in self.params.items()}
        self.buffers = {n: b[sel] for n, b in self.buffers.items()}
        self.lam, self.rows = self.lam[sel], self.rows[sel]
        state, self.opt = self.opt.state, self._optimizer()
        for n in self.trainable:
            if old[n] in state:
                s = state[old[n]]
                self.opt.state[self.params[n]] = {k: (v[sel] if k in ("exp_avg", "exp_avg_sq") else v.clone())
                                                  for k, v in s.items()}


def train_stack(plans: list[RunPlan], data: CachedData, progress=None) -> list[Path]:
    """Train the cells of one stack with ``loop.fit``; each writes its own run record as soon as
    it stops. Returns their run dirs, in plan order."""
    p0 = plans[0]
    device = pick_device(p0.cfg.device)
    union = np.unique(np.concatenate([p.rows for p in plans]))  # every cell's rows, each checked once
    tensors = checked_tensors(data, (p0.image_layer, p0.text_layer), union, device)
    # Each cell's training rows as positions in ``union``, padded to one (K, n_max) table.
    rows = torch.zeros(len(plans), max(len(p.rows) for p in plans), dtype=torch.long)
    for c, p in enumerate(plans):
        rows[c, :len(p.rows)] = torch.from_numpy(np.searchsorted(union, p.rows))
    models = [new_model(p.cfg, tensors[0].shape[1], tensors[1].shape[1], device) for p in plans]
    configs = [p.config(data, len(tensors[2])) for p in plans]
    writers: dict[int, RunWriter] = {}
    done: dict[int, Path] = {}
    try:
        for c, p in enumerate(plans):
            writers[c] = RunWriter(p.cfg.runs_dir, configs[c], p.cfg.log)
        stack = Stack(plans, models, tensors, rows.to(device))
        records = [RunProgress(p.cfg, writers[c], configs[c], stack.weights(c)) for c, p in enumerate(plans)]

        def finish(c: int, steps: int) -> None:
            models[c].load_state_dict(records[c].best_weights)
            summary = records[c].summary(steps, len(plans[c].rows)) | {"batched_cells": len(plans)}
            extra = {"layer_scores.json": plans[c].table.to_dict()} if plans[c].table is not None else None
            done[c] = writers[c].finish(summary, models[c].state_dict(), extra)

        fit(stack, records, [len(p.rows) for p in plans], Budget(p0.cfg.epochs, p0.batch, p0.steps_per_epoch),
            finish, progress, f"align {p0.image_layer}/{p0.text_layer} x {len(plans)} cells")
        return [done[c] for c in range(len(plans))]
    except BaseException:
        for c, w in writers.items():
            if c not in done and w.tmp.exists():
                w.abort()
        raise
