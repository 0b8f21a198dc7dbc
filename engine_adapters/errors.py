"""Errors of the engine adapters (one line each, naming the fix).

AdapterError              base; ``exit_code`` 1 unless a usage error
├── UnknownEngine         engine name not registered (lists valid names; exit 2)
├── ModelNotFound         a local model path that does not exist (exit 2)
├── EngineNotInstalled    the engine's Python package is missing (names the pip extra)
├── EngineArgsRefused     an engine argument the launcher owns or this platform cannot honour (exit 2)
├── EngineUnsupported     the engine cannot run here as coldstart needs it (says what was not proven)
└── EngineCallFailed      a before-checkpoint / after-restore call the engine refused or failed
"""

from __future__ import annotations


class AdapterError(Exception):
    exit_code = 1


class UnknownEngine(AdapterError):
    exit_code = 2


class ModelNotFound(AdapterError):
    exit_code = 2


class EngineNotInstalled(AdapterError):
    pass


class EngineArgsRefused(AdapterError):
    exit_code = 2


class EngineUnsupported(AdapterError):
    pass


class EngineCallFailed(AdapterError):
    pass
