"""One trainer rank (a Ray actor that looks like a torchrun process): DeepSpeed engine + SFT steps.

The driver (sft.py) starts `train.world_size` of these in a TrainerGroup and calls every method on
all ranks at once (they are collectives). Metrics come back from every rank; rank 0's are the
run's (losses are already averaged over ranks).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from vla_dist.config.schema import RunConfig
from vla_dist.data.augment import augment_batch
from vla_dist.distributed.rank import DeepSpeedRank
from vla_dist.models.object_head import OBJECT_HEAD


class SFTWorker(DeepSpeedRank):
    def setup(self, env: dict[str, str], cfg: RunConfig, manifest: dict[str, Any], resume: str | None,
              resume_mode: str = "same") -> dict[str, Any]:
        self.init_distributed(env, cfg)
        import deepspeed

        from vla_dist.distributed.ds_config import build_ds_config, scheduler_factory
        from vla_dist.models.build import build_policy
        from vla_dist.train.batches import EpisodeWindows, LoaderBatches
        from vla_dist.train.lora import apply_lora, trainable_count

        self.manifest = manifest
        torch.manual_seed(cfg.run.seed)  # the same random init on every rank (and in export)
        ds_config = build_ds_config(cfg.train, on_gpu=self.on_gpu)
        with self.partitioned_loading(ds_config):  # ZeRO-3: a checkpoint loads already partitioned
            policy, load = self.measured_load(lambda: build_policy(cfg.model, manifest))
        if cfg.train.lora.enabled:
            apply_lora(policy, cfg.train.lora)
        self.lora = cfg.train.lora.enabled
        if cfg.train.object_target:  # training's auxiliary perception target (never saved with the policy)
            from vla_dist.models.object_head import attach_object_head

            hidden = policy.hf_model.config.vlm_config.text_config.hidden_size
            attach_object_head(policy, hidden, len(policy.cameras), cfg.train.object_target)
        if resume is not None and resume_mode == "universal":  # another world size, same stage
            ds_config["checkpoint"] = {"load_universal": True}
        self.engine, *_ = deepspeed.initialize(model=policy, config=ds_config,
                                               model_parameters=[p for p in policy.parameters() if p.requires_grad],
                                               lr_scheduler=scheduler_factory(cfg.train))
        # fixed_batches: every rank reads all episodes and draws global micro-batch g = micro * world_size
        # + rank, so a step's global batch is the same at any world size (elastic resume compares)
        shard = (0, 1) if cfg.train.fixed_batches else (self.rank, self.world_size)
        self.windows: EpisodeWindows | None = None
        self.data: LoaderBatches | None = None
        if cfg.train.fixed_batches:
            self.windows = EpisodeWindows(cfg.data.dir, policy.cameras, policy.chunk_size, *shard)
        else:  # real training: this rank's WindowLoader split; every rank takes the same number of batches
            self.data = LoaderBatches(cfg, self.rank, self.world_size, cfg.train.micro_batch_size, self._all_min,
                                      chunk_size=policy.chunk_size)
        if resume is not None:
            from vla_dist.checkpoint.universal import load_resume

            load_resume(self.engine, resume, resume_mode)  # same size, universal, or across ZeRO stages
            self._load_data_state(resume)
        self.nan_in_row = 0
        trainable, total = trainable_count(self.engine.module)
        return {"step": int(self.engine.global_steps), "trainable": trainable, "parameters": total,
                "windows": len(self.windows) if self.windows is not None else None, "load": load}

    def release(self) -> None:
        data = getattr(self, "data", None)  # (None before setup ran, or with fixed batches)
        if data is not None:
            data.close()

    def _load_data_state(self, step_dir: str) -> None:
        """Continue the data stream where the checkpoint left it: every rank's loader state is in the
        checkpoint's train_state.json, indexed by rank (see save()): plain JSON, so resuming never
        unpickles anything of ours. Another world size: the loader restarts
        the saved epoch with the new split (WindowLoader.load_state_dict warns)."""
        if self.data is None:
            return  # fixed batches: stateless
        from vla_dist.checkpoint.manager import TRAIN_STATE

        state_file = Path(step_dir) / TRAIN_STATE
        states = json.loads(state_file.read_text())["data_loader"] if state_file.is_file() else None
        if states:
            self.data.load_state_dict(states[self.rank] if len(states) == self.world_size else states[0])

    def train(self, steps: int) -> list[dict[str, Any]]:
        """Run `steps` optimizer steps; one metrics dict per step. A non-finite loss (on any rank)
        skips that micro-batch (no backward, no step; all ranks agree) and draws another; after
        train.max_nan_steps in a row the last dict has "stop": "nan". The ranks' losses are averaged
        (and loader mode's window counts gathered) in one collective after the last step, not one
        per step: a collective costs a round trip of every rank (0.15-1.5 ms on a CPU node)."""
        from vla_dist.train.breakdown import StepBreakdown

        t, seed = self.cfg.train, self.cfg.run.seed
        self.engine.train()
        timer = StepBreakdown(t.breakdown, synchronize=self.on_gpu)
        out: list[dict[str, Any]] = []
        # this rank's mean loss, windows and object-head error (NaN: no head), per finished step
        local: list[tuple[float, int, float]] = []
        head = self.engine.module._modules.get(OBJECT_HEAD)  # train.object_target's head, or None
        for _ in range(steps):
            step = int(self.engine.global_steps)
            draw = 0 if t.fixed_batches else step  # the step number the batch/noise seeds use
            started = time.perf_counter()
            losses: list[float] = []
            object_errors: list[float] = []  # the object head's error per micro-batch (m), when it trains
            micro = attempt = skipped = 0
            used: list[Any] = []
            while micro < t.grad_accum:
                key = ((seed, 0, draw, micro * self.world_size + self.rank, attempt) if t.fixed_batches
                       else (seed, self.rank, draw, micro, attempt))
                with timer.phase("data"):
                    if self.data is not None:
                        batch = self.data.next()  # collective: the ranks agree there is a batch on each
                        used.append(batch)
                    else:
                        batch = self.windows.batch(t.micro_batch_size, key)
                    aug = self.cfg.data
                    batch = augment_batch(batch, aug.random_shift, seed=hash((*key, 1)) & 0x7FFF_FFFF,
                                          jitter=aug.color_jitter, state_noise=aug.state_noise)
                # noise and flow-matching time are drawn from torch's generator: seed it per micro-batch
                # so a resumed run continues the uninterrupted one exactly
                torch.manual_seed(hash(key) & 0x7FFF_FFFF)
                with timer.phase("forward"):
                    loss = self._loss(batch)
                with timer.phase("nan_check"):
                    finite = self._all_min(float(torch.isfinite(loss.detach()).all())) >= 1
                if not finite:
                    skipped += 1
                    attempt += 1
                    self.nan_in_row += 1
                    if self.nan_in_row >= t.max_nan_steps:
                        out.append({"step": step, "stop": "nan", "nan_skipped": skipped})
                        return self._reduce_step_metrics(out, local)
                    continue
                self.nan_in_row = 0
                lr = float(self.engine.get_lr()[0])  # the rate this step uses (read after, it is the next one's)
                with timer.phase("backward"):
                    self.engine.backward(loss)
                with timer.phase("step"):
                    self.engine.step()
                losses.append(float(loss.detach()))
                if head is not None:
                    object_errors.append(head.last_error_m)
                micro += 1
            elapsed = time.perf_counter() - started
            grad_norm = self.engine.get_global_grad_norm()
            object_error = sum(object_errors) / len(object_errors) if object_errors else float("nan")
            local.append((sum(losses) / len(losses), sum(int(b.actions.shape[0]) for b in used), object_error))
            row = {
                "step": int(self.engine.global_steps),
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "step_time_s": elapsed,
                "samples_per_s": t.micro_batch_size * t.grad_accum * self.world_size / elapsed,
                "nan_skipped": skipped,
                **self._data_metrics(used),
            }
            if t.breakdown:
                row["breakdown_ms"] = timer.finish(elapsed, self.engine)
            out.append(row)
        return self._reduce_step_metrics(out, local)

    def _reduce_step_metrics(
        self, rows: list[dict[str, Any]], local: list[tuple[float, int, float]]
    ) -> list[dict[str, Any]]:
        """Collective, once per train() call: every finished step's loss (and the object head's error:
        how well the images locate the cube) averaged over the ranks and micro-batches and, in loader
        mode, the windows each rank trained on (rows without a loss: a NaN stop)."""
        import torch.distributed as dist

        mine = torch.tensor(local, dtype=torch.float64).reshape(len(local), 3)
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        every = torch.stack(gathered)  # rank, step, (loss, windows)
        finished = [row for row in rows if "stop" not in row]
        for i, row in enumerate(finished):
            row["loss"] = float(every[:, i, 0].mean())
            if not torch.isnan(every[:, i, 2]).any():
                row["object_error_cm"] = round(100 * float(every[:, i, 2].mean()), 3)
            if self.data is not None:
                row["rank_windows"] = [int(w) for w in every[:, i, 1].tolist()]
        return rows

    def _loss(self, batch: Any) -> torch.Tensor:
        """One micro-batch's loss: the engine's forward (a subclass may wrap it)."""
        return self.engine(batch)

    def _data_metrics(self, used: list[Any]) -> dict[str, Any]:
        """Loader mode: rank 0's data position after the step and a digest of the windows it used
        (the windows each rank trained on are gathered with the losses: _reduce_step_metrics)."""
        if self.data is None:
            return {}
        from vla_dist.train.batches import batch_digest

        state = self.data.state_dict()
        return {"data_epoch": state["epoch"], "data_position": state["windows_delivered_total"],
                "batch_digest": batch_digest(used)}

    def save(self, step_dir: str, meta: dict[str, Any]) -> None:
        """Collective. DeepSpeed's shards (no DeepSpeed `latest`: the driver writes ours after
        COMPLETE), at ZeRO stage 0 rank 0's safetensors copy of weights and Adam moments
        (checkpoint/stage0.py), the gathered adapter when LoRA, and train_meta.json (rank 0)."""
        import torch.distributed as dist

        from vla_dist.checkpoint.manager import META, TRAIN_STATE
        from vla_dist.train.lora import save_adapter

        path = Path(step_dir)
        states: list[Any] | None = None
        if self.data is not None:  # every rank's loader state, gathered: only rank 0 writes it
            states = [None] * self.world_size
            dist.all_gather_object(states, self.data.state_dict())
        self._save_engine(path)
        if self.lora:
            save_adapter(self.engine.module, path / "adapter", self.rank)
        if self.rank == 0:
            (path / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            # What our own resume paths read (step, schedule, data position), as JSON rather than
            # from DeepSpeed's pickled model-states file.
            train_state = {
                "global_steps": int(self.engine.global_steps),
                "global_samples": int(self.engine.global_samples),
                "lr_scheduler": self.engine.lr_scheduler.state_dict(),
                "data_loader": states,
            }
            (path / TRAIN_STATE).write_text(json.dumps(train_state) + "\n", encoding="utf-8")
        dist.barrier()

    def export_policy(self, out_dir: str) -> float:
        """Collective: the current weights for a training-time eval (train/evals.py), in seconds of
        the ranks' time. Full fine-tune: rank 0 writes a policy directory (save_pretrained) with every
        parameter gathered (ZeRO-3 partitions them; a no-op at stages 0-2). LoRA: only the adapter
        (the eval side merges it into the rebuilt base), so the ranks never gather the frozen base."""
        import torch.distributed as dist

        from vla_dist.train.lora import save_adapter

        started = time.perf_counter()
        module = self.engine.module
        if self.lora:
            save_adapter(module, Path(out_dir) / "adapter", self.rank)
        else:
            self.save_gathered_pretrained(module, out_dir)
        dist.barrier()
        return time.perf_counter() - started
