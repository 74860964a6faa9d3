"""The experiment file's schema: the skeleton and the neutral sections, as pydantic models.

Neutral sections say what a training engineer means (steps, lr, batch sizes, parallel degrees) in
one vocabulary for every backend; each backend translates them to its native keys. A field left
unset (None) means "keep the backend preset's value", so only what the user wrote is translated.
"""

from __future__ import annotations

import getpass
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

# numbers a training engineer means as finite: `.inf` or `.nan` is a mistake, refused here
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PositiveFiniteFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFiniteFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# what a POSIX shell and os.environ accept as a variable name
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

LogLevel = Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"]


def login_name() -> str:
    """The default `user_name`: the login name (`getpass.getuser()`: LOGNAME, USER, LNAME, USERNAME,
    then the password database), or "user" when there is none (a container's uid without a passwd
    entry) or it could not be a folder name."""
    try:
        name = getpass.getuser()
    except Exception:  # KeyError (no passwd entry), OSError (Python >= 3.13)
        return "user"
    if not name or name in (".", "..") or "/" in name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "user"
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainSection(_Strict):
    steps: PositiveInt | None = Field(None, description="Optimizer steps to train.")
    lr: PositiveFiniteFloat | None = Field(None, description="Peak learning rate.")
    min_lr: NonNegativeFiniteFloat | None = Field(None, description="Learning rate at the end of the decay.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps.")
    lr_schedule: Literal["cosine", "linear", "constant"] | None = Field(None, description="Decay after warmup.")
    micro_batch_size: PositiveInt | None = Field(None, description="Sequences per device per micro step.")
    global_batch_size: PositiveInt | None = Field(
        None, description="Sequences per optimizer step: micro x data-parallel x accumulation.")
    seq_length: PositiveInt | None = Field(None, description="Tokens per sequence.")
    seed: int | None = Field(None, ge=0, description="Random seed.")
    weight_decay: NonNegativeFiniteFloat | None = None
    grad_clip: NonNegativeFiniteFloat | None = Field(None, description="Max global grad norm; 0 disables clipping.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = Field(
        None, description="auto: bf16 on GPUs, fp32 on CPU.")
    log_interval: PositiveInt | None = Field(None, description="Steps between logged metrics.")
    eval_interval: PositiveInt | None = Field(None, description="Steps between validation passes.")
    eval_steps: PositiveInt | None = Field(None, description="Batches per validation pass.")
    compile: bool | None = Field(
        None, description="torch.compile the model (unset: off). hf: torch_compile; torchtitan: compile.enable; "
                          "megatron refuses it (megatron-core compiles its fused kernels only). "
                          "docs/guide/performance.md.")


class ParallelSection(_Strict):
    tensor: PositiveInt | None = None
    pipeline: PositiveInt | None = None
    data: PositiveInt | Literal["auto"] | None = Field(None, description="auto: world / (tensor x pipeline x context).")
    expert: PositiveInt | None = None
    context: PositiveInt | None = None
    fsdp: bool | None = Field(None, description="Shard parameters, grads and optimizer state (FSDP).")


class DataSection(_Strict):
    mock: bool | None = Field(None, description="Synthetic tokens, seeded; needs no files.")
    path: str | None = Field(None, description="Local text or JSONL corpus.")
    text_key: str | None = Field(None, description="JSONL field holding the text (default 'text').")
    tokenizer: str | None = Field(None, description="Local tokenizer directory.")
    valid_fraction: FiniteFloat | None = Field(None, ge=0, lt=1, description="Share of documents held out for validation.")
    # post-training (docs/guide/posttrain.md)
    format: Literal["text", "messages", "alpaca", "prompt_completion", "squad"] | None = Field(
        None, description="Records of data.path: text (pretraining), messages (chats: {messages: [{role, content}]}), "
                          "alpaca ({instruction, input?, output}), prompt_completion ({prompt, completion}) or squad "
                          "({context, question, answers: {text: [...]}}: trained on the first answer). "
                          "Default: text for pre_trainer modules; for post_trainer modules, read off the first record.")
    chat_template: str | None = Field(
        None, description="tokenizer (its own template, the default for messages), chatml, a Jinja template inline, "
                          "or a .jinja file. Set for alpaca / prompt_completion, it renders them as one chat turn.")
    packing: bool | None = Field(None, description="Pack several samples into each sequence (post-training).")
    packed_attention: Literal["isolated", "causal"] | None = Field(
        None, description="With packing: isolated (attention stays inside each sample; default where the backend "
                          "can) or causal across the packed samples (upstream's default regime).")
    truncation: Literal["right", "drop"] | None = Field(
        None, description="A sample longer than seq_length + 1 tokens: right (cut its end, the default) or drop it.")

    @model_validator(mode="after")
    def _mock_or_path(self) -> DataSection:
        if self.mock and self.path:
            raise ValueError("set either `mock: true` or `path`, not both")
        if self.packed_attention is not None and not self.packing:
            raise ValueError("packed_attention applies with `packing: true`")
        return self


#: the neutral names of a decoder layer's linear layers (Hugging Face's, as peft's target_modules
#: name them); each backend maps them onto its own modules
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSection(_Strict):
    rank: PositiveInt = Field(16, description="Rank r of the low-rank update B @ A.")
    alpha: PositiveFiniteFloat = Field(32.0, description="Scale: the update is (alpha / rank) * B @ A.")
    dropout: FiniteFloat = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Linear layers that get an adapter, by their Hugging Face names "
                                  f"({', '.join(LORA_TARGETS)}), or all-linear. Routed experts are not adapted.")
    merge: bool = Field(False, description="Also write the base model with the adapter merged in, to <run dir>/hf/.")

    @field_validator("target_modules")
    @classmethod
    def _known(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list):
            if not value:
                raise ValueError("target_modules is empty: name at least one layer, or all-linear")
            from primus.suggest import did_you_mean

            for name in value:
                if name not in LORA_TARGETS:
                    hint = did_you_mean(name, list(LORA_TARGETS))
                    raise ValueError(f"unknown LoRA target module {name!r}" + (f" ({hint})" if hint else "")
                                     + f"; the model's linear layers: {', '.join(LORA_TARGETS)}")
        return value

    def targets(self) -> tuple[str, ...]:
        return LORA_TARGETS if self.target_modules == "all-linear" else tuple(
            t for t in LORA_TARGETS if t in self.target_modules)


class FinetuneSection(_Strict):
    method: Literal["full", "lora"] | None = Field(
        None, description="full: train every weight; lora: train low-rank adapters on frozen base weights. "
                          "Default: lora when `lora:` is given, else full.")
    lora: LoraSection | None = None

    @model_validator(mode="after")
    def _method(self) -> FinetuneSection:
        if self.method == "full" and self.lora is not None:
            raise ValueError("`lora:` is set but method is full: remove one")
        return self

    @property
    def is_lora(self) -> bool:
        return self.method == "lora" or (self.method is None and self.lora is not None)

    @property
    def lora_settings(self) -> LoraSection:
        return self.lora or LoraSection()


class CheckpointSection(_Strict):
    dir: str | None = Field(None, description="Default: <run dir>/checkpoints.")
    interval: PositiveInt | None = Field(None, description="Steps between checkpoints.")
    resume: Literal["auto", "never"] | bool | None = Field(
        None, description="auto: continue from the newest complete checkpoint.")
    keep_last: PositiveInt | None = Field(None, description="Checkpoints kept on disk.")
    on_damaged: Literal["fail", "previous"] | None = Field(
        None, description="A newest checkpoint that cannot be read: fail (default, naming it) or resume from the "
                          "previous complete one (said in one line).")
    export: Literal["hf"] | None = Field(
        None, description="hf: when the run finishes, write its last checkpoint as a Hugging Face model directory "
                          "into <run dir>/hf/ (as `primus export` does).")


NEUTRAL_SECTIONS: dict[str, type[_Strict]] = {
    "train": TrainSection,
    "parallel": ParallelSection,
    "data": DataSection,
    "checkpoint": CheckpointSection,
    "finetune": FinetuneSection,
}


class ModuleConfig(_Strict):
    """One module of an experiment (`modules.pre_trainer`, ...)."""

    framework: str = Field(description="A backend name from the primus.backends entry-point group.")
    config: str | None = Field(None, description="The backend's module preset, e.g. pre_trainer.yaml.")
    model: str | dict[str, Any] | None = Field(
        None, description="A model preset file (neutral or backend-native) or an inline mapping.")
    train: TrainSection = Field(default_factory=TrainSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    data: DataSection = Field(default_factory=DataSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection,
                                      description="Post-training (post_trainer modules): full or LoRA.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Backend-native keys.")
    trainer_class: str | None = Field(
        None, description="Upstream Primus: the backend trainer to run (e.g. MegatronPretrainTrainer); "
                          "checked against the trainers the backend has.")
    # module_base fields (upstream names); None keeps module_base.yaml's value.
    trainable: bool | None = None
    sink_level: LogLevel | None = None
    file_sink_level: LogLevel | None = None
    stderr_sink_level: LogLevel | None = None


class SlurmSection(_Strict):
    partition: str | None = None
    account: str | None = None
    time: str | None = Field(None, description="Wall-clock limit, e.g. 04:00:00.")
    gpus_per_node: int | None = Field(None, ge=0, description="Default: --nproc-per-node on GPU platforms, 0 on CPU.")
    signal: str | None = Field("TERM@120", description="sbatch --signal: preemption notice before the time limit.")
    sbatch: list[str] = Field(default_factory=list, description="Extra sbatch options, e.g. --qos=high.")
    srun_args: list[str] = Field(default_factory=list, description="Extra srun options.")
    requeue: bool = Field(False, description="sbatch --requeue: Slurm requeues a preempted job.")


class ContainerSection(_Strict):
    runtime: Literal["docker", "podman", "apptainer", "singularity"] = Field(
        "docker", description="docker/podman: `run`; apptainer/singularity: `exec` with --rocm or --nv.")
    image: str | None = Field(None, description="Image with Primus and the backend installed (a .sif file or "
                                                "docker:// URI for apptainer).")
    shm_size: str = "64g"
    devices: list[str] | None = Field(
        None, description="Devices passed in (docker/podman). Default: /dev/kfd and /dev/dri on ROCm, none on "
                          "CUDA (--gpus all instead) or CPU.")
    mounts: list[str] = Field(default_factory=list, description="Extra host:container[:mode] mounts.")
    env: list[str] = Field(default_factory=list, description="Variables passed in (allowlist), besides Primus's.")
    extra_args: list[str] = Field(default_factory=list)


class LaunchSection(_Strict):
    launcher: Literal["local", "slurm", "container"] = "local"
    nnodes: PositiveInt | None = None
    nproc_per_node: PositiveInt | None = None
    master_port: PositiveInt | None = None
    max_restarts: int | None = Field(None, ge=0, description="torchrun restarts; workers resume from checkpoints.")
    platform: Literal["rocm", "cuda", "cpu"] | None = Field(
        None, description="Target platform of the nodes that run the job. Default: this host's, or, for Slurm "
                          "from a host without GPUs, what each compute node detects.")
    arch: str | None = Field(None, description="Target gfx arch on ROCm, e.g. gfx950 (default: read on the node).")
    slurm: SlurmSection = Field(default_factory=SlurmSection)
    container: ContainerSection = Field(default_factory=ContainerSection)


class Experiment(_Strict):
    """The experiment file."""

    work_group: str = "amd"
    user_name: str = Field(default_factory=login_name,
                           description="Run directory level under work_group; default: the login name.")
    exp_name: str
    workspace: str = "./output"
    env: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Exported before the backend is imported; wins over platform defaults.")
    modules: dict[str, ModuleConfig] = Field(min_length=1)
    launch: LaunchSection = Field(default_factory=LaunchSection)

    @field_validator("env")
    @classmethod
    def _env_exportable(cls, env: dict[str, Any]) -> dict[str, Any]:
        """Names a shell can export and values os.environ can hold: checked before anything runs."""
        for name, value in env.items():
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"env name {name!r} is not a variable name (letters, digits, _; not starting "
                                 "with a digit)")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"env {name}: {value!r} is not a finite number")
            if "\0" in str(value):
                raise ValueError(f"env {name}: the value holds a NUL character, which no environment can carry")
        return env

    @model_validator(mode="after")
    def _names_are_path_safe(self) -> Experiment:
        for field_name in ("work_group", "user_name", "exp_name"):
            value = getattr(self, field_name)
            if not value or value in (".", "..") or "/" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
                raise ValueError(f"{field_name} must be a plain name (no '/', no control characters, not '.' or "
                                 f"'..'), got {value!r}")
        return self


def experiment_json_schema() -> dict[str, Any]:
    """JSON Schema of the experiment file, for editors."""
    schema = Experiment.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Primus experiment"
    return schema
