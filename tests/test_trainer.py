"""The trainer end to end on a tiny model and a tiny self-made dataset (CPU), fixed-shape packing for CUDA
graphs, the resumable state, and (GPU only) a graph-replayed training step against the eager one."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from abm_rt.data.buckets import geometric_grid
from abm_rt.data.crohme import Sample
from abm_rt.data.vocab import Vocab
from abm_rt.model import ABM, ModelConfig, initialize
from training.checkpoint import load_state, save_state, state_from_engine
from training.packed import ShapeGrid, pack_fixed_shapes
from training.trainer import TrainConfig, Trainer, should_pause

TINY = {"growth": 8, "block_depth": 2, "hidden": 32, "embed": 32, "attn": 32}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny shapes gain nothing from two on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _samples(n: int, seed: int, max_h: int = 300, max_w: int = 900) -> list[Sample]:
    rng = np.random.default_rng(seed)
    vocab = Vocab.default()
    out = []
    for i in range(n):
        h, w = int(rng.integers(20, max_h)), int(rng.integers(20, max_w))
        image = ((rng.random((h, w)) > 0.9) * 255).astype(np.uint8)
        tokens = [vocab.tokens[int(t)] for t in rng.integers(2, len(vocab) - 1, int(rng.integers(1, 40)))]
        out.append(Sample(f"s{i}", image, tokens))
    return out


def test_geometric_grid():
    assert geometric_grid(64, 512, 1.5, 16) == [64, 96, 144, 224, 336, 512]
    assert geometric_grid(10, 10, 2.0, 1) == [10]


def test_pack_fixed_shapes_properties():
    """Every canvas is on the grid (or past it, rounded), B is one number per canvas, T is on the step grid
    and holds the longest label, every sample is used, pixels past an image are zero, and the number of
    distinct shapes stays small."""
    samples = _samples(300, seed=0)
    vocab = Vocab.default()
    grid = ShapeGrid()
    batches = pack_fixed_shapes(samples, vocab, torch.device("cpu"), max_batch=16, max_batch_pixels=600_000,
                                grid=grid)
    by_name = {s.name: s for s in samples}
    counts: dict[str, int] = {}
    per_canvas: dict[tuple[int, int], set[int]] = {}
    for b in batches:
        B, _, H, W = b.images.shape
        T = b.l2r_in.shape[1]
        assert H in grid.heights and W in grid.widths
        assert T in grid.steps and T >= int(b.lengths.max()) + 1
        assert B <= max(1, min(16, 600_000 // (H * W)))
        per_canvas.setdefault((H, W), set()).add(B)
        for j, name in enumerate(b.names):
            s = by_name[name]
            h, w = s.image.shape
            assert int(b.heights[j]) == h and int(b.widths[j]) == w and int(b.lengths[j]) == len(s.tokens)
            assert torch.equal(b.images[j, 0, :h, :w], torch.from_numpy(s.image))
            assert int(b.images[j, 0].sum()) == int(s.image.astype(np.int64).sum())   # zero outside
            assert b.l2r_in[j, 1:len(s.tokens) + 1].tolist() == vocab.encode(s.tokens)
            counts[name] = counts.get(name, 0) + 1
    assert set(counts) == set(by_name) and max(counts.values()) <= 2
    assert all(len(v) == 1 for v in per_canvas.values())
    shapes = {(tuple(b.images.shape), b.l2r_in.shape[1]) for b in batches}
    assert len(shapes) <= len(grid.heights) * len(grid.widths) * len(grid.steps)
    canvases = {(b.images.shape[2], b.images.shape[3]): b.images.shape[0] for b in batches}
    assert sum(counts.values()) - len(samples) <= sum(B - 1 for B in canvases.values())   # last batches only


def _write_split(folder, samples: list[Sample]) -> None:
    folder.mkdir(parents=True)
    lines = []
    for s in samples:
        Image.fromarray(255 - s.image).save(folder / f"{s.name}.png")    # black ink on white, as CROHME
        lines.append(f"{s.name}\t{' '.join(s.tokens)}")
    (folder / "caption.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("optimizer", ["adamw", "adadelta"])
def test_trainer_runs_logs_and_resumes(tmp_path, optimizer):
    """Two epochs on 12 images (fixed-shape batches, as CUDA-graph training packs them; on a CPU they train
    eagerly), validation decode, one JSON line per epoch, a saved state; a second Trainer resumes at epoch 2
    from that state with the same weights, runs a third epoch and pauses there at its --stop-after."""
    data = tmp_path / "crohme"
    _write_split(data / "train", _samples(12, seed=1, max_h=120, max_w=300))
    _write_split(data / "2014", _samples(4, seed=2, max_h=120, max_w=300))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=2, optimizer=optimizer,
                      lr=1e-3 if optimizer == "adamw" else 1.0, max_batch=4, batch_pixels=200_000,
                      cuda_graphs=True, val_every=1, val_beam=2, device="cpu", model=TINY, save_every=1)
    trainer = Trainer(cfg)
    assert trainer.graphed is None                      # no CUDA device: eager steps on fixed shapes
    assert all(b.l2r_in.shape[1] in ShapeGrid().steps for b in trainer.train_batches)
    meta = trainer.run()
    assert meta["epoch"] == 2 and meta["step"] == 2 * len(trainer.train_batches)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch" in r and "ce_l2r" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert np.isfinite([r["ce_l2r"], r["ce_r2l"], r["kl"], r["val_ce"]]).all()
        assert r["val_total"] == 4 and 0 <= r["val_exprate"] <= 100
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    # a schedule of 5 epochs, but --stop-after allows less than one more: one epoch, then a saved pause
    resumed = Trainer(TrainConfig(**{**cfg.__dict__, "epochs": 5, "stop_after": 1e-3}))
    assert resumed.meta["epoch"] == 2 and resumed.meta["step"] == meta["step"]
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert resumed.run()["epoch"] == 3
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "pause" and last["epoch"] == 3


def test_warm_start_and_kl_warmup(tmp_path):
    """--init-from copies the engine's encoder and L2R weights into a fresh run (R2L keeps its own init),
    also into a run with another dropout rate;
    the KL weight ramps linearly to kl_weight over kl_warmup_epochs; the CLI parses both options."""
    from abm_rt.engine_dir import save_engine
    from training.__main__ import build_parser

    data = tmp_path / "crohme"
    _write_split(data / "train", _samples(6, seed=4, max_h=100, max_w=200))
    _write_split(data / "2014", _samples(2, seed=5, max_h=100, max_w=200))
    torch.manual_seed(7)
    source = ABM(ModelConfig(**TINY))
    initialize(source)
    save_engine(tmp_path / "engine", source, Vocab.default())
    args = build_parser().parse_args(["--init-from", str(tmp_path / "engine"), "--kl-warmup-epochs", "2"])
    assert args.init_from == str(tmp_path / "engine") and args.kl_warmup_epochs == 2.0
    trainer = Trainer(TrainConfig(data=str(data), out=str(tmp_path / "run"), device="cpu", model=TINY,
                                  init_from=args.init_from, kl_warmup_epochs=2.0))
    for k, v in source.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k
    assert not torch.equal(trainer.model.r2l.W_o.weight, source.l2r.W_o.weight)
    assert [trainer._kl_weight_at(s, 10) for s in (0, 9, 19, 40)] == pytest.approx([0.4, 4.0, 8.0, 8.0])
    with pytest.raises(ValueError, match="model dimensions"):
        Trainer(TrainConfig(data=str(data), out=str(tmp_path / "run2"), device="cpu",
                            model={**TINY, "hidden": 48}, init_from=str(tmp_path / "engine")))
    # Dropout is a training setting, not a dimension: a dropout-0.3 fine-tune warm starts from it.
    stronger = Trainer(TrainConfig(data=str(data), out=str(tmp_path / "run3"), device="cpu",
                                   model={**TINY, "dropout": 0.3}, init_from=str(tmp_path / "engine")))
    assert stronger.model.cfg.dropout == 0.3
    for k, v in source.state_dict().items():
        assert torch.equal(stronger.model.state_dict()[k], v), k


def test_warm_start_from_a_weights_export_keeps_r2l(tmp_path):
    """--init-from a trainer state (the weights-only export a device call hands back, fp32 or fp16) warm
    starts every branch, R2L included; fp16 weights arrive rounded, the rest exactly."""
    from training.checkpoint import save_state
    import subprocess
    import sys

    data = tmp_path / "crohme"
    _write_split(data / "train", _samples(6, seed=4, max_h=100, max_w=200))
    _write_split(data / "2014", _samples(2, seed=5, max_h=100, max_w=200))
    torch.manual_seed(3)
    source = ABM(ModelConfig(**TINY), bidirectional=True)
    initialize(source)
    opt = torch.optim.Adadelta(source.parameters(), lr=1.0)
    save_state(tmp_path / "w", source, opt, {"epoch": 4, "config": {"model": TINY}}, keep_moments=False)
    subprocess.run([sys.executable, "-m", "training.checkpoint", str(tmp_path / "w"), str(tmp_path / "w16"),
                    "--fp16"], check=True, capture_output=True)
    for src, exact in (("w", True), ("w16", False)):
        trainer = Trainer(TrainConfig(data=str(data), out=str(tmp_path / f"run_{src}"), device="cpu", model=TINY,
                                      init_from=str(tmp_path / src)))
        assert trainer.meta["init_from"] == str(tmp_path / src) and trainer.meta.get("epoch", 0) == 0
        got = trainer.model.state_dict()
        for k, v in source.state_dict().items():
            if exact or not v.is_floating_point():
                assert torch.equal(got[k], v), k
            else:
                torch.testing.assert_close(got[k], v, rtol=1e-3, atol=1e-4, msg=k)
    with pytest.raises(ValueError, match="model dimensions"):
        Trainer(TrainConfig(data=str(data), out=str(tmp_path / "run_bad"), device="cpu",
                            model={**TINY, "hidden": 48}, init_from=str(tmp_path / "w")))


def test_weight_average_math_and_applied_restores():
    """WeightAverage follows a <- d a + (1 - d) w with the warm-up decay min(d, (1+n)/(10+n)); applied()
    puts the average into the parameters' own storage and gives the raw weights back on exit."""
    from training.ema import WeightAverage

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    ema = WeightAverage(list(lin.parameters()), decay=0.99)
    expected = [p.detach().clone() for p in lin.parameters()]
    for n in range(30):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.99, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, lin.parameters())]
    for a, e in zip(ema.average, expected):
        torch.testing.assert_close(a, e)
    raw = [p.detach().clone() for p in lin.parameters()]
    pointers = [p.data_ptr() for p in lin.parameters()]
    with ema.applied():
        assert [p.data_ptr() for p in lin.parameters()] == pointers       # copied in, never swapped
        for p, a in zip(lin.parameters(), ema.average):
            assert torch.equal(p, a)
    for p, r in zip(lin.parameters(), raw):
        assert torch.equal(p, r)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(list(lin.parameters()), decay=1.0)


def test_uniform_weight_average_is_the_mean_of_the_updates():
    """With decay None the average is the plain mean of the weights at every update (the starting weights not
    included)."""
    from training.ema import WeightAverage

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    mean = WeightAverage(list(lin.parameters()), decay=None)
    seen = []
    for _ in range(5):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(torch.randn_like(p))
        seen.append([p.detach().clone() for p in lin.parameters()])
        mean.update()
    for i, a in enumerate(mean.average):
        torch.testing.assert_close(a, torch.stack([s[i] for s in seen]).mean(0))


def _ema_run_config(tmp_path, epochs: int) -> TrainConfig:
    """A tiny Adadelta run with an EMA and a validation decode every epoch, on 8 + 3 self-made images."""
    data = tmp_path / "crohme"
    _write_split(data / "train", _samples(8, seed=1, max_h=100, max_w=240))
    _write_split(data / "2014", _samples(3, seed=2, max_h=100, max_w=240))
    return TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=epochs, optimizer="adadelta", lr=1.0,
                       max_batch=4, batch_pixels=200_000, val_every=1, val_beam=2, device="cpu", model=TINY,
                       ema_decay=0.5)


def test_trainer_with_ema_validates_both_and_saves_the_better(tmp_path):
    """With ema_decay the decode epochs log the average's figures next to the raw ones, best_engine holds
    the weights (raw or average) that the provenance names, and training itself keeps the raw weights."""
    from abm_rt.engine_dir import load_engine

    trainer = Trainer(_ema_run_config(tmp_path, epochs=1))
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "ce_l2r" in r]
    assert all("ema_val_exprate" in r and np.isfinite(r["ema_val_ce"]) for r in epochs)
    assert epochs[0]["ema_val_ce"] != epochs[0]["val_ce"]            # a different set of weights
    assert epochs[0]["saved_best"] in ("raw", "ema")
    engine = load_engine(tmp_path / "run" / "best_engine")
    best = next(r for r in reversed(epochs) if r.get("saved_best"))
    assert engine.config["provenance"]["weights"] == best["saved_best"] == trainer.meta["best_weights"]
    assert any(not torch.equal(p, a) for p, a in zip(trainer.ema.params, trainer.ema.average))
    source = trainer.ema.average if best["saved_best"] == "ema" else [p.detach() for p in trainer.ema.params]
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    saved = dict(engine.model.named_parameters())
    assert engine.has_r2l and set(names) == set(saved)     # the engine keeps R2L too, for rescoring
    for n, v in zip(names, source):
        assert torch.equal(saved[n].detach().cpu(), v.cpu()), n


def test_trainer_tail_average_is_the_mean_of_epoch_end_weights(tmp_path):
    """--average-from 2 on a 3-epoch run: epochs 2 and 3 log 'tail' figures beside the raw and EMA ones (over 1,
    then 2 epochs); the mean equals that of the weights at the end of epochs 2 and 3; inside ``tail_weights`` the
    model holds that mean with recomputed BN statistics (those of ``recalibrate_batchnorm`` on a copy), as does
    the ``tail_engine`` the run's end writes; on exit the raw weights and statistics are back, bit for bit, in
    the same storage."""
    import copy

    from training.bn_recalibrate import batchnorm_buffers, recalibrate_batchnorm

    cfg = TrainConfig(**{**_ema_run_config(tmp_path, epochs=3).__dict__, "average_from": 2, "average_bn_batches": 2})
    trainer = Trainer(cfg)
    ends = []
    train_epoch = trainer.train_epoch

    def recording_epoch():
        out = train_epoch()
        ends.append([p.detach().clone() for p in trainer.model.parameters() if p.requires_grad])
        return out

    trainer.train_epoch = recording_epoch
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    epochs = {r["epoch"]: r for r in records if "ce_l2r" in r}
    assert "tail_val_exprate" not in epochs[1]
    assert epochs[2]["tail_epochs"] == 1 and epochs[3]["tail_epochs"] == 2
    assert all(np.isfinite(epochs[e]["tail_val_ce"]) and "ema_val_ce" in epochs[e] for e in (2, 3))
    for i, a in enumerate(trainer.tail.average):
        torch.testing.assert_close(a, (ends[1][i] + ends[2][i]) / 2)
    from abm_rt.engine_dir import load_engine

    tail_engine = load_engine(tmp_path / "run" / "tail_engine")     # written at the end of the run
    assert tail_engine.config["provenance"]["tail_epochs"] == [2, 3] and tail_engine.has_r2l

    raw = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    pointers = [t.data_ptr() for t in batchnorm_buffers(trainer.model)]
    reference = copy.deepcopy(trainer.model)
    with torch.no_grad():
        for p, a in zip([p for p in reference.parameters() if p.requires_grad], trainer.tail.average):
            p.copy_(a)
    recalibrate_batchnorm(reference, trainer.train_batches[::max(1, len(trainer.train_batches) // 2)][:2])
    saved = tail_engine.model.state_dict()
    with trainer.tail_weights():
        inside = trainer.model.state_dict()
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(inside[name], value, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(saved[name], value, rtol=1e-6, atol=1e-7)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, raw[name]), name
    assert [t.data_ptr() for t in batchnorm_buffers(trainer.model)] == pointers


def test_state_rebuilt_from_the_best_engine_resumes_the_schedule(tmp_path):
    """When a run's state is lost but its best engine and log came back, ``--from-engine`` rebuilds a
    weights-only state: the trainer resumes after the engine's epoch, at the logged step and training
    seconds, from the engine's weights (every branch), and trains on."""
    import subprocess
    import sys

    from abm_rt.engine_dir import load_engine

    cfg = _ema_run_config(tmp_path, epochs=2)
    Trainer(cfg).run()
    engine = load_engine(tmp_path / "run" / "best_engine")
    epoch = engine.config["provenance"]["epoch"]
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    logged = {r["epoch"]: r for r in records if "ce_l2r" in r}
    subprocess.run([sys.executable, "-m", "training.checkpoint", "--from-engine", str(tmp_path / "run" / "best_engine"),
                    str(tmp_path / "run" / "log.jsonl"), str(tmp_path / "lost" / "state")], check=True,
                   capture_output=True)
    resumed = Trainer(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "lost"), "epochs": 3}))
    assert resumed.meta["epoch"] == epoch and resumed.meta["step"] == logged[epoch]["step"]
    assert resumed.meta["train_seconds"] == pytest.approx(sum(logged[e]["epoch_seconds"] for e in range(1, epoch + 1)))
    got = resumed.model.state_dict()
    for k, v in engine.model.state_dict().items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k
    assert resumed.run()["epoch"] == 3
    (tmp_path / "short.jsonl").write_text("")
    with pytest.raises(ValueError, match="lacks epochs"):
        state_from_engine(tmp_path / "run" / "best_engine", tmp_path / "short.jsonl", tmp_path / "bad")


def test_state_round_trip_keeps_optimizer_flags_and_tensor_lr(tmp_path):
    """save_state writes a tensor lr as a float; load_state restores weights and moments and keeps the
    loading optimizer's own lr object and flags (a CUDA-graph run's tensor lr must stay a tensor)."""
    torch.manual_seed(0)
    model = ABM(ModelConfig(**TINY), bidirectional=True)
    initialize(model)
    opt = torch.optim.Adadelta(model.parameters(), lr=torch.tensor(0.5), foreach=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    save_state(tmp_path / "s", model, opt, {"epoch": 1})
    model2 = ABM(ModelConfig(**TINY), bidirectional=True)
    lr = torch.tensor(0.25)
    opt2 = torch.optim.Adadelta(model2.parameters(), lr=lr, foreach=True)
    assert load_state(tmp_path / "s", model2, opt2)["epoch"] == 1
    assert opt2.param_groups[0]["lr"] is lr
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    p1, p2 = next(model.parameters()), next(model2.parameters())
    assert torch.equal(opt.state[p1]["square_avg"], opt2.state[p2]["square_avg"])

    # weights only (what a device call hands back to bundle an engine): no optimizer tensors at all
    save_state(tmp_path / "w", model, opt, {"epoch": 1, "config": {"model": TINY}}, keep_moments=False)
    from safetensors.torch import load_file
    names = [k for f in (tmp_path / "w").glob("*.safetensors") for k in load_file(str(f))]
    assert names and all(k.startswith("model.") for k in names)
    from training.checkpoint import export_weights
    export_weights(tmp_path / "s", tmp_path / "w2")          # the same, from a full saved state
    assert sorted(k for f in (tmp_path / "w2").glob("*.safetensors") for k in load_file(str(f))) == sorted(names)
    from training.bundle import bundle
    from abm_rt.engine_dir import load_engine
    engine = load_engine(bundle(tmp_path / "w", tmp_path / "engine"))
    assert torch.equal(engine.model.l2r.W_o.weight, model.l2r.W_o.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("optimizer,pairing,streams,soft,smoothing,paired", [
    ("adamw", "aligned", False, False, 0.0, False), ("adadelta", "aligned", False, False, 0.0, False),
    ("adadelta", "paper", False, False, 0.0, False), ("adadelta", "aligned", True, False, 0.0, False),
    ("adadelta", "aligned", False, True, 0.0, False), ("adadelta", "aligned", False, False, 0.1, False),
    ("adadelta", "aligned", False, False, 0.0, True)])
def test_graphed_step_equals_eager_step(tmp_path, optimizer, pairing, streams, soft, smoothing, paired):
    """From the same weights and optimizer state, one replayed graph step and one eager step on a new batch
    of the captured shape give the same parameters (fp32, dropout 0), and the loss sums agree. Both KL
    pairings capture (the paper's one once used ``nonzero``, a host sync that broke the capture). With
    ``streams`` the graph runs the R2L branch on a second stream (--branch-streams) and the eager reference
    runs everything on one: the fork and join are captured without changing the step. With ``soft`` the
    batches carry teacher soft targets (--teachers): the graph reads each batch's own. ``smoothing``:
    --label-smoothing in the captured CE. ``paired``: --paired-branches, both branches in one stacked pass, and
    the eager reference runs them separately: the stacked pass captures and computes the same step."""
    from training.graphed import GraphedTrainStep
    from training.trainer import batch_loss

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    samples = _samples(64, seed=3, max_h=100, max_w=300)
    batches = pack_fixed_shapes(samples, Vocab.default(), dev, max_batch=8, max_batch_pixels=400_000)
    key = lambda b: (tuple(b.images.shape), b.l2r_in.shape[1])
    pair = next((a, b) for i, a in enumerate(batches) for b in batches[i + 1:] if key(a) == key(b))
    if soft:
        g = torch.Generator(device=dev).manual_seed(9)
        for b in pair:
            for name in ("l2r_soft", "r2l_soft"):
                shape = (*b.l2r_in.shape, len(Vocab.default()))
                setattr(b, name, torch.softmax(3 * torch.randn(shape, device=dev, generator=g), -1).to(torch.bfloat16))
    cfg = TrainConfig(precision="fp32", model={**TINY, "dropout": 0.0}, pairing=pairing, label_smoothing=smoothing,
                      paired_branches=paired)
    eager_cfg = TrainConfig(**{**asdict(cfg), "paired_branches": False})
    torch.manual_seed(0)
    model = ABM(ModelConfig(**cfg.model), bidirectional=True)
    initialize(model)
    model.to(dev).train()
    lr = torch.tensor(1e-3 if optimizer == "adamw" else 1.0, device=dev)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=True)
    else:
        opt = torch.optim.Adadelta(model.parameters(), lr=lr, foreach=True, capturable=True)
    side = torch.cuda.Stream() if streams else None
    step = GraphedTrainStep(model, opt, lambda b, cache: batch_loss(model, b, cfg, "cuda", cache, side_stream=side),
                            100.0)
    assert step.step(pair[0]) is False                 # warm-up (a real step) and capture
    snapshot = ({k: v.clone() for k, v in model.state_dict().items()},
                {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()})

    def restore():
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(snapshot[0][k])
            for p, st in opt.state.items():
                for k, v in st.items():
                    v.copy_(snapshot[1][id(p)][k])

    restore()
    step.reset_sums()
    assert step.step(pair[1]) is True                  # replay
    graphed = {k: v.clone() for k, v in model.state_dict().items()}
    graphed_sums = step.sums.clone()
    restore()
    opt.zero_grad(set_to_none=False)
    loss, parts = batch_loss(model, pair[1], eager_cfg, "cuda")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(step.params, 100.0, foreach=True)
    opt.step()
    assert torch.allclose(parts, graphed_sums, rtol=1e-5, atol=1e-6), (parts, graphed_sums)
    worst = 0.0
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            moved = (snapshot[0][k] - v).abs().max()
            err = (graphed[k] - v).abs().max()
            assert torch.isfinite(graphed[k]).all(), k
            worst = max(worst, float(err / moved.clamp(min=1e-12)))
    print(f"{optimizer}: worst |graphed - eager| / |update| over tensors = {worst:.2e}; "
          f"{len(step.graphs)} graph(s), capture {step.capture_seconds:.2f} s")
    assert worst < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a second CUDA stream needs a CUDA GPU")
def test_branch_streams_eager_gradients_equal_one_stream():
    """Eager (no graph): the loss parts and every gradient are the same whether the R2L branch runs on a
    second stream or on the current one (fp32, dropout 0), on fresh random batches."""
    from training.trainer import batch_loss

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    batches = pack_fixed_shapes(_samples(24, seed=11, max_h=100, max_w=300), Vocab.default(), dev, max_batch=8,
                                max_batch_pixels=400_000)
    cfg = TrainConfig(precision="fp32", model={**TINY, "dropout": 0.0})
    torch.manual_seed(5)
    model = ABM(ModelConfig(**cfg.model), bidirectional=True)
    initialize(model)
    model.to(dev).train()
    side = torch.cuda.Stream()
    for b in batches[:3]:
        got = []
        for stream in (None, side):
            model.zero_grad(set_to_none=True)
            loss, parts = batch_loss(model, b, cfg, "cuda", side_stream=stream)
            loss.backward()
            got.append((parts.clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        torch.cuda.synchronize()
        (p1, g1), (p2, g2) = got
        assert torch.isfinite(p1).all() and torch.allclose(p1, p2, rtol=1e-6, atol=1e-7), (p1, p2)
        assert g1.keys() == g2.keys() and any(n.startswith("r2l.") for n in g2)
        for n in g1:
            assert torch.allclose(g1[n], g2[n], rtol=1e-5, atol=1e-7), n


def test_branch_streams_needs_cuda(tmp_path):
    """--branch-streams on a CPU is refused with the reason, before any data loads."""
    cfg = TrainConfig(data=str(tmp_path / "absent"), out=str(tmp_path / "run"), device="cpu", model=TINY,
                      branch_streams=True)
    with pytest.raises(ValueError, match="second CUDA stream"):
        Trainer(cfg)


def test_adamw_at_an_adadelta_rate_is_refused(tmp_path):
    """lr 0.5 is an Adadelta rate; with AdamW it is a forgotten --optimizer, refused before any data loads."""
    cfg = TrainConfig(data=str(tmp_path / "absent"), out=str(tmp_path / "run"), optimizer="adamw", lr=0.5,
                      device="cpu", model=TINY)
    with pytest.raises(ValueError, match="--optimizer adadelta"):
        Trainer(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graph_replays_draw_fresh_dropout_and_augmentation(tmp_path):
    """Replaying one batch's graph twice at lr 0 gives different losses when dropout and augmentation are on
    (each replay draws new masks and maps from the graph-safe generator) and the same losses when both are
    off. A frozen draw would make dropout a fixed sub-network per batch shape: far weaker regularisation."""
    from training.graphed import GraphedTrainStep
    from training.trainer import batch_loss

    dev = torch.device("cuda")
    samples = _samples(32, seed=5, max_h=100, max_w=300)
    batch = pack_fixed_shapes(samples, Vocab.default(), dev, max_batch=8, max_batch_pixels=400_000)[0]
    sums = {}
    for random_on in (False, True):
        aug = dict(scale_min=0.7, scale_max=1.4, shear_max=0.2) if random_on else {}
        cfg = TrainConfig(precision="fp32", model={**TINY, "dropout": 0.2 if random_on else 0.0}, **aug)
        torch.manual_seed(0)
        model = ABM(ModelConfig(**cfg.model), bidirectional=True)
        initialize(model)
        model.to(dev).train()
        opt = torch.optim.Adadelta(model.parameters(), lr=torch.tensor(0.0, device=dev), foreach=True,
                                   capturable=True)
        step = GraphedTrainStep(model, opt, lambda b, cache, cfg=cfg, model=model: batch_loss(model, b, cfg, "cuda",
                                                                                              cache), 100.0)
        step.step(batch)                               # warm-up and capture
        replays = []
        for _ in range(2):
            step.reset_sums()
            assert step.step(batch) is True
            replays.append(step.sums.clone())
        sums[random_on] = replays
    assert torch.allclose(sums[False][0], sums[False][1], rtol=1e-6, atol=1e-7), sums[False]
    assert not torch.allclose(sums[True][0], sums[True][1], rtol=1e-4, atol=0), sums[True]


def test_length_curriculum_trains_the_shortest_labels_first(tmp_path):
    """With ``curriculum_epochs`` N, epoch e trains on the ceil(f n) batches with the shortest longest label,
    f = start + (1 - start) e / N, and on every batch from epoch N on; the log says how many batches and
    up to which label length each curriculum epoch used, and the steps count only the batches trained."""
    data = tmp_path / "crohme"
    _write_split(data / "train", _samples(24, seed=3, max_h=120, max_w=300))
    _write_split(data / "2014", _samples(2, seed=4, max_h=120, max_w=300))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=3, optimizer="adadelta", lr=1.0,
                      max_batch=2, batch_pixels=200_000, cuda_graphs=True, val_every=10, device="cpu",
                      model=TINY, curriculum_epochs=2, curriculum_start=0.25)
    trainer = Trainer(cfg)
    batches = trainer.train_batches
    n = len(batches)
    longest = [int(b.lengths.max()) for b in batches]
    for epoch, fraction in [(0, 0.25), (1, 0.625)]:
        chosen = trainer.epoch_batches(epoch)
        k = int(np.ceil(fraction * n))
        assert len(chosen) == k == len(set(chosen))
        left_out = set(range(n)) - set(chosen)
        assert all(longest[i] <= longest[j] for i in chosen for j in left_out)
    assert trainer.epoch_batches(2) == list(range(n))
    meta = trainer.run()
    sizes = [int(np.ceil(0.25 * n)), int(np.ceil(0.625 * n)), n]
    assert meta["step"] == sum(sizes)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "ce_l2r" in r]
    assert [r.get("curriculum_batches") for r in epochs] == [sizes[0], sizes[1], None]
    for r, k in zip(epochs[:2], sizes[:2]):
        assert r["curriculum_max_len"] == sorted(longest)[k - 1]
    # throughput counts distinct images: a full epoch trains all 24, however many batches repeat some
    assert epochs[2]["images_per_s"] * epochs[2]["epoch_seconds"] == pytest.approx(24)
    first = {name for i in trainer.epoch_batches(0) for name in batches[i].names}
    assert epochs[0]["images_per_s"] * epochs[0]["epoch_seconds"] == pytest.approx(len(first))


def test_teachers_attach_soft_targets_and_add_the_kd_term(tmp_path):
    """--teachers: every training batch carries the teachers' mean softmax(z / T), teacher-forced on its own
    inputs (checked against two engines by hand on one batch); an epoch logs a finite kd; batch_loss adds
    teacher_weight * T^2 * kd, and a teacher without R2L is refused."""
    from abm_rt.engine_dir import save_engine
    from training.losses import soft_target_kl
    from training.trainer import batch_loss

    data = tmp_path / "crohme"
    _write_split(data / "train", _samples(8, seed=11, max_h=100, max_w=200))
    _write_split(data / "2014", _samples(2, seed=12, max_h=100, max_w=200))
    teachers = []
    for k in range(2):
        torch.manual_seed(20 + k)
        m = ABM(ModelConfig(**TINY), bidirectional=True)
        initialize(m)
        save_engine(tmp_path / f"t{k}", m, Vocab.default(), with_r2l=True)
        teachers.append(m.eval())
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, device="cpu", model=TINY,
                      precision="fp32", max_batch=4, batch_pixels=200_000, val_every=1, val_beam=2,
                      teachers=f"{tmp_path / 't0'},{tmp_path / 't1'}", teacher_temperature=2.0, teacher_weight=0.5)
    trainer = Trainer(cfg)
    b = trainer.train_batches[0]
    B, T = b.l2r_in.shape
    assert b.l2r_soft.shape == b.r2l_soft.shape == (B, T, len(Vocab.default()))
    assert b.l2r_soft.dtype == torch.bfloat16
    with torch.no_grad():
        x, pm = b.inputs()
        want = {"l2r": 0, "r2l": 0}
        for m in teachers:
            f, fm = m.encode(x, pm)
            want["l2r"] = want["l2r"] + torch.softmax(m.l2r.teacher_forward(f, fm, b.l2r_in)[0] / 2.0, -1) / 2
            want["r2l"] = want["r2l"] + torch.softmax(m.r2l.teacher_forward(f, fm, b.r2l_in)[0] / 2.0, -1) / 2
    torch.testing.assert_close(b.l2r_soft.float(), want["l2r"], rtol=1e-2, atol=4e-3)
    torch.testing.assert_close(b.r2l_soft.float(), want["r2l"], rtol=1e-2, atol=4e-3)

    trainer.model.eval()                            # deterministic: the parts must add up to the loss
    with torch.no_grad():
        loss, parts = batch_loss(trainer.model, b, cfg, "cpu")
        feats, fmask = trainer.model.encode(*b.inputs())
        zl, _ = trainer.model.l2r.teacher_forward(feats, fmask, b.l2r_in)
        zr, _ = trainer.model.r2l.teacher_forward(feats, fmask, b.r2l_in)
        kd = soft_target_kl(zl, b.l2r_soft, b.lengths, 2.0) + soft_target_kl(zr, b.r2l_soft, b.lengths, 2.0)
    assert float(parts[3]) == pytest.approx(float(kd), rel=1e-5)
    assert float(loss) == pytest.approx(float(parts[0] + parts[1] + cfg.kl_weight * parts[2] + 0.5 * 4.0 * kd),
                                        rel=1e-5)
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "teacher_seconds" in records[0]
    assert np.isfinite(records[1]["kd"]) and records[1]["kd"] > 0

    torch.manual_seed(30)
    lone = ABM(ModelConfig(**TINY), bidirectional=False)
    initialize(lone)
    save_engine(tmp_path / "no_r2l", lone, Vocab.default())
    with pytest.raises(ValueError, match="no R2L branch"):
        Trainer(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "run2"), "teachers": str(tmp_path / "no_r2l")}))


def test_label_smoothing_reaches_both_branches_ce(tmp_path):
    """--label-smoothing eps: batch_loss's CE parts are sequence_ce with eps for both branches (where
    the plain CE of the same logits differs), and the loss still adds up from its parts."""
    from training.losses import sequence_ce
    from training.trainer import batch_loss

    data = tmp_path / "crohme"
    _write_split(data / "train", _samples(4, seed=13, max_h=100, max_w=200))
    _write_split(data / "2014", _samples(2, seed=14, max_h=100, max_w=200))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, device="cpu", model=TINY,
                      precision="fp32", max_batch=4, batch_pixels=200_000, label_smoothing=0.1)
    trainer = Trainer(cfg)
    b = trainer.train_batches[0]
    trainer.model.eval()
    with torch.no_grad():
        loss, parts = batch_loss(trainer.model, b, cfg, "cpu")
        feats, fmask = trainer.model.encode(*b.inputs())
        zl, _ = trainer.model.l2r.teacher_forward(feats, fmask, b.l2r_in)
        zr, _ = trainer.model.r2l.teacher_forward(feats, fmask, b.r2l_in)
    assert float(parts[0]) == pytest.approx(float(sequence_ce(zl, b.l2r_tgt, b.lengths, 0.1)), rel=1e-5)
    assert float(parts[1]) == pytest.approx(float(sequence_ce(zr, b.r2l_tgt, b.lengths, 0.1)), rel=1e-5)
    assert float(parts[0]) != pytest.approx(float(sequence_ce(zl, b.l2r_tgt, b.lengths)), rel=1e-4)
    assert float(loss) == pytest.approx(float(parts[0] + parts[1] + cfg.kl_weight * parts[2]), rel=1e-5)


def test_should_pause_discounts_the_capture_epoch():
    """--stop-after estimates the next epoch from the epochs after the first (which carries the graph capture):
    session 4's figures (a first epoch of 117.3 s, capture and validation included, 48.3 s the next, 165.6 s
    elapsed, 260 s allowed) go on."""
    assert not should_pause(165.6, [117.3, 48.3], 260.0)
    assert should_pause(214.0, [117.3, 48.3, 48.4], 260.0)          # 214 + 48.4 * 1.15 > 260
    assert should_pause(117.3, [117.3], 200.0)                      # alone, the first epoch is the estimate
    assert not should_pause(117.3, [117.3], 260.0)
    assert should_pause(100.0, [90.0, 40.0, 60.0, 40.0], 165.0)     # the costliest later epoch (validation) counts
    assert not should_pause(0.0, [], 1.0)
