"""The run config: one typed dataclass per preset section.

A preset (``ds_configs/*.json``) is one ``RunConfig``. Every key below is documented where it is
declared; the README's config reference lists the sections. Keys are read by the trainer (or the
part it hands them to) and nowhere else.
"""
from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None
    """Hub id or local directory, loaded with ``from_pretrained``. Exactly one of this and ``config``."""
    config: Optional[dict] = None
    """A transformers config as a dict with ``model_type`` (e.g. ``{"model_type": "llama", ...}``):
    the model is built randomly initialized from it (tiny models, tests, the demo)."""
    tokenizer: Optional[str] = None
    """Hub id or local directory of the tokenizer; ``builtin:arithmetic`` trains the demo's tokenizer
    locally. Default: ``name_or_path``."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in (the DeepSpeed config's bf16/fp16 section decides training precision)."""
    init_seed: int = 0
    """Seed of the random initialization when built from ``config``."""
    trust_remote_code: bool = False
    processor: Optional[str] = None
    """Vision-language models: hub id / local dir of the processor (``AutoProcessor``), or
    ``builtin:tiny-llava`` / ``builtin:tiny-qwen2vl`` (built offline, the VLM presets). The model is then
    loaded as an image-text-to-text model and its tokenizer is the processor's (leave ``tokenizer``
    unset). Student and teacher are both vision-language models or both not."""


@dataclass
class TeacherSFTConfig:
    """An optional supervised stage that fine-tunes the teacher on the training completions before
    distillation starts (the demo uses it: its teacher is built from a config, so it must learn the
    task first). The result is exported and then loaded as the frozen teacher."""
    max_steps: int = 0
    """Optimizer steps of the supervised stage; 0 skips it."""
    deepspeed: dict = field(default_factory=dict)
    """DeepSpeed config of the supervised stage (ZeRO stage 3 with an optimizer)."""


@dataclass
class LoraConfig:
    """A LoRA adapter on the student, applied with ``peft`` (the ``lora`` extra) before the DeepSpeed
    engine is made: the base weights are frozen and only the adapter (and ``modules_to_save``) train."""
    rank: int = 16
    """The adapter's rank r."""
    alpha: float = 32.0
    """Scaling numerator: the update is (alpha / rank) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: Union[str, list] = "all-linear"
    """Modules that get an adapter: ``all-linear`` (every linear layer but the output head; of a
    vision-language model, the language model's), or a list of names, each matching a module whose
    qualified name is it or ends in ``.<name>`` (``["q_proj", "v_proj"]``)."""
    modules_to_save: list = field(default_factory=list)
    """Modules trained fully beside the adapter, matched like ``target_modules`` (e.g.
    ``["embed_tokens", "lm_head"]`` for a new tokenizer); saved in the adapter."""


@dataclass
class StudentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: dict = field(default_factory=dict)
    """The student's DeepSpeed config: ZeRO stage 3, optimizer, scheduler,
    ``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps`` (the window length)."""
    lora: Optional[LoraConfig] = None
    """Train a LoRA adapter instead of every weight (null: full fine-tuning)."""


@dataclass
class TeacherConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: dict = field(default_factory=dict)
    """The teacher's ZeRO-inference config: stage 3, no optimizer, optional
    ``zero_optimization.offload_param`` to ``cpu`` or ``nvme``."""
    sft: TeacherSFTConfig = field(default_factory=TeacherSFTConfig)
    forward_micro_steps: Optional[int] = None
    """Micro-steps whose teacher forward runs as one batch: ZeRO-3 gathers the teacher's parameters
    (and runs its hooks) once for all of them (``gold_ds.trainer.objective``). null: a whole window
    (``gradient_accumulation_steps``) for text models, 1 for vision-language models (their images are
    processed one micro-step at a time). Lower it when the teacher's activations for micro batch x
    this many sequences, or its outputs for them (see ``distill.logits``), do not fit."""


DATA_COLUMNS = ("messages", "prompt", "completion", "answer", "images")
"""The raw columns gold_ds reads from a dataset (``DatasetSource.columns`` maps other names onto them)."""


@dataclass
class DatasetSource:
    path: Optional[str] = None
    """Local ``.json``/``.jsonl``/``.parquet`` data: a file, a glob (``shards/*.parquet``) or a directory
    of shards; else a Hugging Face hub dataset id. Relative paths are from the working directory."""
    builtin: Optional[Literal["arithmetic", "arithmetic-words", "shapes"]] = None
    """A built-in synthetic task instead of ``path``: ``arithmetic`` (text), ``arithmetic-words`` (its
    answers spelled in words) or ``shapes`` (images; needs
    vision-language models)."""
    split: str = "train"
    """Split to read: a hub dataset's, a directory's (its files named by split: ``train-*``,
    ``test.jsonl``; files named otherwise are all ``train``), or ``builtin``'s ``train``/``eval``."""
    name: Optional[str] = None
    """Hub dataset config name."""
    revision: Optional[str] = None
    """Hub dataset revision (a branch, tag or commit); pin it for a reproducible run."""
    columns: Optional[dict] = None
    """The dataset's column for each column gold_ds reads (``messages``, ``prompt``, ``completion``,
    ``answer``, ``images``), e.g. ``{"prompt": "question", "completion": "response"}``."""
    num_examples: Optional[int] = None
    """Rows to use: the first N of the split (builtin: how many to generate)."""
    seed: int = 0
    """Builtin tasks: generation seed."""


@dataclass
class DataConfig:
    train: DatasetSource = field(default_factory=DatasetSource)
    eval: Optional[DatasetSource] = None
    """Held-out split for evaluation; none disables evaluation."""
    max_prompt_length: int = 512
    """Prompt tokens (chat template included). A longer prompt is a bad row: never truncated."""
    max_completion_length: int = 512
    """Completion tokens kept (end-of-turn included); longer completions keep their start."""
    on_bad_row: Literal["report", "error"] = "report"
    """Rows with no assistant turn, an empty completion or an over-long prompt: ``report`` counts them
    per reason, logs the counts at start and skips them; ``error`` stops at the first one."""
    shuffle: bool = True
    cache_dir: Optional[str] = None
    """Where encoded datasets are cached (default ``<output_dir>/data_cache``): one directory per
    source and encoding, reused by later launches and ``--resume``; a shared filesystem across
    nodes, or one per node. Delete it to re-encode."""
    num_proc: int = 1
    """Worker processes that encode a dataset (one encoder per node, the other ranks wait)."""


@dataclass
class DistillConfig:
    loss: Literal["jsd", "uld", "hybrid_uld", "byte_prefix_jsd"] = "jsd"
    """Divergence between the student's and the teacher's next-token distributions. ``jsd``
    (generalized JSD, token by token) needs one shared tokenizer. ``uld`` (sorted L1) and
    ``hybrid_uld`` (JSD on the tokens both vocabularies share, matched by the bytes they stand for;
    sorted L1 on the rest) work across tokenizers: rows are compared per aligned byte span, with the
    probabilities of multi-token spans merged by the chain rule (see ``gold_ds.align``).
    ``byte_prefix_jsd`` works across tokenizers too, and also where they cut words and numbers
    differently: at every byte offset inside an aligned span it compares the finer side's
    next-piece distribution with the coarser side's, projected through byte prefixes (see
    ``gold_ds.losses.byte_prefix_jsd``)."""
    beta: float = 0.5
    """Generalized JSD interpolation (``jsd``, ``byte_prefix_jsd``, and ``hybrid_uld``'s matched part):
    0 = KL(teacher||student), 1 = KL(student||teacher)."""
    temperature: float = 1.0
    """The student's logits are divided by it before the loss (and the teacher's, unless
    ``teacher_temperature`` is set)."""
    teacher_temperature: Optional[float] = None
    """The teacher's temperature across tokenizers; default ``temperature``."""
    matched_weight: Optional[float] = None
    """``hybrid_uld``: weight of the matched (JSD) part; default K / teacher vocabulary size, K the
    number of matched tokens."""
    unmatched_weight: Optional[float] = None
    """``hybrid_uld``: weight of the unmatched (sorted L1) part; default 1 - the default matched weight."""
    divergence_weight: float = 1.0
    """Weight of the divergence above in the loss."""
    ce_weight: float = 0.0
    """Weight of an added cross-entropy term: the student's negative log-likelihood of the trained
    completion tokens (0: none). Divergence weight 0, ce weight 1, ``seq_kd`` and ``lmbda`` 0 is
    supervised fine-tuning on the teacher's completions."""
    lmbda: float = 0.5
    """Probability that a micro-step is on-policy (completions sampled from the student)."""
    seq_kd: bool = False
    """Off-policy micro-steps train on completions sampled from the teacher instead of the dataset's."""
    num_generations: int = 1
    """Completions sampled per prompt on on-policy micro-steps (an on-policy micro-step takes micro
    batch / num_generations prompts)."""
    logits: Literal["auto", "sharded", "full"] = "auto"
    """How the loss gets the models' logits. ``sharded``: the forwards stop at the final hidden
    states, every rank applies its vocabulary slice of both heads (read from its ZeRO-3 partition)
    to all ranks' completion rows inside the loss, chunk by chunk, so no rank holds a full
    [rows, vocabulary] logits tensor. ``full``: each model's own forward computes [B, T, V] logits
    on every rank (the fallback for heads ``sharded`` does not know; see ``gold_ds.engine.heads``).
    ``auto``: ``sharded`` when either tokenizer has at least 16,384 tokens (every real LLM's), else
    ``full``, whose small logits cost less than the sharded path's collectives;
    ``full`` too when a model's parameters are offloaded to NVMe (``sharded`` reads the heads from
    memory). The start-up log names the choice."""

    @property
    def cross_tokenizer(self) -> bool:
        """Every loss but ``jsd``: the student and teacher may tokenize differently (aligned by bytes)."""
        return self.loss != "jsd"


@dataclass
class VLLMColocateConfig:
    """The colocated vLLM engine (``rollout.backend = "vllm_colocate"``): one per rank, or per group
    of ``tensor_parallel_size`` ranks, in the trainer's processes."""
    gpu_memory_utilization: float = 0.3
    """Share of each GPU's memory vLLM may use (weights, activations, KV cache); the rest is the trainer's."""
    max_model_len: Optional[int] = None
    """Longest prompt + completion vLLM accepts. Default: data.max_prompt_length + rollout.max_new_tokens."""
    kv_cache_memory_bytes: Optional[int] = None
    """KV-cache size in bytes; overrides ``gpu_memory_utilization``'s KV share. Required by vLLM on
    CPU, where the default is 256 MiB."""
    sleep_level: int = 1
    """0: never sleep. 1: between rollouts the weights move to host memory and the KV cache is freed.
    2: weights and KV cache are freed (needs ``rollout.sync_every`` 1: weights are synced at every
    wake). Sleep mode needs a GPU; on CPU the calls are made but vLLM ignores them."""
    tensor_parallel_size: int = 1
    """Ranks sharing one engine (contiguous ranks; it must divide the number of ranks)."""
    enforce_eager: bool = False
    """No CUDA graphs / torch.compile: faster start, slower decoding (use on CPU)."""


@dataclass
class VLLMServerConfig:
    """A vLLM OpenAI-compatible server started by the user (``rollout.backend = "vllm_server"``)."""
    url: str = "http://127.0.0.1:8000"
    """Base URL of the server (started with VLLM_SERVER_DEV_MODE=1 for the weight-update endpoints)."""
    weights_path: Optional[str] = None
    """Directory both the trainer's rank 0 and the server can read and write, where synced weights
    are written (safetensors) for the server to load. Default: ``<output_dir>/server-weights``."""
    timeout_s: float = 600.0
    """How long to wait for the server to answer (and to become ready at start)."""


@dataclass
class RolloutConfig:
    backend: Literal["transformers", "vllm_colocate", "vllm_server"] = "transformers"
    """Generator of on-policy samples: ``transformers`` (``generate`` on the student, see
    ``student_copy``),
    ``vllm_colocate`` (a vLLM engine in the trainer's processes, weights synced from ZeRO-3) or
    ``vllm_server`` (a vLLM server, weights pushed to it). The vLLM backends need the vllm extra."""
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    stop_token_ids: list = field(default_factory=list)
    """Token ids that end a sample (kept in it), besides the tokenizer's EOS. vLLM backends only."""
    student_copy: bool = True
    """``transformers`` backend: generate with a plain copy of the student on every rank, its weights
    loaded from the ZeRO-3 partitions before a rollout (``sync_every``, ``sync_bucket_mb``): one
    gather per rollout and no collective per generated token. It costs one full copy of the
    student's weights per rank, built at the first rollout; ``false`` generates with the ZeRO-3 model itself (every generated
    token gathers every layer, all ranks in lock-step), for a student that does not fit twice."""
    sync_every: int = 1
    """Generators with their own copy of the student's weights (vLLM backends, ``student_copy``):
    the weights are synced before a rollout when this many steps passed since the last sync (and
    always before the first rollout)."""
    sync_bucket_mb: int = 512
    """Weight syncs gather the weights from ZeRO-3 in buckets of at most this many MiB of full
    tensors (a larger single parameter is a bucket of its own)."""
    colocate: VLLMColocateConfig = field(default_factory=VLLMColocateConfig)
    """``vllm_colocate`` only."""
    server: VLLMServerConfig = field(default_factory=VLLMServerConfig)
    """``vllm_server`` only."""


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "gold_ds"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    """Default: ``run.name``."""
    mode: Optional[Literal["online", "offline", "disabled"]] = None
    """Default: W&B's own (``WANDB_MODE``)."""
    tags: list = field(default_factory=list)


@dataclass
class LoggingConfig:
    every: int = 1
    """Steps between metric records (console, JSONL, W&B)."""
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    every: int = 0
    """Steps between evaluations on ``data.eval``; 0 = only before training and at the end."""
    num_examples: Optional[int] = None
    """Eval rows used (default: all)."""
    max_new_tokens: int = 32
    """Greedy decoding length for exact-match accuracy and the sample table."""
    num_samples: int = 4
    """Rows of the (prompt, student, teacher) completion table logged per evaluation."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Steps between checkpoints; 0 disables them."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a new one is complete."""


@dataclass
class ExportConfig:
    enabled: bool = True
    """At the end, write a Hugging Face model (consolidated weights + tokenizer) to ``<output_dir>/export``.
    With ``student.lora``: the adapter in ``peft``'s format (``PeftModel.from_pretrained`` on the
    base model loads it) and the tokenizer."""
    merge_lora: bool = False
    """With ``student.lora``: also write the merged model (base + adapter, loadable with
    ``from_pretrained``) to ``<output_dir>/export-merged``."""


@dataclass
class RunConfig:
    name: str = "gold_ds"
    output_dir: str = "runs/gold_ds"
    """Metrics, checkpoints and the export go here."""
    seed: int = 0
    max_steps: int = 100
    """Optimizer steps of distillation."""
    timeout_s: int = 300
    """Seconds a collective waits for the other ranks before the run stops (exit code 3): a rank that
    died or hangs ends the job within this. Raise it if one rank alone works longer between
    collectives (a very large export)."""
    max_consecutive_skips: int = 3
    """Optimizer steps skipped in a row for NaN/inf values (in the loss, the teacher's outputs or the
    gradient norm) after which the run stops (exit code 4); 1 stops at the first."""
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
