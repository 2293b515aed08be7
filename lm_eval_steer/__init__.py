"""lm-eval-steer: activation steering for instruction following, as an lm-evaluation-harness plugin.

Heavy modules (torch, transformers, the harness) load only when used: ``import lm_eval_steer``
stays cheap because the start-up hook imports it in every lm-eval process.
"""

__version__ = "0.3.0"
