"""Checkpoint conversion: ChatGLM2-6B / ChatGLM3-6B / GLM-4 in their original (remote-code) layout to
transformers' native GLM (``GlmForCausalLM``), so they train like any native model.

- ``checkpoint_files``: which files hold the weights; tensor names, shapes and dtypes from headers only.
- ``chatglm_config``: the original config.json read and checked; the native ``GlmConfig`` it maps to.
- ``chatglm_weights``: the tensor renaming (fused query_key_value split into q/k/v) streamed shard by shard.
- ``chatglm_tokenizer`` / ``glm4_tokenizer``: the original tokenizers as ``tokenizer.json`` with the original
  special-token ids and a chat template that reproduces the original chat format.
- ``families``: what differs between ChatGLM2, ChatGLM3 and GLM-4 (special tokens, stop tokens, chat format).
- ``detect``: which family a directory holds, and the one-sentence reason a remote-code model cannot run.
- ``chatglm``: the conversion itself (checked first, then built beside DST and renamed into place).
"""
