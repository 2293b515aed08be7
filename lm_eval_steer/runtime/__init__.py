"""What runs inside an lm-eval process: the vector file format, the steering math, the decoder-layer
hooks, per-document routing, ``steered-hf`` (:class:`~lm_eval_steer.runtime.model.SteeredHFLM`)
and its registration with the harness.

Layers, lowest first: ``vectorfile`` → ``interventions`` → ``hooks`` → ``routing`` → ``harness`` /
``rows`` → ``model``; ``cache`` and ``registration`` stand beside ``model``. Nothing here imports
:mod:`lm_eval_steer.analysis` or the builder.
"""
