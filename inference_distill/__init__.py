"""Synthetic data from a teacher for ``cookbook distill generate``: prompts from pretraining documents, the
vllm / openai / cookbook backends behind one interface, ``cookbook serve``, quality filters and resumable shards."""
