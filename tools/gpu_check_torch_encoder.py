"""GPU check for TorchEncoder: padding effect with trained weights, timings, capture cost, memory."""
import sys, time, statistics
sys.path.insert(0, '.'); sys.path.insert(0, 'tests')
import torch
from abm_rt.engine_dir import load_engine, default_engine_path
from abm_rt.backends.torch_backend import TorchEncoder
from abm_rt.data.buckets import pad_batch
from conftest import random_ink_image

print(torch.__version__, torch.cuda.get_device_name(0), "cudnn.allow_tf32", torch.backends.cudnn.allow_tf32)
eng = load_engine(default_engine_path())
model = eng.model.cuda().eval()

def batch(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pad_batch([random_ink_image(h, w, gen, strokes=20)[0, 0].numpy() for h, w in sizes], multiple=16)

def vrel(a, ref, mask):
    valid = mask[:, None].expand_as(ref)
    return float((a - ref).abs()[valid].max() / ref.abs()[valid].max())

# 1. bucket padding effect, trained weights, fp32 without TF32
torch.backends.cudnn.allow_tf32 = False
exact = TorchEncoder(model, "cuda", cuda_graphs=False)
buck = TorchEncoder(model, "cuda", cuda_graphs=False, bucket_pad=True)
cases = {"4 mixed": [(47, 129), (33, 251), (94, 97), (20, 333)], "1 x 60x200": [(60, 200)],
         "1 x 100x400": [(100, 400)], "1 x 50x130": [(50, 130)], "8 x ~90x250": [(90 + i, 240 + 3 * i) for i in range(8)]}
for name, sizes in cases.items():
    errs = []
    for seed in range(3):
        x, pm = batch(sizes, seed)
        f0, m0 = exact.encode(x, pm); f1, _ = buck.encode(x, pm)
        errs.append(vrel(f1, f0, m0))
    x, pm = batch(sizes)
    print(f"trained model, bucket padding {tuple(x.shape)} -> {buck.bucket_shape(x.shape[0], *x.shape[2:])}: "
          f"max rel diff on valid cells {max(errs):.2e} (3 seeds)")
# fp16 error vs fp32 (trained weights)
for bp in (False, True):
    e16 = TorchEncoder(model, "cuda", precision="fp16", bucket_pad=bp)
    e32 = TorchEncoder(model, "cuda", cuda_graphs=False, bucket_pad=bp)
    x, pm = batch(cases["8 x ~90x250"])
    f16, m = e16.encode(x, pm); f32, _ = e32.encode(x, pm)
    print(f"trained model fp16 (graphs, bucket_pad={bp}) vs fp32: max rel err {vrel(f16, f32, m):.2e}")
torch.backends.cudnn.allow_tf32 = True

# 2. timings (default TF32 setting)
def timeit(fn, n=30):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3, min(ts) * 1e3

for name, sizes in (("8 x 94x256", [(94, 256)] * 8), ("1 x 94x256", [(94, 256)]), ("32 x 94x256", [(94, 256)] * 32)):
    x, pm = batch(sizes)
    variants = {
        "reference model.encode": lambda: model.encode(x.cuda(), pm.cuda()),
        "folded eager fp32 NCHW": TorchEncoder(model, "cuda", channels_last=False, cuda_graphs=False),
        "folded eager fp32 NHWC": TorchEncoder(model, "cuda", cuda_graphs=False),
        "graphs fp32 NHWC": TorchEncoder(model, "cuda"),
        "graphs fp32 NCHW": TorchEncoder(model, "cuda", channels_last=False),
        "folded eager fp16 NHWC": TorchEncoder(model, "cuda", precision="fp16", cuda_graphs=False),
        "graphs fp16 NHWC": TorchEncoder(model, "cuda", precision="fp16"),
        "graphs fp16 NCHW": TorchEncoder(model, "cuda", precision="fp16", channels_last=False),
    }
    for vname, v in variants.items():
        fn = v if callable(v) and not isinstance(v, TorchEncoder) else (lambda v=v: v.encode(x, pm))
        with torch.inference_mode():
            med, mn = timeit(fn)
        print(f"{name:12s} {vname:26s} median {med:7.2f} ms  min {mn:7.2f} ms")

# 3. capture cost and memory for many buckets
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
enc = TorchEncoder(model, "cuda", precision="fp16")
caps = []
for b in (1, 2, 4, 8, 16, 32):
    for h, w in ((64, 256), (128, 512)):
        x, pm = batch([(h - 5, w - 7)] * b)
        torch.cuda.synchronize(); t = time.perf_counter(); enc.encode(x, pm); torch.cuda.synchronize()
        caps.append((b, h, w, (time.perf_counter() - t) * 1e3))
print("first call (warmup + capture + replay) ms:", [(b, h, w, round(ms)) for b, h, w, ms in caps])
print(f"{len(enc._graphs)} fp16 graphs: allocated {(torch.cuda.memory_allocated() - base) / 2**20:.0f} MiB, "
      f"reserved {torch.cuda.memory_reserved() / 2**20:.0f} MiB, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
print(enc.describe())
