"""Running a trained model: loading any checkpoint (``load``), the sampling parameters and the sampler
(``sampling``), the continuous-batching generation engine (``engine``), logprob scoring (``logprobs``),
text-level completions (``generator``), token texts for logprobs and tokenizer endpoints (``text``) and
lm-evaluation-harness on top of them (``harness``).

``cookbook serve``, ``cookbook generate``, ``cookbook eval --tasks``, ``distill generate --backend cookbook`` and
passkey retrieval all generate through the one engine here.
"""
