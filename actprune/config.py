"""Structured config schemas: a typo or a wrong type in any group fails when Hydra composes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    path: str = "???"  # hub id, local folder, or pkg://<python package> holding the files
    gguf_file: Optional[str] = None
    sha256: Optional[str] = None  # of the GGUF file: checked before it is used (a preset's package)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    seqlen: int = 2048
    trust_remote_code: bool = False
    apply_chat_template: bool = False  # what lm_eval uses for this model unless told otherwise
    device_map: Optional[str] = None  # CUDA: null (one GPU) | auto (a model larger than one GPU over all visible)


@dataclass
class PruningConfig:
    method: str = "dense"
    sparsity: Any = 0.0  # float r in [0, 1) zeroed per token, or "N:M" (N kept in every M)
    target_modules: List[str] = field(default_factory=lambda: list(PROJECTIONS))
    layers: Optional[List[int]] = None  # decoder layer indices; null: all
    score: str = "magnitude"  # activation methods: magnitude | weight_norm | amber | clact
    transforms: List[Any] = field(default_factory=list)  # e.g. [shift, variance], [{name: shift, mode: static}]
    selection: str = "topk"  # topk (exact per token) | threshold (calibrated per layer, ratios only)
    dense_tokens: int = 0  # the first k tokens of each sequence stay dense (attention sinks)
    mask_scope: str = "token"  # token (a mask per token) | step (the batch's rows at one position share one)
    mask_pool: str = "mean"  # mask_scope=step: how the rows' scores are pooled, mean | max | rms
    skip_layers: List[str] = field(default_factory=list)  # name patterns kept dense, e.g. ["*.layers.0.*"]
    backend: str = "emulate"  # emulate (mask, then dense matmul) | kernel (real sparse compute: actprune.kernels)
    allocation: str = "uniform"  # uniform | calibrated (N chosen per projection, the same mean kept fraction)
    allocation_choices: Optional[List[float]] = None  # N (N:M) or ratios to choose from; null: see docs/methods.md
    allocation_budget: str = "weights"  # the kept fraction held: by weight size (in · out) | inputs (in)
    blocksize: int = 128  # weight_sparsegpt: columns updated together
    percdamp: float = 0.01  # weight_sparsegpt: dampening, a fraction of the mean Hessian diagonal


@dataclass
class CalibrationConfig:
    corpus: str = "auto"  # auto (train if reachable, else validation) | wikitext2_validation | wikitext2_train | c4
    windows: int = 32
    seqlen: int = 512
    seed: int = 0


@dataclass
class LoggerConfig:
    name: str = "none"  # wandb | none
    project: str = "actprune"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    tags: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    root_dir: str = "???"
    data_dir: str = "???"
    output_dir: Optional[str] = "???"  # the job folder; null outside a run (e.g. --cfg job --resolve)
    cache_dir: str = "???"


@dataclass
class ActpruneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    # name -> options; each benchmark checks its own (actprune.eval), before the model is loaded
    benchmark: Dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    overwrite: bool = False  # re-run jobs whose results.json says ok (the old record is renamed, not lost)
    imports: List[str] = field(default_factory=list)  # modules imported first: methods and benchmarks of your own


@dataclass
class SweeperConfig:
    """Hydra's basic grid sweeper plus resume and `grids` (hydra_plugins/actprune_sweeper)."""

    _target_: str = "hydra_plugins.actprune_sweeper.sweeper.ResumingSweeper"
    max_batch_size: Optional[int] = None  # jobs launched at once (null: all; local launcher with GPUs: one per GPU)
    params: Optional[Dict[str, str]] = None  # one grid: {key: comma-separated values}
    grids: Optional[List[Dict[str, str]]] = None  # several grids whose jobs are joined


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="actprune_schema", node=ActpruneConfig)
    store.store(group="hydra/sweeper", name="actprune", node=SweeperConfig, provider="actprune")
