"""The recipe: one YAML file, checked by a typed schema before anything heavy happens.

Every field's description feeds `launcher fields` and `--help`. Loading collects every
problem at once and names each by its dotted path (`train.lr`), with the nearest valid
key for a typo. Dotted overrides (`train.lr=1e-4`) apply on top of the file.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from launcher.config.errors import UserError, count, listing
from launcher.config.tables import FLOAT_DTYPES, OPTIMIZERS, STORAGE_DTYPES, STRATEGIES
from launcher.config.userio import dump_yaml, load_yaml, quote, read_text

BUILTIN_RECIPE = "builtin:demo"

DType = Literal[("auto", *FLOAT_DTYPES)]  # type: ignore[valid-type]


class Section(BaseModel):
    # allow_inf_nan: `.inf`/`.nan` are valid YAML floats, never a valid learning rate or epoch count
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)


class ModelCfg(Section):
    """The base model."""

    name: str = Field(
        description="Local Hugging Face model directory, hub id, builtin:tiny-math (pretrained on addition) or "
        "builtin:tiny-llama (random weights)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: DType = Field(
        "auto", description="dtype of the weights that stay unquantized; auto follows quant.compute_dtype."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Attention kernel. sdpa: torch SDPA, and packed rows attend one sample at a time (no work "
        "across samples); eager; flash_attention_2 (needs flash-attn; packed rows run its varlen kernel).",
    )
    trust_remote_code: bool = Field(False, description="Allow custom modeling code from the model directory.")
    random_init: bool = Field(
        False,
        description="Random weights created layer by layer on the device and quantized at once (scaling "
        "experiments, no download): model.name is a planner preset such as llama-65b or a directory with a "
        "config.json.",
    )
    device_map: Union[str, dict[str, Any], None] = Field(
        None,
        description="Override the placement's device_map (normally unset: the strategy picks it; refused under "
        "ZeRO-3/FSDP).",
    )


class QuantCfg(Section):
    """How the frozen base model is quantized (bitsandbytes)."""

    mode: Literal["nf4", "fp4", "int8", "none"] = Field(
        "nf4", description="nf4/fp4: 4-bit QLoRA; int8: 8-bit; none: plain LoRA on 16-bit."
    )
    double_quant: bool = Field(
        True, description="Quantize the 4-bit quantization constants too (~0.37 bit/param saved)."
    )
    compute_dtype: DType = Field(
        "auto",
        description="dtype the 4-bit layers compute in; auto: bfloat16 on GPUs that support it, float16 on older "
        "GPUs, float32 on CPU.",
    )
    storage_dtype: Literal[("auto", *STORAGE_DTYPES)] = Field(  # type: ignore[valid-type]
        "auto",
        description="Container dtype of packed 4-bit weights; auto: uint8, or the parameter dtype when FSDP "
        "shards them.",
    )


class PeftCfg(Section):
    """The parameter-efficient method (peft). Also accepted as section `lora`."""

    method: Literal["lora", "prompt_tuning", "prefix_tuning", "ia3", "loha", "adalora"] = Field(
        "lora", description="peft method."
    )
    r: int = Field(16, gt=0, description="LoRA/LoHa/AdaLoRA rank.")
    alpha: float = Field(
        32, gt=0, description="LoRA scaling numerator (scale = alpha/r, or alpha/sqrt(r) with use_rslora)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    target_modules: Union[list[str], str] = Field(
        "all-linear", description="Modules to adapt: a list of names, a regex, or all-linear."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha/sqrt(r).")
    num_virtual_tokens: int = Field(16, gt=0, description="Virtual tokens for prompt_tuning / prefix_tuning.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for peft's config class of this method."
    )


class DataCfg(Section):
    """Training data."""

    path: str = Field(
        description="JSONL/JSON/CSV/Parquet file, a datasets.save_to_disk directory, a hub dataset name, or "
        "builtin:subtraction / builtin:arithmetic (two-digit subtraction / addition)."
    )
    format: Literal["auto", "prompt_completion", "alpaca", "chat", "text"] = Field(
        "auto", description="Sample format; auto detects it from the first sample's fields."
    )
    prompt_field: str = Field("prompt", description="Field holding the prompt (prompt_completion).")
    completion_field: str = Field("completion", description="Field holding the completion (prompt_completion).")
    text_field: str = Field("text", description="Field holding raw text (text).")
    messages_field: str = Field("messages", description="Field holding chat messages (chat).")
    instruction_field: str = Field("instruction", description="Alpaca: field holding the instruction.")
    input_field: str = Field("input", description="Alpaca: field holding the optional input.")
    output_field: str = Field("output", description="Alpaca: field holding the response.")
    group_by_length: bool = Field(
        False, description="Batch samples of similar length together (less padding; order still seeded)."
    )
    train_on_prompt: bool = Field(
        False, description="Also train on prompt tokens (by default they are masked out of the loss)."
    )
    max_seq_len: int = Field(512, ge=8, description="Tokens per sequence.")
    too_long: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with samples longer than max_seq_len (counted and reported)."
    )
    eval_path: str | None = Field(
        None, description="Separate eval source (any data.path kind); otherwise eval_fraction of the data is held out."
    )
    eval_split: str | None = Field(
        None, description="Split of data.eval_path to read (default: data.split), e.g. test."
    )
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of samples held out for eval when eval_path is unset."
    )
    max_samples: int | None = Field(None, gt=0, description="Use only the first N samples (quick experiments).")
    packing: bool = Field(
        False, description="Pack several samples into each max_seq_len sequence (no attention across samples)."
    )
    remainder: Literal["drop", "pad"] = Field(
        "drop",
        description="Samples left when the epoch does not split evenly over ranks: drop (skipped this epoch, "
        "different ones each epoch) or pad (every sample trains once; short ranks get loss-free filler).",
    )
    streaming: bool = Field(
        False, description="Stream the data (datasets IterableDataset) instead of loading it; needs train.max_steps."
    )
    split: str = Field("train", description="Split to read from a hub dataset or a save_to_disk DatasetDict.")
    cache_dir: str | None = Field(
        None, description="Where tokenized data is cached (default: LAUNCHER_CACHE/tokenized)."
    )
    num_proc: int | None = Field(
        None,
        gt=0,
        description="Processes that tokenize (default: the cores this process may use; files under 8 MB: one).",
    )
    log_sample_ids: bool = Field(
        False, description="Debug: each rank logs the sample ids it trains on to RUN/sample_ids/rankN.jsonl."
    )


class TrainCfg(Section):
    """The training loop."""

    output_dir: str = Field("runs/run", description="Run directory: adapter, tokenizer, recipe, metrics, checkpoints.")
    seed: int = Field(42, description="Seed for weights init, data order and dropout.")
    epochs: float = Field(1, gt=0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per forward pass per process.")
    grad_accum: int = Field(1, gt=0, description="Micro batches accumulated per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (added to warmup_ratio's share).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warmup as a share of the total steps.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    optimizer: Literal[tuple(OPTIMIZERS)] = Field(  # type: ignore[valid-type]
        "paged_adamw_32bit", description="Optimizer; paged ones fall back to non-paged on CPU."
    )
    max_grad_norm: float | None = Field(0.3, gt=0, description="Gradient clipping norm; null disables.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast; auto: bf16 on GPUs that support it, else no."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward (non-reentrant).")
    chunked_loss: int | Literal["auto"] = Field(
        "auto",
        description="Compute the loss this many tokens at a time, never holding the full logits (less memory at "
        "large vocabularies; the head runs over labelled tokens only and is never recomputed); 0: off. single, ddp and "
        "zero2. auto: on, micro batch tokens / 8 (at least 128) a "
        "chunk, where the memory planner finds the logits the step's largest transient and the strategy allows it.",
    )
    fused_ops: bool = Field(
        True,
        description="Fewer passes over memory and fewer bytes kept per layer, same arithmetic: the LoRA linear "
        "without peft's copy of its output, SwiGLU keeping only gate and up, RMSNorm keeping only its input and "
        "rstd (Llama, Mistral, Qwen; other modules as they are).",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer on its own (regional: one layer's compile serves all; the "
        "token dimension dynamic, so packed rows of any length reuse it), the 4-bit layers intact; single and ddp. "
        "The first steps pay the compile (docs/benchmarks.md).",
    )
    checkpoint_every: int = Field(
        1,
        gt=0,
        description="With gradient_checkpointing: recompute only every n-th decoder layer (1: all). The others keep "
        "their activations: less recompute per step for more memory (launcher plan shows how much).",
    )
    memory_budget_gb: float | Literal["auto"] | None = Field(
        "auto",
        description="With gradient_checkpointing: device memory per GPU (per process on CPU) the step may use. The "
        "memory planner keeps the activations of as many of the last decoder layers as fit in it and recomputes the "
        "others: speed for memory that would sit idle. null: recompute as checkpoint_every says. auto: 85% of the "
        "GPU's memory on GPUs (the planner is within 15% of published reserved figures); on CPU what recomputing "
        "every layer needs, which keeps the last layer where that costs nothing (backward frees it first).",
    )
    log_every: int = Field(10, gt=0, description="Optimizer steps between metric lines.")
    eval_every: int = Field(100, gt=0, description="Optimizer steps between evals (and one at the end).")
    eval_batches: int | None = Field(None, gt=0, description="Cap on eval micro batches per eval.")
    eval_accuracy_samples: int = Field(
        0,
        ge=0,
        description="Eval prompts answered greedily at each eval and scored by exact match with their completion "
        "(eval_accuracy); 0: off. Needs data with a prompt: prompt_completion, alpaca or chat.",
    )
    eval_max_new_tokens: int = Field(32, gt=0, description="Longest answer generated for eval_accuracy, in tokens.")
    save_every: int = Field(200, gt=0, description="Optimizer steps between checkpoints (and one at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Newest checkpoints kept on disk.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        ["tensorboard"], description="Trackers besides metrics.jsonl."
    )

    @field_validator("chunked_loss", mode="before")
    @classmethod
    def _chunk(cls, v):
        """A whole number of tokens (0: off) or auto, one message for anything else."""
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"expected tokens per chunk (0: off) or auto, got {quote(v)}")
        return v

    @field_validator("memory_budget_gb", mode="before")
    @classmethod
    def _budget(cls, v):
        """GB above 0, auto, or null (off), one message for anything else."""
        if v is None or v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e6:
            raise ValueError(f"expected GB above 0, auto or null, got {quote(v)}")
        return float(v)


class DistCfg(Section):
    """How processes are placed."""

    strategy: Literal[("auto", *STRATEGIES)] = Field(  # type: ignore[valid-type]
        "auto",
        description="Parallelism; auto: single for one process, else ddp when a replica fits a GPU, else fsdp "
        "(zero3 on CPU).",
    )
    fsdp_version: Literal[1, 2] = Field(
        2, description="FSDP2 (fully_shard, per-parameter sharding) or FSDP1 (flat parameters)."
    )
    nproc: int = Field(1, gt=0, description="Processes per node (one per GPU).")
    nnodes: int = Field(1, gt=0, description="Nodes.")
    timeout_s: int = Field(
        600,
        gt=0,
        description="A collective that waits longer ends the run, naming the rank that stopped answering "
        "(start-up and the first step get at least 1800 s).",
    )
    max_restarts: int = Field(
        0,
        ge=0,
        description="On one node: restart every rank from the newest intact checkpoint this many times after a "
        "rank dies or freezes (torchrun's --max_restarts). 0: the run ends and says how to resume.",
    )


class SlurmCfg(Section):
    """Slurm resources for `launcher submit`."""

    nodes: int = Field(1, gt=0, description="Nodes to allocate.")
    gpus_per_node: int = Field(1, ge=0, description="GPUs per node; 0 runs on CPUs with gloo.")
    cpus_per_task: int | None = Field(None, gt=0, description="CPUs per task.")
    mem: str | None = Field(None, description="Memory per node, e.g. 200G.")
    partition: str | None = Field(None, description="Partition.")
    time: str = Field("01:00:00", description="Time limit (HH:MM:SS or D-HH:MM:SS).")
    account: str | None = Field(None, description="Account to charge.")
    qos: str | None = Field(None, description="Quality of service.")
    constraint: str | None = Field(None, description="Node feature constraint.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before the launch (module loads, env).")
    sbatch_extra: dict[str, Any] = Field(default_factory=dict, description="Extra sbatch options, name to value.")
    max_timeout_requeues: int = Field(3, ge=0, description="How often a job that hits its time limit is requeued.")
    launch: Literal["node", "task"] = Field(
        "node",
        description="node: one `accelerate launch` per node starting dist.nproc processes; "
        "task: one Slurm task per GPU (or per CPU process), each bound to its own GPU.",
    )
    signal_delay_s: int = Field(
        120,
        ge=10,
        description="Seconds before the time limit that Slurm sends USR2 "
        "(time to finish a step and save a checkpoint).",
    )
    job_name: str | None = Field(None, description="Slurm job name (default: the run directory's name).")

    @field_validator("mem", mode="before")
    @classmethod
    def _mem_format(cls, v) -> str | None:
        """What sbatch's --mem takes: a whole number with an optional K, M, G or T suffix (not "GB")."""
        if v is None:
            return None
        text = str(v).strip()
        if isinstance(v, bool) or not re.fullmatch(r"\d+[KMGTkmgt]?", text):
            raise ValueError(f"{quote(v)} is not a Slurm memory size: a whole number with K, M, G or T, e.g. 200G")
        return text.upper()

    @field_validator("time", mode="before")
    @classmethod
    def _time_format(cls, v) -> str:
        """Any Slurm time form in, one canonical form out (HH:MM:SS or D-HH:MM:SS): what is rendered
        into a script is the checked value, never the raw text."""
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError(f"{quote(v)} is not a Slurm time (MM, HH:MM:SS or D-HH:MM:SS; quote it in YAML)")
        seconds = time_seconds(str(v))  # `time: 30` is a number: minutes, as for sbatch
        days, rest = divmod(seconds, 86400)
        hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
        return f"{days}-{hms}" if days else hms


def time_minutes(text: str) -> int:
    """Slurm time strings (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, rounded up."""
    return -(-time_seconds(text) // 60)


def time_seconds(text: str) -> int:
    """Slurm time strings (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds."""

    m = re.fullmatch(r"(?:(\d{1,5})-)?(\d{1,7})(?::(\d{1,7}))?(?::(\d{1,7}))?", text, flags=re.ASCII)
    if not m:
        raise ValueError(f"{quote(text)} is not a Slurm time (MM, HH:MM:SS or D-HH:MM:SS)")
    days, first, b, c = (int(x) if x else None for x in m.groups())
    a = first or 0  # the pattern always matches a first number
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + (b or 0) * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # MM
        seconds = a * 60
    if seconds <= 0:
        raise ValueError(f"{quote(text)} is not a positive time")
    return seconds


class Recipe(Section):
    """A whole fine-tune."""

    model: ModelCfg
    quant: QuantCfg = Field(default_factory=QuantCfg)
    peft: PeftCfg = Field(default_factory=PeftCfg)
    data: DataCfg
    train: TrainCfg = Field(default_factory=TrainCfg)
    dist: DistCfg = Field(default_factory=DistCfg)
    slurm: SlurmCfg = Field(default_factory=SlurmCfg)

    def to_yaml(self) -> str:
        return dump_yaml(self.model_dump(mode="json"))


# ---------------------------------------------------------------- loading


def _read_yaml(path: str | None) -> dict:
    if path is None or path == BUILTIN_RECIPE:
        text = resources.files("launcher").joinpath("recipes/demo.yaml").read_text()
        where = BUILTIN_RECIPE
    else:
        if not Path(path).expanduser().is_file():
            what = "is a directory; give the recipe's YAML file" if Path(path).expanduser().is_dir() else "not found"
            raise UserError(f"recipe file {what}: {path}")
        text, where = read_text(path, "recipe"), path
    raw = load_yaml(text, where)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"{where}: a recipe is a mapping of sections (model, data, train, ...), got {type(raw).__name__}"
        )
    return raw


def _field_at(parts: list[str]):
    """The pydantic field at a dotted path, or None (unknown keys are reported by validation)."""
    model: Any = Recipe
    field = None
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None and model is Recipe and part == "lora":
            field = model.model_fields["peft"]
        if field is None:
            return None
        model = field.annotation
    return field


def _takes_text_only(parts: list[str]) -> tuple[bool, bool]:
    """(the field holds plain text, it may be null): such values are taken as typed, not as YAML,
    so `slurm.constraint=[a100|h100]` or `model.name=007` keep their text."""
    field = _field_at(parts)
    if field is None:
        return False, False
    args = set(get_args(field.annotation)) or {field.annotation}
    return args <= {str, type(None)}, type(None) in args


def _set(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _split_key(key: str, item: str) -> list[str]:
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise UserError(f"override {quote(item)} is not of the form section.key=value (e.g. train.lr=1e-4)")
    return parts


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict. The value is YAML 1.2 (numbers, lists, null), except for
    fields that hold plain text, which take the text as written (`null` still clears an optional one)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise UserError(f"override {quote(item)} is not of the form section.key=value (e.g. train.lr=1e-4)")
    parts = _split_key(key, item)
    text_only, nullable = _takes_text_only(parts)
    if text_only and not (nullable and value.strip() in ("null", "~")):
        parsed: Any = value
    elif value == "":
        parsed = ""
    else:
        parsed = load_yaml(value, f"override {key}")
    _set(raw, parts, parsed)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class whose fields live at `loc` (a path of field names)."""
    field = _field_at(list(loc)) if loc else None
    model: Any = field.annotation if field is not None else (Recipe if not loc else None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _format_error(err: dict) -> str:
    loc = err["loc"]
    if err["type"] != "extra_forbidden":  # drop pydantic's union tags (`list[str]`, `str`); unknown keys are the user's
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float"))))
    path = ".".join(str(p) for p in loc) or "recipe"
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = list(parent.model_fields) if parent else []
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        hint = (
            f"; did you mean {'.'.join([*map(str, loc[:-1]), near[0]])}?"
            if near
            else f"; valid keys: {', '.join(valid)}"
        )
        return f"{quote(path) if not path.isprintable() or len(path) > 60 else path}: unknown key{hint}"
    msg = err["msg"]
    if err["type"] == "missing":
        return f"{path}: required"
    if err["type"] == "value_error":  # our validators' messages already quote the value
        return f"{path}: {msg.removeprefix('Value error, ')}"
    if "input" in err and err["type"] not in ("model_type", "dict_type"):
        return f"{path}: {msg} (got {quote(err['input'])})"
    return f"{path}: {msg}"


def _cross_checks(r: Recipe) -> list[str]:
    """Checks that involve several fields; each names the field to change."""
    problems = []
    if r.data.eval_path and "eval_fraction" in r.data.model_fields_set and r.data.eval_fraction > 0:
        problems.append("data.eval_fraction: set either data.eval_path or data.eval_fraction, not both")
    if r.peft.method != "lora" and (r.peft.use_dora or r.peft.use_rslora):
        problems.append(f"peft.use_dora/use_rslora: only apply to method lora, not {r.peft.method}")
    if r.peft.method == "loha" and r.quant.mode != "none":
        problems.append("peft.method: loha cannot adapt bitsandbytes-quantized layers; use lora, or quant.mode=none")
    if r.peft.method == "prefix_tuning" and r.train.gradient_checkpointing:
        problems.append(
            "peft.method: prefix_tuning does not work with gradient checkpointing; "
            "set train.gradient_checkpointing=false"
        )
    budget = r.train.memory_budget_gb
    if budget not in (None, "auto") and (not r.train.gradient_checkpointing or r.train.checkpoint_every != 1):
        problems.append(
            "train.memory_budget_gb: chooses which layers recompute, so it needs train.gradient_checkpointing=true "
            "and train.checkpoint_every=1; set one or the other"
        )
    if r.quant.mode == "int8" and r.quant.storage_dtype not in ("auto", "uint8"):
        problems.append("quant.storage_dtype: only applies to 4-bit modes (nf4, fp4)")
    if r.dist.strategy == "single" and (r.dist.nproc > 1 or r.dist.nnodes > 1):
        problems.append(
            "dist.strategy: single runs one process; set dist.strategy=ddp (or zero2/zero3/fsdp) or dist.nproc=1"
        )
    if r.data.streaming and not r.train.max_steps:
        problems.append("data.streaming: a stream has no known length; set train.max_steps")
    if r.data.streaming and (r.data.packing or not r.data.eval_path and r.data.eval_fraction > 0):
        problems.append(
            "data.streaming: works with data.packing=false and an eval set from data.eval_path "
            "(or data.eval_fraction=0)"
        )
    if r.train.max_steps and r.train.warmup_steps >= r.train.max_steps:
        problems.append(f"train.warmup_steps: {r.train.warmup_steps} is not below train.max_steps={r.train.max_steps}")
    if "wandb" in r.train.report_to:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            problems.append("train.report_to: wandb is not installed (pip install wandb), or drop it from the list")
    return problems


def split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """`[RECIPE] [key=value ...]`: the first item is the recipe unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    return None, list(items)


def load_recipe(
    path: str | None = None, overrides: list[str] | tuple = (), flags: dict[str, tuple[str, Any]] | None = None
) -> Recipe:
    """Read a recipe (the built-in demo when path is None), apply overrides, validate.

    `flags` maps dotted keys to (command-line flag, typed value): set as given, never read as
    YAML, last; a problem with one names the flag too (`--time (slurm.time): ...`).
    Raises UserError listing every problem, one per line, each with its dotted path.
    """
    raw = _read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    for key, (_, value) in (flags or {}).items():
        _set(raw, key.split("."), value)
    if isinstance(raw.get("lora"), dict) and isinstance(raw.get("peft", {}), dict):  # `lora` is accepted for `peft`
        raw["peft"] = {**raw.get("peft", {}), **raw.pop("lora")}
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems = [_format_error(dict(err)) for err in e.errors()]
    else:
        problems = _cross_checks(recipe)
    for key, (flag, _) in (flags or {}).items():
        problems = [f"{flag} ({key}){p[len(key) :]}" if p.startswith(key + ":") else p for p in problems]
    if problems:
        where = path or BUILTIN_RECIPE
        raise listing(f"{where}: {count(len(problems), 'problem')} in the recipe", problems)
    return recipe


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(recipe.to_yaml())


def describe_fields() -> str:
    """Every recipe key with its type, default and description (for --help)."""
    lines = []
    for section, field in Recipe.model_fields.items():
        model = field.annotation
        assert model is not None and model.__doc__  # every section is a documented Section
        lines.append(f"{section}:  {model.__doc__.strip().splitlines()[0]}")
        for name, f in model.model_fields.items():
            ann = f.annotation
            typ = (
                "|".join(map(str, get_args(ann))) if get_origin(ann) is Literal else getattr(ann, "__name__", str(ann))
            )
            default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
            lines.append(f"  {section}.{name} ({typ}; {default}): {f.description}")
    return "\n".join(lines)
