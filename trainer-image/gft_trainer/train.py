"""One fine-tune, start to end: load, prepare data, run transformers' ``Trainer``, save, summarise.

``GemmaTrainer`` adds these to ``Trainer`` and nothing else: token accuracy computed inside
``compute_loss`` (the argmax is taken while the logits exist anyway, then they are dropped),
throughput and ETA in the logs, sample answers at each evaluation, a divergence guard (a NaN
or exploding loss stops the run before any checkpoint holds the damage), and checkpoints that
carry a completion marker and are rotated only once complete, never the best one.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from gft_api.contract import DatasetFormat, ExitCode, Outcome, TrainerConfig, TrainerSummary
from gft_api.training import BestMetric, ExportChoice, Hyperparameters, MethodType, Precision
from transformers import PrinterCallback, Trainer, TrainerState, TrainingArguments, set_seed

from gft_trainer import (
    checkpoints,
    cost,
    data,
    export,
    judge,
    memory,
    modeling,
    resume,
    samples,
    toolchain,
)
from gft_trainer.callbacks import (
    KeepBest,
    LogLine,
    StopOnSignal,
    TensorBoardScalars,
    tensorboard_run_dir,
)
from gft_trainer.errors import DivergedError, StopRequested
from gft_trainer.metrics import PrometheusMetrics
from gft_trainer.signals import StopFlag

log = logging.getLogger("gft")


class GemmaTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        keep_checkpoints: int = 2,
        best_metric: BestMetric = BestMetric.EVAL_LOSS,
        divergence_factor: float = 0.0,
        sampler: samples.Sampler | None = None,
        liger: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.liger = liger  # Liger's fused loss is on the model (modeling.load applied it)
        self.keep_checkpoints = keep_checkpoints
        self.best_metric = best_metric
        self.divergence_factor = divergence_factor
        self.sampler = sampler
        self.latest_samples: list[Any] = []
        self.pad_id = self.processing_class.pad_token_id if self.processing_class else 0
        self._zero = torch.zeros((), dtype=torch.long, device=self.args.device)
        # [correct, counted] next-token predictions, per mode; tokens and rows since the last log
        self._acc = {
            True: [self._zero.clone(), self._zero.clone()],
            False: [self._zero.clone(), self._zero.clone()],
        }
        self._tokens = self._zero.clone()
        self._rows = self._zero.clone()
        # Micro-batches with a NaN/inf loss since the last log: counted on the device, so the
        # guard costs no synchronisation per step.
        self._nonfinite = self._zero.clone()
        self._last_log = (time.monotonic(), 0)
        self._start: tuple[float, int] | None = None
        self.last_checkpoint: Path | None = None

    # -- loss and accuracy

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.liger:
            # Liger's fused loss never makes the logits (in evaluation too: only the loss is
            # kept there); it reports the share of tokens it got right.
            inputs = {**inputs, "return_token_accuracy": True, "skip_logits": True}
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        labels = inputs["labels"]
        with torch.no_grad():
            logits = outputs.get("logits")
            target = labels[:, 1:]
            mask = target != data.IGNORE_INDEX
            acc = self._acc[model.training]
            if logits is None:
                acc[0] += (outputs["token_accuracy"] * mask.sum()).round().long()
            else:
                acc[0] += ((logits[:, :-1].argmax(dim=-1) == target) & mask).sum()
            acc[1] += mask.sum()
            if model.training:
                self._tokens += (inputs["input_ids"] != self.pad_id).sum()
                self._rows += data.examples_in(inputs)
                self._nonfinite += ~torch.isfinite(loss.detach())
        del logits
        outputs["logits"] = None  # nothing downstream needs the 256k-wide logits
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._acc[False] = [self._zero.clone(), self._zero.clone()]
        if self.is_world_process_zero():
            # A long evaluation is otherwise silent until its result line.
            rows = len(self.eval_dataset) if self.eval_dataset is not None else 0
            log.info(
                "evaluating at step %d/%d: %d rows",
                self.state.global_step,
                self.state.max_steps,
                rows,
            )
        return super().evaluate(*args, **kwargs)

    # -- logs: accuracy, throughput, ETA

    def _sum(self, *values: torch.Tensor | float) -> list[float]:
        """The values summed over the ranks, read back in one transfer (a log step's only
        wait for the GPU)."""
        device = self.args.device
        t = torch.stack([torch.as_tensor(v, device=device).to(torch.float64) for v in values])
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() != "nccl":
                t = t.cpu()
            dist.all_reduce(t)
        return t.tolist()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            nonfinite = self._add_train_stats(logs)
            self._guard(logs.get("loss"), nonfinite, logs.get("grad_norm"))
        if "eval_loss" in logs:
            correct, counted = self._sum(*self._acc[False])
            if counted:
                logs["eval_token_accuracy"] = correct / counted
            self._guard(logs["eval_loss"], 0, None, what="evaluation")
            if self.sampler is not None:  # at step 0 too: the base model's answers, before
                logs.update(self._sample())
        super().log(logs, start_time)

    def _guard(
        self, loss: float | None, nonfinite: int, grad_norm: float | None, what: str = "training"
    ) -> None:
        """Stop the run as Diverged; every rank sees the same reduced numbers and stops."""
        start = judge.first_loss(self.state.log_history) if what == "training" else None
        why = judge.divergence(loss, nonfinite, grad_norm, start, self.divergence_factor)
        if why is None:
            return
        good = checkpoints.newest_valid(Path(self.args.output_dir))
        raise DivergedError(
            f"training diverged at step {self.state.global_step} ({what}): {why}. "
            + (f"The last good checkpoint is {good}. " if good else "No checkpoint was saved. ")
            + "Lower training.learningRate (or raise warmupRatio, or use bf16 over fp16), then "
            "re-create the fine-tune" + (" with resumeFrom naming that checkpoint" if good else "")
        )

    def _sample(self) -> dict[str, float]:
        """Sample answers on the main process; their numbers are shared with every rank, which
        must all take the same best-checkpoint decisions."""
        answers = None
        if self.is_world_process_zero() and self.sampler is not None:
            answers = self.sampler.run(self.model, self.state.global_step)
            self.latest_samples = answers.samples
        hits, scored, seconds = self._sum(
            (answers.exact_match or 0.0) * answers.scored if answers else 0.0,
            answers.scored if answers else 0,
            answers.seconds if answers else 0.0,
        )
        out = {"eval_samples_seconds": seconds}
        if scored:
            out["eval_exact_match"] = hits / scored
        return out

    def _add_train_stats(self, logs: dict[str, float]) -> int:
        """Adds accuracy and throughput to ``logs``; returns the non-finite losses counted."""
        correct, counted, tokens, rows, nonfinite = self._sum(
            *self._acc[True], self._tokens, self._rows, self._nonfinite
        )
        self._acc[True] = [self._zero.clone(), self._zero.clone()]
        self._tokens = self._zero.clone()
        self._rows = self._zero.clone()
        self._nonfinite = self._zero.clone()
        now, step = time.monotonic(), self.state.global_step
        then, then_step = self._last_log
        self._last_log = (now, step)
        if self._start is None:
            self._start = (then, then_step)
        dt = max(now - then, 1e-9)
        if counted:
            logs["token_accuracy"] = correct / counted
        logs["tokens_per_second"] = tokens / dt
        logs["samples_per_second"] = rows / dt
        if step > then_step:
            logs["step_time_seconds"] = dt / (step - then_step)
        self.state.num_input_tokens_seen = int(self.state.num_input_tokens_seen + tokens)
        logs["tokens_total"] = float(self.state.num_input_tokens_seen)
        self._samples_total = getattr(self, "_samples_total", 0.0) + rows
        logs["samples_total"] = self._samples_total
        start, start_step = self._start
        if step > start_step:
            per_step = (now - start) / (step - start_step)
            logs["eta_seconds"] = per_step * max(0, self.state.max_steps - step)
        return int(nonfinite)

    def _inner_training_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._last_log = (time.monotonic(), self.state.global_step)
        return super()._inner_training_loop(*args, **kwargs)

    # -- checkpoints

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # A NaN since the last log must never become the newest checkpoint: a retry or
        # resume would start from broken weights.
        (nonfinite,) = self._sum(self._nonfinite)
        self._guard(None, int(nonfinite), None)
        super()._save_checkpoint(model, trial)
        path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank wrote its part (RNG state, shards) before the marker
        if self.args.should_save:
            checkpoints.mark_complete(path, self.state.global_step)
            top = judge.best(self.state.log_history, self.best_metric)
            checkpoints.rotate(
                path.parent, self.keep_checkpoints, protect=top.step if top else None
            )
        self.last_checkpoint = path


# ---------------------------------------------------------------- the run


@dataclass
class Plan:
    """Numbers decided before training starts."""

    world_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan(config: TrainerConfig, train_rows: int, world_size: int) -> Plan:
    h = config.training
    per_step = h.batch_size * h.gradient_accumulation_steps * world_size
    steps_per_epoch = max(1, math.ceil(train_rows / per_step))
    total = h.max_steps if h.max_steps else max(1, math.ceil(h.epochs * steps_per_epoch))
    return Plan(world_size, steps_per_epoch, total, math.ceil(h.warmup_ratio * total))


def training_arguments(
    config: TrainerConfig,
    p: Plan,
    precision: Precision,
    cuda: bool,
    has_eval: bool,
    checkpointing: bool | None = None,
) -> TrainingArguments:
    h, out = config.training, config.output
    checkpointing = bool(h.gradient_checkpointing) if checkpointing is None else checkpointing
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if h.eval_every_steps else "epoch"
    # Full fine-tuning over several GPUs shards weights, gradients and optimizer state instead
    # of keeping a whole copy on each. (accelerate applies FSDP to GPU ranks only: CPU ranks
    # train under DDP, so FSDP is never asked for where it would not run.)
    full_sharded = config.method.type == MethodType.FULL and p.world_size > 1 and cuda
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = data.loader_workers(data.cpu_count(), local_ranks) if cuda else 0
    return TrainingArguments(
        output_dir=str(Path(out.dir) / "checkpoints"),
        run_name=config.run_name,
        max_steps=p.total_steps,
        per_device_train_batch_size=h.batch_size,
        per_device_eval_batch_size=h.batch_size,
        gradient_accumulation_steps=h.gradient_accumulation_steps,
        learning_rate=h.learning_rate,
        lr_scheduler_type=h.lr_scheduler.value,
        warmup_steps=p.warmup_steps,
        weight_decay=h.weight_decay,
        max_grad_norm=h.max_grad_norm if h.max_grad_norm > 0 else 0.0,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        bf16=precision == Precision.BF16,
        fp16=precision == Precision.FP16,
        seed=h.seed,
        data_seed=h.seed,
        logging_strategy="steps",
        logging_steps=h.logging_every_steps,
        eval_strategy=eval_strategy,
        eval_steps=h.eval_every_steps or None,
        eval_on_start=has_eval and h.eval_on_start,
        save_strategy="steps" if out.checkpoint_every_steps else "no",
        save_steps=out.checkpoint_every_steps or 500,
        save_total_limit=None,  # GemmaTrainer rotates, counting only complete checkpoints
        prediction_loss_only=True,
        logging_nan_inf_filter=False,  # a NaN loss is shown as NaN, and the guard stops the run
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        # On GPUs, worker processes make the next batches into pinned memory while the GPU
        # trains (the copy to the device then overlaps); on CPU the cores are the training's.
        dataloader_num_workers=workers,
        dataloader_pin_memory=cuda,
        dataloader_persistent_workers=workers > 0,
        use_cpu=not cuda,
        ddp_backend="gloo" if p.world_size > 1 and not cuda else None,
        ddp_find_unused_parameters=False,
        optim=memory.transformers_optimizer(h.optimizer, cuda),
        torch_compile=h.torch_compile,
        fsdp=full_sharded,
        fsdp_config=FSDP_CONFIG if full_sharded else None,
    )


def plan_memory(
    config: TrainerConfig, choice: modeling.Choice, hw: modeling.Hardware, world_size: int
) -> bool:
    """Whether to checkpoint activations, from what the run needs on each GPU (estimated from
    the model's config, before its weights load); a run that cannot fit is refused here."""
    h, method = config.training, config.method
    sharded = method.type == MethodType.FULL and world_size > 1 and hw.cuda
    memory.check_optimizer(h.optimizer, hw.cuda, sharded)
    if not hw.cuda:
        return bool(h.gradient_checkpointing)
    shape = memory.shape_of(choice.path, method)
    run = memory.RunShape(
        method=method.type,
        optimizer=h.optimizer,
        half=choice.precision in (Precision.BF16, Precision.FP16),
        rows=h.batch_size,
        row_tokens=config.data.max_seq_length,
        attention=choice.attention,
        liger_loss=choice.liger is not None
        and choice.liger.get("fused_linear_cross_entropy", True),
        lora_dropout=method.type != MethodType.FULL and method.lora.dropout > 0,
        world_size=world_size,
    )
    gpu_memory = torch.cuda.get_device_properties(0).total_memory
    checkpointing = memory.plan(shape, run, h.gradient_checkpointing, gpu_memory)
    log.info(
        "memory: about %s per GPU of %.1f GiB",
        memory.need(shape, run, checkpointing).describe(),
        gpu_memory / memory.GIB,
    )
    return checkpointing


def liger_line(
    kernels: dict[str, bool] | None, requested: bool | None, hw: modeling.Hardware
) -> str:
    if kernels is not None:
        names = modeling.LIGER_KERNELS
        on = [name for key, name in names.items() if kernels.get(key, True)]
        off = [name for key, name in names.items() if not kernels.get(key, True)]
        return f"on ({', '.join(on)}{'; left out: ' + ', '.join(off) if off else ''})"
    if requested is False:
        return "off (training.ligerKernels: false)"
    return "off (no CUDA GPU)" if not hw.cuda else "off (not available for this model)"


# FSDP2 (fully_shard), each decoder layer its own unit. Rank 0 alone reads the checkpoint into
# CPU memory and the others receive their shards: with every rank loading the whole model,
# 8 ranks of a 27B model need 8 copies of host RAM. Checkpoints hold the gathered (full) state,
# so a checkpoint stays an ordinary model folder: resumed on any number of ranks, exported as is.
FSDP_CONFIG = {
    "version": 2,
    "reshard_after_forward": True,
    "cpu_ram_efficient_loading": True,
    "state_dict_type": "FULL_STATE_DICT",
}


@dataclass
class RunResult:
    summary: TrainerSummary
    metrics_port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run(
    config: TrainerConfig, stop: StopFlag, metrics_port_file: Path | None = None
) -> TrainerSummary:
    """The whole fine-tune. Raises on failure (the CLI maps the exception to an exit code)."""
    started = time.monotonic()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rank, world_size = world()
    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    config_text = config.dump()
    earlier = resume.earlier(out, config_text)
    if earlier is not None and resume.finished(earlier):
        # Started again after it succeeded (its Job was re-created): the same outcome, no step.
        log.info("this run already succeeded (%s); nothing left to train", earlier.message)
        return earlier
    if earlier is not None and resume.diverged(earlier):
        # The Job does not retry a divergence; this is a restart of the same run folder by
        # other means. Training again with the same settings would diverge again.
        raise DivergedError(f"{earlier.message} (this run already diverged; not trained again)")
    if rank == 0:
        export.check_credentials(config.output.s3, config.output.hub)
        resume.keep_config(out, config_text)
    # Each pod's first process measures what its GPUs cost, from the start (they are held
    # while the model loads).
    meter = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        meter = cost.Meter(out / "cost", cost.pod_name(), started).start()
    hw = modeling.Hardware.detect()
    modeling.check_gpus(config.resources.gpus, hw.cuda, modeling.Driver.detect())
    records = data.read_and_check(config.dataset, config.data, config.training.seed)
    # training.seed decides the adapter's initial weights too: without it they came from
    # whatever the process's generator held (another fine-tune run before in the same process).
    set_seed(config.training.seed)
    cache_dir = config.model.cache_dir or str(out / "hub-cache")
    choice = modeling.choose(
        config.model,
        config.method,
        config.training.precision,
        cache_dir,
        hw,
        liger=config.training.liger_kernels,
    )
    if choice.liger is not None:
        toolchain.require(hw.cuda, "training.ligerKernels (on by default on GPUs)")
    if config.training.torch_compile:
        toolchain.require(hw.cuda, "training.torchCompile")
    checkpointing = plan_memory(config, choice, hw, world_size)
    loaded = modeling.load_chosen(choice, config.method, hw)
    loaded.model.config.use_cache = False  # a cache would hide packed examples from the mask
    start = resume.choose(out / "checkpoints", config.output.resume_from, config.method.type)
    if start.adapter is not None:
        resume.load_adapter(loaded.model, start.adapter)
    trainable, total = modeling.count_parameters(loaded.model)
    log.info(
        "model %s (%s, Gemma %d): %s params, %s trainable (%s), %s, attention %s",
        config.model.name_or_path,
        loaded.model_type,
        loaded.generation,
        f"{total:,}",
        f"{trainable:,}",
        config.method.type.value,
        loaded.precision.value,
        loaded.attention,
    )
    tok = data.Tokenizer(loaded.tokenizer, loaded.generation)
    # Tokenized once, by rank 0, on the output volume: a retry or resume reads it back.
    prepared = data.prepare(
        tok, records, config.data, config.data.packing, cache_dir=out / "data-cache"
    )
    p = plan(config, len(prepared.train), world_size)
    log.info(
        "data%s: %d train examples -> %d rows, %d eval examples; %d steps (%d per epoch)",
        " (tokenized before, read from data-cache)" if prepared.from_cache else "",
        prepared.train_examples,
        len(prepared.train),
        prepared.eval_examples,
        p.total_steps,
        p.steps_per_epoch,
    )
    cut = prepared.truncated
    if cut.examples:
        log.warning(
            "data: %d examples were longer than data.maxSeqLength=%d and were truncated; "
            "%d of them lost answer tokens (raise maxSeqLength or shorten those records)",
            cut.examples,
            config.data.max_seq_length,
            cut.answers_cut,
        )
    log.info(
        "gradient checkpointing %s%s",
        "on" if checkpointing else "off",
        "" if config.training.gradient_checkpointing is not None else " (chosen by memory need)",
    )
    args = training_arguments(
        config,
        p,
        loaded.precision,
        hw.cuda,
        prepared.eval is not None,
        checkpointing,
    )
    log.info("Liger kernels: %s", liger_line(loaded.liger, config.training.liger_kernels, hw))
    if args.torch_compile:
        log.info(
            "torch.compile: on (%s backend); the first steps wait for the compile",
            args.torch_compile_backend,
        )
    prometheus = PrometheusMetrics(config.run_name)
    if meter is not None:
        prometheus.registry.register(meter)
    prometheus.set_data(prepared.train_examples + prepared.eval_examples, prepared.truncated)
    tb_root = Path(config.observability.tensorboard_dir or out / "tensorboard")
    tb_dir = tensorboard_run_dir(tb_root, config.run_name)
    tensorboard = TensorBoardScalars(tb_dir)
    h = config.training
    keep_best = KeepBest(h.metric_for_best, h.early_stopping)
    # The log line last: once it shows a step, TensorBoard and /metrics already hold it.
    callbacks = [tensorboard, prometheus, LogLine(), keep_best, StopOnSignal(stop)]
    chat = prepared.format in (DatasetFormat.CHAT, DatasetFormat.ALPACA)
    sampler = make_sampler(config, tok, records, prepared, loaded, chat, args, tensorboard, started)
    trainer = GemmaTrainer(
        model=loaded.model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=data.Collator(
            tok.pad_id,
            modeling.needs_token_type_ids(loaded.model),
            flatten=data.flattens(loaded.attention),
        ),
        processing_class=loaded.tokenizer,
        callbacks=callbacks,
        keep_checkpoints=config.output.keep_checkpoints,
        best_metric=h.metric_for_best,
        divergence_factor=h.divergence_factor,
        sampler=sampler,
        liger=loaded.liger is not None,
    )
    trainer.remove_callback(PrinterCallback)  # LogLine prints what a human needs
    if rank == 0 and config.observability.metrics_port:
        port = prometheus.serve(
            config.observability.metrics_bind_address, config.observability.metrics_port
        )
        log.info("metrics on http://%s:%d/metrics", config.observability.metrics_bind_address, port)
        if metrics_port_file:
            metrics_port_file.write_text(str(port))
    checkpoint = start.checkpoint
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    stop.training = True
    if stop.requested:
        raise StopRequested("stop requested before training started")
    try:
        if checkpoint and (checkpoints.step_of(checkpoint) or 0) >= p.total_steps:
            # Every planned step is in the checkpoint already: training on would go past the
            # plan. Take its weights and finish (evaluate, save the artifacts).
            log.info(
                "the checkpoint is at step %d of %d: finishing without training",
                checkpoints.step_of(checkpoint),
                p.total_steps,
            )
            trainer._load_from_checkpoint(str(checkpoint))
            trainer.state = TrainerState.load_from_json(str(checkpoint / checkpoints.TRAINER_STATE))
            result, stopped = None, False
        else:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            stopped = stop.requested
    except StopRequested:
        step = trainer.state.global_step
        newest = checkpoints.newest_valid(Path(args.output_dir))
        if newest is not None and checkpoints.step_of(newest) == step:
            # Nothing trained since (an evaluation on start of a resumed run): rewriting that
            # checkpoint in place could leave it half-written if the pod is killed meanwhile.
            log.info("stop requested during evaluation; the checkpoint of step %d exists", step)
        else:
            log.info("stop requested during evaluation; saving the checkpoint of step %d", step)
            trainer._save_checkpoint(trainer.model, trial=None)
        result, stopped = None, True
    early = keep_best.stopped_early and not stopped
    summary = TrainerSummary(
        outcome=Outcome.STOPPED if stopped else Outcome.SUCCEEDED,
        exit_code=int(ExitCode.STOPPED if stopped else ExitCode.SUCCESS),
        reason="StoppedAfterCheckpoint" if stopped else ("EarlyStopped" if early else "Completed"),
        global_step=trainer.state.global_step,
        total_steps=p.total_steps,
        epoch=trainer.state.epoch,
        train_loss=result.training_loss if result else _mean_logged_loss(trainer),
        train_tokens=int(trainer.state.num_input_tokens_seen) or None,
        runtime_seconds=round(time.monotonic() - started, 3),
    )
    try:
        if stopped:
            summary.message = f"stopped by {stop.signal_name or 'signal'} after a checkpoint"
        else:
            if prepared.eval is not None:
                metrics = last_eval(trainer) or trainer.evaluate()
                summary.eval_loss = metrics.get("eval_loss")
                summary.eval_token_accuracy = metrics.get("eval_token_accuracy")
                summary.eval_exact_match = metrics.get("eval_exact_match")
            summary.samples = final_samples(trainer)
            top = judge.best(trainer.state.log_history, h.metric_for_best)
            if top is not None:
                summary.best_step = top.step
                summary.best_metric = top.value
                summary.best_eval_loss = top.entry.get("eval_loss")
            summary.exported_step = take_exported_weights(trainer, top, config.output.export)
            summary.artifacts = save_artifacts(trainer, loaded, config, out, chat)
            if trainer.args.should_save:
                summary.artifacts |= copy_artifacts(config, summary.artifacts)
            summary.message = f"trained {summary.global_step} steps"
            if early:
                summary.message = early_stop_message(summary, h)
            if summary.exported_step != summary.global_step:
                summary.message += f"; exported the best weights, of step {summary.exported_step}"
        ckpt = checkpoints.newest_valid(Path(args.output_dir))
        if ckpt:
            summary.last_checkpoint = str(ckpt)
            summary.last_checkpoint_step = checkpoints.step_of(ckpt)
        if summary.train_tokens and summary.runtime_seconds:
            summary.tokens_per_second = round(summary.train_tokens / summary.runtime_seconds, 2)
        if meter is not None:
            summary.cost = meter.stop()
    finally:
        for cb in callbacks:
            if isinstance(cb, TensorBoardScalars):
                cb.close()
        prometheus.shutdown()
    return summary


def final_samples(trainer: GemmaTrainer) -> list[Any]:
    """The run's last answers, whole: the last evaluation's, unless its time budget cut or
    skipped them; then the shown prompts are answered once more without one (after training,
    so it costs the run no step)."""
    latest = trainer.latest_samples
    cut = not latest or any(s.truncated == samples.TIME_BUDGET for s in latest)
    if trainer.sampler is not None and cut and trainer.is_world_process_zero():
        latest = trainer.sampler.run(trainer.model, trainer.state.global_step, whole=True).samples
    return latest


def make_sampler(
    config: TrainerConfig,
    tok: data.Tokenizer,
    records: data.Records,
    prepared: data.PreparedData,
    loaded: modeling.LoadedModel,
    chat: bool,
    args: TrainingArguments,
    tensorboard: TensorBoardScalars,
    started: float,
) -> samples.Sampler | None:
    """Sample answers at each evaluation, or ``None`` when there are none to give."""
    settings = config.training.samples
    if prepared.eval is None or not (settings.count or settings.exact_match_examples):
        return None
    if args.fsdp:
        # The weights are sharded across ranks; one rank alone cannot generate.
        log.info("samples: off under FSDP (the weights are sharded across the ranks)")
        return None
    prompts = samples.collect(tok, settings, records.format, records.eval())
    if not prompts:
        log.info("samples: none (plain-text data has no prompts; give training.samples.prompts)")
        return None
    stops = stop_tokens(loaded.tokenizer, loaded.generation) if chat else [tok.eos_id]
    max_len = config.data.max_seq_length
    return samples.Sampler(
        tok, prompts, settings, stops, max_len, on_answers=tensorboard.samples, started=started
    )


def take_exported_weights(
    trainer: GemmaTrainer, top: judge.Best | None, choice: ExportChoice
) -> int:
    """Put the weights to export into the model; returns their step. The best checkpoint's
    when asked and it is not the last step, else the weights as they are."""
    step = trainer.state.global_step
    if choice != ExportChoice.BEST or top is None or top.step == step:
        return step
    path = Path(trainer.args.output_dir) / f"checkpoint-{top.step}"
    if not checkpoints.is_valid(path):
        log.warning(
            "the best checkpoint (step %d) is missing; exporting the last weights", top.step
        )
        return step
    log.info("exporting the best weights, of step %d (%s)", top.step, _metrics_of(top.entry))
    trainer._load_from_checkpoint(str(path))
    return top.step


def _metrics_of(entry: dict[str, Any]) -> str:
    shown = [m.value for m in BestMetric]
    return ", ".join(f"{k} {entry[k]:.4f}" for k in shown if isinstance(entry.get(k), float))


def early_stop_message(summary: TrainerSummary, h: Hyperparameters) -> str:
    early = h.early_stopping
    assert early is not None  # only asked when the run stopped early
    return (
        f"stopped early at step {summary.global_step} of {summary.total_steps}: "
        f"{h.metric_for_best.value} did not improve by more than {early.min_delta:g} for "
        f"{early.patience} evaluation(s); best at step {summary.best_step}"
    )


def _mean_logged_loss(trainer: GemmaTrainer) -> float | None:
    """The run's mean training loss as its log history has it (for a run finished from a
    checkpoint, whose ``train()`` summary is lost)."""
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return sum(losses) / len(losses) if losses else None


def last_eval(trainer: GemmaTrainer) -> dict[str, float] | None:
    """The evaluation logged at the final step, if the loop already ran one."""
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            return entry if entry.get("step") == trainer.state.global_step else None
    return None


def save_artifacts(
    trainer: GemmaTrainer,
    loaded: modeling.LoadedModel,
    config: TrainerConfig,
    out: Path,
    chat: bool,
) -> dict[str, str]:
    """The adapter (or full model), and optionally the merged model; each folder appears whole.
    A model trained on chats stops generating at its end-of-turn token."""
    kind = "model" if config.method.type == MethodType.FULL else "adapter"
    artifacts = {kind: str(out / kind)}
    _atomic_save(out / kind, lambda tmp: trainer.save_model(str(tmp)), trainer)
    if trainer.args.should_save:
        _atomic_tokenizer(out / kind, loaded.tokenizer)
    stops = stop_tokens(loaded.tokenizer, loaded.generation) if chat else []
    if trainer.args.should_save:
        _stop_at_end_of_turn(out / kind, loaded.path, stops)
    if config.method.merge_adapter and kind == "adapter":
        if trainer.args.should_save:
            merged = merge_adapter(loaded, out / "adapter", config.method.type)
            _atomic_save(out / "merged", lambda tmp: merged.save_pretrained(tmp), trainer)
            _atomic_tokenizer(out / "merged", loaded.tokenizer)
            _stop_at_end_of_turn(out / "merged", loaded.path, stops)
        artifacts["merged"] = str(out / "merged")
    return artifacts


def copy_artifacts(config: TrainerConfig, artifacts: dict[str, str]) -> dict[str, str]:
    """The bucket's and the hub's copies, by name, when the config asks for them."""
    copies: dict[str, str] = {}
    if config.output.s3 is not None:
        copies |= export.to_s3({k: Path(v) for k, v in artifacts.items()}, config.output.s3)
    hub = config.output.hub
    if hub is not None:
        kind = "merged" if hub.merged else ("model" if "model" in artifacts else "adapter")
        copies["hub"] = export.to_hub(Path(artifacts[kind]), hub)
    return copies


def merge_adapter(loaded: modeling.LoadedModel, adapter: Path, method: MethodType) -> Any:
    """The base with the adapter merged in. After QLoRA the base is reloaded unquantized in
    bf16 and the saved adapter merged into it: merging into the 4-bit base would round the
    merged weights back to NF4 and lose most of what was learned."""
    if method != MethodType.QLORA:
        return loaded.model.merge_and_unload()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.bfloat16)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def stop_tokens(tokenizer: Any, generation: int) -> list[int]:
    """The ids a chat-trained model ends its turn with: its end-of-turn token and EOS."""
    ids = [tokenizer.convert_tokens_to_ids(data.end_of_turn(generation)), tokenizer.eos_token_id]
    unknown = getattr(tokenizer, "unk_token_id", None)
    return sorted({i for i in ids if i is not None and i != unknown})


def _stop_at_end_of_turn(folder: Path, base: Path, stops: list[int]) -> None:
    """Write ``generation_config.json`` so that generation stops where the model learned to end
    its turn; a pretrained base's config stops only at EOS, and the model would talk on."""
    if not stops:
        return
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(str(folder))
    except OSError:
        try:
            gen = GenerationConfig.from_pretrained(str(base))
        except OSError:
            gen = GenerationConfig()
    current = gen.eos_token_id
    current = [current] if isinstance(current, int) else list(current or [])
    gen.eos_token_id = sorted({*current, *stops})
    gen.save_pretrained(str(folder))


def _atomic_save(target: Path, save: Any, trainer: GemmaTrainer) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    if trainer.args.should_save and tmp.exists():
        shutil.rmtree(tmp)
    save(tmp)
    if trainer.args.should_save:
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)


def _atomic_tokenizer(target: Path, tokenizer: Any) -> None:
    tokenizer.save_pretrained(str(target))
