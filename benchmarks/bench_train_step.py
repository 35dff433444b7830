"""Training-step speed on the GPU with and without --compile-step / --attention-fp32: checks compiled vs
eager gradients on full-size batches (fp32), then times bf16 optimizer steps and counts compiled graphs over
four batch shapes for each option combination. Run on the device: TORCH_LOGS=recompiles python3 benchmarks/bench_train_step.py"""
import os, sys, time, json
sys.path.insert(0, ".")
import torch
from torch._dynamo.utils import counters
from abm_rt.model import ABM, ModelConfig, initialize
from training.trainer import TrainConfig, batch_loss
from training.losses import teacher_tensors
from training.packed import PackedBatch

dev = torch.device(os.environ.get("DEV", "cuda"))
print(torch.__version__, torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", flush=True)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
torch.backends.cudnn.benchmark = False
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

def batch(B, H, W, T, seed):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randint(H // 2, H + 1, (B,), generator=g); ws = torch.randint(W // 2, W + 1, (B,), generator=g)
    hs[0], ws[-1] = H, W
    img = torch.zeros(B, 1, H, W, dtype=torch.uint8)
    for i in range(B):
        img[i, 0, :hs[i], :ws[i]] = (torch.rand(int(hs[i]), int(ws[i]), generator=g) > 0.85) * 255
    n = torch.randint(max(1, T // 3), T, (B,), generator=g); n[0] = T - 1
    labels = [torch.randint(2, 111, (int(k),), generator=g).tolist() for k in n]
    tt = {k: v.to(dev) for k, v in teacher_tensors(labels).items()}
    return PackedBatch(img.to(dev), hs.to(dev), ws.to(dev), tt["lengths"], tt["l2r_in"], tt["l2r_tgt"],
                       tt["r2l_in"], tt["r2l_tgt"], [""] * B, [[]] * B)

def graphs():
    return counters["stats"]["unique_graphs"]

mcfg = ModelConfig(**json.loads(os.environ.get("MCFG", "{}")))
torch.manual_seed(0)
model = ABM(mcfg, bidirectional=True); initialize(model); model.to(dev).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")

def train_step(b, cfg):
    loss, parts = batch_loss(model, b, cfg, dev.type)
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0); opt.step()

# 1. correctness on CUDA, fp32, TF32 off: compiled vs eager losses and all grads
torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
for shape in json.loads(os.environ.get("CHECK", "[[16, 96, 320, 20], [24, 128, 384, 25]]")):
    b = batch(*shape, seed=1)
    res = []
    for cs in (False, True):
        model.zero_grad(set_to_none=True); torch.manual_seed(0)
        t0 = time.time()
        loss, parts = batch_loss(model, b, TrainConfig(precision="fp32", compile_step=cs), dev.type); loss.backward()
        sync()
        res.append((parts.clone(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, time.time() - t0))
    (p0, g0, _), (p1, g1, tc) = res
    worst = max(float((g0[k] - g1[k]).abs().max() / g0[k].abs().max().clamp(min=1e-12)) for k in g0)
    print(f"fp32 check {shape}: parts {p0.tolist()} vs {p1.tolist()}; worst grad rel err {worst:.2e}; "
          f"compiled first call {tc:.1f}s; graphs so far {graphs()}", flush=True)
torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True

# 2. bf16 timing: ms per optimizer step, first call (compile) separately, graphs added per shape
shapes = json.loads(os.environ.get("SHAPES", "[[126, 128, 512, 40], [120, 160, 640, 50], [12, 256, 1024, 60], [100, 96, 384, 30]]"))
bs = [batch(*s, seed=i + 2) for i, s in enumerate(shapes)]
variants = json.loads(os.environ.get("VARIANTS", '[[false,false],[false,true],[true,false],[true,true]]'))
for att32, cs in variants:
    cfg = TrainConfig(precision="bf16", attention_fp32=att32, compile_step=cs)
    out = []
    for s, b in zip(shapes, bs):
        g_before = graphs()
        sync(); t0 = time.time(); train_step(b, cfg); sync(); first = time.time() - t0
        t0 = time.time()
        for _ in range(3):
            train_step(b, cfg)
        sync(); per = (time.time() - t0) / 3
        out.append(f"{s}: first {first:.1f}s, {per * 1e3:.0f} ms/step, +{graphs() - g_before} graphs")
    print(f"attention_fp32={att32} compile_step={cs}: " + " | ".join(out), flush=True)
print("counters", {k: dict(v) for k, v in counters.items() if k in ("stats", "aot_autograd")}, flush=True)
if dev.type == "cuda": print("max mem GiB", torch.cuda.max_memory_allocated() / 2**30)
