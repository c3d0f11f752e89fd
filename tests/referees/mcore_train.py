"""torchrun script: Megatron-core trains a tiny GPT with its distributed optimizer on CPU (gloo) and is the
referee of optimizer-state resharding (FORMATS.md §8).

    make   SPEC_JSON OUT TP [PP]
                                a random GPTModel (local spec) at TP, data parallel over the other ranks,
                                wrapped in Megatron-core's DistributedDataParallel and DistributedOptimizer
                                (Adam) with its OptimizerParamScheduler, trained 2 steps on a fixed global
                                batch; saved at iteration 2 three ways (see :func:`make`); then one more
                                step, whose loss goes to OUT/losses.json and whose weights to OUT/step3
    check  SPEC_JSON OUT CKPT:TP[:MULTIPLE[:PP]] ...
                                per job, in one process group: the same model and optimizer at TP (data
                                parallel over the rest, vocab padded to MULTIPLE*TP); CKPT loaded with
                                Megatron's own loading code (model, optimizer, scheduler), OUT/torch_dist
                                loaded the same way into a second copy (Megatron reshards its own save);
                                every optimizer tensor (master weight, exp_avg, exp_avg_sq) and the step
                                compared (vocab padding rows excluded); then one more step on each: the
                                losses beside the source's third step, the updated weights against the
                                second copy's and against the source's own third step (OUT/step3)

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
DP_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}
BF16 = {"on": False}  # make_nd16: bf16 weights, Float16OptimizerWithFloat16Params with fp32 masters


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


def build(spec, tp, multiple=128, pp=1, distributed=True):
    """Model, DDP and optimizer at TP (data parallel over the other ranks); the vocab padded to a multiple
    of ``multiple * tp`` (Megatron's --make-vocab-size-divisible-by)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    torch.manual_seed(1234)
    m = multiple * tp
    dtype = torch.bfloat16 if BF16["on"] else torch.float32
    model = mcore.build_gpt(spec, tp, pp, -(-spec["vocab_size"] // m) * m, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            use_distributed_optimizer=distributed, overlap_grad_reduce=False, bucket_size=None,
            grad_reduce_in_fp32=BF16["on"]), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01,
                                                     use_distributed_optimizer=distributed, bf16=BF16["on"], fp16=False,
                                                     params_dtype=dtype), [ddp])
    return model, ddp, opt


def scheduler(opt):
    """Megatron-core's learning-rate / weight-decay scheduler, constant (the losses do not depend on it); its
    state (the samples it has seen) is what a resumed run continues from."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(opt, init_lr=1e-2, max_lr=1e-2, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=100,
                                   lr_decay_style="constant", start_wd=0.01, end_wd=0.01, wd_incr_steps=100,
                                   wd_incr_style="constant")


def step(model, ddp, opt, spec, k):
    """One Adam step on this data-parallel rank's share of global batch ``k``; returns the global mean loss."""
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(100 + k)
    tokens = torch.randint(0, spec["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=g)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = GLOBAL_BATCH // dp
    x, y = tokens[r * n:(r + 1) * n, :-1], tokens[r * n:(r + 1) * n, 1:]
    pos = torch.arange(SEQ).unsqueeze(0).expand(n, -1)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        loss = model(x, pos, None, labels=y).float().mean()
        loss.backward()
    else:  # Megatron's own 1F1B schedule: activations and gradients sent between the stages (gloo p2p)
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data, m):
            a, b = next(data)
            return m(a, pos, None, labels=b), lambda out: (out.float().mean(), {"loss": out.float().mean().detach()})

        out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([(x, y)]), model=[ddp],
                                          num_microbatches=1, seq_length=SEQ, micro_batch_size=n, forward_only=False)
        loss = out[0]["loss"] if out else torch.zeros(())
        last = ps.get_pipeline_model_parallel_last_rank()  # the loss lives on the last stage
        loss = loss.detach().clone().reshape(())
        dist.broadcast(loss, last, group=ps.get_pipeline_model_parallel_group())
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


def make(spec, out, tp, pp=1, distributed=True):
    """Train 2 steps, then save the same state three ways: torch_dist ``fully_reshardable`` (OUT/torch_dist),
    torch_dist ``dp_reshardable`` (OUT/torch_dist_dp, Megatron-LM's default) and legacy (OUT/legacy: each
    model-parallel rank's ``model_optim_rng.pt`` with the optimizer's ``state_dict()``, and its
    ``distrib_optim.pt`` from ``save_parameter_state``, as Megatron-LM's ``save_checkpoint`` writes them)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    model, ddp, opt = build(spec, tp, pp=pp, distributed=distributed)
    sched = scheduler(opt)
    losses = []
    for k in range(2):
        losses.append(step(model, ddp, opt, spec, k))
        sched.step(increment=GLOBAL_BATCH)
    dp = dist.get_world_size() // (tp * pp)
    args = megatron_args(spec, tp, pp, 0, padded_vocab(spec, tp))
    args.iteration, args.use_distributed_optimizer, args.data_parallel_size = 2, distributed, dp
    args.bf16, args.params_dtype, args.accumulate_allreduce_grads_in_fp32 = BF16["on"], model.config.params_dtype, BF16["on"]
    args.world_size, args.overlap_grad_reduce, args.ddp_bucket_size = dist.get_world_size(), False, None
    args.consumed_train_samples, args.global_batch_size = 2 * GLOBAL_BATCH, GLOBAL_BATCH
    for name, sharding in (("torch_dist", SHARDING), ("torch_dist_dp", DP_SHARDING))[:2 if distributed else 1]:
        state = {"model": model.sharded_state_dict()}
        state["optimizer"] = opt.sharded_state_dict(state["model"], metadata=sharding)
        state.update(args=args, iteration=2, checkpoint_version=3.0, opt_param_scheduler=sched.state_dict())
        d = os.path.join(out, name, "iter_0000002")
        os.makedirs(d, exist_ok=True)
        dist_checkpointing.save(state, d, content_metadata=sharding)
    t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    d = os.path.join(out, "legacy", "iter_0000002", f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
    os.makedirs(d, exist_ok=True)
    legacy = {"args": args, "checkpoint_version": 3.0, "iteration": 2, "model": model.state_dict(),
              "optimizer": opt.state_dict(), "opt_param_scheduler": sched.state_dict(),
              "rng_state": [{"torch_rng_state": torch.get_rng_state()}]}
    if ps.get_data_parallel_rank() == 0:
        torch.save(legacy, os.path.join(d, "model_optim_rng.pt"))
    if distributed:
        opt.save_parameter_state(os.path.join(d, "distrib_optim.pt"))  # gathers the DP shards on DP rank 0
    losses.append(step(model, ddp, opt, spec, 2))
    # the weights after that third step, the reference for the step taken after a conversion
    d = os.path.join(out, "step3", "iter_0000003")
    os.makedirs(d, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "iteration": 3}, d)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "step3", "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("3")
        for name in ("torch_dist", "torch_dist_dp", "legacy") if distributed else ("torch_dist", "legacy"):
            with open(os.path.join(out, name, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("2")
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump({"losses": losses, "tp": tp, "pp": pp, "dp": dp, "distributed": distributed, "bf16": BF16["on"]}, f)
    dist.barrier()
    mcore.say(f"made tp {tp} pp {pp} dp {dp}: losses {losses}")


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
    # megatron-core 0.19.2 with torch's Adam gives every parameter one shared step tensor on load, so the
    # k-th parameter would step as 3 + k (FORMATS.md §8): each gets its own, as an unbroken run has
    for st in inner.state.values():
        if "step" in st:
            st["step"] = st["step"].clone()


def load_legacy(model, opt, ckpt):
    """Megatron-LM's legacy load, by Megatron-core's own methods: this rank's ``model_optim_rng.pt`` (the model,
    strict, and the optimizer's ``state_dict``), then ``load_parameter_state`` of its ``distrib_optim.pt``
    (read on DP rank 0, scattered over the DP group). Returns the rank file's object."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    d = os.path.join(ckpt, f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
                     + (f"_{ps.get_pipeline_model_parallel_rank():03d}" if pp > 1 else ""))
    state = torch.load(os.path.join(d, "model_optim_rng.pt"), weights_only=False)
    model.load_state_dict(state["model"], strict=True)
    inner = opt.optimizer
    for group in inner.param_groups:  # torch's Adam state as a run that took steps has it (FORMATS.md §8)
        for p in group["params"]:
            if not inner.state[p]:
                inner.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                      step=torch.tensor(0.0))
    with torch.no_grad():
        opt.load_state_dict(state["optimizer"])
        if os.path.exists(os.path.join(d, "distrib_optim.pt")):
            opt.load_parameter_state(os.path.join(d, "distrib_optim.pt"))
    for st in inner.state.values():
        if "step" in st:
            st["step"] = st["step"].clone()
    return state


def optimizer_tensors(model, opt, spec):
    """This rank's shard of the optimizer, per model parameter: ``(name, [(what, tensor)], step)`` with the
    master weight and Adam moments, vocab padding rows left out (padding is not data: they differ whenever
    the padded vocab does)."""
    from megatron.core import parallel_state as ps

    o = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    tp, t = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    out = []
    for name, mp in model.named_parameters():
        if hasattr(o, "model_param_group_index_map"):  # the distributed optimizer: this DP rank's range
            if mp not in o.model_param_group_index_map:
                continue
            g, j = o.model_param_group_index_map[mp]
            main = o.optimizer.param_groups[g]["params"][j]
            r = o._get_model_param_range_map(mp)["param"]
            start, end = r.start, r.end
        elif hasattr(o, "float16_groups"):  # Float16Optimizer: the fp32 master beside the bf16 parameter
            g, j = next((g, j) for g, ps in enumerate(o.float16_groups) for j, q in enumerate(ps) if q is mp)
            main, start, end = o.fp32_from_float16_groups[g][j], 0, mp.numel()
        else:  # FP32Optimizer: the model parameter is the master weight, its whole state on every DP rank
            main, start, end = mp, 0, mp.numel()
        st = o.optimizer.state[main]
        r = range(start, end)
        keep = torch.ones(end - start, dtype=torch.bool)
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            rows = mp.shape[0]
            global_row = t * rows + torch.arange(r.start, r.stop) // mp.shape[1]
            keep = global_row < spec["vocab_size"]
        out.append((name, [(w, x.detach().flatten()[keep]) for w, x in
                           (("master weight", main), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"]))],
                    st.get("step")))
    assert tp >= 1 and out
    return out


def iter_dir(ckpt):
    from tests.referees.mcore_ckpt import iter_dir as d

    return d(ckpt)


def check(spec, out, ckpt, tp, multiple=128, pp=1, job=0):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    with open(os.path.join(out, "losses.json")) as f:
        made = json.load(f)
    distributed, BF16["on"] = made.get("distributed", True), made.get("bf16", False)
    got = build(spec, tp, multiple, pp, distributed)
    legacy = any(x.startswith("mp_rank_") for x in os.listdir(iter_dir(ckpt)))
    if legacy:
        common = load_legacy(got[0], got[2], iter_dir(ckpt))
    else:
        load(got[0], got[2], iter_dir(ckpt))
        common = dist_checkpointing.load_common_state_dict(iter_dir(ckpt))
    want = build(spec, tp, multiple, pp, distributed)
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
    t, d, q = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    mcore.say(f"OK job {job} rank {dist.get_rank()} tp {t} pp {q} dp {d}: {n} optimizer tensors equal, step 2")
    # the training state beside the tensors, loaded by Megatron's own code: scheduler, iteration, consumed samples
    sched = scheduler(got[2])
    sched.load_state_dict(common["opt_param_scheduler"])
    mcore.say(f"STATE job {job} rank {dist.get_rank()}: {'legacy' if legacy else 'torch_dist'}, iteration {common['iteration']}, scheduler num_steps {sched.num_steps}, "
              f"consumed_train_samples {getattr(common['args'], 'consumed_train_samples', None)}")
    ours, megatron = step(*got, spec, 2), step(*want, spec, 2)
    with open(os.path.join(out, "losses.json")) as f:
        src = json.load(f)
    mcore.say(f"STEP job {job} rank {dist.get_rank()} tp {t} pp {q} dp {d}: loss {ours:.7f} (Megatron's own resharding "
              f"{megatron:.7f}; the source at tp {src['tp']} pp {src['pp']} dp {src['dp']}: {src['losses'][2]:.7f})")
    # the weights that step gave: against Megatron's own resharding (the same step on the same state: equal) and
    # against the source's own third step, resharded by Megatron (other TP/DP: float sums in another order)
    m = multiple * tp
    ref = mcore.build_gpt(spec, tp, pp, -(-spec["vocab_size"] // m) * m, dtype=torch.bfloat16 if BF16["on"] else torch.float32)
    state = dist_checkpointing.load({"model": ref.sharded_state_dict()}, iter_dir(os.path.join(out, "step3")))
    ref.load_state_dict(state["model"], strict=True)
    same, worst, k = 0, 0.0, 0
    ps_ref = dict(ref.named_parameters())
    for (name, a), (_, b) in zip(got[0].named_parameters(), want[0].named_parameters()):
        a, b, c = a.detach(), b.detach(), ps_ref[name].detach()
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            real = max(0, min(a.shape[0], spec["vocab_size"] - t * a.shape[0]))
            a, b, c = a[:real], b[:real], c[:real]
        same += int(torch.equal(a, b))
        worst = max(worst, (a - c).abs().max().item() if a.numel() else 0.0)
        k += 1
    mcore.say(f"WEIGHTS job {job} rank {dist.get_rank()} tp {t} pp {q} dp {d}: {same} of {k} updated weights equal to Megatron's own "
              f"resharding's; max |d| vs the source's step 3 {worst:.2e}")


def main():
    cpu_patches()
    procgroup.init_gloo()
    mode = sys.argv[1]
    with open(sys.argv[2]) as f:
        spec = json.load(f)
    if mode in ("make", "make_nd", "make_nd16"):  # make_nd: the non-distributed optimizer (no torch_dist_dp, no
        BF16["on"] = mode == "make_nd16"          # distrib_optim.pt); make_nd16: in bf16 (Float16Optimizer)
        make(spec, sys.argv[3], *map(int, sys.argv[4:6]), distributed=mode == "make")
    else:
        for k, job in enumerate(sys.argv[4:]):  # one process group for every job
            parts = job.split(":")  # CKPT:TP[:MULTIPLE[:PP]]
            ckpt, tp, multiple, pp = parts + ["128", "1"][len(parts) - 2:]
            check(spec, sys.argv[3], ckpt, int(tp), int(multiple), int(pp), job=k)
            dist.barrier()
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
