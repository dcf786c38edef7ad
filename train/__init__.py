"""MoLE gate training: backend-agnostic engine, diffusers backend, background worker and CLI.

Entry points: :func:`train.engine.train`, :class:`train.config.TrainConfig`,
:class:`train.worker.Worker`, ``python -m train`` (console script ``mole-train``).
"""
