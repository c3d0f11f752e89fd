"""torchrun script: Megatron-core's BertModel makes and checks Megatron BERT checkpoints (FORMATS.md §10).

    make   SPEC_JSON OUT TP PP      a random BertModel (local spec, CPU) at TP/PP, saved the way Megatron-LM
                                    saves it: legacy files (``state_dict()`` per rank, ``args`` with a Megatron
                                    enum, RNG state) under OUT/legacy and ``dist_checkpointing.save`` under
                                    OUT/torch_dist; then its MLM and NSP logits on a fixed batch, computed at
                                    TP/PP (the pipeline stages hand the hidden states on with send/recv),
                                    saved as OUT/logits.pt
    check  SPEC_JSON OUT KIND:CKPT:TP:PP [...]
                                    for each job, in one process group (data parallel fills the ranks a layout
                                    does not use): build the model at TP/PP; load CKPT (legacy: strict
                                    ``load_state_dict`` of this rank's file; torch_dist: ``dist_checkpointing.load``);
                                    load OUT/torch_dist (Megatron's own save) into a second model - Megatron
                                    reshards it itself - and compare every tensor (vocab rows past the true vocab
                                    excluded: padding is not data); then the logits of the loaded model against
                                    the source's at its own layout (OUT/logits.pt)

Prints ``OK job k rank r tp t pp p: n tensors equal`` per rank, and ``LOGITS job k ...: mlm max |d| = x, nsp
max |d| = y`` on the last stage.
"""

import json
import os
import sys
import warnings
from argparse import Namespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))

from tests import procgroup  # noqa: E402
from tests.referees import mcore  # noqa: E402
from tests.referees.mcore_ckpt import (ITERATION, count_equal, iter_dir, load_rank_file, padded_vocab,  # noqa: E402
                                       rank_dir, rng_state, save_both)

BATCH, SEQ = 2, 12


def config(spec, tp, pp):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=spec["num_layers"], hidden_size=spec["hidden_size"], num_attention_heads=spec["num_attention_heads"],
        kv_channels=spec["head_dim"], ffn_hidden_size=spec["ffn_hidden_size"], layernorm_epsilon=spec["norm_eps"],
        add_bias_linear=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32 if pp > 1 else None, params_dtype=torch.float32, use_cpu_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False,
    )


def build(spec, tp, pp):
    """This rank's BertModel stage, as Megatron-LM's pretrain_bert builds it (local spec)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel

    mcore.patch_cuda_for_cpu()
    mcore.init_model_parallel(tp, pp)
    with warnings.catch_warnings(), mcore.tensor_cuda_is_identity():
        warnings.simplefilter("ignore")
        return BertModel(
            config=config(spec, tp, pp), transformer_layer_spec=bert_layer_local_spec,
            vocab_size=padded_vocab(spec, tp), max_sequence_length=spec["max_position_embeddings"],
            num_tokentypes=spec["num_tokentypes"], add_binary_head=spec["binary_head"],
            share_embeddings_and_output_weights=spec["tie_word_embeddings"], parallel_output=True,
            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        )


def megatron_args(spec, tp, pp):
    from megatron.core.enums import ModelType

    return Namespace(
        num_layers=spec["num_layers"], hidden_size=spec["hidden_size"], ffn_hidden_size=spec["ffn_hidden_size"],
        num_attention_heads=spec["num_attention_heads"], kv_channels=spec["head_dim"],
        group_query_attention=False, padded_vocab_size=padded_vocab(spec, tp), make_vocab_size_divisible_by=128,
        swiglu=False, normalization="LayerNorm", norm_epsilon=spec["norm_eps"], add_bias_linear=True,
        untie_embeddings_and_output_weights=not spec["tie_word_embeddings"], bert_binary_head=spec["binary_head"],
        position_embedding_type="learned_absolute", max_position_embeddings=spec["max_position_embeddings"],
        seq_length=spec["max_position_embeddings"], tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        transformer_impl="local", spec=["local"], params_dtype=torch.float32, bf16=False, fp16=False,
        model_type=ModelType.encoder_or_decoder, iteration=100, ckpt_format="torch",
        tokenizer_type="BertWordPieceLowerCase",
    )


def perturb(model):
    """Norms at 1 and biases at 0 would hide a swap of two of them: move each by noise. Tensors every TP
    rank holds whole (norms, row-parallel biases, the heads, position embeddings) stay equal over TP, as in
    a real run: TP rank 0's values are broadcast."""
    from megatron.core import parallel_state as ps

    torch.manual_seed(1000 + ps.get_pipeline_model_parallel_rank() * 10 + ps.get_tensor_model_parallel_rank())
    group = ps.get_tensor_model_parallel_group()
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if not getattr(p, "tensor_model_parallel", False):
                dist.broadcast(p.data, src, group=group)


def batch(spec):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, spec["vocab_size"], (BATCH, SEQ), generator=g)
    types = torch.cat([torch.zeros(BATCH, SEQ // 2, dtype=torch.long), torch.ones(BATCH, SEQ - SEQ // 2,
                                                                                 dtype=torch.long)], 1)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -3:] = 0  # padding in the second sequence
    return tokens, (types if spec["num_tokentypes"] else None), mask


def logits(model, spec):
    """MLM logits ``[b, s, vocab]`` (true vocab) and NSP logits on the last stage (None elsewhere): the
    stages run in turn, each sending its hidden states ``[s, b, h]`` to the next."""
    from megatron.core import parallel_state as ps

    tokens, types, mask = batch(spec)
    p, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    model.eval()
    with torch.no_grad():
        if p > 0:
            hidden = torch.empty(SEQ, BATCH, spec["hidden_size"])
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(tokens, mask, tokentype_ids=types)
        if p < pp - 1:
            dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None, None
        mlm, nsp = out
        group = ps.get_tensor_model_parallel_group()
        parts = [torch.empty_like(mlm) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mlm.contiguous(), group=group)
        return torch.cat(parts, -1)[..., :spec["vocab_size"]], nsp


def make(spec, out, tp, pp):
    from megatron.core import parallel_state as ps

    torch.manual_seed(1234)
    model = build(spec, tp, pp)
    perturb(model)
    t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    d = rank_dir(t, p, pp)
    args = megatron_args(spec, tp, pp)
    common = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION}
    save_both(out, d, dict(common, model=model.state_dict(), rng_state=rng_state()),
              dict(common, model=model.sharded_state_dict()))
    mlm, nsp = logits(model, spec)
    if mlm is not None and t == 0:
        torch.save({"mlm": mlm, "nsp": nsp, "layout": [tp, pp]}, os.path.join(out, "logits.pt"))
    dist.barrier()
    mcore.rank_print(f"made {d}")


def load_megatron(model, ckpt):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
    model.load_state_dict(state["model"], strict=True)


def check(spec, out, kind, ckpt, tp, pp, job):
    from megatron.core import parallel_state as ps

    got = build(spec, tp, pp)
    t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    if kind == "legacy":
        state = load_rank_file(ckpt, rank_dir(t, p, pp))
        a = state["args"]
        assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (tp, pp), (tp, pp)
        assert a.padded_vocab_size == padded_vocab(spec, tp) and a.bert_binary_head == spec["binary_head"]
        got.load_state_dict(state["model"], strict=True)
    else:
        load_megatron(got, iter_dir(ckpt))
    want = build(spec, tp, pp)
    load_megatron(want, iter_dir(os.path.join(out, "torch_dist")))
    rows = padded_vocab(spec, tp) // tp
    real = max(0, min(rows, spec["vocab_size"] - t * rows))
    n = count_equal(got.state_dict(), want.state_dict(), real, f"job {job} rank {dist.get_rank()} (tp {t} pp {p})")
    assert n > 0
    mcore.say(f"OK job {job} rank {dist.get_rank()} tp {t} pp {p}: {n} tensors equal")
    mlm, nsp = logits(got, spec)
    if mlm is not None:
        ref = torch.load(os.path.join(out, "logits.pt"))
        assert (nsp is None) == (ref["nsp"] is None) == (not spec["binary_head"])
        dm = (mlm - ref["mlm"]).abs().max().item()
        dn = (nsp - ref["nsp"]).abs().max().item() if nsp is not None else 0.0
        assert dm < 1e-4 and dn < 1e-4, (dm, dn)
        head = f"nsp {tuple(nsp.shape)} max |d| = {dn:.2e}" if nsp is not None else "no binary head"
        mcore.say(f"LOGITS job {job} rank {dist.get_rank()} tp {t} pp {p}: mlm {tuple(mlm.shape)} max |d| = {dm:.2e}, "
                  f"{head} (vs the source at tp {ref['layout'][0]} pp {ref['layout'][1]})")


def main():
    procgroup.init_gloo()
    mode = sys.argv[1]
    with open(sys.argv[2]) as f:
        spec = json.load(f)
    if mode == "make":
        make(spec, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        for k, item in enumerate(sys.argv[4:]):
            kind, ckpt, tp, pp = item.split(":")
            check(spec, sys.argv[3], kind, ckpt, int(tp), int(pp), k)
            dist.barrier()
    dist.barrier()
    procgroup.finish()


if __name__ == "__main__":
    main()
