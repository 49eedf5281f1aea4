"""Fixtures that several test files share (pytest reads this file first)."""
import pytest
import torch

from test_decon import fake_checkpoint


@pytest.fixture
def one_thread():
    """On 64 px inputs, intra-op threads cost more in synchronization than they save, and when the cores are
    shared (parallel CI jobs) a 2-thread step can be 10x slower than a 1-thread one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    specs = {"r50_fpn": ("ml-fpn", "resnet50"), "r50_fcn": ("sl-fcn", "resnet50"),
             "r18_fpn_sl": ("sl-fpn", "resnet18"),
             "r18_fcn": ("sl-fcn", "resnet18"), "r18_none": ("slotcon", "resnet18"),
             "r18_densecl_fpn": ("densecl-ml-fpn", "resnet18")}
    paths = {name: str(d / f"{name}.pt") for name in specs}
    for name, (variant, arch) in specs.items():
        fake_checkpoint(paths[name], variant, arch)
    return paths

