"""From a validated EngineConfig to a loaded Model: which file, how many layers on the GPU, where they go."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pyllm import default_model
from pyllm.config import EngineConfig
from pyllm.devices import resolve_gpu_layers
from pyllm.model import Model, check_model_file
from pyllm.placement import Placement


def load_model(config: EngineConfig) -> Model:
    """The model a config names (the default model without MODEL_PATH), loaded as it says."""
    return Model(model_path_of(config), n_gpu_layers=gpu_layers_of(config), use_mmap=config.use_mmap,
                 use_mlock=config.use_mlock, placement=placement_of(config))


def model_path_of(config: EngineConfig) -> str:
    """The model file a config names, checked (ModelLoadError naming MODEL_PATH or -m and the .env file it
    came from), or the default model's."""
    if config.model_path is None:
        return str(default_model.path())
    check_model_file(Path(config.model_path), config.source("model_path"))
    return config.model_path


def gpu_layers_of(config: EngineConfig) -> int:
    """-ngl as given; without it, every layer where a GPU is visible or RPC servers are given, else 0."""
    return gpu_layers_for(config.n_gpu_layers, placement_of(config))


def gpu_layers_for(n_gpu_layers: Optional[int], placement: Optional[Placement]) -> int:
    remote = placement is not None and bool(placement.rpc_servers)
    if n_gpu_layers is None and remote:
        return 99
    return resolve_gpu_layers(n_gpu_layers, remote_devices=remote)


def placement_of(config: EngineConfig) -> Placement:
    """Where the config puts the model's layers: split mode, shares, main GPU, RPC servers."""
    return Placement(split_mode=config.split_mode, tensor_split=config.tensor_split, main_gpu=config.main_gpu,
                     rpc_servers=config.rpc_servers, rpc_timeout=config.rpc_timeout, repack=config.repack)
