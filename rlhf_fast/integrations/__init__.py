"""Integrations of rlhf_fast with model libraries. Each submodule imports its library lazily, on import of
the submodule itself: ``import rlhf_fast`` never imports transformers.

  rlhf_fast.integrations.transformers  ``attn_implementation="rlhf_fast"`` for Hugging Face models, and
                                       shared-prefix forwards (one prompt, K answers) of such models
"""
