"""Shared test setup: the repo root on sys.path, offline HF/wandb, small thread counts."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA GPU (tests/test_gpu.py; skipped without one; '
                                       'bash bench/gpu_check.sh runs them)')
