"""Session-wide fixtures: tiny SD1.5 / SDXL models, their saved diffusers folders, LoRA sets.

Everything is built once per session into ``tmp_path_factory`` folders, from fixed seeds, offline.
Fixtures hand out shared objects: tests must not modify them (copy with
``tests.fixtures.oracle.copy_components`` first).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.sets import LoraSet, SameLora


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread by default: the models are tiny, and on a busy 2-core machine torch's
    thread pool made a 0.06 s UNet forward take 6 s. Override with ``MOLE_TEST_THREADS``."""
    import torch

    torch.set_num_threads(int(os.environ.get("MOLE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (CLIP BPE, from open_clip)."""
    from tests.fixtures.tokenizer import make_clip_tokenizer_files

    return make_clip_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="session")
def tiny_sd15(clip_tokenizer_dir: Path) -> dict[str, Any]:
    """Tiny SD1.5 components: ``unet, text_encoder, vae, tokenizer, scheduler`` (seed 0)."""
    from tests.fixtures.tiny_models import build_tiny_sd15

    return build_tiny_sd15(seed=0, tokenizer_dir=clip_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory: pytest.TempPathFactory, tiny_sd15: dict[str, Any]) -> Path:
    """``tiny_sd15`` saved as a diffusers folder (``StableDiffusionPipeline.from_pretrained`` loads it)."""
    from tests.fixtures.tiny_models import save_tiny_sd15_pipeline

    return save_tiny_sd15_pipeline(tmp_path_factory.mktemp("tiny_sd15") / "pipeline", components=tiny_sd15)


@pytest.fixture(scope="session")
def tiny_sdxl(clip_tokenizer_dir: Path) -> dict[str, Any]:
    """Tiny SDXL components: ``unet, text_encoder, text_encoder_2, vae, tokenizer, tokenizer_2, scheduler``."""
    from tests.fixtures.tiny_models import build_tiny_sdxl

    return build_tiny_sdxl(seed=0, tokenizer_dir=clip_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl: dict[str, Any]) -> Path:
    """``tiny_sdxl`` saved as a diffusers folder (``StableDiffusionXLPipeline.from_pretrained`` loads it)."""
    from tests.fixtures.tiny_models import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "pipeline", components=tiny_sdxl)


@pytest.fixture(scope="session")
def lora_set(tmp_path_factory: pytest.TempPathFactory, tiny_sd15: dict[str, Any]) -> LoraSet:
    """Three SD1.5 experts (rank 4/8/16, alpha 2/8/32) as kohya, PEFT folder, diffusers; see
    ``tests.fixtures.sets.build_sd15_lora_set``."""
    from tests.fixtures.sets import build_sd15_lora_set

    return build_sd15_lora_set(tiny_sd15, tmp_path_factory.mktemp("lora_set"))


@pytest.fixture(scope="session")
def same_lora_all_formats(tmp_path_factory: pytest.TempPathFactory, tiny_sd15: dict[str, Any]) -> SameLora:
    """One SD1.5 LoRA (rank 4, alpha 2, UNet + text encoder) as kohya, diffusers, PEFT folder and comfy."""
    from tests.fixtures.sets import build_same_lora_all_formats

    return build_same_lora_all_formats(tiny_sd15, tmp_path_factory.mktemp("same_lora"))


@pytest.fixture(scope="session")
def sdxl_lora(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl: dict[str, Any]) -> LoraSet:
    """One SDXL LoRA as kohya (LDM names, ``lora_te1_``/``lora_te2_``) and diffusers files."""
    from tests.fixtures.sets import build_sdxl_lora

    return build_sdxl_lora(tiny_sdxl, tmp_path_factory.mktemp("sdxl_lora"))
