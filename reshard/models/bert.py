"""Megatron BERT (megatron-core ``BertModel``; FORMATS.md §10): a pre-LayerNorm encoder under
``encoder.layers.{i}.``, LayerNorm with weight and bias, a GeLU MLP (no gate), biases on every
linear, learned absolute position embeddings, optional token-type embeddings, and the MLM head
(``lm_head.dense`` + ``lm_head.layer_norm``, vocab-parallel ``output_layer`` with a bias), with the
pooler and binary (next-sentence) head when the model was trained with one.

There is no Hugging Face spelling: HF ``BertForPreTraining`` is post-LayerNorm and Megatron-core's
BertModel is not, so no weight mapping gives the same logits (checked; ``spec.hf_problems``).
The canonical names are therefore Megatron's own names at TP=1 (local-spec spelling for the
norms): a canonical tensor is the TP=1 Megatron tensor, and the fused QKV - one ``[q; k; v]``
block per head, as every head is its own group - splits over TP in plain row chunks.
"""

from ..mapping import Column, MappingTable, Replicated, Row, Vocab

_L = "encoder.layers.{i}."


def _norm(te: str, local: str):
    """A LayerNorm's weight and bias (TE fuses it into the next linear: ``<linear>.layer_norm_{weight,bias}``)."""
    return tuple(Replicated(mcore=f"{te}.layer_norm_{x}", local=f"{local}.{x}", hf=f"{_L}{local}.{x}", dims=("hidden",))
                 for x in ("weight", "bias"))


def _linear(cls, name: str, dims: tuple, bias_cls):
    """A parallel linear's weight (split per ``cls``) and bias (a column-parallel bias is split with its
    rows; a row-parallel one is added after the reduction, so every rank holds all of it)."""
    return (cls(mcore=f"{name}.weight", extra_state=name, hf=f"{_L}{name}.weight", dims=dims),
            bias_cls(mcore=f"{name}.bias", hf=f"{_L}{name}.bias", dims=dims[:1]))


def _top(name: str, dims: tuple, cls=Replicated, when=None, extra_state=None):
    return cls(mcore=name, hf=name, dims=dims, when=when, extra_state=extra_state)


TABLE = MappingTable(
    family="bert",
    layer_prefix="encoder.layers.{i}.",
    top=(
        # the word embedding first: a tied output layer's copy on the last stage is this entry
        _top("embedding.word_embeddings.weight", ("vocab", "hidden"), Vocab),
        _top("embedding.position_embeddings.weight", ("positions", "hidden")),
        _top("embedding.tokentype_embeddings.weight", ("tokentypes", "hidden"), when="tokentypes"),
        _top("encoder.final_layernorm.weight", ("hidden",)),
        _top("encoder.final_layernorm.bias", ("hidden",)),
        _top("pooler.dense.weight", ("hidden", "hidden"), when="binary_head"),
        _top("pooler.dense.bias", ("hidden",), when="binary_head"),
        _top("lm_head.dense.weight", ("hidden", "hidden")),
        _top("lm_head.dense.bias", ("hidden",)),
        _top("lm_head.layer_norm.weight", ("hidden",)),
        _top("lm_head.layer_norm.bias", ("hidden",)),
        _top("output_layer.weight", ("vocab", "hidden"), Vocab, when="untied"),
        # BertModel keeps the output layer's _extra_state in its sharded state dict (GPTModel drops it)
        _top("output_layer.bias", ("vocab",), Vocab, extra_state="output_layer"),
        _top("binary_head.weight", ("two", "hidden"), when="binary_head"),
        _top("binary_head.bias", ("two",), when="binary_head"),
    ),
    layer=(
        *_norm("self_attention.linear_qkv", "input_layernorm"),
        *_linear(Column, "self_attention.linear_qkv", ("qkv_rows", "hidden"), Column),
        *_linear(Row, "self_attention.linear_proj", ("hidden", "q_rows"), Replicated),
        *_norm("mlp.linear_fc1", "pre_mlp_layernorm"),
        *_linear(Column, "mlp.linear_fc1", ("ffn", "hidden"), Column),
        *_linear(Row, "mlp.linear_fc2", ("hidden", "ffn"), Replicated),
    ),
)
