"""``ModelConfig`` checks itself on construction; messages about one field start with its name."""

from __future__ import annotations

import pytest

from pipeline.model import ModelConfig, ModelConfigError
from pipeline.model.config import TINYLLAMA_1B_CONFIG


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_key_value_heads": 0}, "num_key_value_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"max_position_embeddings": -1}, "max_position_embeddings"),
        ({"hidden_size": 250, "num_attention_heads": 4}, "hidden_size"),  # 250 / 4 heads: set head_dim
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_attention_heads"),
        ({"vocab_size": 64, "base_vocab_size": 65}, "base_vocab_size"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ],
)
def test_model_config_refuses_bad_shapes_naming_the_field(fields, named):
    with pytest.raises(ModelConfigError, match=rf"^{named} "):
        ModelConfig(**fields)


def test_model_config_refuses_unknown_architectures_and_rope_types():
    with pytest.raises(ModelConfigError, match="gpt2"):
        ModelConfig(architecture="gpt2")
    with pytest.raises(ModelConfigError, match="yarn"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_tinyllama_config_reads_as_its_1b_shape():
    c = ModelConfig.from_hf_config(TINYLLAMA_1B_CONFIG)
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.num_key_value_heads) == (2048, 22, 64, 4)
