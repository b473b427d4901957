"""The Keras dtype policy a trial trains in: `train.mixed_precision` resolved on the machine the trial runs on.

16-bit compute with float32 weights pays only where the hardware computes in 16 bits natively: GPUs with tensor
cores (float16; Keras's own advice) and CPUs with AVX512-BF16 or AMX (bfloat16, through oneDNN). Measured on an
AMD EPYC (Zen 4) with AVX512-BF16, one thread, batch 128: the batch-norm CNN trains at 1,310-1,350 images/s in
mixed_bfloat16 against 967-969 in float32 (two threads: 2,330-2,460 against 1,620-1,660), the classic CNN at
1,980-2,040 against 1,130-1,190. Without native bfloat16, oneDNN emulates it: 416-425 images/s with plain AVX-512
(2.3x slower than float32), and on AVX2 the convolution does not run at all. Hence `true` asks for 16 bits where
they are native and keeps float32 elsewhere, while "float16" and "bfloat16" force a policy wherever the trial runs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Literal, get_args

from stages.common.errors import TrainingError

SixteenBits = Literal["float16", "bfloat16"]
MixedPrecision = bool | SixteenBits
MIXED_PRECISION_CHOICES = (True, False, *get_args(SixteenBits))

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # Linux's names for the x86 extensions
# oneDNN emulates bfloat16 with these (slowly); without them its bfloat16 convolutions do not run at all
AVX512_CORE_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
# ONEDNN_MAX_CPU_ISA caps the instructions oneDNN uses; these caps leave out every bfloat16 instruction, the first
# five AVX-512 as well
ONEDNN_ISAS_WITHOUT_AVX512 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"})
ONEDNN_ISAS_WITHOUT_BFLOAT16 = ONEDNN_ISAS_WITHOUT_AVX512 | {"AVX512_CORE", "AVX512_CORE_VNNI"}
MIN_FLOAT16_COMPUTE_CAPABILITY = (7, 0)  # Volta: the first tensor cores


def dtype_policy(mixed_precision: MixedPrecision, *, gpu_compute_capabilities: list[tuple[int, int]]) -> str:
    """The Keras dtype policy name for `mixed_precision` in a process that sees GPUs of these compute capabilities
    (none: a CPU trial).

    false: float32. "float16", "bfloat16": mixed_float16, mixed_bfloat16, whatever the hardware. true: mixed_float16
    where every visible GPU has tensor cores, mixed_bfloat16 on a CPU trial where the CPU (and oneDNN's instruction
    cap) computes bfloat16 natively, float32 elsewhere.
    """
    if mixed_precision is False:
        return "float32"
    if isinstance(mixed_precision, str):
        return f"mixed_{mixed_precision}"
    if gpu_compute_capabilities:
        fast = all(capability >= MIN_FLOAT16_COMPUTE_CAPABILITY for capability in gpu_compute_capabilities)
        return "mixed_float16" if fast else "float32"
    return "mixed_bfloat16" if cpu_computes_bfloat16() else "float32"


def cpu_computes_bfloat16(cpuinfo: str | None = None, onednn_max_isa: str | None = None) -> bool:
    """Whether this CPU has bfloat16 instructions that oneDNN may use.

    Args:
      cpuinfo: the text of /proc/cpuinfo; read from this machine when None (no such file: False).
      onednn_max_isa: the ONEDNN_MAX_CPU_ISA cap; from the environment when None.
    """
    if _isa_cap(onednn_max_isa) in ONEDNN_ISAS_WITHOUT_BFLOAT16:
        return False
    return bool(_cpu_flags(cpuinfo) & NATIVE_BFLOAT16_FLAGS)


def cpu_runs_bfloat16(cpuinfo: str | None = None, onednn_max_isa: str | None = None) -> bool:
    """Whether oneDNN can run this model's bfloat16 kernels here at all (natively, or emulated with AVX-512)."""
    if _isa_cap(onednn_max_isa) in ONEDNN_ISAS_WITHOUT_AVX512:
        return False
    flags = _cpu_flags(cpuinfo)
    return bool(flags & NATIVE_BFLOAT16_FLAGS) or AVX512_CORE_FLAGS <= flags


def _isa_cap(onednn_max_isa: str | None) -> str:
    if onednn_max_isa is None:
        onednn_max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return onednn_max_isa.strip().upper()


def _cpu_flags(cpuinfo: str | None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo's text (this machine's when None; none where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            return set()
    flags = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            flags.update(value.split())
    return flags


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """The compute capability of each GPU TensorFlow sees in this process ((0, 0) where TensorFlow gives none)."""
    import tensorflow as tf

    return [
        tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0))
        for gpu in tf.config.list_physical_devices("GPU")
    ]


def use_dtype_policy(mixed_precision: MixedPrecision) -> str:
    """Sets Keras's global dtype policy for `mixed_precision` on this machine (after keras.backend.clear_session,
    which resets it to float32); returns the policy's name. Models built afterwards compute in it."""
    import keras

    gpus = gpu_compute_capabilities()
    policy = dtype_policy(mixed_precision, gpu_compute_capabilities=gpus)
    if policy == "mixed_bfloat16" and not gpus and not cpu_runs_bfloat16():
        raise TrainingError(
            "train.mixed_precision: bfloat16 cannot run on this node's CPU (no AVX-512, or ONEDNN_MAX_CPU_ISA "
            "below it): use true (16 bits only where native) or false"
        )
    keras.mixed_precision.set_global_policy(policy)
    return policy


@contextlib.contextmanager
def global_dtype_policy(name: str):
    """Keras's global dtype policy set to `name` inside the block, and back to what it was after it."""
    import keras

    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def in_float32(model):
    """`model` computing in float32 with Keras's own layers: the model itself where it does, else a copy with its
    weights.

    A model trained in mixed precision keeps its policy in its saved config; evaluate and the export use this copy,
    so the test accuracy is that of the exported model, which then runs on any machine (mixed_bfloat16 does not run
    on a CPU without bfloat16 instructions, mixed_float16 crawls on CPUs) and loads in plain Keras (our fused batch
    normalization, a training-speed matter, becomes Keras's BatchNormalization).
    """
    import keras

    from stages.training.fused_batch_norm import FusedBatchNormalization, keras_layer

    if all(
        layer.dtype_policy.name == "float32" and not isinstance(layer, FusedBatchNormalization)
        for layer in model.layers
    ):
        return model
    copy = keras.models.clone_model(model, clone_function=lambda layer: keras_layer(layer, dtype="float32"))
    copy.set_weights(model.get_weights())
    return copy
