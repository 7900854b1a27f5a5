"""One RL trainer rank: the policy (+LoRA) and, for PPO, its value head under a DeepSpeed engine;
the PPO/GRPO update of one iteration's `Trajectories`; the trainable weights for the sync; saving.

The driver (rl/loop.py) calls every method on all ranks at once (they are collectives). Each rank
gets the whole iteration (one object in Ray's store), works on its share of the decisions, and
the ranks' gradients are averaged by DeepSpeed as in SFT.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from vla_dist.config.schema import RunConfig, TrainSection
from vla_dist.distributed.rank import DeepSpeedRank
from vla_dist.rl.advantages import episode_weights, explained_variance, gae, group_relative_advantages
from vla_dist.rl.losses import ppo_policy_loss, reference_kl, value_loss
from vla_dist.rl.trajectories import Trajectories

RL_STATE = "rl_state.json"  # iteration and weight version of a checkpoint (rank 0, plain JSON)
POLICY = "policy"  # a checkpoint's policy directory: `vla-dist eval eval.checkpoint=...` reads it as it is
BASE = "base_policy"  # LoRA runs: run.dir/base_policy, the merged starting policy each checkpoint's adapter is on


def rl_train_section(cfg: RunConfig) -> TrainSection:
    """The DeepSpeed settings of the RL ranks: train.* (stage, offload, clipping, placement) with
    rl's learning rate and one minibatch of rl.minibatch_size decisions per rank per step."""
    from dataclasses import replace

    return replace(cfg.train, lr=cfg.rl.lr, micro_batch_size=cfg.rl.minibatch_size, grad_accum=1,
                   global_batch_size=0)


class RLWorker(DeepSpeedRank):
    def setup(self, env: dict[str, str], cfg: RunConfig, manifest: dict[str, Any], resume: str | None,
              resume_mode: str = "same") -> dict[str, Any]:
        self.init_distributed(env, cfg)
        import deepspeed

        from vla_dist.distributed.ds_config import build_ds_config
        from vla_dist.models.build import load_policy
        from vla_dist.rl.objective import ActorCritic, Sampling
        from vla_dist.rl.value import ValueHead, value_input_size
        from vla_dist.train.lora import apply_lora, trainable_count

        assert cfg.model.pretrained, "validated by the driver"
        torch.manual_seed(cfg.run.seed)  # the value head's init, the same on every rank
        policy, load = self.measured_load(lambda: load_policy(cfg.model.pretrained))
        _as_configured(policy, cfg)
        self.lora = cfg.train.lora.enabled
        if self.lora:
            if self.rank == 0 and not resume:  # the base every checkpoint's adapter applies to
                _save_base(policy, Path(cfg.run.dir) / BASE)
            apply_lora(policy, cfg.train.lora)
        rl = cfg.rl
        value_head = ValueHead(value_input_size(policy, list(rl.value_inputs))) if rl.algorithm == "ppo" else None
        module = ActorCritic(policy, value_head, Sampling(rl.noise_level, rl.temperature), rl.value_trains_backbone,
                             tuple(rl.value_inputs))
        ds_config = build_ds_config(rl_train_section(cfg), on_gpu=self.on_gpu)
        groups: list[dict[str, Any]]
        if value_head is not None and rl.value_lr:  # the head in its own group at its own learning rate
            groups = [{"params": [p for p in policy.parameters() if p.requires_grad]},
                      {"params": list(value_head.parameters()), "lr": rl.value_lr}]
        else:  # one group as before rl.value_lr, so checkpoints saved by earlier versions still resume
            groups = [{"params": [p for p in module.parameters() if p.requires_grad]}]
        self.engine, *_ = deepspeed.initialize(model=module, config=ds_config, model_parameters=groups)
        self.reference: ActorCritic | None = None
        if rl.kl_coef:  # the start policy, frozen (resumed runs too: cfg.model.pretrained is the start)
            start = _as_configured(load_policy(cfg.model.pretrained), cfg).requires_grad_(False)
            self.reference = ActorCritic(start, None, Sampling(rl.noise_level, rl.temperature))
            self.reference.to(self.engine.device).eval()
        self.iteration, self.version = 0, 0
        if resume is not None:
            from vla_dist.checkpoint.universal import load_resume

            load_resume(self.engine, resume, "same")
            state = json.loads((Path(resume) / RL_STATE).read_text(encoding="utf-8"))
            self.iteration, self.version = int(state["iteration"]), int(state["version"])
        trainable, total = trainable_count(self.engine.module.policy)
        return {"step": self.iteration, "version": self.version, "trainable": trainable, "parameters": total,
                "load": load}

    # ------------------------------------------------------------------ weight sync

    def weights(self) -> dict[str, Any]:
        """Collective: the policy's trainable weights (LoRA: the adapter only), gathered, put in Ray's
        object store by rank 0. -> {"ref": [ObjectRef] (rank 0; [] elsewhere), "bytes", "seconds"}."""
        import ray

        started = time.perf_counter()
        weights = self.gathered_trainable(self.engine.module.policy)
        if self.rank != 0:
            return {"ref": [], "bytes": 0, "seconds": 0.0}
        ref = ray.put(weights)  # owned by this rank; the actors fetch it from the store
        size = sum(t.numel() * t.element_size() for t in weights.values())
        return {"ref": [ref], "bytes": size, "seconds": time.perf_counter() - started}

    # ------------------------------------------------------------------ update

    def update(self, traj: Trajectories, iteration: int) -> dict[str, Any]:
        """One iteration's policy update: old log-probabilities and values recomputed under the
        weights that sampled (they are these: the sync happened after the last update), advantages
        (GAE or group-relative), then rl.epochs passes of clipped-ratio minibatch steps."""
        rl, seed = self.cfg.rl, self.cfg.run.seed
        started = time.perf_counter()
        positions = traj.positions()  # [N, 2]
        count = positions.shape[0]
        old_log_probs, whole, values, reference, mine, value_inputs = self._evaluate(traj, positions)
        drift = float((whole - traj.sample_log_probs[positions[:, 0], positions[:, 1]]).abs().max())
        rewards = traj.shaped_rewards(rl.shaped_reward)
        if rl.algorithm == "ppo":
            grid = torch.zeros_like(rewards)
            grid[positions[:, 0], positions[:, 1]] = values
            advantages_grid, returns_grid = gae(rewards, grid, traj.dones | ~traj.valid,
                                                torch.zeros(traj.episodes), rl.gamma, rl.gae_lambda)
            advantages = advantages_grid[positions[:, 0], positions[:, 1]]
            returns = returns_grid[positions[:, 0], positions[:, 1]]
            advantages = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8)
        else:  # GRPO: the episode's group-relative return on each of its decisions
            episode_adv = group_relative_advantages((rewards * traj.valid).sum(1), traj.groups)
            advantages, returns = episode_adv[positions[:, 0]], torch.zeros(count)
        weights = episode_weights(positions[:, 0]) if rl.loss_weighting == "episode" else torch.ones(count)
        self.engine.train()
        fit = self._fit_value(value_inputs, returns[mine], iteration) if rl.value_epochs else {}
        per_step = rl.minibatch_size * self.world_size
        steps_per_epoch = max(1, count // per_step)
        # iteration counts from 0: iterations 0..critic_warmup-1 fit the critic to this policy's returns
        # (validation allows a warm-up under PPO only)
        warming = iteration < rl.critic_warmup
        sums: dict[str, float] = {}
        optimizer_steps, kl_stopped = 0, False
        for epoch in range(rl.epochs):
            shuffle = torch.Generator().manual_seed(hash((seed, iteration, epoch)) & 0x7FFF_FFFF)
            order = torch.randperm(count, generator=shuffle)
            for minibatch in torch.tensor_split(order, steps_per_epoch):
                mine = torch.tensor_split(minibatch, self.world_size)[self.rank]
                stats = self._step(traj, positions[mine], old_log_probs[mine], advantages[mine], returns[mine],
                                   weights[mine], reference[mine], train_policy=not warming)
                optimizer_steps += 1
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                # every rank takes the same decision (the mean over ranks): the steps stay collective
                if rl.target_kl and not warming and self._all_mean(stats["approx_kl"]) > 1.5 * rl.target_kl:
                    kl_stopped = True
                    break
            if kl_stopped:
                break
        out = {key: self._all_mean(value / optimizer_steps) for key, value in sorted(sums.items())}
        if rl.algorithm == "ppo":
            out["explained_variance"] = explained_variance(values, returns)
        lrs = [float(group["lr"]) for group in self.engine.optimizer.param_groups]  # as the optimizer holds them
        out |= {"lr": lrs[0], **({"value_lr": lrs[-1]} if len(lrs) > 1 else {})}
        return {**out, **fit, "decisions": count, "optimizer_steps": optimizer_steps, "kl_stopped": kl_stopped,
                "critic_warmup": warming, "logprob_drift": drift, "update_s": time.perf_counter() - started,
                "advantage_nonzero": float((advantages.abs() > 1e-6).float().mean()),
                # as the loss weighs them (rl.loss_weighting): < 0 when failures' decisions outweigh successes'
                "advantage_mean": float((weights * advantages).mean())}

    def _fit_value(self, inputs: torch.Tensor | None, returns: torch.Tensor, iteration: int) -> dict[str, float]:
        """Collective: rl.value_epochs passes of value-only steps, each rank on its share of the decisions
        (the inputs its head read in `_evaluate`; DeepSpeed averages the gradients). The policy's group is
        held at learning rate 0 meanwhile, so Adam's momentum from earlier policy steps moves nothing; the
        policy's moments still decay (zero gradients), as after a critic warm-up."""
        rl = self.cfg.rl
        assert inputs is not None and len(inputs) == len(returns), "PPO evaluates a value per decision"
        head = self.engine.module.value_head
        # the same number of steps on every rank (shares differ by at most one decision)
        steps = max(1, int(self._all_min(len(returns))) // rl.minibatch_size)
        losses: list[float] = []
        with learning_rate_zero(self.engine.optimizer.param_groups[0]):  # the policy's group
            for epoch in range(rl.value_epochs):
                # ints only: a str's hash differs between processes
                shuffle = torch.Generator().manual_seed(hash((self.cfg.run.seed, iteration, epoch, 1)) & 0x7FFF_FFFF)
                total = 0.0
                for rows in torch.tensor_split(torch.randperm(len(returns), generator=shuffle), steps):
                    loss = value_loss(head(inputs[rows].to(self.engine.device)).float(),
                                      returns[rows].to(self.engine.device))
                    self.engine.backward(loss)
                    self.engine.step()
                    total += float(loss.detach())
                losses.append(self._all_mean(total / steps))
        return {"value_fit_first": losses[0], "value_fit_last": losses[-1],
                "value_fit_steps": float(steps * rl.value_epochs)}

    @torch.no_grad()
    def _evaluate(self, traj: Trajectories, positions: torch.Tensor) -> tuple[Any, ...]:
        """Collective: (log-probs over executed steps, whole-chunk log-probs, values) of every
        decision, each rank computing a share and all ranks receiving all; then this rank's share
        (indices into positions) and what its value head read for them (kept for rl.value_epochs; else None).
        With rl.kl_coef also the start policy's log-probabilities of the same sampled paths (else zeros)."""
        import torch.distributed as dist

        self.engine.eval()
        shares = torch.tensor_split(torch.arange(positions.shape[0]), self.world_size)
        mine = shares[self.rank]
        rows, read = [], []
        for chunk in torch.split(mine, self.cfg.rl.minibatch_size):
            decisions = _decisions(traj, positions[chunk])
            log_prob, whole, value, _, value_inputs = self.engine(*decisions)
            value = value if value is not None else torch.zeros_like(log_prob)
            if value_inputs is not None and self.cfg.rl.value_epochs:  # only rl.value_epochs' fit reads them
                read.append(value_inputs.detach().float().cpu())
            reference = torch.zeros_like(log_prob)
            if self.reference is not None:  # the same decisions' inputs, built once for both
                reference = self.reference(*decisions).log_prob
            rows.append(torch.stack([t.float().cpu() for t in (log_prob, whole, value, reference)], dim=1))
        local = torch.cat(rows) if rows else torch.zeros(0, 4)
        longest = max(len(s) for s in shares)
        padded = torch.zeros(longest, 4)
        padded[: len(local)] = local
        gathered = [torch.zeros(longest, 4) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        out = torch.cat([g[: len(s)] for g, s in zip(gathered, shares, strict=True)])
        return out[:, 0], out[:, 1], out[:, 2], out[:, 3], mine, (torch.cat(read) if read else None)

    def _forward(self, traj: Trajectories, at: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The engine on the decisions at `at` [n, 2]: ActorCritic's Evaluation."""
        return self.engine(*_decisions(traj, at))

    def _step(self, traj: Trajectories, at: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
              returns: torch.Tensor, weights: torch.Tensor, reference: torch.Tensor,
              train_policy: bool = True) -> dict[str, float]:
        """One optimizer step; `train_policy=False` (critic warm-up): the value loss alone, so the policy's
        gradients are zero (the value head reads detached features unless rl.value_trains_backbone).
        `reference`: the start policy's log-probabilities of these decisions (rl.kl_coef)."""
        rl = self.cfg.rl
        log_prob, _, value, entropy, _ = self._forward(traj, at)
        device = log_prob.device
        policy_loss, stats = ppo_policy_loss(log_prob.float(), old_log_probs.to(device), advantages.to(device), rl.clip,
                                             weights.to(device))
        loss = policy_loss if train_policy else torch.zeros((), device=device)
        if self.reference is not None:
            kl = reference_kl(log_prob.float(), reference.to(device), weights.to(device))
            stats["reference_kl"] = float(kl.detach())
            if train_policy:
                loss = loss + rl.kl_coef * kl
        if value is not None:
            critic = value_loss(value.float(), returns.to(device))
            loss = loss + rl.value_coef * critic
            stats["value_loss"] = float(critic.detach())
        if entropy is not None:
            stats["entropy"] = float(entropy.detach().mean())
        self.engine.backward(loss)
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        return {**stats, "policy_loss": float(policy_loss.detach()),
                **({"grad_norm": float(grad_norm)} if grad_norm is not None else {})}

    # ------------------------------------------------------------------ save

    def save(self, step_dir: str, meta: dict[str, Any]) -> None:
        """Collective: DeepSpeed's shards (policy, value head, optimizer), the policy as a directory
        `vla-dist eval` reads (full: gathered weights; LoRA: the base's files linked + adapter/),
        and rl_state.json with the iteration and weight version (rank 0)."""
        import torch.distributed as dist

        from vla_dist.checkpoint.manager import META
        from vla_dist.train.lora import save_adapter

        path = Path(step_dir)
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        policy = self.engine.module.policy
        if self.lora:
            if self.rank == 0:
                _link_tree(Path(self.cfg.run.dir) / BASE, path / POLICY)
            save_adapter(policy, path / POLICY / "adapter", self.rank)
        else:
            self.save_gathered_pretrained(policy, path / POLICY)
        if self.rank == 0:
            (path / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            state = {"iteration": meta["iteration"], "version": meta["version"]}
            (path / RL_STATE).write_text(json.dumps(state) + "\n", encoding="utf-8")
        dist.barrier()


@contextmanager
def learning_rate_zero(group: dict[str, Any]) -> Iterator[None]:
    """An optimizer param group at learning rate 0 for the block (restored after, also on error): Adam(W)
    then moves none of its parameters, whatever momentum they carry, and decays none."""
    lr, group["lr"] = group["lr"], 0.0
    try:
        yield
    finally:
        group["lr"] = lr


def _as_configured(policy: Any, cfg: RunConfig) -> Any:
    """A loaded policy with the run's denoising steps and dtype (the trained one and the KL reference alike)."""
    from vla_dist.models.policy import DTYPES

    policy.spec.num_inference_steps = cfg.model.num_inference_steps
    policy.hf_model.to(DTYPES[cfg.model.dtype])
    return policy


def _decisions(traj: Trajectories, at: torch.Tensor) -> tuple[Any, Any, torch.Tensor]:
    """ActorCritic's arguments for the decisions at `at` [n, 2]: inputs, sampling record, executed steps."""
    return traj.inputs(at), traj.record(at), traj.executed[at[:, 0], at[:, 1]]


def _save_base(policy: Any, out: Path) -> None:
    """Written once (atomically: a temp dir renamed), before LoRA wraps the model."""
    if out.is_dir():
        return
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    os.replace(tmp, out)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links of `src`'s files under `dst` (a copy where linking is refused): checkpoints share
    the LoRA base's weights instead of each holding a copy."""
    for file in src.rglob("*"):
        target = dst / file.relative_to(src)
        if file.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)
