"""The one training loop (``fit``), for a single run and for stacked sweep cells alike: batch
order, the λ ramp, validation, a record per epoch and early stopping on the best validation
epoch. What differs between one run and a stack, the forward and backward of a step, sits
behind ``Cells``; the epoch's rules have this one home."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

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
from featcache.pipeline.train.plan import CachedData, RunSetup, build_run, cosine_factor, load_cached
from featcache.pipeline.train.progress import LOSS_NAMES, RunProgress
from featcache.pipeline.train.runs import RunWriter
from featcache.pipeline.train.training_free import solve_maps


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
def validation_totals(model, cfg, xi, xt) -> torch.Tensor:
    """Validation losses (total, clip, structure) over batches of the training batch size,
    weighted by batch length: a float64 tensor left on the device, so the loop reads it with the
    epoch's training losses in one go."""
    totals = torch.zeros(3, dtype=torch.float64, device=xi.device)  # summed on the device, read once
    scored = 0
    for s in range(0, len(xi), cfg.batch_size):
        bi, bt = xi[s:s + cfg.batch_size], xt[s:s + cfg.batch_size]
        if len(bi) < 2:  # a last batch of one row has no contrastive loss
            continue
        total, clip, reg = batch_losses(model, cfg, bi, bt, cfg.lam)
        totals += torch.stack([total, clip, reg.to(total.device)]).double() * len(bi)
        scored += len(bi)
    return totals / max(scored, 1)


def validation_losses(model, cfg, xi, xt) -> dict:
    """``validation_totals`` by name."""
    return dict(zip(LOSS_NAMES, validation_totals(model, cfg, xi, xt).tolist()))


class Cells(Protocol):
    """What ``fit`` trains: K runs that step together. One run is a stack of one (``OneRun``);
    compatible sweep cells are a vmapped stack (``stacked.Stack``). Each step reads nothing
    back to the host, so a GPU never waits inside an epoch."""

    device: torch.device

    def step(self, positions: torch.Tensor, step: int) -> torch.Tensor:
        """One optimiser step of every active cell on its rows at ``positions`` (K, B), with
        λ and the learning rate of global step ``step``; returns (K, 3) losses, on the device."""

    def validate(self) -> torch.Tensor:
        """(K, 3) float64 validation losses of the active cells, weighted by batch length."""

    def weights(self, j: int) -> dict:
        """Active cell ``j``'s weights, a copy under the model's state_dict names."""

    def keep(self, sel: list[int]) -> None:
        """Go on with only the active cells at positions ``sel`` (the others have stopped)."""


@dataclass
class Budget:
    """The step budget every cell of a ``fit`` shares."""

    epochs: int
    batch: int
    steps_per_epoch: int


def fit(cells: Cells, runs: list[RunProgress], sizes: list[int], budget: Budget,
        finish: Callable[[int, int], None], progress=None, label: str = "align") -> None:
    """The one training loop: epochs of shuffled batches, validation, a record per epoch and
    early stopping for each cell (``runs[c]`` decides), until every cell has stopped.

    Each cell draws its batch order from its own generator, seeded by its seed alone, so a cell
    trains on the batches its run would alone. ``finish(c, steps)`` is called once per cell,
    when it stops or at the end, with its best weights kept in ``runs[c].best_weights``."""
    active = list(range(len(runs)))
    gens = [torch.Generator().manual_seed(r.cfg.seed) for r in runs]
    batch, steps = budget.batch, budget.steps_per_epoch
    total_steps = steps * budget.epochs
    step = 0
    task = progress.add_task(label, total=budget.epochs) if progress else None
    for epoch in range(budget.epochs):
        # the tail that does not fill a batch is dropped this epoch
        orders = torch.stack([torch.randperm(sizes[c], generator=gens[c])[:steps * batch] for c in active])
        orders = orders.to(cells.device)
        sums = torch.zeros(len(active), 3, device=cells.device)  # on the device: read once per epoch
        for b in range(steps):
            sums += cells.step(orders[:, b * batch:(b + 1) * batch], step)
            step += 1
        stats = torch.cat([(sums / steps).double(), cells.validate()], 1).cpu().tolist()  # the epoch's one read
        keep = []
        for j, c in enumerate(active):
            train_losses, val_losses = (dict(zip(LOSS_NAMES, stats[j][s:s + 3])) for s in (0, 3))
            lr = runs[c].cfg.lr * cosine_factor(step, total_steps)
            if runs[c].end_epoch(epoch, step, lr, train_losses, val_losses, lambda j=j: cells.weights(j)):
                finish(c, step)
            else:
                keep.append(j)
        if task is not None:
            progress.update(task, advance=1)
        if not keep:
            return
        if len(keep) < len(active):  # stopped cells leave the stack
            cells.keep(keep)
            active = [active[j] for j in keep]
    for c in active:
        finish(c, step)


class OneRun:
    """One run's heads as ``Cells`` of one: a plain forward and backward, torch's own
    gradient clipping and schedule, and the fixed-structure ablation, which a stack cannot take."""

    def __init__(self, run: RunSetup):
        self.run, self.cfg, self.model = run, run.cfg, run.model
        self.xi, self.xt, self.vi, self.vt = run.tensors
        self.device = self.xi.device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.fixed = None
        if self.cfg.fixed_structure:  # drawn once, from its own generator so the batch order is unchanged
            pick = torch.randperm(run.rows, generator=torch.Generator().manual_seed(self.cfg.seed + 1))[:run.batch]
            self.fixed = (self.xi[pick.to(self.device)], self.xt[pick.to(self.device)])

    def step(self, positions: torch.Tensor, step: int) -> torch.Tensor:
        cfg, model, idx = self.cfg, self.model, positions[0]
        model.train()
        lam = lambda_at(step, cfg.lam, cfg.lam_warmup_steps)
        total, clip, reg = batch_losses(model, cfg, self.xi[idx], self.xt[idx], lam, self.fixed)
        self.run.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.run.opt.step()
        self.run.sched.step()
        return torch.stack([total.detach(), clip.detach(), reg.detach().to(total.device)])[None]

    def validate(self) -> torch.Tensor:
        self.model.eval()
        return validation_totals(self.model, self.cfg, self.vi, self.vt)[None]

    def weights(self, j: int) -> dict:
        return copy.deepcopy(self.model.state_dict())

    def keep(self, sel: list[int]) -> None:  # a stack of one stops as a whole
        pass


def run_training_free(run: RunSetup, writer: RunWriter) -> dict:
    """A training-free method: fit its maps on the run's training pairs, score them once on val."""
    cfg, start = run.cfg, time.perf_counter()
    xi, xt, vi, vt = run.tensors
    image, text, facts = solve_maps(cfg.method, xi.float().cpu().numpy(), xt.float().cpu().numpy(), cfg.free, cfg.seed)
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
        summary = train_heads(run, writer, progress) if cfg.method == "heads" else run_training_free(run, writer)
    except BaseException:
        writer.abort()
        raise
    extra = {"layer_scores.json": run.table.to_dict()} if run.table is not None else None
    return writer.finish(summary, run.model.state_dict(), extra)


def train_heads(run: RunSetup, writer: RunWriter, progress=None) -> dict:
    """``fit`` one run's heads; leaves the best epoch's weights in ``run.model`` and returns the summary."""
    record = RunProgress(run.cfg, writer, run.config, copy.deepcopy(run.model.state_dict()))
    stopped: list[int] = []

    def finish(c: int, steps: int) -> None:
        run.model.load_state_dict(record.best_weights)
        stopped.append(steps)

    label = f"align {run.config['image_layer']}/{run.config['text_layer']} seed {run.cfg.seed}"
    fit(OneRun(run), [record], [run.rows], Budget(run.cfg.epochs, run.batch, run.steps_per_epoch), finish,
        progress, label)
    return record.summary(stopped[0], run.rows)
