"""The retrofit run: teacher targets, the student's training steps, evaluation, checkpoints; :func:`train_retrofit`
is its public face.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.alibi import METHODS, AlibiConfig, retrofit
from posvit_cli.core.io.preprocess import ResizeMode, parse_size
from posvit_cli.core.measure.probe import RAMP_TARGETS, stack_r2
from posvit_cli.core.progress import ProgressCallback, report
from posvit_cli.core.debias.retrofit.config import RetrofitConfig, RetrofitResult, Stage
from posvit_cli.core.debias.retrofit.data import (
    ImageSet, epoch_order, make_loader, noise_images, prepare_image, split_train_val, step_batches,
)
from posvit_cli.core.debias.retrofit.distributed import DistInfo, barrier
from posvit_cli.core.debias.retrofit.losses import distill_loss, learning_rate, most_positional_channels
from posvit_cli.core.debias.retrofit.state import (
    STATE_FORMAT, STATE_VERSION, read_training_state, rng_state, save_torch_atomic, set_rng_state, sha_of_paths,
    state_meta, write_log_csv,
)


def _patch_token_module(model, num_prefix: int):
    import torch

    class PatchTokens(torch.nn.Module):
        """Final normed patch tokens (B, N, C) of a timm ViT: the module DDP and torch.compile see."""

        def __init__(self, vit, prefix):
            super().__init__()
            self.vit = vit
            self.prefix = prefix

        def forward(self, x):
            return self.vit.forward_features(x)[:, self.prefix :]

    return PatchTokens(model, num_prefix)


def _trainable_parameters(model) -> list:
    # forward_features never uses the classifier, its pre-norm (fc_norm) or an attention-pool head: DDP would
    # wait forever for their gradients.
    unused = ("head.", "fc_norm.", "attn_pool.", "head_drop.")
    params = []
    for name, p in model.named_parameters():
        if name.startswith(unused):
            p.requires_grad_(False)
        elif p.requires_grad:
            params.append(p)
    return params


# --------------------------------------------------------------------------------------------------------------
# The run


class _Run:
    """One retrofit run: holds the models, data and counters; :func:`train_retrofit` is its public face."""

    def __init__(self, teacher, images, config: RetrofitConfig, *, output, run_dir, resume, student_init,
                 monitor, teacher_stores, dist: DistInfo, device, progress, on_log):
        import torch

        self.torch = torch
        self.cfg = config
        self.teacher = teacher
        self.output = Path(output) if output is not None else None
        self.run_dir = Path(run_dir)
        self.dist = dist
        self.device = device
        self.progress = report(progress)
        self.on_log = on_log or (lambda row: None)
        self.monitor_raw = list(monitor) if monitor is not None else None
        self.resume_state = read_training_state(resume) if resume is not None else None
        self.student_init = student_init
        self.teacher_stores = list(teacher_stores or [])
        self.images = [Path(p) for p in images]
        self.log_rows: list[dict] = []
        # Training-loss window since the last log row: [loss sum, steps, images, seconds].
        self._running: list = [0.0, 0, 0, 0.0]
        self.t0 = time.perf_counter()
        self.elapsed_before = 0.0

    # -- set-up -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        cfg.validate()
        t = self.teacher
        if any(m.get("name") in METHODS for m in t.modifications):
            raise PosvitError(f"the teacher '{t.name}' is already retrofitted: use the original model as teacher")
        if t.is_sam:
            raise PosvitError(f"'{t.name}' (SAM) uses windowed attention: the retrofit needs a global-attention ViT")
        if self.resume_state is not None:
            self._check_resume_compatible()
        self.train_paths, self.val_paths = split_train_val(self.images, cfg.val_fraction, cfg.val_max, cfg.seed)
        if not self.train_paths:
            raise PosvitError("no training images left after the validation split")
        for k, st in enumerate(cfg.stages):
            if st.batch_size % self.dist.world_size:
                raise PosvitError(
                    f"stage {k + 1}: batch size {st.batch_size} does not split over {self.dist.world_size} processes"
                )
            if st.batch_size > len(self.train_paths):
                raise PosvitError(
                    f"stage {k + 1}: batch size {st.batch_size} is larger than the {len(self.train_paths)} "
                    "training images; lower --batch-size or add images"
                )
        # Teacher: frozen, eval mode, on the device.
        t.model.eval().requires_grad_(False)
        t.to(self.device)
        self.prefix = t.num_prefix_tokens
        self.student = self._build_student()
        self.stores = self._index_teacher_stores()
        self.monitor = self._monitor_images()
        self.blank = self._resolve_blank()
        if self.resume_state is not None:
            had = list(state_meta(self.resume_state).get("channels_blanked", []))
            if had != self.blank:
                raise PosvitError(
                    f"--resume '{self.resume_state['_path']}' blanked channels {had}, the options ask for {self.blank}"
                )
        self.teacher_r2: dict[str, dict[str, float]] = {}

    def _build_student(self):
        cfg = self.cfg
        t = self.teacher
        if self.student_init is not None:
            from posvit_cli.core.features.encoders import load_encoder, read_checkpoint_meta

            meta = read_checkpoint_meta(self.student_init)
            if meta is None:
                raise PosvitError(f"--student-init '{self.student_init}' is not a posvit encoder checkpoint")
            if int(meta.get("embed_dim", -1)) != t.embed_dim:
                raise PosvitError(
                    f"width mismatch: the student '{self.student_init}' has {meta.get('embed_dim')} channels, the "
                    f"teacher {t.name} has {t.embed_dim}"
                )
            if meta.get("timm_name") != t.spec.timm_name:
                raise PosvitError(
                    f"the student '{self.student_init}' is a {meta.get('timm_name')}, the teacher a {t.spec.timm_name}"
                )
            names = [m.get("name") for m in meta.get("modifications", [])]
            if names != [cfg.method]:
                raise PosvitError(
                    f"the student '{self.student_init}' was retrofitted with {names or 'nothing'}, not {cfg.method}"
                )
            if cfg.method == "alibi":
                have = AlibiConfig.from_dict(meta["modifications"][0].get("config"))
                if have != cfg.alibi:
                    raise PosvitError(
                        f"the student '{self.student_init}' has ALiBi settings {have.to_dict()}, the options ask for "
                        f"{cfg.alibi.to_dict()}"
                    )
            student = load_encoder(None, self.student_init, device="cpu")
        else:
            student = copy.deepcopy(t)
            student.model.requires_grad_(True)  # the copy of the frozen teacher; the retrofit freezes what it must
            retrofit(student, cfg.method, cfg.alibi if cfg.method == "alibi" else None)
        student.model.train()
        student.to(self.device)
        return student

    def _index_teacher_stores(self) -> dict[int, tuple[str, dict[str, int]]]:
        """Map stage size → (store path, abs image path → store index) for stores of the teacher's features."""
        out: dict[int, tuple[str, dict[str, int]]] = {}
        if not self.teacher_stores:
            return out
        from posvit_cli.core.features.store import FeatureStore

        t = self.teacher
        sizes = {st.size for st in self.cfg.stages}
        for path in self.teacher_stores:
            with FeatureStore(path) as fs:
                if fs.channels != t.embed_dim:
                    raise PosvitError(
                        f"width mismatch: teacher store '{path}' has {fs.channels} channels, the teacher {t.name} "
                        f"has {t.embed_dim}"
                    )
                if fs.weights_sha256 and fs.weights_sha256 != t.weights_sha256:
                    raise PosvitError(f"teacher store '{path}' was extracted with other weights than the teacher's")
                if "final" not in fs.layers:
                    raise PosvitError(f"teacher store '{path}' has no final layer")
                pre = fs.preprocessing
                if pre.get("intensity", self.cfg.intensity) != self.cfg.intensity:
                    raise PosvitError(
                        f"teacher store '{path}' was extracted with --intensity {pre.get('intensity')}, the training "
                        f"uses {self.cfg.intensity}"
                    )
                size_rule = str(pre.get("size", ""))
                mode = parse_size(size_rule) if size_rule else None
                if mode is None or mode.kind != "crop" or mode.size not in sizes:
                    raise PosvitError(
                        f"teacher store '{path}' was extracted with --size {size_rule or '?'}: extract the teacher "
                        f"with --size crop:N for a stage size N ({', '.join(str(s) for s in sorted(sizes))})"
                    )
                index = {os.path.abspath(r.path): r.index for r in fs.records}
            wanted = [os.path.abspath(p) for p in self.train_paths + self.val_paths]
            missing = [p for p in wanted if p not in index]
            if missing:
                raise PosvitError(
                    f"teacher store '{path}' lacks {len(missing)} of the {len(wanted)} images (first: {missing[0]})"
                )
            out[mode.size] = (str(path), index)
        return out

    def _monitor_images(self) -> list[np.ndarray]:
        if self.monitor_raw is not None:
            return self.monitor_raw
        # The published noise set: 518 × 518 uniform noise (37 × 37 tokens at patch 14).
        return noise_images(4, 518, seed=self.cfg.seed)

    def _monitor_mode(self, stage: Stage) -> ResizeMode:
        return ResizeMode("crop", stage.size) if self.cfg.monitor_size == "stage" else parse_size(self.cfg.monitor_size)

    def _monitor_tensors(self, stage: Stage) -> list:
        t = self.teacher
        mode = self._monitor_mode(stage)
        return [prepare_image(raw, mode, t.patch_size, t.mean, t.std, t.in_chans, self.cfg.intensity) for raw in self.monitor]

    def _resolve_blank(self) -> list[int]:
        cfg = self.cfg
        c = self.teacher.embed_dim
        if cfg.blank == "auto":
            if self.resume_state is not None:
                return list(state_meta(self.resume_state)["channels_blanked"])
            grids = self._features(self.teacher, self._monitor_tensors(cfg.stages[0]))
            return most_positional_channels(grids, fraction=cfg.r2_fraction, repeats=cfg.r2_repeats, seed=cfg.seed)
        chans = sorted(int(v) for v in cfg.blank)
        bad = [v for v in chans if v >= c]
        if bad:
            raise PosvitError(f"--blank channel {bad[0]} does not exist: {self.teacher.name} has channels 0..{c - 1}")
        return chans

    def _check_resume_compatible(self) -> None:
        meta = state_meta(self.resume_state)
        path = self.resume_state["_path"]
        if meta.get("method") != self.cfg.method:
            raise PosvitError(
                f"--resume '{path}' is a checkpoint of a `debias-train {meta.get('method')}` run, "
                f"not `debias-train {self.cfg.method}`"
            )
        want = self.cfg.recipe()
        have = meta.get("recipe", {})
        diff = sorted(k for k in set(want) | set(have) if json.dumps(want.get(k)) != json.dumps(have.get(k)))
        if diff:
            raise PosvitError(f"--resume '{path}' was trained with other settings: {', '.join(diff)} differ")
        t = self.teacher
        if meta.get("teacher", {}).get("weights_sha256") != t.weights_sha256:
            raise PosvitError(f"--resume '{path}' was trained with another teacher ({meta.get('teacher', {}).get('model')})")
        if meta.get("finished"):
            raise PosvitError(f"--resume '{path}' is a finished run; start a new one (e.g. with --student-init)")

    # -- forward passes -----------------------------------------------------------------------------------
    def _autocast(self):
        from posvit_cli.core.device import autocast

        return autocast(self.device, self.cfg.precision)

    def _teacher_tokens(self, x):
        torch = self.torch
        with torch.no_grad(), self._autocast():
            out = self.teacher_fn(x)
        out = out.float()
        if self.blank:
            out[..., self.blank] = 0.0
        return out

    def _features(self, encoder, tensors) -> list[np.ndarray]:
        """Final patch tokens (h, w, C) of single images, batched by size; eval mode; float32 numpy."""
        torch = self.torch
        model = encoder.model
        was_training = model.training
        model.eval()
        out: list[np.ndarray | None] = [None] * len(tensors)
        by_shape: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        try:
            with torch.no_grad(), self._autocast():
                for shape, idx in by_shape.items():
                    for k in range(0, len(idx), self.cfg.micro_batch):
                        chunk = idx[k : k + self.cfg.micro_batch]
                        x = torch.stack([tensors[i] for i in chunk]).to(self.device)
                        tok = model.forward_features(x)[:, encoder.num_prefix_tokens :].float()
                        h, w = encoder.grid(shape[-2], shape[-1])
                        tok = tok.reshape(len(chunk), h, w, -1).cpu().numpy()
                        for j, i in enumerate(chunk):
                            out[i] = tok[j]
        finally:
            model.train(was_training)
        return out  # type: ignore[return-value]

    def _monitor_r2(self, encoder, stage: Stage) -> dict[str, float]:
        grids = self._features(encoder, self._monitor_tensors(stage))
        scores = [
            stack_r2(g, RAMP_TARGETS, fraction=self.cfg.r2_fraction, repeats=self.cfg.r2_repeats, seed=self.cfg.seed + i)
            for i, g in enumerate(grids)
        ]
        return {t: float(np.mean([s[t] for s in scores])) for t in RAMP_TARGETS}

    # -- evaluation ---------------------------------------------------------------------------------------
    def _evaluate(self, stage_index: int, stage: Stage) -> dict:
        torch = self.torch
        model = self.student.model
        row: dict[str, Any] = {}
        if self.val_paths:
            ds = self._dataset(self.val_paths, stage)
            micro = self.cfg.micro_batch
            batches = [list(range(i, min(i + micro, len(ds)))) for i in range(0, len(ds), micro)]
            total_loss = total_cos = 0.0
            n = 0
            model.eval()
            try:
                with torch.no_grad():
                    for batch in make_loader(ds, batches, self.cfg.workers):
                        self._raise_batch_error(batch)
                        x = batch["image"].to(self.device)
                        target = self._target(batch, x)
                        with self._autocast():
                            s = self.student_fn(x)
                        s = s.float()
                        loss = distill_loss(s, target, self.cfg.loss, self.cfg.gram_weight)
                        cos = torch.nn.functional.cosine_similarity(s, target, dim=-1, eps=1e-8).mean()
                        total_loss += float(loss) * len(batch["index"])
                        total_cos += float(cos) * len(batch["index"])
                        n += len(batch["index"])
            finally:
                model.train()
            row["val_loss"] = total_loss / n
            row["val_cosine"] = total_cos / n
        r2 = self._monitor_r2(self.student, stage)
        row.update({f"r2_{k}": v for k, v in r2.items()})
        return row

    # -- data ---------------------------------------------------------------------------------------------
    def _dataset(self, paths, stage: Stage) -> ImageSet:
        t = self.teacher
        store = self.stores.get(stage.size)
        return ImageSet(paths, stage.size, t.patch_size, t.mean, t.std, t.in_chans, self.cfg.intensity,
                         store_path=store[0] if store else None, store_index=store[1] if store else None)

    @staticmethod
    def _raise_batch_error(batch: dict) -> None:
        if "error" in batch:
            raise PosvitError(f"cannot read training image {batch['error']}")

    def _target(self, batch: dict, x):
        if "target" in batch:
            t = batch["target"].to(self.device).float()
            t = t.reshape(t.shape[0], -1, t.shape[-1])
            h, w = self.teacher.grid(x.shape[-2], x.shape[-1])
            if t.shape[1] != h * w:
                raise PosvitError(
                    f"the teacher store's grid ({t.shape[1]} tokens) does not match the {h}×{w} grid of the stage"
                )
            if self.blank:
                t[..., self.blank] = 0.0
            return t
        return self._teacher_tokens(x)

    # -- logging and checkpoints ----------------------------------------------------------------------------
    def _log(self, row: dict) -> None:
        row = dict(row)
        row["elapsed_s"] = round(self.elapsed_before + time.perf_counter() - self.t0, 3)
        self.log_rows.append(row)
        if self.dist.is_main:
            write_log_csv(self.log_rows, self.log_csv)
            self.on_log(dict(row, event="eval" if row.get("val_loss") is not None or row.get("r2_xy") is not None
                             else "train"))

    def _state(self, stage_index: int, step_in_stage: int, global_step: int, finished: bool) -> dict:
        t = self.teacher
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "method": self.cfg.method,
            "recipe": self.cfg.recipe(),
            "teacher": {"model": t.name, "weights": t.weights, "weights_sha256": t.weights_sha256},
            "images_sha256": self.images_sha,
            "channels_blanked": self.blank,
            "stage_index": stage_index,
            "step_in_stage": step_in_stage,
            "global_step": global_step,
            "finished": finished,
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.t0,
            "teacher_r2": self.teacher_r2,
            # The training-loss window in progress, so a resumed run logs the same averages.
            "running": self._running,
        }
        return {
            "meta": json.dumps(meta),
            "student": {k: v.detach().cpu().clone() for k, v in self.student.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "rng": rng_state(),
            "log": json.dumps(self.log_rows),
        }

    def _save_state(self, stage_index: int, step_in_stage: int, global_step: int, finished: bool = False) -> None:
        if self.dist.is_main:
            state = self._state(stage_index, step_in_stage, global_step, finished)
            save_torch_atomic(state, self.run_dir / "last.pt")
            if self.cfg.keep_checkpoints and not finished:
                save_torch_atomic(state, self.run_dir / f"step{global_step:07d}.pt")
            if not finished:
                self.on_log({"event": "checkpoint", "step": global_step, "path": str(self.run_dir / "last.pt")})
        barrier(self.dist)

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> RetrofitResult:
        torch = self.torch
        cfg = self.cfg
        self.setup()
        self.images_sha = sha_of_paths(self.train_paths + self.val_paths)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.dist)
        self.log_csv = self.run_dir / "log.csv"

        start_stage, start_step, global_step = 0, 0, 0
        self.optimizer = None
        if self.resume_state is not None:
            meta = state_meta(self.resume_state)
            if meta.get("images_sha256") != self.images_sha:
                raise PosvitError(
                    f"--resume '{self.resume_state['_path']}' was trained on other images: pass the same image folder"
                )
            self.student.model.load_state_dict(self.resume_state["student"], strict=True)
            start_stage, start_step = int(meta["stage_index"]), int(meta["step_in_stage"])
            global_step = int(meta["global_step"])
            self.log_rows = json.loads(self.resume_state["log"])
            self.elapsed_before = float(meta.get("elapsed_s", 0.0))
            self.teacher_r2 = dict(meta.get("teacher_r2", {}))
            set_rng_state(self.resume_state["rng"])
            self._running = list(meta.get("running", [0.0, 0, 0, 0.0]))

        # The functions the loop calls: DDP- and compile-wrapped student, plain or compiled teacher.
        student_module = _patch_token_module(self.student.model, self.prefix)
        teacher_module = _patch_token_module(self.teacher.model, self.prefix)
        params = _trainable_parameters(self.student.model)
        train_fn = student_module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            train_fn = DistributedDataParallel(student_module, device_ids=ids)
        if cfg.compile:
            # Static shapes: each stage size compiles its own graph. Dynamic shapes made Inductor fail on the
            # ALiBi mask's symbolic sizes (torch 2.11, H100), and a stage rarely changes size mid-way.
            train_fn = torch.compile(train_fn, dynamic=False)
            self.student_fn = torch.compile(student_module, dynamic=False)
            self.teacher_fn = torch.compile(teacher_module, dynamic=False)
        else:
            self.student_fn = student_module
            self.teacher_fn = teacher_module
        ddp = train_fn if self.dist.enabled else None

        n_train = len(self.train_paths)
        total_steps = sum(self._stage_steps(st, n_train) for st in cfg.stages)
        for k in range(start_stage, len(cfg.stages)):
            stage = cfg.stages[k]
            steps = self._stage_steps(stage, n_train)
            first = start_step if k == start_stage else 0
            if first >= steps:
                continue
            self.optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=cfg.weight_decay)
            if self.resume_state is not None and k == start_stage and first > 0:
                self.optimizer.load_state_dict(self.resume_state["optimizer"])
            key = str(stage.size)
            if key not in self.teacher_r2 and self.dist.is_main:
                self.teacher_r2[key] = self._monitor_r2(self.teacher, stage)
                if self.dist.is_main:
                    self.on_log({"event": "teacher", "stage": k + 1, "size": stage.size,
                                 **{f"r2_{t}": v for t, v in self.teacher_r2[key].items()},
                                 "channels_blanked": self.blank})
            if global_step == 0 and first == 0:
                # Step 0: what the retrofit alone costs before any distillation (the baseline of the curve).
                row = self._train_row(k, stage, -1, 1, 0, stage.lr, None, None)
                row["epoch"] = 0.0
                if self.dist.is_main:
                    row.update(self._evaluate(k, stage))
                barrier(self.dist)
                self._log(row)
            global_step = self._run_stage(k, stage, first, steps, global_step, total_steps, train_fn, ddp, params)
        evals = [r for r in self.log_rows if r.get("r2_xy") is not None]
        final_row = evals[-1] if evals else {}

        # The end: a finished state (nothing to resume) and the encoder checkpoint.
        last_stage = len(cfg.stages) - 1
        self._save_state(last_stage, self._stage_steps(cfg.stages[-1], n_train), global_step, finished=True)
        if self.dist.is_main and self.output is not None:
            self._save_encoder(final_row)
        barrier(self.dist)
        return RetrofitResult(
            output=str(self.output) if self.output is not None else None,
            run_dir=str(self.run_dir),
            log_csv=str(self.log_csv),
            steps=global_step,
            channels_blanked=list(self.blank),
            teacher_r2=self.teacher_r2,
            final={k: final_row.get(k) for k in ("val_loss", "val_cosine", *(f"r2_{t}" for t in RAMP_TARGETS))},
            seconds=round(self.elapsed_before + time.perf_counter() - self.t0, 3),
            resumed_from=self.resume_state["_path"] if self.resume_state is not None else None,
            train_images=len(self.train_paths),
            val_images=len(self.val_paths),
        )

    @staticmethod
    def _stage_steps(stage: Stage, n_train: int) -> int:
        per_epoch = n_train // stage.batch_size
        return max(1, int(round(stage.epochs * per_epoch)))

    def _run_stage(self, k, stage, first, steps, global_step, total_steps, train_fn, ddp, params) -> int:
        torch = self.torch
        cfg = self.cfg
        dist = self.dist
        n_train = len(self.train_paths)
        per_epoch = n_train // stage.batch_size
        warmup_steps = int(round(cfg.warmup * steps))
        micro = cfg.micro_batch
        # This process's micro-batches for every remaining step, in order; one loader serves the whole stage.
        plan: list[list[list[int]]] = []
        for s in range(first, steps):
            epoch, b = divmod(s, per_epoch)
            if b == 0 or not plan or s == first:
                order = epoch_order(n_train, cfg.seed, k, epoch)
            plan.append(step_batches(order, b, stage.batch_size, dist.rank, dist.world_size, micro))
        flat = [mb for step in plan for mb in step]
        loader = iter(make_loader(self._dataset(self.train_paths, stage), flat, cfg.workers))
        task = f"stage {k + 1}/{len(cfg.stages)}: {stage.size} px"
        self.progress(task, first, steps)
        t_start = time.perf_counter()
        local_batch = stage.batch_size // dist.world_size
        self.student.model.train()
        for s, micro_batches in zip(range(first, steps), plan):
            lr = learning_rate(s, steps, stage.lr, warmup_steps, cfg.schedule, cfg.min_lr_ratio)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            step_loss = torch.zeros((), device=self.device)
            for j, idx in enumerate(micro_batches):
                batch = next(loader)
                self._raise_batch_error(batch)
                x = batch["image"].to(self.device, non_blocking=True)
                target = self._target(batch, x)
                sync = ddp is None or j == len(micro_batches) - 1
                ctx = contextlib.nullcontext() if sync else ddp.no_sync()
                with ctx:
                    with self._autocast():
                        out = train_fn(x)
                    loss = distill_loss(out.float(), target, cfg.loss, cfg.gram_weight)
                    # Micro-batch means weighted by size: the step minimises the mean over its global batch.
                    (loss * (len(idx) / local_batch)).backward()
                step_loss += loss.detach() * (len(idx) / local_batch)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if dist.enabled:
                import torch.distributed as tdist

                tdist.all_reduce(step_loss)
                step_loss /= dist.world_size
            value = float(step_loss)
            if not math.isfinite(value):
                raise PosvitError(
                    f"the training loss became {value} at step {global_step + 1}: lower --lr (or use --precision fp32)"
                )
            now = time.perf_counter()
            run_ = self._running
            run_[0] += value
            run_[1] += 1
            run_[2] += stage.batch_size
            run_[3] += now - t_start
            t_start = now
            global_step += 1
            done = s + 1
            self.progress(task, done, steps)
            end_of_stage = done == steps
            row = None
            if cfg.log_every and (global_step % cfg.log_every == 0) or end_of_stage:
                run_ = self._running
                row = self._train_row(k, stage, s, per_epoch, global_step, lr, run_[0] / run_[1],
                                      run_[2] / max(1e-9, run_[3]))
                self._running = [0.0, 0, 0, 0.0]
            if (cfg.eval_every and global_step % cfg.eval_every == 0) or end_of_stage:
                if row is None:
                    row = self._train_row(k, stage, s, per_epoch, global_step, lr, None, None)
                if dist.is_main:
                    row.update(self._evaluate(k, stage))
                barrier(dist)
            if row is not None:
                self._log(row)
            if (cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0) or end_of_stage:
                self._save_state(k, done, global_step)
        return global_step

    @staticmethod
    def _train_row(k, stage, s, per_epoch, global_step, lr, loss, ips) -> dict:
        return {
            "step": global_step,
            "stage": k + 1,
            "epoch": round((s + 1) / per_epoch, 4),
            "size": stage.size,
            "lr": lr,
            "train_loss": loss,
            "images_per_s": None if ips is None else round(ips, 3),
        }

    def _save_encoder(self, final_row: dict) -> None:
        from posvit_cli import __version__
        from posvit_cli.core.features.encoders import save_encoder_checkpoint

        t = self.teacher
        cfg = self.cfg
        extra = {
            "method": cfg.method,
            "alibi": cfg.alibi.to_dict() if cfg.method == "alibi" else None,
            "channels_blanked": list(self.blank),
            "recipe": cfg.recipe(),
            "teacher": {"model": t.name, "weights": t.weights, "weights_sha256": t.weights_sha256},
            "train_images": len(self.train_paths),
            "val_images": len(self.val_paths),
            "final": {k: final_row.get(k) for k in ("val_loss", "val_cosine", *(f"r2_{x}" for x in RAMP_TARGETS))},
            "teacher_r2": self.teacher_r2,
            "posvit_version": __version__,
        }
        self.output.parent.mkdir(parents=True, exist_ok=True)
        save_encoder_checkpoint(self.output, self.student, extra=extra)


def train_retrofit(
    teacher,
    images: Sequence[str | os.PathLike],
    config: RetrofitConfig,
    *,
    output: str | os.PathLike | None,
    run_dir: str | os.PathLike,
    resume: str | os.PathLike | None = None,
    student_init: str | os.PathLike | None = None,
    monitor: Sequence[np.ndarray] | None = None,
    teacher_stores: Sequence[str | os.PathLike] = (),
    dist: DistInfo | None = None,
    device=None,
    progress: ProgressCallback | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> RetrofitResult:
    """Retrofit ``teacher``'s architecture with ALiBi or NoPE and distil it to ``teacher`` on ``images``.

    Parameters
    ----------
    teacher : Encoder
        The original model (frozen during training; not modified).
    images : sequence of path
        Training images (readable; see :func:`check_images`); a seeded ``config.val_fraction`` is held out.
    config : RetrofitConfig
    output : path or None
        Final posvit encoder checkpoint (``.safetensors``), written atomically by rank 0.
    run_dir : path
        Folder for training states (``last.pt``) and the log (``log.csv``).
    resume : path, optional
        A training state (or run folder) of an interrupted run with the same recipe, teacher and images.
    student_init : path, optional
        Start the student from this retrofitted posvit checkpoint (e.g. the 224 px result before a 518 px stage).
    monitor : sequence of ndarray, optional
        Homogeneous images ``(H, W[, C])`` for the stack-R² monitor and automatic blanking; default: 4 uniform-noise
        images of 518 × 518 px.
    teacher_stores : sequence of path
        Feature stores of the teacher (``posvit extract --size crop:N``) that replace on-the-fly teacher passes for
        stages of size N.
    dist : DistInfo, optional
        From :func:`setup_distributed`.
    device : torch.device, optional
    progress : callable, optional
        ``progress(task, completed, total)`` per optimiser step.
    on_log : callable, optional
        Called on rank 0 with each log row (``event``: ``train``, ``eval``, ``teacher``, ``checkpoint``).

    Returns
    -------
    RetrofitResult

    Raises
    ------
    PosvitError
        For inputs that do not fit (batch larger than the data, wrong resume state, width mismatch, ...).
    """
    import torch

    device = device if device is not None else torch.device("cpu")
    with warnings.catch_warnings():
        # timm warns once per new grid size when resampling position embeddings; irrelevant for the teacher here.
        warnings.filterwarnings("ignore", category=UserWarning, module="timm")
        run = _Run(teacher, images, config, output=output, run_dir=run_dir, resume=resume, student_init=student_init,
                   monitor=monitor, teacher_stores=teacher_stores, dist=dist or DistInfo(), device=device,
                   progress=progress, on_log=on_log)
        return run.run()
