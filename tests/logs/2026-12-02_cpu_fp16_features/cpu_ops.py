import time, torch
from abm_rt.decode import native
from abm_rt.engine_dir import load_engine, default_engine_path
_C = native.load_extension()
torch.manual_seed(0)
N=160
for dt in ("fp32","fp16","int8"):
    w=torch.randn(768,684)/26; p=native.pack_linear(w, torch.randn(768), dt, "cpu")
    x=torch.randn(N,684); y=torch.empty(N,768)
    for _ in range(3): _C.linear(p.lin, x.data_ptr(), y.data_ptr(), N, False, "cpu", 0)
    t=time.perf_counter()
    for _ in range(20): _C.linear(p.lin, x.data_ptr(), y.data_ptr(), N, False, "cpu", 0)
    print("linear 768x684", dt, round((time.perf_counter()-t)/20*1e3,3), "ms")
model=load_engine(default_engine_path()).model.eval()
B,H,W=16,6,24
f=torch.rand(B,684,H,W); mask=torch.ones(B,H,W,dtype=torch.bool)
for wd,fd in (("fp32","fp32"),("fp16","fp16"),("int8","fp16")):
    dec=native.NativeDecoder(model.l2r,"cpu",weight_dtype=wd,feat_dtype=fd)
    feats=dec.prepare(f,mask); rows=torch.arange(B,dtype=torch.int32).repeat_interleave(10)
    wa=torch.randn(N,dec.d); cov=torch.rand(N,H*W)
    dec.attend(feats,wa,cov,rows)
    t=time.perf_counter()
    for _ in range(5): dec.attend(feats,wa,cov,rows)
    ta=(time.perf_counter()-t)/5
    prev=torch.zeros(N,dtype=torch.int32); h=torch.randn(N,dec.n)
    dec.step(feats,prev,h,cov,rows)
    t=time.perf_counter()
    for _ in range(5): dec.step(feats,prev,h,cov,rows)
    print(wd,fd,"attend",round(ta*1e3,2),"ms  step",round((time.perf_counter()-t)/5*1e3,2),"ms")
