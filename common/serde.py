"""The only place that converts domain types to protobuf and back (tensor payloads: common.transfer)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedpipe.v1 import fedpipe_pb2 as pb

from common.errors import InvalidArgument
from common.secagg import SHARE_BYTES
from common.types import (
    SECAGG_KINDS,
    Accelerator,
    CalibrationPoint,
    DeviceProfile,
    Evaluation,
    ImportanceReport,
    ModelSpec,
    ModuleShape,
    ProbePlan,
    Quantization,
    SecAggStep,
    SecureSpec,
    Task,
    TaskKind,
    TrainPlan,
    UpdateMeta,
)

_QUANT_TO_PB = {
    Quantization.NONE: pb.QUANTIZATION_NONE,
    Quantization.INT8: pb.QUANTIZATION_INT8,
    Quantization.NF4: pb.QUANTIZATION_NF4,
}
_QUANT_FROM_PB = {v: k for k, v in _QUANT_TO_PB.items()}
_KIND_TO_PB = {
    TaskKind.WAIT: pb.TASK_KIND_WAIT,
    TaskKind.TRAIN: pb.TASK_KIND_TRAIN,
    TaskKind.EVALUATE: pb.TASK_KIND_EVALUATE,
    TaskKind.FINISHED: pb.TASK_KIND_FINISHED,
    TaskKind.PROBE: pb.TASK_KIND_PROBE,
    TaskKind.SECAGG_SHARE: pb.TASK_KIND_SECAGG_SHARE,
    TaskKind.SECAGG_MASK: pb.TASK_KIND_SECAGG_MASK,
    TaskKind.SECAGG_UNMASK: pb.TASK_KIND_SECAGG_UNMASK,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}

# ---------------------------------------------------------------- domain <-> proto


def profile_to_pb(profile: DeviceProfile) -> pb.DeviceProfile:
    """DeviceProfile -> proto."""
    return pb.DeviceProfile(
        device=profile.device,
        device_name=profile.device_name,
        total_memory_bytes=profile.total_memory_bytes,
        free_memory_bytes=profile.free_memory_bytes,
        host_memory_bytes=profile.host_memory_bytes,
        flops_per_s=profile.flops_per_s,
        compute_dtype=profile.compute_dtype,
        threads=profile.threads,
        num_train_samples=profile.num_train_samples,
        num_val_samples=profile.num_val_samples,
        memory_cap_bytes=profile.memory_cap_bytes,
        compute_share=profile.compute_share,
        calibration=[
            pb.CalibrationPoint(
                batch_size=p.batch_size,
                seq_len=p.seq_len,
                rank=p.rank,
                quantization=_QUANT_TO_PB[p.quantization],
                step_seconds=p.step_seconds,
                peak_memory_bytes=p.peak_memory_bytes,
                trainable_parameters=p.trainable_parameters,
                layers=p.layers,
            )
            for p in profile.calibration
        ],
        devices=[
            pb.Accelerator(
                device=d.device,
                device_name=d.device_name,
                total_memory_bytes=d.total_memory_bytes,
                flops_per_s=d.flops_per_s,
            )
            for d in profile.devices
        ],
        allreduce_bytes_per_s=profile.allreduce_bytes_per_s,
    )


def profile_from_pb(message: pb.DeviceProfile) -> DeviceProfile:
    """proto -> DeviceProfile; InvalidArgument for impossible figures."""
    if not message.flops_per_s > 0:  # also rejects NaN, which compares false to everything
        raise InvalidArgument("profile.flops_per_s", "must be positive (a measured figure)")
    if message.total_memory_bytes == 0:
        raise InvalidArgument("profile.total_memory_bytes", "must be positive (a measured figure)")
    if not 0 < message.compute_share <= 1:
        raise InvalidArgument("profile.compute_share", f"must be in (0, 1], got {message.compute_share}")
    calibration = []
    for index, point in enumerate(message.calibration):
        if point.quantization not in _QUANT_FROM_PB:
            raise InvalidArgument(f"profile.calibration[{index}].quantization", f"unknown value {point.quantization}")
        if not (math.isfinite(point.step_seconds) and point.step_seconds > 0) or point.batch_size == 0:
            raise InvalidArgument(f"profile.calibration[{index}]", "needs a positive batch size and step time")
        calibration.append(
            CalibrationPoint(
                batch_size=point.batch_size,
                seq_len=point.seq_len,
                rank=point.rank,
                quantization=_QUANT_FROM_PB[point.quantization],
                step_seconds=point.step_seconds,
                peak_memory_bytes=point.peak_memory_bytes,
                trainable_parameters=point.trainable_parameters,
                layers=point.layers,
            )
        )
    devices = tuple(Accelerator(d.device, d.device_name, d.total_memory_bytes, d.flops_per_s) for d in message.devices)
    if devices and not (math.isfinite(message.allreduce_bytes_per_s) and message.allreduce_bytes_per_s > 0):
        raise InvalidArgument("profile.allreduce_bytes_per_s", "must be positive with several devices (measured)")
    return DeviceProfile(
        device=message.device,
        device_name=message.device_name,
        total_memory_bytes=message.total_memory_bytes,
        free_memory_bytes=message.free_memory_bytes,
        host_memory_bytes=message.host_memory_bytes,
        flops_per_s=message.flops_per_s,
        compute_dtype=message.compute_dtype,
        threads=message.threads,
        num_train_samples=message.num_train_samples,
        num_val_samples=message.num_val_samples,
        memory_cap_bytes=message.memory_cap_bytes,
        compute_share=message.compute_share,
        calibration=tuple(calibration),
        devices=devices,
        allreduce_bytes_per_s=message.allreduce_bytes_per_s,
    )


def spec_to_pb(spec: ModelSpec) -> pb.ModelSpec:
    """ModelSpec -> proto."""
    return pb.ModelSpec(
        fingerprint=spec.fingerprint,
        model_type=spec.model_type,
        task=spec.task,
        labels=list(spec.labels),
        candidates=[
            pb.ModuleShape(name=m.name, in_features=m.in_features, out_features=m.out_features) for m in spec.candidates
        ],
        heads=[pb.TensorShape(name=name, shape=list(shape)) for name, shape in spec.heads],
        base_parameters=spec.base_parameters,
        linear_parameters=spec.linear_parameters,
    )


def spec_from_pb(message: pb.ModelSpec) -> ModelSpec:
    """proto -> ModelSpec; InvalidArgument when it cannot describe a model."""
    if not message.fingerprint:
        raise InvalidArgument("model.fingerprint", "empty")
    if not message.candidates:
        raise InvalidArgument("model.candidates", "empty: the model has no LoRA candidates")
    return ModelSpec(
        fingerprint=message.fingerprint,
        model_type=message.model_type,
        task=message.task,
        labels=tuple(message.labels),
        candidates=tuple(
            ModuleShape(name=m.name, in_features=m.in_features, out_features=m.out_features) for m in message.candidates
        ),
        heads=tuple((h.name, tuple(int(d) for d in h.shape)) for h in message.heads),
        base_parameters=message.base_parameters,
        linear_parameters=message.linear_parameters,
    )


def plan_to_pb(plan: TrainPlan) -> pb.TrainPlan:
    """TrainPlan -> proto."""
    return pb.TrainPlan(
        plan_id=plan.plan_id,
        target_modules=list(plan.target_modules),
        rank_pattern=dict(plan.rank_pattern),
        lora_alpha=plan.lora_alpha,
        lora_dropout=plan.lora_dropout,
        modules_to_save=list(plan.modules_to_save),
        batch_size=plan.batch_size,
        local_epochs=plan.local_epochs,
        max_steps=plan.max_steps,
        learning_rate=plan.learning_rate,
        weight_decay=plan.weight_decay,
        quantization=_QUANT_TO_PB[plan.quantization],
        max_seq_len=plan.max_seq_len,
        deadline_s=plan.deadline_s,
        seed=plan.seed,
        mode=plan.mode,
        optimizer=plan.optimizer,
        directions=plan.directions,
        basis=plan.basis,
        shared_seed=plan.shared_seed,
        global_digest=plan.global_digest,
        held_modules=list(plan.held_modules),
        proximal_mu=plan.proximal_mu,
        track_importance=plan.track_importance,
        secure=secure_to_pb(plan.secure) if plan.secure is not None else None,
        even_directions=plan.even_directions,
        placement=plan.placement,
    )


def secure_to_pb(secure: SecureSpec) -> pb.SecureSpec:
    """SecureSpec -> proto."""
    return pb.SecureSpec(
        tag=secure.tag,
        layout=[pb.TensorShape(name=n, shape=list(shape)) for n, shape in sorted(secure.layout.items())],
        fraction_bits=secure.fraction_bits,
        clip_norm=secure.clip_norm,
        signed=secure.signed,
    )


def secure_from_pb(message: pb.SecureSpec) -> SecureSpec:
    """proto -> SecureSpec; InvalidArgument for a layout or scale an agent cannot use."""
    if not 8 <= message.fraction_bits <= 40:
        raise InvalidArgument("plan.secure.fraction_bits", f"{message.fraction_bits} is not in [8, 40]")
    if not 0.0 <= message.clip_norm < 1e12:
        raise InvalidArgument("plan.secure.clip_norm", f"{message.clip_norm} is not in [0, 1e12)")
    layout = {item.name: tuple(int(d) for d in item.shape) for item in message.layout}
    if len(layout) != len(message.layout) or not layout:
        raise InvalidArgument("plan.secure.layout", "empty, or a tensor named twice")
    return SecureSpec(
        tag=message.tag,
        layout=layout,
        fraction_bits=message.fraction_bits,
        clip_norm=message.clip_norm,
        signed=message.signed,
    )


def peer_keys_to_pb(keys: tuple[bytes, bytes], proof: tuple[bytes, bytes] | None = None) -> pb.PeerKeys:
    """An agent's two public keys (and, in a signed round, its certificate and signature) -> proto."""
    certificate, signature = proof if proof is not None else (b"", b"")
    return pb.PeerKeys(share_key=keys[0], mask_key=keys[1], certificate=certificate, signature=signature)


def secagg_to_pb(step: SecAggStep) -> pb.SecAggStep:
    """SecAggStep -> proto."""
    return pb.SecAggStep(
        participants=list(step.participants),
        neighbours=step.neighbours,
        threshold=step.threshold,
        keys={a: peer_keys_to_pb(keys, step.proofs.get(a)) for a, keys in step.keys.items()},
        sealed=dict(step.sealed),
        noise_std=step.noise_std,
        survivors=list(step.survivors),
        dropped=list(step.dropped),
    )


def secagg_from_pb(message: pb.SecAggStep) -> SecAggStep:
    """proto -> SecAggStep."""
    if not math.isfinite(message.noise_std) or message.noise_std < 0:
        raise InvalidArgument("secagg.noise_std", f"{message.noise_std} is not a finite value >= 0")
    return SecAggStep(
        participants=tuple(message.participants),
        neighbours=message.neighbours,
        threshold=message.threshold,
        keys={a: (k.share_key, k.mask_key) for a, k in message.keys.items()},
        proofs={a: (k.certificate, k.signature) for a, k in message.keys.items() if k.certificate},
        sealed=dict(message.sealed),
        noise_std=message.noise_std,
        survivors=tuple(message.survivors),
        dropped=tuple(message.dropped),
    )


MODES = ("lora", "ferret")
OPTIMIZERS = ("adamw", "sgd")
PLACEMENTS = ("replicas", "layers")


def plan_from_pb(message: pb.TrainPlan) -> TrainPlan:
    """proto -> TrainPlan; InvalidArgument for a plan an agent cannot execute."""
    if message.quantization not in _QUANT_FROM_PB:
        raise InvalidArgument("plan.quantization", f"unknown value {message.quantization}")
    mode = message.mode or "lora"
    optimizer = message.optimizer or "adamw"
    if mode not in MODES:
        raise InvalidArgument("plan.mode", f"{mode!r} is not one of {list(MODES)}")
    if optimizer not in OPTIMIZERS:
        raise InvalidArgument("plan.optimizer", f"{optimizer!r} is not one of {list(OPTIMIZERS)}")
    placement = message.placement or "replicas"
    if placement not in PLACEMENTS:
        raise InvalidArgument("plan.placement", f"{placement!r} is not one of {list(PLACEMENTS)}")
    missing = [m for m in message.target_modules if m not in message.rank_pattern]
    if missing and mode == "lora":
        raise InvalidArgument("plan.rank_pattern", f"no rank for {missing[:3]}")
    if message.batch_size == 0:
        raise InvalidArgument("plan.batch_size", "must be positive")
    if not 0.0 <= message.proximal_mu < 1e6:  # also refuses NaN
        raise InvalidArgument("plan.proximal_mu", f"{message.proximal_mu} is not in [0, 1e6)")
    return TrainPlan(
        plan_id=message.plan_id,
        target_modules=tuple(message.target_modules),
        rank_pattern={m: int(message.rank_pattern[m]) for m in message.target_modules if m in message.rank_pattern},
        lora_alpha=message.lora_alpha,
        lora_dropout=message.lora_dropout,
        modules_to_save=tuple(message.modules_to_save),
        batch_size=message.batch_size,
        local_epochs=message.local_epochs,
        max_steps=message.max_steps,
        learning_rate=message.learning_rate,
        weight_decay=message.weight_decay,
        quantization=_QUANT_FROM_PB[message.quantization],
        max_seq_len=message.max_seq_len,
        deadline_s=message.deadline_s,
        seed=message.seed,
        mode=mode,
        optimizer=optimizer,
        directions=message.directions,
        basis=message.basis or "rademacher",
        shared_seed=message.shared_seed,
        global_digest=message.global_digest,
        held_modules=tuple(message.held_modules),
        proximal_mu=message.proximal_mu,
        track_importance=message.track_importance,
        secure=secure_from_pb(message.secure) if message.HasField("secure") else None,
        even_directions=message.even_directions,
        placement=placement,
    )


def probe_to_pb(probe: ProbePlan) -> pb.ProbePlan:
    """ProbePlan -> proto."""
    return pb.ProbePlan(
        probe_id=probe.probe_id,
        candidates=list(probe.candidates),
        rank=probe.rank,
        steps=probe.steps,
        batch_size=probe.batch_size,
        learning_rate=probe.learning_rate,
        max_seq_len=probe.max_seq_len,
        quantization=_QUANT_TO_PB[probe.quantization],
        seed=probe.seed,
        deadline_s=probe.deadline_s,
    )


def probe_from_pb(message: pb.ProbePlan) -> ProbePlan:
    """proto -> ProbePlan; InvalidArgument for a probe an agent cannot run."""
    if message.quantization not in _QUANT_FROM_PB:
        raise InvalidArgument("probe.quantization", f"unknown value {message.quantization}")
    for field in ("rank", "steps", "batch_size"):
        if getattr(message, field) == 0:
            raise InvalidArgument(f"probe.{field}", "must be positive")
    if not message.candidates:
        raise InvalidArgument("probe.candidates", "empty")
    return ProbePlan(
        probe_id=message.probe_id,
        candidates=tuple(message.candidates),
        rank=message.rank,
        steps=message.steps,
        batch_size=message.batch_size,
        learning_rate=message.learning_rate,
        max_seq_len=message.max_seq_len,
        quantization=_QUANT_FROM_PB[message.quantization],
        seed=message.seed,
        deadline_s=message.deadline_s,
    )


def task_to_pb(task: Task) -> pb.GetTaskResponse:
    """Task -> proto."""
    return pb.GetTaskResponse(
        kind=_KIND_TO_PB[task.kind],
        round=task.round,
        global_round=task.global_round,
        plan=plan_to_pb(task.plan) if task.plan is not None else None,
        probe=probe_to_pb(task.probe) if task.probe is not None else None,
        retry_after_s=task.retry_after_s,
        message=task.message,
        secagg=secagg_to_pb(task.secagg) if task.secagg is not None else None,
    )


def task_from_pb(message: pb.GetTaskResponse) -> Task:
    """proto -> Task."""
    if message.kind not in _KIND_FROM_PB:
        raise InvalidArgument("task.kind", f"unknown value {message.kind}")
    kind = _KIND_FROM_PB[message.kind]
    needs_plan = kind in (TaskKind.TRAIN, TaskKind.EVALUATE)
    if needs_plan and not message.HasField("plan"):
        raise InvalidArgument("task.plan", f"a {kind.value} task needs a plan")
    if kind is TaskKind.PROBE and not message.HasField("probe"):
        raise InvalidArgument("task.probe", "a probe task needs a probe plan")
    if kind in SECAGG_KINDS and not message.HasField("secagg"):
        raise InvalidArgument("task.secagg", f"a {kind.value} task needs its step")
    return Task(
        kind=kind,
        round=message.round,
        global_round=message.global_round,
        plan=plan_from_pb(message.plan) if needs_plan else None,
        probe=probe_from_pb(message.probe) if kind is TaskKind.PROBE else None,
        retry_after_s=message.retry_after_s,
        message=message.message,
        secagg=secagg_from_pb(message.secagg) if kind in SECAGG_KINDS else None,
    )


def update_header_to_pb(meta: UpdateMeta, payload: pb.PayloadHeader) -> pb.UpdateHeader:
    """UpdateMeta plus payload header -> proto header of an upload."""
    return pb.UpdateHeader(
        agent_id=meta.agent_id,
        round=meta.round,
        plan_id=meta.plan_id,
        samples=meta.samples,
        steps=meta.steps,
        train_seconds=meta.train_seconds,
        train_loss=meta.train_loss,
        peak_memory_bytes=meta.peak_memory_bytes,
        payload=payload,
        base_digest=meta.base_digest,
        projection_seconds=meta.projection_seconds,
        importance=dict(meta.importance),
    )


def update_meta_from_pb(message: pb.UpdateHeader) -> UpdateMeta:
    """proto upload header -> UpdateMeta; InvalidArgument for missing identity or work."""
    if not message.agent_id:
        raise InvalidArgument("header.agent_id", "empty")
    if not message.HasField("payload"):
        raise InvalidArgument("header.payload", "missing")
    if not math.isfinite(message.train_loss):
        raise InvalidArgument("header.train_loss", f"must be a finite number, got {message.train_loss}")
    if not (math.isfinite(message.train_seconds) and message.train_seconds >= 0):
        raise InvalidArgument("header.train_seconds", f"must be finite and >= 0, got {message.train_seconds}")
    if not (math.isfinite(message.projection_seconds) and message.projection_seconds >= 0):
        raise InvalidArgument("header.projection_seconds", f"must be finite and >= 0, got {message.projection_seconds}")
    bad = sorted(name for name, score in message.importance.items() if not (math.isfinite(score) and score >= 0))
    if bad:
        raise InvalidArgument("header.importance", f"scores must be finite and >= 0 (not for {bad[:3]})")
    return UpdateMeta(
        agent_id=message.agent_id,
        round=message.round,
        plan_id=message.plan_id,
        samples=message.samples,
        steps=message.steps,
        train_seconds=message.train_seconds,
        train_loss=message.train_loss,
        peak_memory_bytes=message.peak_memory_bytes,
        base_digest=message.base_digest,
        projection_seconds=message.projection_seconds,
        importance=dict(message.importance),
    )


def evaluation_to_pb(agent_id: str, global_round: int, evaluation: Evaluation) -> pb.ReportEvaluationRequest:
    """Evaluation -> proto (the confusion matrix row-major)."""
    return pb.ReportEvaluationRequest(
        agent_id=agent_id,
        global_round=global_round,
        loss=evaluation.loss,
        accuracy=evaluation.accuracy,
        samples=evaluation.samples,
        confusion=[value for row in evaluation.confusion for value in row],
    )


def evaluation_from_pb(message: pb.ReportEvaluationRequest) -> Evaluation:
    """proto evaluation report -> Evaluation; InvalidArgument for impossible figures (the coordinator's
    bounds then check them against the run: classes, samples, accuracy)."""
    if not 0.0 <= message.accuracy <= 1.0:
        raise InvalidArgument("accuracy", f"must be in [0, 1], got {message.accuracy}")
    if message.loss != message.loss or message.loss < 0:
        raise InvalidArgument("loss", f"must be a non-negative number, got {message.loss}")
    flat = list(message.confusion)
    n = math.isqrt(len(flat))
    if n * n != len(flat):
        raise InvalidArgument("confusion", f"must hold classes x classes values, got {len(flat)}")
    if not all(math.isfinite(v) and v >= 0 for v in flat):
        raise InvalidArgument("confusion", "must hold finite, non-negative counts")
    confusion = tuple(tuple(flat[i * n : (i + 1) * n]) for i in range(n))
    return Evaluation(loss=message.loss, accuracy=message.accuracy, samples=message.samples, confusion=confusion)


def importance_to_pb(agent_id: str, report: ImportanceReport) -> pb.ReportImportanceRequest:
    """ImportanceReport -> proto."""
    return pb.ReportImportanceRequest(
        agent_id=agent_id,
        probe_id=report.probe_id,
        scores=dict(report.scores),
        samples=report.samples,
        steps=report.steps,
        seconds=report.seconds,
    )


def importance_from_pb(message: pb.ReportImportanceRequest) -> ImportanceReport:
    """proto -> ImportanceReport; InvalidArgument for non-finite or negative scores."""
    for name, score in message.scores.items():
        if not (math.isfinite(score) and score >= 0):
            raise InvalidArgument(f"scores[{name}]", f"must be finite and >= 0, got {score}")
    if message.samples == 0:
        raise InvalidArgument("samples", "must be positive: the weight of these scores")
    return ImportanceReport(
        probe_id=message.probe_id,
        scores=dict(message.scores),
        samples=message.samples,
        steps=message.steps,
        seconds=message.seconds,
    )


def revealed_to_pb(agent_id: str, round_: int, revealed: Mapping[str, tuple[str, int]]) -> pb.UnmaskRequest:
    """An agent's unmasking shares -> proto."""
    shares = [
        pb.RevealedShare(owner=owner, kind=kind, share=share.to_bytes(SHARE_BYTES, "big"))
        for owner, (kind, share) in sorted(revealed.items())
    ]
    return pb.UnmaskRequest(agent_id=agent_id, round=round_, shares=shares)


def revealed_from_pb(message: pb.UnmaskRequest) -> dict[str, tuple[str, int]]:
    """proto -> owner -> (kind, share); InvalidArgument for a repeated owner, a kind or a share out of form."""
    revealed: dict[str, tuple[str, int]] = {}
    for item in message.shares:
        if item.owner in revealed:
            raise InvalidArgument("shares", f"{item.owner}'s share sent twice")
        if item.kind not in ("seed", "key"):
            raise InvalidArgument("shares.kind", f"{item.kind!r} is not 'seed' or 'key'")
        if len(item.share) != SHARE_BYTES:
            raise InvalidArgument("shares.share", f"a share is {SHARE_BYTES} bytes, not {len(item.share)}")
        revealed[item.owner] = (item.kind, int.from_bytes(item.share, "big"))
    return revealed
