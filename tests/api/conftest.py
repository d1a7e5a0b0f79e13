from __future__ import annotations

import pytest
import torch

from dsv32.api.service import ServingContext
from dsv32.chat import load_tokenizer
from dsv32.engine.async_engine import AsyncEngine
from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.weights.default_model import ensure_default_model
from dsv32.weights.loader import load_model
from tests.api.server_harness import RunningServer, ScriptedEngine


@pytest.fixture(scope="session")
def default_model_dir():
    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    return load_tokenizer(default_model_dir)


@pytest.fixture(scope="module")
def engine_server(default_model_dir, tokenizer):
    """The real server on the embedded default model (random weights), real engine."""
    model = load_model(default_model_dir, dtype=torch.float32, progress=False)
    core = EngineCore(
        model, EngineConfig(block_size=16, num_blocks=2048, max_num_seqs=64), eos_id=tokenizer.eos_id
    )
    engine = AsyncEngine(core, tokenizer, max_waiting=256)
    ctx = ServingContext(engine=engine, tokenizer=tokenizer, family="v3.2", max_model_len=4096,
                         served_model_name="dsv32-default", keepalive_s=0.5, eos_id=tokenizer.eos_id)  # fmt: skip
    with RunningServer(ctx) as srv:
        yield srv
    engine.shutdown()


@pytest.fixture()
def scripted_server(tokenizer):
    """The real server, encoder and parser, with a scripted token source behind the engine interface."""
    engine = ScriptedEngine(tokenizer, tokenizer.eos_id)
    ctx = ServingContext(engine=engine, tokenizer=tokenizer, family="v3.2", max_model_len=4096,
                         served_model_name="scripted", eos_id=tokenizer.eos_id)  # fmt: skip
    with RunningServer(ctx) as srv:
        srv.engine = engine
        yield srv
