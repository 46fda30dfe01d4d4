"""Configuration of a BD3-LM (block diffusion) checkpoint: the backbone's own config plus ``bd3``.

The ``bd3`` section of config.json holds what block decoding needs: ``mask_token_id``,
``base_vocab_size`` (ids from there on and the mask token are never predicted), ``block_size``
(the block size L' it was trained at; ``block_sizes`` when trained at several) and ``shift``
(position l - 1 predicts token l, as in the AR model it was initialized from).
Only ``torch`` and ``transformers`` are imported: this file travels with the weights. The classes
subclass the architectures' own configs, so the same file serves transformers 4.57 and 5.x (where
``PretrainedConfig`` became ``PreTrainedConfig``, configs are dataclasses and the rotary settings move
to ``rope_parameters``, converted from this file's ``rope_theta``/``rope_scaling`` by 5.x itself).
"""

from transformers import LlamaConfig, MistralConfig, Qwen2Config


class _BD3Fields:
    def _init_bd3(self, bd3):
        # No check here: transformers builds a default config (no arguments) to diff against.
        self.bd3 = dict(bd3 or {})
        self.bd3.setdefault("base_vocab_size", self.vocab_size)
        self.bd3.setdefault("shift", True)


class BD3LlamaConfig(_BD3Fields, LlamaConfig):
    def __init__(self, bd3=None, **kwargs):
        super().__init__(**kwargs)
        self._init_bd3(bd3)


class BD3Qwen2Config(_BD3Fields, Qwen2Config):
    def __init__(self, bd3=None, **kwargs):
        super().__init__(**kwargs)
        self._init_bd3(bd3)


class BD3MistralConfig(_BD3Fields, MistralConfig):
    def __init__(self, bd3=None, **kwargs):
        super().__init__(**kwargs)
        self._init_bd3(bd3)
