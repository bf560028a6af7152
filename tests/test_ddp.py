"""SparksConv2d under DistributedDataParallel: 2 CPU processes, gloo backend.

Each rank builds its model from a different seed and draws from a different global RNG, so the
test fails unless DDP's broadcast plus the layer's own noise generator (seeded by buffers) make
the Gumbel noise, the hard selection and the training steps identical on every rank and equal
to one process training on the whole batch.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparks_ext.nn import SparksConv2d

STEPS = 5


def _model():
    return nn.Sequential(SparksConv2d(2, 4, 3, n_codewords=8, padding=1, hungarian_every=2, gumbel_scale=2.0),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _data():
    g = torch.Generator().manual_seed(42)
    return torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    selections = []
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        layer = model.module[0] if hasattr(model, "module") else model[0]
        selections.append(layer.selected.clone())
    return selections


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initialisation per rank: DDP must broadcast rank 0's
        model = nn.parallel.DistributedDataParallel(_model())
        torch.manual_seed(100 + rank)  # and a different global RNG: the noise must not use it
        x, y = _data()
        half = x.shape[0] // world
        selections = _train(model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        torch.save({"selections": selections, "state": model.module.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_two_ranks_agree_with_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    torch.manual_seed(0)
    single = _model()
    x, y = _data()
    selections = _train(single, x, y)

    for r in ranks:
        for a, b in zip(r["selections"], selections):
            assert torch.equal(a, b)
        assert r["selections"][-1].unique().numel() == 8
        for key, value in single.state_dict().items():
            torch.testing.assert_close(r["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # The hard selection changed during training, so the comparison above is not vacuous.
    assert any(not torch.equal(selections[0], s) for s in selections[1:])
