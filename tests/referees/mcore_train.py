"""torchrun script: Megatron-core trains a tiny GPT with its distributed optimizer on CPU (gloo) and is the
referee of optimizer-state resharding (FORMATS.md §8).

    make   SPEC_JSON OUT TP     a random GPTModel (local spec) at TP, data parallel over the other ranks,
                                wrapped in Megatron-core's DistributedDataParallel and DistributedOptimizer
                                (Adam), trained 2 steps on a fixed global batch; saved with
                                ``dist_checkpointing.save`` as ``fully_reshardable`` (OUT/torch_dist,
                                iteration 2, args and iteration in the common state); then one more step,
                                whose loss goes to OUT/step3.json
    check  SPEC_JSON OUT CKPT TP
                                the same model and optimizer at TP (data parallel over the rest): CKPT
                                loaded with Megatron's own loading code (model and optimizer), OUT/torch_dist
                                loaded the same way into a second copy (Megatron reshards its own save);
                                every optimizer tensor (master weight, exp_avg, exp_avg_sq) and the step
                                compared (vocab padding rows excluded), then one more step on each, whose
                                losses are printed beside the source's third step (they differ where the
                                padding rows do: Megatron's softmax runs over the padded vocab)

Megatron-core 0.19.2 assumes CUDA in its DDP and optimizer; :func:`cpu_patches` maps what it needs
onto the CPU (tensor type names, streams, ``device='cuda'``).
"""

import contextlib
import functools
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))

from tests import procgroup  # noqa: E402
from tests.referees import mcore  # noqa: E402
from tests.referees.mcore_ckpt import megatron_args, padded_vocab  # noqa: E402

GLOBAL_BATCH, SEQ = 4, 12
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def cpu_patches():
    class _Stream:
        def wait_stream(self, *a):
            pass

        def synchronize(self):
            pass

    def on_cpu(fn):
        @functools.wraps(fn)
        def wrapped(*a, **k):
            if "cuda" in str(k.get("device", "")):
                k["device"] = "cpu"
            return fn(*a, **k)
        return wrapped

    for name in ("tensor", "empty", "zeros", "ones", "full", "arange"):
        setattr(torch, name, on_cpu(getattr(torch, name)))
    orig_type = torch.Tensor.type

    def cuda_type(self, *a, **k):  # Megatron checks param.type() == 'torch.cuda.FloatTensor'
        r = orig_type(self, *a, **k)
        return r.replace("torch.", "torch.cuda.", 1) if not a and not k and not r.startswith("torch.cuda") else r

    torch.Tensor.type = cuda_type
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.current_stream = lambda *a, **k: _Stream()
    torch.cuda.Stream = lambda *a, **k: _Stream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.empty_cache = lambda: None
    mcore.patch_cuda_for_cpu()
    fix_step_on_load()


def fix_step_on_load():
    """megatron-core 0.19.2 with torch's Adam: ``load_state_dict`` puts the param groups' ``step`` into the
    Adam state, then ``_set_main_param_and_optimizer_states`` copies every state tensor from the file's,
    which has no ``step`` (KeyError). The step already in the state is kept (FORMATS.md §8)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    orig = DistributedOptimizer._set_main_param_and_optimizer_states

    def keep_step(self, model_param, tensors):
        if "step" not in tensors:
            g, j = self.model_param_group_index_map[model_param]
            st = self.optimizer.state[self.optimizer.param_groups[g]["params"][j]]
            if "step" in st:
                tensors = dict(tensors, step=st["step"].clone())
        return orig(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = keep_step


def build(spec, tp):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    torch.manual_seed(1234)
    model = mcore.build_gpt(spec, tp, 1, padded_vocab(spec, tp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            use_distributed_optimizer=True, overlap_grad_reduce=False, bucket_size=None), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01,
                                                     use_distributed_optimizer=True, bf16=False, fp16=False,
                                                     params_dtype=torch.float32), [ddp])
    return model, ddp, opt


def step(model, ddp, opt, spec, k):
    """One Adam step on this data-parallel rank's share of global batch ``k``; returns the global mean loss."""
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(100 + k)
    tokens = torch.randint(0, spec["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=g)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = GLOBAL_BATCH // dp
    x, y = tokens[r * n:(r + 1) * n, :-1], tokens[r * n:(r + 1) * n, 1:]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = model(x, torch.arange(SEQ).unsqueeze(0).expand(n, -1), None, labels=y).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok
    total = loss.detach().clone()
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return total.item() / dp


def sharded(model, opt, loading=False):
    state = {"model": model.sharded_state_dict()}
    # is_loading: a fresh optimizer's Adam state is initialised first, as Megatron-LM's loader does
    state["optimizer"] = opt.sharded_state_dict(state["model"], is_loading=loading, metadata=SHARDING)
    return state


def make(spec, out, tp):
    from megatron.core import dist_checkpointing

    model, ddp, opt = build(spec, tp)
    losses = [step(model, ddp, opt, spec, k) for k in range(2)]
    state = sharded(model, opt)
    state.update(args=megatron_args(spec, tp, 1, 0, padded_vocab(spec, tp)), iteration=2, checkpoint_version=3.0)
    state["args"].iteration = 2
    d = os.path.join(out, "torch_dist", "iter_0000002")
    os.makedirs(d, exist_ok=True)
    dist_checkpointing.save(state, d, content_metadata=SHARDING)
    losses.append(step(model, ddp, opt, spec, 2))
    if dist.get_rank() == 0:
        with open(os.path.join(out, "torch_dist", "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("2")
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump({"losses": losses, "tp": tp, "dp": dist.get_world_size() // tp}, f)
    dist.barrier()
    mcore.say(f"made tp {tp} dp {dist.get_world_size() // tp}: losses {losses}")


def load(model, opt, ckpt):
    from megatron.core import dist_checkpointing

    # megatron-core 0.19.2 with torch's Adam (no TE/apex): state_dict() needs one 'step' in the state, which
    # its init_state_fn does not set (FORMATS.md §8): a fresh optimizer gets zero moments and step 0 first
    inner = opt.optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            if not inner.state[p]:
                inner.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                      step=torch.tensor(0.0))
    request = sharded(model, opt, loading=True)
    for st in inner.state.values():  # its loader copies every tensor of the state from the file's, which has no step
        st.pop("step", None)
    state = dist_checkpointing.load(request, ckpt)
    model.load_state_dict(state["model"], strict=True)
    with torch.no_grad():
        opt.load_state_dict(state["optimizer"])


def optimizer_tensors(model, opt, spec):
    """This rank's shard of the optimizer, per model parameter: ``(name, [(what, tensor)], step)`` with the
    master weight and Adam moments, vocab padding rows left out (padding is not data: they differ whenever
    the padded vocab does)."""
    from megatron.core import parallel_state as ps

    o = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    tp, t = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    out = []
    for name, mp in model.named_parameters():
        if mp not in o.model_param_group_index_map:
            continue
        g, j = o.model_param_group_index_map[mp]
        main = o.optimizer.param_groups[g]["params"][j]
        st = o.optimizer.state[main]
        r = o._get_model_param_range_map(mp)["param"]
        keep = torch.ones(r.end - r.start, dtype=torch.bool)
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            rows = mp.shape[0]
            global_row = t * rows + torch.arange(r.start, r.end) // mp.shape[1]
            keep = global_row < spec["vocab_size"]
        out.append((name, [(w, x.detach().flatten()[keep]) for w, x in
                           (("master weight", main), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"]))],
                    st.get("step")))
    assert tp >= 1 and out
    return out


def iter_dir(ckpt):
    from tests.referees.mcore_ckpt import iter_dir as d

    return d(ckpt)


def check(spec, out, ckpt, tp):
    from megatron.core import parallel_state as ps

    got = build(spec, tp)
    load(got[0], got[2], iter_dir(ckpt))
    want = build(spec, tp)
    load(want[0], want[2], iter_dir(os.path.join(out, "torch_dist")))
    n = 0
    for (name, xs, s), (name2, ys, s2) in zip(optimizer_tensors(got[0], got[2], spec),
                                             optimizer_tensors(want[0], want[2], spec)):
        assert name == name2
        for (what, a), (_, b) in zip(xs, ys):
            if a.shape != b.shape or not torch.equal(a, b):
                raise AssertionError(f"rank {dist.get_rank()}: {name} {what} differs")
            n += 1
        assert float(s) == float(s2) == 2.0, (s, s2)
    assert n > 0
    t, d = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    mcore.say(f"OK rank {dist.get_rank()} tp {t} dp {d}: {n} optimizer tensors equal, step 2")
    ours, megatron = step(*got, spec, 2), step(*want, spec, 2)
    with open(os.path.join(out, "losses.json")) as f:
        src = json.load(f)
    mcore.say(f"STEP rank {dist.get_rank()} tp {t} dp {d}: loss {ours:.7f} (Megatron's own resharding "
              f"{megatron:.7f}; the source at tp {src['tp']} dp {src['dp']}: {src['losses'][2]:.7f})")


def main():
    cpu_patches()
    procgroup.init_gloo()
    mode = sys.argv[1]
    with open(sys.argv[2]) as f:
        spec = json.load(f)
    if mode == "make":
        make(spec, sys.argv[3], int(sys.argv[4]))
    else:
        check(spec, sys.argv[3], sys.argv[4], int(sys.argv[5]))
    dist.barrier()
    # Megatron-core's DDP and optimizer keep references to the gloo groups in module state that
    # destroy_model_parallel does not clear; its result is written, so leave without the interpreter's
    # teardown of those groups (procgroup.finish would report the threads they still run); dist_checkpointing's
    # writer started a multiprocessing manager, which would outlive the rank holding its stdout
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
        child.join(10)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
